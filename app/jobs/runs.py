"""What a worker may do to a job: claim it, report on it, finish it. Every write after the claim
carries the attempt number it was given; once the job has moved on (requeued to another worker,
finished), the write changes nothing and the worker learns it has lost the job."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.datasets.tables import Dataset
from app.db import database_clock, database_now
from app.jobs import repository, states
from app.jobs.tables import Checkpoint, Job
from app.models import repository as models
from app.usage import ledger
from worker.training.protocol import (
    PHASE_EVENT,
    PHASES,
    CheckpointStored,
    EvalPoint,
    Event,
    Progress,
    QuantizedBaseStored,
    Record,
    TrainPoint,
)

INITIAL_ADAPTER = "adapter"  # the artifact of the initial job a job starts from


class LeaseLost(Exception):
    """This worker no longer owns the job: stop training and write nothing more."""


@dataclass
class ObjectRef:
    """A stored object a worker will fetch, with the sha256 it must have."""

    id: str
    storage_key: str
    sha256: str
    size: int  # bytes, for the progress of a long download


@dataclass
class ClaimedJob:
    id: str
    team_id: str
    queue: str
    attempt: int
    spec: dict
    base_model: dict  # name, path, hub_id, revision
    train: ObjectRef
    validation: ObjectRef | None
    resume_from: ObjectRef | None = None  # the newest complete checkpoint, for a later attempt
    resume_step: int = 0
    # The `adapter` artifact of the job this one continues (initial_job_id), for every attempt alike.
    initial_adapter: ObjectRef | None = None
    initial_job_id: str | None = None


def claim(session: Session, job_id: str, worker: str, token: str | None = None) -> ClaimedJob | None:
    """queued → running, marked with the claim's `token` (landed_claim). None when the job is not queued
    (cancelled, or another worker has it).

    The attempt's GPU time starts now, by the database's clock at this moment: the claim saw the job queued, so
    this comes after the end of the attempt before it (a preemption, a lost worker, out of memory). At the claim
    transaction's start instead (database_now), a claim that began a moment before that end and read the queue
    after it charged the seconds between twice (usage, the monthly budget, fair share)."""
    attempt = repository.claim(session, job_id, worker, database_clock(session), token)
    if attempt is None:
        return None
    job = repository.get_any_team(session, job_id)
    assert job is not None  # this transaction just claimed it
    session.refresh(job)
    assert job.claimed_at is not None
    ledger.start(session, job, job.claimed_at)
    repository.add_event(session, job.id, "claimed", message=f"{worker} took the job (attempt {attempt})",
                         attempt=attempt, data={"worker": worker})
    repository.set_phase(session, job.id, attempt, "preparing")  # downloads and the base's load, until it trains
    claimed = _to_run(session, job, attempt)
    if claimed is not None and attempt > 1:
        _plan_resume(session, claimed)
    return claimed


def landed_claim(session: Session, token: str) -> ClaimedJob | None:
    """The job a claim marked `token` took, if that claim's commit landed and the attempt still runs: what a worker
    whose claim met a dropped connection asks before it claims again, since the commit may have reached the
    database and lost only its answer. Claimed anew instead, the worker took a second job while the first stayed
    running, claimed by a worker that never ran it, until the reaper's deadline. What the claim wrote (its event,
    the resume plan) landed with it, and is not written again."""
    job = repository.landed_claim(session, token)
    if job is None:
        return None
    claimed = _to_run(session, job, job.attempt)
    if claimed is not None and job.attempt > 1:
        _resume_point(session, claimed)
    return claimed


def _to_run(session: Session, job: Job, attempt: int) -> ClaimedJob | None:
    """What the worker needs to run the claimed attempt; None, and the job failed saying why, when its base model,
    its training dataset or its starting adapter is gone."""
    model = models.by_name(session, job.base_model)
    train = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    validation = session.get(Dataset, job.validation_dataset_id) if job.validation_dataset_id else None
    # The starting adapter, read in the job's own team like every other read of a job.
    initial = repository.artifact(session, job.team_id, job.initial_job_id, INITIAL_ADAPTER) \
        if job.initial_job_id else None
    missing = None
    if model is None:
        missing = f"base model {job.base_model!r} is no longer registered"
    elif train is None:
        missing = "its training dataset was deleted"
    elif job.initial_job_id and initial is None:
        missing = (f"the adapter of its initial job {job.initial_job_id} is gone from storage; create the "
                   f"job again from another job's adapter, or without initial_job_id")
    if missing:
        finish(session, job.id, attempt, states.FAILED, error=f"cannot start: {missing}")
        return None
    assert model is not None and train is not None
    return ClaimedJob(
        id=job.id, team_id=job.team_id, queue=job.queue, attempt=attempt, spec=job.spec,
        base_model={"name": model.name, "path": model.path, "hub_id": model.hub_id, "revision": model.revision},
        train=ObjectRef(train.id, train.storage_key, train.sha256, train.bytes),
        validation=ObjectRef(validation.id, validation.storage_key, validation.sha256, validation.bytes)
        if validation else None,
        initial_adapter=ObjectRef(initial.id, initial.storage_key, initial.sha256, initial.bytes) if initial else None,
        initial_job_id=job.initial_job_id,
    )


def _resume_point(session: Session, job: ClaimedJob) -> Checkpoint | None:
    """Point `job` at the newest complete checkpoint (None: from step 0), and return it."""
    saved = repository.checkpoints(session, job.id)
    newest = saved[-1] if saved else None
    job.resume_from = ObjectRef(newest.id, newest.storage_key, newest.sha256, newest.bytes) if newest else None
    job.resume_step = newest.step if newest else 0
    return newest


def _plan_resume(session: Session, job: ClaimedJob, instead_of: str | None = None) -> None:
    """A later attempt continues from the newest complete checkpoint; what the lost attempt logged
    after it is deleted, so the curve has each step once, as the resumed run logs it again.
    `instead_of`: the newer checkpoint it could not use, and why (checkpoint_unusable)."""
    newest = _resume_point(session, job)
    if newest is not None:
        message = f"attempt {job.attempt} resumes from the checkpoint at step {newest.step}"
        tokens = newest.tokens_seen
    elif instead_of is not None:
        message = f"attempt {job.attempt} starts over from step 0: no usable checkpoint is left"
        tokens = 0
    else:
        message = f"attempt {job.attempt} starts over: no checkpoint was saved before the worker was lost"
        tokens = 0
    if instead_of is not None:
        message += f" ({instead_of})"
    if tokens is not None:  # None: a checkpoint saved before its tokens were recorded
        ledger.resumes_at(session, job.id, job.attempt, tokens)
    repository.delete_metrics_after(session, job.id, job.resume_step)
    # After a pause (asked for, or to make room for another job) resuming is the plan; after a lost attempt, news.
    planned = instead_of is None and repository.has_event(session, job.id, states.PAUSED, job.attempt - 1)
    repository.add_event(session, job.id, "resumed", "info" if planned else "warning", message, attempt=job.attempt,
                         step=job.resume_step)


def _still_owns(session: Session, job_id: str, attempt: int, **values: Any) -> None:
    """The fence of every write an attempt makes: its heartbeat (now, unless `values` say when) and `values`
    written while it still runs the job, LeaseLost once another attempt, or an end, has taken it."""
    values.setdefault("heartbeat_at", database_now(session))
    if not repository.touch(session, job_id, attempt, **values):
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer owns it")


def checkpoint_unusable(session: Session, job: ClaimedJob, why: str) -> str:
    """The checkpoint the attempt was to resume from (job.resume_from) cannot be fetched as it was stored: its
    bytes no longer match the sha256 recorded at its upload, or it is gone from storage. Another attempt would
    meet the same checkpoint, so instead of failing the job (it did: "the worker failed: ChecksumMismatch"), its
    row goes and the attempt resumes from the newest checkpoint before it, or from step 0 when none is left;
    `job` is changed to say which, and the resumed event says why. Fenced by the attempt (LeaseLost). Returns the
    dropped checkpoint's storage key, to delete once this is committed."""
    _still_owns(session, job.id, job.attempt)
    assert job.resume_from is not None
    dropped, step = job.resume_from, job.resume_step
    row = repository.checkpoint(session, job.id, dropped.id)
    if row is None:
        # Dropped already, by a try of this very change whose commit landed unheard (its connection dropped on the
        # way back): the plan it wrote stands, and is read, not written twice (a second resumed event, and the
        # checkpoint before dropped too).
        _resume_point(session, job)
        return dropped.storage_key
    repository.delete_checkpoint(session, row)
    session.flush()
    _plan_resume(session, job, instead_of=f"the checkpoint at step {step} is unusable and was dropped: {why}")
    return dropped.storage_key


def heartbeat(session: Session, job_id: str, attempt: int, events: Iterable[Event] = (), *,
              again: bool = False) -> str | None:
    """The worker is alive and still owns the job: written every supervise interval from the claim to
    the final state, whatever the worker is doing (downloading, training, uploading), with the progress
    events of long transfers. Returns the job's status (cancelling or pausing means: stop); None: this
    attempt no longer owns the job (it was requeued or finished). `again`: `events` were sent before by a try
    that failed, whose commit may have landed unheard (as report's)."""
    now = database_now(session)
    if not repository.touch(session, job_id, attempt, heartbeat_at=now):
        return None
    told = _told_before(session, job_id, attempt, again)
    for event in events:
        _add_event(session, job_id, attempt, event, now, told)
    status = repository.status_of(session, job_id)
    return status[0] if status else None


def _told_before(session: Session, job_id: str, attempt: int, again: bool) -> set[tuple[str, int | None, str]]:
    """For a write tried again after a try that may have landed unheard (`again`): the events the attempt has
    recorded, which _add_event does not add twice. Otherwise none, and no query."""
    return repository.events_told(session, job_id, attempt) if again else set()


def _add_event(session: Session, job_id: str, attempt: int, event: Event, at: datetime,
               told: set[tuple[str, int | None, str]] | None = None) -> None:
    if told and (event.type, event.step, event.message) in told:
        return  # this very event, from a try whose commit landed unheard
    # A path the training process wrote to is on the worker's disk, gone with the attempt: nothing for a client.
    data = {key: value for key, value in (event.data or {}).items() if key != "path"}
    if event.type == PHASE_EVENT and (data.get("phase") in PHASES):
        repository.set_phase(session, job_id, attempt, data["phase"])  # the job shows the newest while it runs
    repository.add_event(session, job_id, event.type, event.level, event.message, attempt=attempt, step=event.step,
                         data=data or None, at=at)


def report(session: Session, job_id: str, attempt: int, records: list[Record], progress: Progress | None,
           keep_checkpoints: int = 3, *, again: bool = False) -> tuple[str, list[str]]:
    """Write the training process's metrics, events and checkpoints and a heartbeat. Returns the
    job's status (cancelling means: stop) and the storage keys of checkpoints no longer kept, to
    delete once this is committed. Raises LeaseLost when this attempt no longer owns the job.

    `again`: these records were reported before by a try that failed, whose commit may have landed unheard (the
    connection dropped as its answer came back). Points and checkpoints are written over by step; an event this
    attempt already told (its type, step and message) is not added twice. Added again, the job's events said
    `checkpoint_saved` twice for one checkpoint, `finished` twice for one run."""
    # The batch's points and events are dated with the heartbeat: the database's clock, as claimed_at is, which
    # the job's pace is read since (pace.finish_at), read once for all of them.
    now = database_now(session)
    values: dict = {"heartbeat_at": now}
    if progress:
        values["step"] = progress.step
        values["total_steps"] = progress.total_steps
        values["trained_tokens"] = progress.tokens_seen
    _still_owns(session, job_id, attempt, **values)
    told = _told_before(session, job_id, attempt, again)
    unkept: list[str] = []
    for logged, record in enumerate(records):
        # A microsecond apart, in the order the training process logged them: dated alike, the /v1 events feed (which
        # puts an event after the points of its moment) showed each of the batch's events after all of its points.
        at = now + timedelta(microseconds=logged)
        match record:
            case TrainPoint() | EvalPoint():
                repository.upsert_metric(session, job_id, _metric_values(record), at=at)
            case QuantizedBaseStored():
                if not repository.add_quantized_base(session, record.key, record.storage_key, record.size,
                                                     record.sha256, record.identity):
                    unkept.append(record.storage_key)  # another job cached the same weights first
            case CheckpointStored():
                repository.add_checkpoint(session, job_id, attempt, record.step, record.key, record.size,
                                          record.sha256, *repository.losses_at(session, job_id, record.step),
                                          tokens_seen=record.tokens_seen)
                session.flush()
                unkept += _prune_checkpoints(session, job_id, keep_checkpoints)
            case Event():
                _add_event(session, job_id, attempt, record, at, told)
    status = repository.status_of(session, job_id)
    return (status[0] if status else states.FAILED), unkept


def _prune_checkpoints(session: Session, job_id: str, keep: int) -> list[str]:
    """Keep the newest `keep` and the best by eval loss; return the storage keys of the rest."""
    saved = repository.checkpoints(session, job_id)
    kept = {c.id for c in saved[-keep:]}
    evaluated = [c for c in saved if c.eval_loss is not None]
    if evaluated:
        kept.add(min(evaluated, key=lambda c: (c.eval_loss, -c.step)).id)
    dropped = [c for c in saved if c.id not in kept]
    for checkpoint in dropped:
        repository.delete_checkpoint(session, checkpoint)
    return [c.storage_key for c in dropped]


_METRIC_FIELDS = ("step", "epoch", "train_loss", "eval_loss", "learning_rate", "grad_norm", "tokens_seen",
                  "tokens_per_second", "peak_memory_bytes", "gpu_utilization",
                  "reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin")  # the last four: dpo only


def _metric_values(point: TrainPoint | EvalPoint) -> dict:
    values = finite_json({name: getattr(point, name, None) for name in _METRIC_FIELDS})
    values["kind"] = point.kind
    return values


def cached_base(session: Session, key: str) -> ObjectRef | None:
    row = repository.quantized_base(session, key)
    return ObjectRef(row.key, row.storage_key, row.sha256, row.bytes) if row else None


def mark_cached_base_used(session: Session, key: str) -> bool:
    """A job is about to load entry `key` (if there is one): it is in use now, and a prune keeps it. Now by the
    database's clock, which the prune reads too: by the worker's, a worker whose clock ran 30 days behind marked
    an entry it loaded as unused for 30 days, and the reaper's next pass deleted it."""
    return repository.mark_quantized_base_used(session, key, database_now(session))


def forget_cached_base(session: Session, entry: ObjectRef) -> bool:
    """A cache entry that could not be loaded (failed its checksum, or its object is gone): forget it, unless
    the key has been stored again since. True if it was forgotten (its object is then the caller's to delete)."""
    return repository.drop_quantized_base(session, entry.id, entry.storage_key)


def finite_json(value):
    """JSON and Postgres' json type have no NaN or infinity: a diverged loss is stored as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def finish(session: Session, job_id: str, attempt: int, status: str, *, error: str | None = None,
           summary: dict | None = None, report: dict | None = None, half_life_s: float | None = None,
           message: str | None = None, ended_at: datetime | None = None) -> bool:
    """From a worker-owned state to succeeded | failed | cancelled | paused, fenced by attempt; with the
    run's summary and its eval report (kept on the row: GET /jobs/{id}/report serves it from there), and
    the event saying so (`message`, else the error). False: someone else decided (the job was requeued,
    or cancelled while it was paused). `ended_at` (the database's clock): when the attempt ended, where that
    was before this write (a worker that waited for the database to come back); its GPU time ends there."""
    values: dict = {"heartbeat_at": database_now(session)}
    if error is not None or status != states.CANCELLED:
        # A cancel says no error; one an admin's removal of the base model asked for left its own, which stays.
        values["error"] = error
    if status in states.FINISHED:
        if status == states.SUCCEEDED:
            message = _succeeded_though_asked_to_stop(session, job_id, attempt, message)
        values.update(finished_at=values["heartbeat_at"], preempting=False)
    if summary is not None:
        values["summary"] = finite_json(summary)
    if report is not None:
        values["report"] = finite_json(report)
    owned = [state for state in states.WORKER_OWNED if status in states.TRANSITIONS[state]]
    won = repository.transition(session, job_id, status, attempt=attempt, only_from=owned, **values)
    if won:
        level = {"succeeded": "info", "cancelled": "warning", "paused": "info"}.get(status, "error")
        # A run that stopped in training said so itself, with the step ("cancelled at step 12"): once is enough.
        if not (status in (states.CANCELLED, states.PAUSED) and repository.has_event(session, job_id, status, attempt)):
            repository.add_event(session, job_id, status, level, message or error or f"job {status}", attempt=attempt)
        ledger.end(session, job_id, attempt, min(ended_at or values["heartbeat_at"], values["heartbeat_at"]), status,
                   half_life_s)
        if status == states.PAUSED:
            requeue_if_preempted(session, job_id, attempt)
    return won


def _succeeded_though_asked_to_stop(session: Session, job_id: str, attempt: int, message: str | None) -> str | None:
    """A cancel or a pause asked as the run was past training (merging, or its worker storing what it made) cannot
    stop it: it ends succeeded, with its artifacts, and a preempted one is not queued again. The cancel_requested or
    pause_requested event said it would stop: the succeeded event says why not. (A cancel that came as the worker
    uploaded the adapter ended in a bare "job succeeded" after "the training process stops after its current step".)
    The row is locked first, so the status read is the one the transition starts from: a cancel waits for it."""
    repository.lock(session, job_id)
    now = repository.status_of(session, job_id)
    if now is None or now[1] != attempt or now[0] not in (states.CANCELLING, states.PAUSING):
        return message
    asked = "cancel" if now[0] == states.CANCELLING else "pause"
    then = ("so it finished; what it made is kept" if asked == "cancel"
            else "so it finished instead of being queued again" if repository.preempting(session, job_id, attempt)
            else "so it finished")
    return f"{message or 'job succeeded'} (it was past training when it was asked to {asked}, {then})"


def attempt_lost(session: Session, job: Job, why: str, max_attempts: int, ended_at: datetime,
                 half_life_s: float, *, outside_the_job: bool = False, silent_before: datetime | None = None) -> str | None:
    """The job's attempt ended without its result: its worker went silent (the reaper), or its training
    process died or the worker failed on the way to storage or the database (the worker itself). A job
    being cancelled is cancelled, one pausing is paused; any other gets another attempt, which resumes
    from the newest checkpoint, until max_attempts attempts were lost. Then it fails, unless the last
    attempt ended on something `outside_the_job` (a full disk, storage or the database out of reach, a
    worker gone silent): that is for an operator to mend, not a reason to lose the job, so it is paused
    instead, keeping its checkpoints, for its team to resume once mended (a resume counts its lost
    attempts afresh). What became of it ("requeued", "failed", "cancelled", "paused"), or None when
    something else moved the job meanwhile. `silent_before` (the reaper's deadline): only while its worker's
    last heartbeat is still older than that when the change is written, not only when the job was read."""
    if job.status not in states.WORKER_OWNED:
        # Ended by the attempt itself meanwhile (its watch records a time limit, or a cancel or pause before
        # training, as the worker loses it): fenced by that state, a failed job was queued again or paused.
        return None
    now = database_now(session)  # finished_at, beside started_at and heartbeat_at: the database's clock
    values: dict[str, Any]
    if job.status == states.CANCELLING:
        outcome, level, message, values = states.CANCELLED, "warning", f"{why} while cancelling", {"finished_at": now}
    elif job.status == states.PAUSING:
        # It was stopping anyway: paused, resumable from its newest checkpoint.
        outcome, level, message, values = (states.PAUSED, "warning",
                                           f"{why} while pausing; it resumes from its newest checkpoint", {"worker": None})
    elif job.lost_workers + 1 >= max_attempts and outside_the_job:
        outcome, level, values = states.PAUSED, "warning", {"worker": None, "lost_workers": job.lost_workers + 1}
        message = (f"the job lost {job.lost_workers + 1} attempts (last: {why}); paused rather than failed after "
                   f"QLORA_MAX_ATTEMPTS={max_attempts}, keeping its checkpoints: resume it once that is mended, "
                   "and it continues from the newest checkpoint")
    elif job.lost_workers + 1 >= max_attempts:
        outcome, level, values = states.FAILED, "error", {"finished_at": now}
        message = (f"the job lost {job.lost_workers + 1} attempts (last: {why}); giving up after "
                   f"QLORA_MAX_ATTEMPTS={max_attempts}. Look at the workers' health (memory, preemption, "
                   "driver errors, storage and database reachability) and start a new job")
        values["error"] = message
    else:
        outcome, level, values = states.QUEUED, "warning", {"worker": None, "dispatched_at": None, "continuing": True,
                                                           "lost_workers": job.lost_workers + 1}
        message = (f"{why}; requeued for try {job.lost_workers + 2} of QLORA_MAX_ATTEMPTS={max_attempts}, "
                   "which resumes from the newest checkpoint")
    return _end_attempt(session, job, outcome, level, message, values, ended_at, half_life_s, silent_before)


def _end_attempt(session: Session, job: Job, outcome: str, level: str, message: str, values: dict[str, Any],
                 ended_at: datetime, half_life_s: float, silent_before: datetime | None = None) -> str | None:
    """Move the job from the state it was read in to `outcome`, fenced by that state and its attempt (and, with
    `silent_before`, by its last heartbeat being older); record the event, the attempt's end (usage), and queue
    again a paused job that was making way. What became of it, or None when something else moved it first: a job
    paused and queued again so is "requeued", which its caller sends (reaper.reap_claims_of_gone_worker). Said to be
    "paused", a preempted or handed-back job lost with its worker was left unsent, and `serve` called it paused."""
    if not repository.transition(session, job.id, outcome, attempt=job.attempt, only_from=[job.status],
                                 silent_before=silent_before, **values):
        return None
    event = "requeued" if outcome == states.QUEUED else outcome
    repository.add_event(session, job.id, event, level, message, attempt=job.attempt, step=job.step)
    ledger.end(session, job.id, job.attempt, ended_at, outcome, half_life_s)
    if outcome == states.PAUSED and requeue_if_preempted(session, job.id, job.attempt):
        return "requeued"
    return event


def continue_smaller(session: Session, job_id: str, attempt: int, training: dict[str, int], ended_at: datetime,
                     half_life_s: float) -> str | None:
    """The attempt ran out of memory at a training step (its out_of_memory event says where): the job continues
    from its newest checkpoint with `training`, a smaller micro-batch and more gradient accumulation
    (worker/training/recipe.smaller_micro_batch: the same rows at each optimizer step), written into its spec.
    It is not a lost attempt: each retry halves the micro-batch or more, down to 1, where the job fails. A job
    being paused is paused with the smaller micro-batch; one being cancelled is cancelled. What became of it
    ("requeued", "paused", "cancelled"), or None when something else moved it meanwhile (fenced by attempt)."""
    job = session.get(Job, job_id)
    if job is None or job.attempt != attempt or job.status not in states.WORKER_OWNED:
        return None
    before = job.spec["training"]
    micro, accumulation = training["per_device_batch_size"], training["gradient_accumulation_steps"]
    was = (f"{before['per_device_batch_size']} and {before['gradient_accumulation_steps']}"
           if before.get("per_device_batch_size") != "auto" else "what per_device_batch_size \"auto\" chose")
    change = (f"micro-batch {micro} and gradient_accumulation_steps {accumulation} (from {was}: the same "
              f"{micro * accumulation} rows at each optimizer step, in smaller pieces)")
    values: dict[str, Any] = {"spec": {**job.spec, "training": {**before, **training}}}
    if job.status == states.CANCELLING:
        outcome, values, message = states.CANCELLED, {"finished_at": database_now(session)}, "out of memory while cancelling"
    elif job.status == states.PAUSING:
        outcome, message = states.PAUSED, f"out of memory while pausing; paused, and it resumes with {change}"
        values["worker"] = None
    else:
        outcome = states.QUEUED
        values.update(worker=None, dispatched_at=None, continuing=True)
        message = f"out of memory; queued again to continue from its newest checkpoint with {change}"
    return _end_attempt(session, job, outcome, "warning", message, values, ended_at, half_life_s)


def requeue_if_preempted(session: Session, job_id: str, attempt: int) -> bool:
    """A job paused to make way (the scheduler's preemption for another team's job, or its worker shutting
    down; not its own team's pause) is queued again at once, keeping its place in its team; its next
    attempt resumes from the pause checkpoint. Its message is sent after the commit by whoever committed
    it (worker or reaper), or by the scheduler."""
    if not repository.requeue_preempted(session, job_id, attempt):
        return False
    repository.add_event(session, job_id, "requeued", "info",
                         "paused to make way (see the pause request above); queued again, it resumes from this checkpoint",
                         attempt=attempt)
    return True


def hand_back(session: Session, worker: str, job_id: str, attempt: int) -> bool:
    """A worker shutting down (SIGTERM: a deploy, a scale-down) hands back the attempt it runs: the job saves
    a checkpoint after its current step and stops, then is queued again at once, as a preempted job is.
    Before, the worker trained on to the end of the job, until its stop grace period ran out and the kill
    lost everything since the last checkpoint and counted as a lost worker. By job and attempt, which the
    worker's own pool process names (worker/supervisor.held_attempt): a name may be another worker's too."""
    if not repository.preempt(session, job_id, attempt, counted=False):
        return False
    repository.add_event(session, job_id, "pause_requested", "info",
                         f"worker {worker} is shutting down: the job saves a checkpoint after its current "
                         "step, stops, and is queued again", attempt=attempt)
    return True


def add_artifact(session: Session, job_id: str, attempt: int, kind: str, key: str, size: int, sha256: str) -> str | None:
    """Records an artifact the attempt stored. One an earlier attempt stored before it was lost (between
    its adapter and its merged model, say) is replaced: the unique (job, kind) made the retry fail the
    job. Returns the replaced object's key, to delete once this is committed."""
    _still_owns(session, job_id, attempt)
    return repository.put_artifact(session, job_id, kind, key, size, sha256)


def unrecorded_keys(session: Session, keys: list[str]) -> list[str]:
    """Of the storage keys of an attempt's records that it could not report (its lease lost), those no row names:
    a report whose commit went through but whose answer was lost recorded some, and their objects stay. A read,
    so not fenced: the rows stay whoever owns the job now."""
    named = repository.recorded_storage_keys(session, keys)
    return [key for key in keys if key not in named]


def keep_only_artifacts(session: Session, job_id: str, attempt: int, kinds: Collection[str]) -> list[str]:
    """A succeeding attempt has stored and recorded its artifacts, of `kinds`: any other kind recorded is an earlier
    attempt's, lost after it stored it (a merged model, where this attempt's merge was skipped on a host without
    the memory or disk for it), and goes. Kept, the job that says "the merged model was not built" served a
    merged model of another run, whose fidelity nothing recorded. Fenced by the attempt (LeaseLost); safe to repeat.
    Returns the storage keys of the rows deleted, to delete once this is committed; a repeat after a commit that
    landed unheard finds none, so the caller keeps every try's (worker/supervisor.py)."""
    _still_owns(session, job_id, attempt)
    return repository.delete_artifacts_except(session, job_id, kinds)
