"""Jobs as the API sees them: create (validated, then queued after commit), read, cancel, pause, resume.

Every read takes the caller and answers 404 for a job of another team, as for a missing one; what
the job owns (events, metrics, checkpoints, artifacts) is read with the team in the query too."""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.config import Settings
from app.datasets import service as datasets
from app.datasets.tables import Dataset
from app.db import after_commit, database_now, read_only
from app.errors import Conflict, DoesNotFit, Forbidden, Invalid, NotFound, field_errors
from app.idempotency import service as idempotency
from app.jobs import lineage, pace, preflight, repository, states, thinned
from app.jobs.admission import Admission, admit
from app.jobs.dispatch import send
from app.jobs.preflight import PreflightRunner, needs_validation
from app.jobs.schemas import EVAL_FIELDS, FIELDS_OF, JOB_FIELDS, MAX_METADATA, TRAIN_FIELDS, JobCreate
from app.jobs.stream import StreamStart, parse_event_id
from app.jobs.tables import Artifact, Checkpoint, Job, JobEvent, JobMetric
from app.models import repository as models
from app.models.tables import RegisteredModel
from app.pagination import MAX_ID, Page, check_limit, page
from app.quotas.service import check_can_queue, lock_team
from app.recent import Recent
from app.scheduling import service as scheduling
from app.scheduling.policy import PRIORITIES
from app.storage.base import Storage, delete_objects
from app.teams import service as teams
from app.teams.service import Caller
from app.text import counted, format_bytes, has_control_characters
from worker.training.estimate import keeps_reference_adapter
from worker.training.spec import JobSpec, describe_validation_error, excerpt

MAX_EXAMPLES = 5  # rows a preflight shows token by token (worker/training/preflight.py's MAX_EXAMPLES)

# What each of the job's own fields must be, said once whatever pydantic's complaint (JobCreate
# holds the rules; these are the messages clients have always been given).
_FIELD_RULES = {
    "dataset_id": "required: the id of a dataset you uploaded (POST /datasets)",
    "validation_dataset_id": "must be a dataset id, or null for none",
    "name": "must be one line of at most 200 characters, without control characters (line breaks, tabs, NUL)",
    "gpu_class": "lowercase letters, digits, '-' and '_', at most 50 characters",
    "metadata": f"at most {MAX_METADATA} string keys (<= 64 chars) with string values (<= 512 chars), without NUL",
    "priority": "one of low, normal, high (the order among your team's own queued jobs)",
    "initial_job_id": "must be the id of a job of yours that succeeded (its adapter is where this job starts), or null",
}


def parse_create(body: Any) -> tuple[dict, JobSpec]:
    """Split a POST /jobs body into the job's own fields and the engine's spec; report every bad field at once."""
    if isinstance(body, bytes | str):  # FastAPI hands over a body it did not read as JSON as it came
        raise Invalid("the body was not sent as JSON: send the job spec plus dataset_id as a JSON object with the "
                      "header 'Content-Type: application/json' (curl -H 'content-type: application/json' -d '{...}')")
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object: the job spec plus dataset_id and an optional name")
    try:
        request = JobCreate.model_validate(body)
    except ValidationError as exc:
        errors = [(field, _FIELD_RULES.get(field.split(".")[0], message))
                  for field, message in describe_validation_error(exc, JobCreate)]
        errors = list(dict(errors).items())  # one entry per field (metadata's keys all say the same)
        raise Invalid("invalid job: " + "; ".join(f"{f}: {m}" for f, m in errors), details=field_errors(errors),
                      code="invalid_job") from None
    meta = request.model_dump(include=set(JOB_FIELDS), exclude_unset=True)
    spec = JobSpec.model_validate({name: getattr(request, name) for name in JobSpec.model_fields})
    return meta, spec


def _admit(settings: Settings, model: RegisteredModel, spec: JobSpec, meta: dict, dataset_tokens: int) -> Admission:
    """Admission of a new job (POST /jobs and its preflight): a DPO job from another job's adapter also
    holds a frozen copy of that adapter as its reference; its datasets' tokens are held in host memory."""
    return admit(settings, model, spec, meta.get("gpu_class"),
                 reference_adapter=keeps_reference_adapter(spec, meta.get("initial_job_id") is not None),
                 dataset_tokens=dataset_tokens)


def create_once(session: Session, settings: Settings, caller: Caller, body: Any, keyed: idempotency.Keyed | None, *,
                storage: Storage | None = None, runner: PreflightRunner | None = None) -> tuple[Job, bool]:
    """create(), once per Idempotency-Key (app/idempotency/): the job and whether an earlier request with
    the same key made it (then nothing is checked or made again)."""
    if keyed is not None and (earlier := idempotency.earlier(session, caller.team_id, keyed)) is not None:
        return _made(session, caller, earlier), True
    try:
        return create(session, settings, caller, body, storage=storage, runner=runner, keyed=keyed), False
    except idempotency.MadeMeanwhile as meanwhile:  # by the same key through another API process
        return _made(session, caller, meanwhile.made), True


def _made(session: Session, caller: Caller, made: idempotency.Made) -> Job:
    job = repository.get(session, caller.team_id, made.job_id) if made.job_id else None
    assert job is not None  # the key is the team's and of a job endpoint, and goes with its job
    return job


def create(session: Session, settings: Settings, caller: Caller, body: Any, *, storage: Storage | None = None,
           runner: PreflightRunner | None = None, keyed: idempotency.Keyed | None = None) -> Job:
    """Validate, admit, preflight (with `storage` and `runner`: a job that cannot learn is refused) and
    queue; with `keyed`, bind its key to the job (create_once is the way in)."""
    meta, spec = parse_create(body)
    model, dataset_tokens = _checked_inputs(session, caller, meta, spec)
    admitted = _admit(settings, model, spec, meta, dataset_tokens)
    checked = (preflight.check(session, storage, runner, caller, model, admitted.spec, meta) if storage is not None
               else preflight.Checked(None, "preflight not run"))
    if checked.report:
        preflight.refuse_if_it_cannot_learn(checked.report)
    # Before the team's row, never after it: a forced removal of the model holds the model's row while it waits for
    # the rows of the jobs on it, and a worker ending one of those holds its job's row while it waits for its team's
    # (usage.ledger). Taken under the team's row, a creation waited for the model's with the team's held: Postgres
    # ended one of the three with "deadlock detected".
    _still_registered(session, spec, model)
    if keyed is not None:
        idempotency.check_not_made_meanwhile(session, caller.team_id, keyed)  # takes the team's row
    check_can_queue(session, settings, caller)  # last: it holds the team's row until the commit
    for field in ("dataset_id", "validation_dataset_id"):
        # Again under the team's row, which deleting a dataset takes too: one deleted during the preflight's
        # seconds is a 404 here, not a failed insert (500) or a queued job with no data (Postgres' SET NULL).
        if meta.get(field) is not None:
            _usable_dataset(session, caller, field, meta[field])
    if meta.get("initial_job_id") is not None:  # its adapter too, which deleting it takes the team's row for
        lineage.initial_job(session, caller.team_id, meta["initial_job_id"], spec)
    job = Job(
        created_at=database_now(session),  # a job's times are all the database's clock (docs/reliability.md)
        team_id=caller.team_id, name=meta.get("name", ""), user_metadata=meta.get("metadata"), status=states.QUEUED,
        spec=admitted.spec.model_dump(mode="json"), base_model=spec.base_model,
        dataset_id=meta["dataset_id"], validation_dataset_id=meta.get("validation_dataset_id"),
        created_dataset_id=meta["dataset_id"], created_validation_dataset_id=meta.get("validation_dataset_id"),
        initial_job_id=meta.get("initial_job_id"),
        queue=settings.queue_for(admitted.gpu_class), priority=PRIORITIES[meta.get("priority", "normal")],
        # The preflight's plan, shown from the start: a queued or loading job read "step 0/?" though the count was
        # known; the trainer's own count replaces it at its first step (progress.planned says which it is).
        total_steps=checked.report["steps"] if checked.report else None,
    )
    session.add(job)
    session.flush()
    if keyed is not None:
        idempotency.bind(session, caller.team_id, keyed, job_id=job.id)
    repository.add_event(session, job.id, "created", message=f"job created on queue {job.queue}; {admitted.note}",
                         data={"estimated_peak_bytes": admitted.estimate.total if admitted.estimate else None,
                               "estimated_resident_bytes": admitted.estimate.resident if admitted.estimate else None,
                               "estimate": admitted.estimate.parts if admitted.estimate else None,
                               # the host (CPU) memory it holds, by part: offloaded activations, paged overflow
                               "host_estimate": admitted.host_parts})
    _record_preflight(session, job, checked)
    # The message only says "job X is ready"; it must not reach a worker before the row exists.
    after_commit(session, lambda: send(settings, job.id, job.queue))
    return job


def _record_preflight(session: Session, job: Job, checked: preflight.Checked) -> None:
    """What preflight found, as the job's events: its numbers, then each warning (they do not block)."""
    report = checked.report
    if report is None:
        repository.add_event(session, job.id, "preflight", message=checked.note)
        return
    train = report["train"]
    steps = counted(report['steps'], 'step') if report["steps"] is not None else "steps decided on the GPU"
    # What the count rests on, where it may not be the run's (packing "auto", a set longer than the preflight reads):
    # the job's total_steps may then differ from the number here, and its events say why.
    note = f" ({report['steps_note']})" if report.get("steps_note") else ""
    repository.add_event(
        session, job.id, "preflight",
        message=f"preflight: {counted(train['kept_rows'], 'row')} to train on, {train['trained_tokens']:,} trained tokens "
                f"({train['trained_fraction']:.0%} of {train['tokens']:,}), {train['truncated_rows']:,} truncated; "
                f"{steps}{note}",
        data={key: report.get(key) for key in ("train", "validation", "steps", "epochs", "steps_per_epoch", "steps_note")})
    for warning in report["warnings"]:
        repository.add_event(session, job.id, "preflight_warning", level="warning", message=warning)


def preflight_report(session: Session, settings: Settings, storage: Storage, runner: PreflightRunner, caller: Caller,
                     body: Any) -> dict:
    """POST /jobs/preflight: the body of POST /jobs (and `examples`, rows shown token by token), answered
    with what the job would train on and where it would run, creating nothing."""
    examples = body.pop("examples", 1) if isinstance(body, dict) else 1
    if not isinstance(examples, int) or isinstance(examples, bool) or not 0 <= examples <= MAX_EXAMPLES:
        raise Invalid(f"examples: an integer from 0 to {MAX_EXAMPLES} (rows shown token by token), got {excerpt(examples)}",
                      details=field_errors([("examples", f"an integer from 0 to {MAX_EXAMPLES}")]), code="invalid_job")
    meta, spec = parse_create(body)
    model, dataset_tokens = _checked_inputs(session, caller, meta, spec)
    try:
        admitted = _admit(settings, model, spec, meta, dataset_tokens)
        placement: dict[str, Any] = {
            "gpu_class": admitted.gpu_class, "note": admitted.note, "spec": admitted.spec.model_dump(mode="json"),
            "estimate": admitted.estimate.parts if admitted.estimate else None, "host_estimate": admitted.host_parts,
            "estimated_peak_bytes": admitted.estimate.total if admitted.estimate else None}
        sized = admitted.spec
    except DoesNotFit as exc:
        placement, sized = {"gpu_class": None, "note": exc.message, "error": exc.body()["error"]}, spec
    checked = preflight.check(session, storage, runner, caller, model, sized, meta, examples=examples)
    if not checked.ran:
        raise preflight.PreflightBusy(f"{checked.note}; try again in a minute")
    return {"placement": placement, "report": checked.report, "note": checked.note,
            "can_learn": None if checked.report is None else not checked.report["refusals"]}


def _checked_inputs(session: Session, caller: Caller, meta: dict, spec: JobSpec) -> tuple[RegisteredModel, int]:
    """What POST /jobs and POST /jobs/preflight both check before admission: the base model is registered,
    the datasets are the team's, ready and of a format the method trains on, the initial job (if any) is the
    team's and left an adapter for the same base model, and a validation set is there where the spec needs one."""
    model = _registered_model(session, spec)
    tokens = 0  # the datasets' token estimates, which the run holds in host memory (admission counts them)
    for field in ("dataset_id", "validation_dataset_id"):
        if meta.get(field) is not None:
            dataset = _usable_dataset(session, caller, field, meta[field])
            lineage.check_format(spec, field, dataset)
            tokens += dataset.token_estimate
    if meta.get("initial_job_id") is not None:
        lineage.initial_job(session, caller.team_id, meta["initial_job_id"], spec)
    needs_validation(spec, meta)
    return model, tokens


def _still_registered(session: Session, spec: JobSpec, model: RegisteredModel) -> None:
    """The model the job was admitted on, read again and held shared until the commit: the preflight gave the
    connection back, and the model's row with it, so a removal during its seconds counted no job and went ahead
    (the job then failed when a worker took it), or another model came under the name (admitted on the old one)."""
    if _registered_model(session, spec, lock="share").id != model.id:
        raise Conflict(f"base_model: {excerpt(spec.base_model)} was registered again while this job was checked; "
                       "send it again to be admitted on the model registered now")


def _registered_model(session: Session, spec: JobSpec, *, lock: str | None = None) -> RegisteredModel:
    # No registered name has a control character, and Postgres would fail the lookup of one with NUL. `lock`
    # "share" (_still_registered only): held until the job is committed, so a removal of the model meanwhile waits,
    # then sees the job (models.remove_model). Not at the first read (_checked_inputs): held from there, the lock
    # spanned the preflight (its wait for a child, the datasets' download: minutes) and POST /jobs/preflight, which
    # makes no job; a removal waited all that time, and, as Postgres lets a shared lock past a waiting FOR UPDATE,
    # for as long as creations on the model overlapped.
    model = None if has_control_characters(spec.base_model) else models.by_name(session, spec.base_model, lock=lock)
    if model is None:
        known = ", ".join(m.name for m in models.list_all(session)) or "none"
        raise Invalid(f"base_model: {excerpt(spec.base_model)} is not a registered model (registered: {known}; see GET /models)",
                      details=field_errors([("base_model", f"not registered; registered: {known}")]), code="invalid_job")
    return model


def _usable_dataset(session: Session, caller: Caller, field: str, dataset_id: str) -> Dataset:
    try:
        if has_control_characters(dataset_id):  # as missing as a wrong id, not a query that fails
            raise NotFound(dataset_id)
        dataset = datasets.get(session, caller, dataset_id)
    except NotFound:
        raise NotFound(f"{field}: no dataset {excerpt(dataset_id)}") from None
    if dataset.status != "ready":
        first = dataset.errors[0] if dataset.errors else {"line": "?", "message": "?"}
        raise Invalid(
            f"{field}: dataset {dataset_id} is invalid ({counted(dataset.error_count, 'bad line')}; "
            f"first: line "
            f"{first['line']}: {first['message']}); fix the file and upload it again",
            details=field_errors([(field, "dataset is invalid")]), code="invalid_job")
    return dataset


@dataclass
class Download:
    artifact: Artifact
    filename: str
    url: str | None  # a presigned URL on S3; None where the API itself must stream the archive
    key_id: str  # the key that asked (or signed the link): a download the API streams counts among its downloads
    # Where it must (local storage), the query of its own signed route for a browser: see browser_download.
    signed: dict[str, str] | None = None


def download(session: Session, storage: Storage, settings: Settings, caller: Caller, job_id: str, kind: str) -> Download:
    job = get(session, caller, job_id)
    artifact = repository.artifact(session, caller.team_id, job.id, kind)
    if artifact is None:
        kinds = [a.kind for a in repository.artifacts(session, caller.team_id, job.id)]
        raise NotFound(f"job {job.id} has no {excerpt(kind)} artifact; it has "
                       + (", ".join(kinds) if kinds else "none yet")
                       + ("" if job.status == states.SUCCEEDED else f" (it {states.described(job.status)}; a job's "
                                                                    "artifacts are stored as it ends)"))
    # The name as the user gave it (any script; the response header encodes it), minus what a file
    # name cannot hold: a path separator, or a control character in a row stored before names were checked.
    filename = "".join("_" if c in "/\\" or has_control_characters(c) else c for c in f"{job.name or job.id}-{kind}.tar")
    url = storage.presigned_url(artifact.storage_key, settings.presign_expires_s, filename=filename)
    return Download(artifact, filename, url, caller.key_id)


def browser_download(session: Session, storage: Storage, settings: Settings, caller: Caller, job_id: str,
                     kind: str) -> Download:
    """download(), with what a browser needs to save the archive without the key on either backend: on S3
    the presigned URL; on local storage, where the API streams the archive itself, the query of its signed
    route (the key's id, an expiry presign_expires_s away, and the key's signature over both and the
    artifact). Before, the dashboard fetched a local archive with its key and saved it from the tab's
    memory: a merged model of 16 GB took the tab down."""
    found = download(session, storage, settings, caller, job_id, kind)
    if found.url is None:
        expires = int(time.time()) + settings.presign_expires_s
        found.signed = {"key_id": caller.key_id, "expires": str(expires),
                        "signature": teams.sign(session, caller, link_message(job_id, kind, expires))}
    return found


def signed_download(session: Session, storage: Storage, settings: Settings, job_id: str, kind: str, key_id: str,
                    expires: int, signature: str) -> Download:
    """What a link from browser_download streams, for whoever holds it, as long as it has not expired and
    the key that signed it still authenticates; the job stays its team's (another team's signature is 404)."""
    caller = teams.signer(session, key_id, link_message(job_id, kind, expires), signature)
    if expires < time.time():
        raise Forbidden("this download link has expired (links last QLORA_PRESIGN_EXPIRES_S="
                        f"{settings.presign_expires_s} s); ask for a new one (GET /jobs/{{id}}/artifacts/{{kind}}/link)")
    return download(session, storage, settings, caller, job_id, kind)


def link_message(job_id: str, kind: str, expires: int) -> str:
    return f"GET /jobs/{job_id}/artifacts/{kind}\n{expires}"


T = TypeVar("T")


def get(session: Session, caller: Caller, job_id: str) -> Job:
    return _found(repository.get(session, caller.team_id, job_id), job_id)


def estimated_finish(session: Session, caller: Caller, job: Job) -> datetime | None:
    """When a running job's last step is expected, at the pace of its current attempt (pace.finish_at); None where
    that is not known. Points of an earlier attempt are left out (they were logged before this claim): the time a
    job waited between attempts is no part of its pace."""
    if job.status != states.RUNNING or not job.total_steps or job.claimed_at is None:
        return None
    return pace.finish_at(job.status, job.total_steps,
                          repository.train_points_since(session, caller.team_id, job.id, job.claimed_at))


def stream_start(session: Session, caller: Caller, job: Job, after_step: int | None, after_event: int | None,
                 last_event_id: str | None) -> StreamStart:
    """Where GET /jobs/{id}/stream starts: a reconnecting client's Last-Event-ID (both cursors, exactly
    where it left off) over `after_event`; with `after_step`, only points past that step (a reconnect keeps
    the URL, so the filter holds across reconnects too), the stream reading from just before the first."""
    if last_event_id is not None and last_event_id.strip():
        cursors = parse_event_id(last_event_id, MAX_ID)
        if cursors is None:
            raise Invalid("Last-Event-ID: not an id this stream sent; reconnect without it, or with the `id:` of "
                          "the last metric or event message received (\"<metric id>.<event id>\")",
                          details=field_errors([("Last-Event-ID", 'expected "<metric id>.<event id>", '
                                                                  f"each 0 to {MAX_ID}")]))
        metric_after, event_after = cursors
    else:
        metric_after = 0 if after_step is None else repository.metric_id_before_step(session, caller.team_id, job.id,
                                                                                       after_step)
        event_after = after_event or 0
    # A position past the job's newest rows (a Last-Event-ID kept from another job: ids are the whole table's;
    # an after_event too high) is read as those rows: the first stream of a job starts the job's feed where
    # it starts (app/jobs/stream.py), and a feed started past every row the job has was one no other stream
    # of the job ever caught up with: each read the database alone every second, never got the job's state,
    # and never ended.
    newest_metric, newest_event = repository.newest_row_ids(session, caller.team_id, job.id)
    return StreamStart(min(metric_after, newest_metric), min(event_after, newest_event), after_step)


def list_page(session: Session, caller: Caller, status: str | None, cursor: str | None, limit: int,
              metadata: Mapping[str, str] | None = repository.ANY_METADATA) -> Page:
    """The team's jobs newest first, optionally of one status, and of metadata holding each pair of
    `metadata` (None: jobs without metadata)."""
    status = _status_filter(status)
    limit = _jobs_that_fit(repository.list_page_spec_chars(session, caller.team_id, status, cursor, limit, metadata), limit)
    return page(repository.list_page(session, caller.team_id, status, cursor, limit, metadata), limit)


def view(session: Session, caller: Caller, job_id: str) -> Row:
    """What GET /jobs/{id} shows of the job, as a plain row (see repository.JOB_VIEW)."""
    return _found(repository.view(session, caller.team_id, job_id), job_id)


Standings = dict[str, scheduling.Standing]


async def standing(settings: Settings, kept: Recent[str, Standings], row: Row | Job) -> scheduling.Standing | None:
    """A queued job's place in its class and what it waits for; None for any other job (as GET /jobs/{id}
    and /v1's jobs.retrieve() show them, from a row of the view or the job itself).

    The order of a class is read once for every poll of its queued jobs in this process, and kept for
    QLORA_STANDINGS_CACHE_S: it weighs every waiting job and every team's share, several queries
    however many jobs wait, which a status poll would otherwise make each time. A job queued since
    the order was read makes it read again."""
    if row.status != states.QUEUED:
        return None

    def read() -> Awaitable[Standings]:
        return read_only(settings.database_url, lambda session: scheduling.standings(session, settings, row.queue))

    order = await kept.get_or_read(row.queue, read)
    if row.id not in order:
        order = await kept.read_again(row.queue, read)
    return order.get(row.id)


def _found(job: T | None, job_id: str) -> T:
    """The job (as a row or a Job) the caller asked for; 404 when it is missing or another team's."""
    if job is None:
        raise NotFound(f"no job {excerpt(job_id)}")
    return job


def view_page(session: Session, caller: Caller, status: str | None, cursor: str | None, limit: int) -> Page:
    """list_page as plain rows, for GET /jobs."""
    return team_view_page(session, caller.team_id, status, cursor, limit)


def team_view_page(session: Session, team_id: str, status: str | None, cursor: str | None, limit: int) -> Page:
    """A team's page of GET /jobs, whoever reads it: the team, or an admin (GET /admin/teams/{team}/jobs)."""
    status = _status_filter(status)
    limit = _jobs_that_fit(repository.view_page_spec_chars(session, team_id, status, cursor, limit), limit)
    return page(repository.view_page(session, team_id, status, cursor, limit), limit)


# A page of jobs holds at most about this many characters of specs, as well as at most `limit` jobs. A job
# accepted before eval prompts had a total (MAX_EVAL_PROMPT_CHARS) may hold 256 of 20,000 characters (5 million;
# 30 MB once JSON escapes non-ASCII text), and GET /jobs?limit=200 of such jobs read, built and sent gigabytes at
# once: a page of 3 of them grew the API by 480 MB; 200 specs at today's limit still reach 26 million characters.
# A page of ordinary specs (a few KiB each) is far below it.
PAGE_SPEC_CHARS = 4 * 1024 * 1024


def _jobs_that_fit(spec_chars: Sequence[int], limit: int) -> int:
    """How many of a page's jobs, whose specs have these lengths in order, to send: as many as fit in
    PAGE_SPEC_CHARS (the first always does), at most `limit`; next_cursor goes on from the last one sent."""
    total = 0
    for count, chars in enumerate(spec_chars[:limit]):
        total += chars
        if count and total > PAGE_SPEC_CHARS:
            return count
    return limit


def _status_filter(status: str | None) -> str | None:
    if status is not None and status not in states.ALL:
        raise Invalid(f"status: must be one of {', '.join(states.ALL)}, got {excerpt(status)}",
                      details=field_errors([("status", f"must be one of {', '.join(states.ALL)}")]))
    return status


MAX_EVENTS = 1000  # per request; a client reading a long history pages with `after`


def events(session: Session, caller: Caller, job_id: str, after: int | None, limit: int) -> list[JobEvent]:
    """Events oldest first, after the event with id `after`; the limit is clamped to 1..MAX_EVENTS."""
    job = get(session, caller, job_id)
    return repository.events(session, caller.team_id, job.id, after, min(max(limit, 1), MAX_EVENTS))


def feed_newest_first(session: Session, caller: Caller, job_id: str, after: tuple[str, int] | None,
                      limit: int) -> Page:
    """The job's events and metric points as one list, newest first (OpenAI's events, whose "metrics"
    events carry the curve), after the item `after` = ("event" | "metric", id) of a previous page."""
    job = get(session, caller, job_id)
    check_limit(limit)
    key = None
    if after is not None:
        table = JobEvent if after[0] == "event" else JobMetric
        key = repository.feed_key(session, caller.team_id, job.id, table, after[1])
        if key is None:
            raise Invalid("after: not an event of this job (pass the last id of the previous page)",
                          details=field_errors([("after", "not an event of this job")]))
    rows = (repository.feed_before(session, caller.team_id, job.id, JobEvent, key, limit + 1)
            + repository.feed_before(session, caller.team_id, job.id, JobMetric, key, limit + 1))
    rank = {JobEvent: repository.EVENT_RANK, JobMetric: repository.METRIC_RANK}
    rows.sort(key=lambda row: (row.created_at, rank[type(row)], row.id), reverse=True)
    return page(rows[:limit + 1], limit)


# Points of the curve per answer, by default and at most: ~3 MB of JSON and well under a second to build. A
# whole curve in one answer was 150 MB and half a minute to a minute of an API process for 510,000 points
# (docs/performance.md); a client reads a longer one page by page with `next`.
MAX_POINTS = 10_000


@dataclass(frozen=True)
class CurveRead:
    """A page of the curve or a thinned view as read from the database: each series' points as column tuples
    (TRAIN_FIELDS, EVAL_FIELDS), and the rest of the answer (`tail`: has_more, next, and a thinned view's
    fields, in the schema's order), for a route to build the answer from apart (CurveRead.curve, then
    schemas.curve_json): the dicts and the JSON are most of a full page's Python (tens of ms for 10,000 points)."""

    job_id: str
    train: Sequence[Sequence]
    eval: Sequence[Sequence]
    tail: dict[str, Any]

    def curve(self) -> dict:
        """The answer as plain dicts and lists in the schema's field order (schemas.curve_json encodes it into
        MetricsOut's very bytes): a pydantic model per point (from an ORM object per point) was ~50 µs a point."""
        return {"job_id": self.job_id, "train": [dict(zip(TRAIN_FIELDS, row, strict=True)) for row in self.train],
                "eval": [dict(zip(EVAL_FIELDS, row, strict=True)) for row in self.eval], **self.tail}


def metrics(session: Session, caller: Caller, job_id: str, after_step: int | None = None,
            after_eval_step: int | None = None, limit: int = MAX_POINTS) -> dict:
    """curve_page(...).curve(): the page as the schema's dicts."""
    return curve_page(session, caller, job_id, after_step, after_eval_step, limit).curve()


def curve_page(session: Session, caller: Caller, job_id: str, after_step: int | None = None,
               after_eval_step: int | None = None, limit: int = MAX_POINTS) -> CurveRead:
    """A page of the loss curve: one train point per logging step, one eval point per evaluation, the
    first `limit` by (step, kind) of the train points past `after_step` and the eval points past
    `after_eval_step` (by default `after_step`; None reads the series from its start). An evaluation
    at step N is recorded after step N's train point (it runs once that step is logged), so a poller
    that holds train points to N but eval points to an earlier step passes that step as
    `after_eval_step`, or the evaluation at N, arriving after its train point, would be skipped.

    `next` is where to go on from, by that same rule: the last train and eval step the caller holds
    once it has this page. Asked again with it, the next page starts exactly after this one (nothing
    lost, nothing twice) and an evaluation that lands later at a step already held is still read.
    `has_more` says the page was cut at `limit`."""
    check_limit(limit, MAX_POINTS)
    train_after = -1 if after_step is None else after_step
    eval_after = train_after if after_eval_step is None else after_eval_step
    # Each series' read holds the team's scope, so the job is read only when both come back empty, to tell an
    # empty page from another team's job or none (404): a watch's poll, the step moved, finds its new points in
    # two statements. It read the whole job first (spec and summary decoded into an ORM object), a third of them.
    train = repository.metrics(session, caller.team_id, job_id, "train", TRAIN_FIELDS, train_after, limit + 1)
    eval_ = repository.metrics(session, caller.team_id, job_id, "eval", EVAL_FIELDS, eval_after, limit + 1)
    if not train and not eval_:
        _found(repository.readable_id(session, caller.team_id, job_id), job_id)
    held_train, held_eval = first_by_step(train, eval_, limit)
    has_more = held_train + held_eval < len(train) + len(eval_)
    train, eval_ = train[:held_train], eval_[:held_eval]
    # No train point held yet: after_step stays unset (from the start). No eval point held: 0, not unset,
    # which would default to after_step and skip an evaluation still to land at a train point held (steps
    # count from 1, so 0 holds nothing).
    next_train = train[-1][0] if train else (None if train_after < 0 else train_after)
    next_eval = eval_[-1][0] if eval_ else max(eval_after, 0)
    return CurveRead(job_id, train, eval_, {"has_more": has_more,
                                            "next": {"after_step": next_train, "after_eval_step": next_eval}})


def first_by_step(train: Sequence[Sequence], eval_: Sequence[Sequence], limit: int) -> tuple[int, int]:
    """How many of each series (both sorted by step, step first in each point) make the first `limit` points
    by (step, kind): at the same step an evaluation comes before the train point ("eval" < "train")."""
    if len(train) + len(eval_) <= limit:
        return len(train), len(eval_)
    # Each point's place as one number, an evaluation's before its step's train point; the limit-th of both
    # series merged is where the page ends (sorted() merges two sorted runs in one pass).
    eval_keys = [point[0] * 2 for point in eval_]
    cut = sorted(eval_keys + [point[0] * 2 + 1 for point in train])[limit - 1]
    held_eval = bisect.bisect_right(eval_keys, cut)
    return limit - held_eval, held_eval


# A thinned view (GET /jobs/{id}/metrics?points=N): the shape of a curve of any length in at most N points,
# for a chart. The curve's steps are cut into buckets of equal width, as many as N / 8; in each, each series
# keeps its first and last point and those of its lowest and highest loss (at most 4 a series, 8 a bucket).
# So a spike or a dip, which an even sample steps over, stays; and every evaluation of a job that evaluates
# at most four times a bucket (most jobs) is kept. Between 8 (one bucket) and 5,000: more than a chart draws.
MIN_THINNED, MAX_THINNED = 8, 5_000
PER_BUCKET = 8
LOSS_OF = {"train": "train_loss", "eval": "eval_loss"}


# The completed buckets of the thinned views asked in this process, kept between polls (app/jobs/thinned.py).
COMPLETED = thinned.CompletedBuckets()


def thinned_metrics(session: Session, caller: Caller, job_id: str, points: int, paged: Sequence[str] = (),
                    completed: thinned.CompletedBuckets | None = COMPLETED) -> dict:
    """thinned_curve(...).curve(): the view as the schema's dicts."""
    return thinned_curve(session, caller, job_id, points, paged, completed).curve()


def thinned_curve(session: Session, caller: Caller, job_id: str, points: int, paged: Sequence[str] = (),
                  completed: thinned.CompletedBuckets | None = COMPLETED) -> CurveRead:
    """The whole curve in at most `points` points that keep its shape (see MIN_THINNED): each series' buckets
    summed up in the database (repository.metric_buckets), then the points kept read: bounded memory, and
    little work for the API's process, at any length.
    `paged`: the paging parameters the request also gave, which a thinned view does not take. Curves that
    fit in `points` come whole (`thinned` false). `next` is the end of the curve: where a poller goes on
    for the points logged since, with after_step and after_eval_step.
    `completed`: where the view's completed buckets are kept between polls, so that a poll reads only the
    buckets past them (app/jobs/thinned.py), on Postgres; the answer is the one computed whole. None: computed
    whole."""
    if not MIN_THINNED <= points <= MAX_THINNED:
        raise Invalid(f"points: must be between {MIN_THINNED} and {MAX_THINNED}, got {points}",
                      details=field_errors([("points", f"must be between {MIN_THINNED} and {MAX_THINNED}")]))
    if paged:
        raise Invalid(f"points: cannot be combined with {' or '.join(paged)}: a thinned view is of the whole curve "
                      "(drop points to read it page by page)",
                      details=field_errors([("points", f"cannot be combined with {' or '.join(paged)}")]))
    job = get(session, caller, job_id)
    if completed is not None and not repository.metric_ids_only_grow(session):
        completed = None  # the embedded database (SQLite): computed whole, as the check cannot be made there
    key = (job.id, points)
    known = completed.get(key) if completed is not None else None
    if completed is not None and known is not None:
        view = _thinned_past(session, caller.team_id, job, points, known, completed)
        if view is not None:
            return view
        completed.drop(key)
    # Read before the curve: a point written meanwhile has a higher id, and the next poll sees it as new.
    newest_id = repository.newest_metric_id(session, caller.team_id, job.id) if completed is not None else 0
    extent = repository.metric_extent(session, caller.team_id, job.id)
    in_curve = sum(count for count, _, _ in extent.values())
    # Read up to the last step counted: points logged meanwhile would fall past the last bucket.
    first = min((lo for _, lo, _ in extent.values()), default=0)
    last = max((hi for _, _, hi in extent.values()), default=0)
    bucketed = (last - first) // (points // PER_BUCKET) + 1  # the width of a bucket, where the curve is thinned
    width = None
    if in_curve <= points:
        train, eval_ = (list(repository.metrics(session, caller.team_id, job.id, kind, FIELDS_OF[kind], -1, points + 1,
                                                through=last)) for kind in ("train", "eval"))
        if len(train) + len(eval_) > points:  # logged at steps counted, since
            width = bucketed
    else:
        width = bucketed
    if width is not None:
        read = {kind: _bucketed(session, caller.team_id, job.id, kind, first, width, last) for kind in ("train", "eval")}
        train, eval_ = list(read["train"][1]), list(read["eval"][1])
        if completed is not None:
            completed.put(key, thinned.completed_after(None, job.attempt, first, width, last, newest_id, read))
    return _thinned_view(job.id, train, eval_, width, in_curve)


def _thinned_past(session: Session, team_id: str, job: Job, points: int, known: thinned.Completed,
                  completed: thinned.CompletedBuckets) -> CurveRead | None:
    """The view from its completed buckets `known` and the buckets past them, read now; None where `known` no
    longer holds (app/jobs/thinned.py says when), for the view to be computed whole."""
    changes = repository.curve_changes(session, team_id, job.id, known.newest_id, known.last_points())
    if not changes.ends:
        return None
    first = min(lo for lo, _ in changes.ends.values())
    last = max(hi for _, hi in changes.ends.values())
    width = (last - first) // (points // PER_BUCKET) + 1
    if not known.holds(job.attempt, first, width, changes.earliest_new_step, changes.ids_at):
        return None
    read = {kind: _bucketed(session, team_id, job.id, kind, first, width, last, from_step=known.through)
            for kind in ("train", "eval")}
    in_curve = (sum(kept.points for kept in known.series.values())
                + sum(points for buckets, _ in read.values() for _, _, points, _ in buckets))
    completed.put((job.id, points), thinned.completed_after(known, job.attempt, first, width, last, changes.newest_id, read))
    return _thinned_view(job.id, [*known.series["train"].rows, *read["train"][1]],
                         [*known.series["eval"].rows, *read["eval"][1]], width, in_curve)


def _thinned_view(job_id: str, train: Sequence[Sequence], eval_: Sequence[Sequence], width: int | None,
                  in_curve: int) -> CurveRead:
    return CurveRead(job_id, train, eval_, {
        "has_more": False, "next": {"after_step": train[-1][0] if train else None,
                                    "after_eval_step": eval_[-1][0] if eval_ else 0},
        "thinned": width is not None, "bucket_steps": width, "curve_points": in_curve})


def _kept(head: int, tail: int, low: int | None, high: int | None) -> list[int]:
    """A bucket's steps kept, each once, by step."""
    return sorted({head, tail, *(step for step in (low, high) if step is not None)})


def _bucketed(session: Session, team_id: str, job_id: str, kind: str, first: int, width: int, last: int,
              from_step: int | None = None) -> tuple[list[tuple[int, int, int, int]], Sequence[Row]]:
    """One series' buckets of `width` steps from `first` up to `last` (from `from_step` on, where given): each
    bucket's (first step, last step, points, id of its last point), and the points kept of them, by step."""
    buckets = repository.metric_buckets(session, team_id, job_id, kind, LOSS_OF[kind], first, width, last, from_step)
    steps = [step for head, tail, low, high, _, _ in buckets for step in _kept(head, tail, low, high)]
    return ([(head, tail, count, tail_id) for head, tail, _, _, count, tail_id in buckets],
            repository.metrics_at(session, team_id, job_id, kind, FIELDS_OF[kind], steps))


def checkpoints(session: Session, caller: Caller, job_id: str) -> list[Checkpoint]:
    """Complete checkpoints in storage, oldest first."""
    job = get(session, caller, job_id)
    return repository.readable_checkpoints(session, caller.team_id, job.id)


def artifacts(session: Session, caller: Caller, job_id: str) -> list[Artifact]:
    job = get(session, caller, job_id)
    return repository.artifacts(session, caller.team_id, job.id)


@dataclass
class Freed:
    objects: int
    bytes: int


def delete_checkpoints(session: Session, storage: Storage, caller: Caller, job_id: str) -> Freed:
    """Delete a finished job's checkpoints: what its storage_gib counts of it beyond the artifacts. A job
    that has not finished resumes from them (409 job_not_finished)."""
    lock_team(session, caller.team_id)  # two deletes at once: the second finds none left, not rows gone under it
    job = _finished(get(session, caller, job_id), "its checkpoints are what it resumes from")
    rows = repository.delete_all_checkpoints(session, job.id)
    freed = Freed(len(rows), sum(row.bytes for row in rows))
    if rows:
        repository.add_event(session, job.id, "checkpoints_deleted", "info",
                             f"{freed.objects} checkpoints deleted ({format_bytes(freed.bytes)} freed)",
                             attempt=job.attempt, data={"checkpoints": freed.objects, "bytes": freed.bytes})
    _delete_after_commit(session, storage, [row.storage_key for row in rows])
    return freed


def delete_artifact(session: Session, storage: Storage, caller: Caller, job_id: str, kind: str) -> Freed:
    """Delete one artifact of a finished job (a merged model once downloaded, say). Its adapter stays
    while a job of the team that has not finished starts from it (initial_job_id: 409 artifact_in_use)."""
    lock_team(session, caller.team_id)  # as a job creation does: one that starts from it is seen, or sees this
    job = _finished(get(session, caller, job_id), "it may still store its artifacts")
    artifact = repository.artifact(session, caller.team_id, job.id, kind)
    if artifact is None:
        raise NotFound(f"job {job.id} has no {excerpt(kind)} artifact")
    users = repository.active_jobs_starting_from(session, caller.team_id, job.id, states.ACTIVE) if kind == "adapter" else []
    if users:
        names = ", ".join(f"{user.id} ({user.status})" for user in users[:5])
        raise Conflict(f"the adapter of job {job.id} is where jobs that have not finished start (initial_job_id): "
                       f"{names}; cancel them or wait for them to finish", code="artifact_in_use")
    session.delete(artifact)
    repository.add_event(session, job.id, "artifact_deleted", "info",
                         f"{kind} deleted ({format_bytes(artifact.bytes)} freed)", attempt=job.attempt,
                         data={"kind": kind, "bytes": artifact.bytes})
    _delete_after_commit(session, storage, [artifact.storage_key])
    return Freed(1, artifact.bytes)


def _finished(job: Job, why: str) -> Job:
    if job.status not in states.FINISHED:
        raise Conflict(f"job {job.id} is {job.status}: {why}; cancel it, or wait for it to finish",
                       code="job_not_finished")
    return job


def _delete_after_commit(session: Session, storage: Storage, keys: list[str]) -> None:
    """The rows go first, in the request's transaction; the objects once it commits (a stray object is
    harmless, a row without its object is not), each tried even when storage refuses another."""
    session.flush()
    after_commit(session, lambda: delete_objects(storage, keys))


def eval_report(session: Session, caller: Caller, job_id: str) -> dict:
    """The eval report a job made when it succeeded (worker/training/report.py). 409 report_not_ready
    while the job may still make one; 404 no_report for a finished job without one, saying why."""
    job = get(session, caller, job_id)
    if job.report is not None:
        return {"job_id": job.id, **job.report}
    if job.status not in states.FINISHED:
        raise Conflict(f"job {job.id} has no report yet: it is {job.status}, and the report is made when it "
                       "succeeds", code="report_not_ready")
    if job.status != states.SUCCEEDED:
        why = f"{'it failed' if job.status == states.FAILED else 'it was cancelled'}, and a report is made only when a job succeeds"
    elif job.spec.get("eval", {}).get("prompts") == 0:
        why = "its spec's eval.prompts is 0, which asks for none"
    else:
        why = "it finished before this service made eval reports"
    raise NotFound(f"job {job.id} has no report: {why}", code="no_report")


# What each request does from each state: (target state, event type, message). A state not listed
# for a request answers 409; a job already where the request leads is answered as it is.
_REQUESTS = {
    "cancel": {status: (states.CANCELS_TO[status], states.CANCEL_EVENTS[states.CANCELS_TO[status]], message) for status, message in (
        (states.QUEUED, "cancelled before it started"),
        (states.PAUSED, "cancelled while paused"),
        (states.RUNNING, "cancel requested; the training process stops after its current step"),
        (states.PAUSING, "cancel requested while pausing; the training process stops without waiting for its save"),
    )},
    "pause": {
        states.RUNNING: (states.PAUSING, "pause_requested",
                         "pause requested; the training process saves a checkpoint after its current step and stops"),
    },
    "resume": {
        states.PAUSED: (states.QUEUED, "resume_requested", "resumed; the next attempt continues from the newest "
                                                           "checkpoint, or from the start if it has none"),
    },
}
_ALREADY = {"cancel": (states.CANCELLING, states.CANCELLED), "pause": (states.PAUSING, states.PAUSED),
            "resume": (states.QUEUED, states.RUNNING)}
# What to do instead, where a refusal's state alone does not say it: "cannot pause job X: it is queued" left a
# script (the README's own openai example, which pauses right after creating) with no next step.
_FINISHED_RUNS_NO_MORE = "a finished job does not run again: create a new job"
_REFUSAL_FIX = {
    ("pause", states.QUEUED): "a queued job has no training to pause yet: pause it once it is running, or cancel it",
    ("pause", states.CANCELLING): "it stops without a pause",
    ("resume", states.PAUSING): "it is saving its checkpoint: resume it once it is paused",
    ("resume", states.CANCELLING): "it stops; it cannot be resumed",
    ("resume", states.SUCCEEDED): f"{_FINISHED_RUNS_NO_MORE} (initial_job_id starts one from its adapter)",
    ("resume", states.FAILED): f"{_FINISHED_RUNS_NO_MORE} with the same spec and data to try again",
    ("resume", states.CANCELLED): f"{_FINISHED_RUNS_NO_MORE} with the same spec and data to try again",
}


def cancel(session: Session, caller: Caller, job_id: str) -> Job:
    """A queued (or paused) job is cancelled at once and never runs again; a running one is asked to
    stop after its current step (cancelling), and its worker records cancelled once the process exits."""
    return _request(session, caller, job_id, "cancel")


def pause(session: Session, caller: Caller, job_id: str) -> Job:
    """A running job saves a checkpoint after its current step, stops and frees its GPU (paused)."""
    return _request(session, caller, job_id, "pause")


def resume(session: Session, settings: Settings, caller: Caller, job_id: str) -> Job:
    """A paused job is queued again; the worker that claims it continues from its pause checkpoint.
    It counts against max_queued as a new job does: else paused jobs, resumed together, passed it.
    Checked on the status the queueing compare-and-set starts from, not a look before it: a job that
    turned paused between the two (its worker's commit) was queued unchecked, past max_queued."""
    job = _request(session, caller, job_id, "resume",
                   before_queueing=lambda: check_can_queue(session, settings, caller))
    if job.status == states.QUEUED and job.dispatched_at is None:
        after_commit(session, lambda: send(settings, job.id, job.queue))
    return job


def _request(session: Session, caller: Caller, job_id: str, request: str,
             before_queueing: Callable[[], None] | None = None) -> Job:
    for _ in range(3):  # the job may change state under us (claimed, finished); look again
        job = get(session, caller, job_id)
        if request == "pause" and job.preempting and job.status in (states.PAUSING, states.PAUSED):
            # Pausing for another team's job already: the team's own pause keeps it paused when it stops.
            if repository.keep_paused(session, job.id):
                repository.add_event(session, job.id, "pause_requested", "info",
                                     "pause requested while preempted; it stays paused once stopped", attempt=job.attempt)
                session.flush()
                session.refresh(job)
        if job.status in _ALREADY[request]:
            return job
        if job.status not in _REQUESTS[request]:
            fix = _REFUSAL_FIX.get((request, job.status))
            raise Conflict(f"cannot {request} job {job_id}: it {states.described(job.status)}{f'; {fix}' if fix else ''}",
                           code="invalid_state")
        target, event, message = _REQUESTS[request][job.status]
        # finished_at on the database's clock, as a worker's end of a job (runs.py) and its started_at: read
        # against those (/metrics' durations and its window of finished jobs), an API host's own was off by its skew.
        values: dict[str, Any] = {"finished_at": database_now(session)} if target in states.FINISHED else {}
        if target == states.QUEUED:
            if before_queueing is not None:
                # The job's row before the team's (which before_queueing takes), as a worker ending a job takes them:
                # the other way round, this waited for the job's row with the team's held, which a forced removal of
                # its base model held while it waited for a job of the team that its worker, ending it, held while it
                # waited for the team's row: Postgres ended one of the three with "deadlock detected".
                repository.lock(session, job.id)
                before_queueing()  # max_queued, under the team's row: the job is queued only from what was read
            # A person resumed it: its lost attempts count afresh (one paused after QLORA_MAX_ATTEMPTS
            # lost to a full disk would otherwise be paused again by the first loss after the resume).
            values.update(dispatched_at=None, lost_workers=0)
        if repository.transition(session, job.id, target, only_from=[job.status], **values):
            level = "warning" if request == "cancel" else "info"
            repository.add_event(session, job.id, event, level, message, attempt=job.attempt)
            session.flush()
            session.refresh(job)
            return job
        session.expire(job)
    raise Conflict(f"job {job_id} kept changing state; try again", code="invalid_state")
