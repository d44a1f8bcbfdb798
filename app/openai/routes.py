"""An OpenAI-compatible fine-tuning API under /v1, so the official `openai` SDK works unchanged
(base_url=http://host:8000/v1, a team key). A thin translation onto the native services."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic_core import to_json
from sqlalchemy.orm import Session

from app.conditional import POLLED, json_answer, polled
from app.datasets import service as datasets
from app.db import read_only
from app.deps import CallerDep, IdempotencyKeyHeader, SessionDep, SettingsDep, StorageDep, TeamTurnDep
from app.errors import Invalid, NotFound, field_errors
from app.idempotency import service as idempotency
from app.jobs import service as jobs
from app.jobs import states
from app.jobs.tables import Job, JobEvent
from app.models import service as models
from app.openai import translate as t
from app.pagination import Page, page_after
from app.ranges import RANGED, RangeDep, stored_object_response
from app.routing import CheckedJSONRoute, outside_team_shares
from app.storage import StoredObject
from app.teams.service import Caller
from worker.training.spec import excerpt

router = APIRouter(prefix="/v1", tags=["openai-compatible"], route_class=CheckedJSONRoute)


def _list(data: list[dict], rows: Page) -> dict:
    """OpenAI's list object: one page, and whether there is more (a client pages on with the last id)."""
    return {"object": "list", "data": data, "has_more": rows.has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


# ------------------------------------------------------------------ files


@router.post("/files")
@outside_team_shares
async def create_file(request: Request, response: Response, session: SessionDep, storage: StorageDep,
                      settings: SettingsDep, caller: CallerDep, idempotency_key: IdempotencyKeyHeader = None):
    """multipart: `file` (JSONL) and `purpose` = fine-tune. Validated line by line while it streams."""
    def purpose_is_fine_tune(fields: dict[str, str]) -> None:
        purpose = fields.get("purpose")
        if purpose is None:  # the OpenAI SDK always sends it; a hand-written curl may not
            raise Invalid("purpose is required: send the form field purpose=fine-tune beside the file",
                          details=field_errors([("purpose", "required: 'fine-tune'")]))
        if purpose != "fine-tune":
            raise Invalid(f"purpose must be 'fine-tune', got {excerpt(purpose)}",
                          details=field_errors([("purpose", "must be 'fine-tune'")]))

    dataset, replayed = await datasets.upload(session, storage, settings, caller, request, check_fields=purpose_is_fine_tune,
                                              idempotency_key=idempotency_key, scope="POST /v1/files")
    if replayed:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    return t.file_object(dataset)


@router.get("/files")
def list_files(session: SessionDep, caller: CallerDep, purpose: str | None = None, limit: int = 100,
               after: str | None = None, order: str = "desc"):
    if order != "desc":
        raise Invalid("order: only 'desc' (newest first) is supported", details=field_errors([("order", "use desc")]))
    if purpose not in (None, "fine-tune"):
        return _list([], Page([], None))
    cursor = t.list_cursor(after, t.FILE, "file", lambda file_id: datasets.get(session, caller, file_id))
    files = datasets.list_page(session, caller, cursor, limit)
    return _list([t.file_object(d) for d in files.data], files)


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, request: Request, session: SessionDep, caller: CallerDep):
    if file_id.startswith(t.RESULTS):
        return t.result_file_object(*_result_file(request, session, caller, file_id))
    return t.file_object(datasets.get(session, caller, t.native_id(file_id, t.FILE, "file")))


@router.delete("/files/{file_id}")
def delete_file(file_id: str, session: SessionDep, storage: StorageDep, caller: CallerDep):
    if file_id.startswith(t.RESULTS):
        _result_job(session, caller, file_id)  # 404 first, as for any id
        raise Invalid("file_id: a job's result file is its curve, read from the job when asked; it goes with the job's "
                      "metrics, not on its own", details=field_errors([("file_id", "a result file is not deleted")]))
    datasets.delete(session, storage, caller, t.native_id(file_id, t.FILE, "file"))
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content", response_class=StreamingResponse, responses=RANGED)
@router.head("/files/{file_id}/content", include_in_schema=False)
def file_content(file_id: str, request: Request, session: SessionDep, storage: StorageDep, caller: CallerDep,
                 asked: RangeDep):
    if file_id.startswith(t.RESULTS):
        _job, content = _result_file(request, session, caller, file_id)
        return Response(content, media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{t.RESULTS_FILENAME}"'})
    dataset = datasets.get(session, caller, t.native_id(file_id, t.FILE, "file"))
    return stored_object_response(asked, storage, StoredObject(dataset.storage_key, dataset.bytes, dataset.sha256),
                                  "application/octet-stream", {}, key_id=caller.key_id)


def _result_job(session: Session, caller: Caller, file_id: str) -> Job:
    """The succeeded job whose result file (t.result_files) this is. Another team's job, or one that has not
    succeeded, is as missing as a wrong id, in the same words."""
    missing = NotFound(f"no file {excerpt(file_id)}")
    try:
        job = jobs.get(session, caller, t.native_id(file_id, t.RESULTS, "file"))
    except NotFound:
        raise missing from None
    if job.status != states.SUCCEEDED:
        raise missing
    return job


def _result_file(request: Request, session: Session, caller: Caller, file_id: str) -> tuple[Job, bytes]:
    """A succeeded job's result file and its CSV, made from the whole curve a page at a time, once in this process
    (app/openai/result_files.py)."""
    job = _result_job(session, caller, file_id)

    def pages() -> Iterator[tuple[Sequence[Sequence], Sequence[Sequence]]]:
        after: dict[str, Any] = {"after_step": None, "after_eval_step": None}
        while True:
            page = jobs.curve_page(session, caller, job.id, **after)
            yield page.train, page.eval
            if not page.tail["has_more"]:
                return
            after = page.tail["next"]

    built = request.app.state.result_files.get(job.id, lambda: t.results_csv(pages(), dpo=t.method_type(job.spec) == "dpo"))
    return job, built


# ------------------------------------------------------------------ fine-tuning jobs


@router.post("/fine_tuning/jobs")
def create_job(body: Annotated[dict[str, Any], Body()], request: Request, session: SessionDep, settings: SettingsDep,
               storage: StorageDep, caller: CallerDep, _turn: TeamTurnDep, idempotency_key: IdempotencyKeyHeader = None):
    """OpenAI's create body; `lora`, `quantization`, `training`, `output` and `eval` (the SDK's extra_body)
    set what OpenAI's hyperparameters do not cover. An `Idempotency-Key` header (the SDK's extra_headers)
    makes the request safe to send again, as on POST /jobs."""
    keyed = idempotency.requested(idempotency_key, "POST /v1/fine_tuning/jobs", body)
    job, replayed = jobs.create_once(session, settings, caller, t.job_body(body, settings.max_micro_batch), keyed,
                                     storage=storage, runner=request.app.state.preflight)
    answer = t.job_object(job, caller.team_name)
    return JSONResponse(answer, headers={idempotency.REPLAYED_HEADER: "true"}) if replayed else answer


@router.get("/fine_tuning/jobs", responses=POLLED)
async def list_jobs(request: Request, caller: CallerDep, after: str | None = None, limit: int = 20):
    """What the SDK's jobs.list() asks, with its metadata filter (metadata[k]=v, metadata=null): read and
    encoded like retrieve_job (jsonable_encoder took 0.1 ms per job of the page)."""
    metadata = t.metadata_filter(request.query_params.multi_items())

    def read(session: Session) -> bytes:
        cursor = t.list_cursor(after, t.JOB, "fine-tuning job", lambda job_id: jobs.get(session, caller, job_id))
        found = jobs.list_page(session, caller, None, cursor, limit, metadata)
        return to_json(_list([t.job_object(j, caller.team_name) for j in found.data], found))

    return await polled(request, read)


@router.get("/fine_tuning/jobs/{job_id}", responses=POLLED)
async def retrieve_job(job_id: str, request: Request, caller: CallerDep):
    """What the SDK's jobs.retrieve() polls: read like GET /jobs/{id} (app.db.read_only, an ETag), a queued
    job with its standing as there (why it waits: "queued" alone never said a class had no worker), and
    encoded by pydantic-core in one call (FastAPI's jsonable_encoder took 0.11 ms of it)."""
    settings = request.app.state.settings

    def read(session: Session) -> tuple[Job, datetime | None]:
        job = jobs.get(session, caller, t.native_id(job_id, t.JOB, "fine-tuning job"))
        return job, jobs.estimated_finish(session, caller, job)

    job, finish = await read_only(settings.database_url, read)
    standing = await jobs.standing(settings, request.app.state.standings, job)
    return json_answer(request, to_json(t.job_object(job, caller.team_name, standing, finish)))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, session: SessionDep, caller: CallerDep):
    return t.job_object(jobs.cancel(session, caller, t.native_id(job_id, t.JOB, "fine-tuning job")), caller.team_name)


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, session: SessionDep, caller: CallerDep):
    return t.job_object(jobs.pause(session, caller, t.native_id(job_id, t.JOB, "fine-tuning job")), caller.team_name)


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep):
    job = jobs.resume(session, settings, caller, t.native_id(job_id, t.JOB, "fine-tuning job"))
    return t.job_object(job, caller.team_name)


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, session: SessionDep, caller: CallerDep, after: str | None = None, limit: int = 20):
    """Newest first, as OpenAI lists them, with each point of the curve as a "metrics" event (step,
    train_loss or valid_loss, and a dpo job's rewards); `after` is the last event id of the previous page."""
    job = jobs.get(session, caller, t.native_id(job_id, t.JOB, "fine-tuning job"))  # 404 before a bad `after`
    feed = jobs.feed_newest_first(session, caller, job.id, t.feed_cursor(after) if after else None, limit)
    return _list([t.event_object(row) if isinstance(row, JobEvent) else t.metric_event_object(row, job.total_steps)
                  for row in feed.data], feed)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, session: SessionDep, caller: CallerDep, after: str | None = None,
                     limit: int = 10):
    job = jobs.get(session, caller, t.native_id(job_id, t.JOB, "fine-tuning job"))
    newest_first = jobs.checkpoints(session, caller, job.id)[::-1]
    saved = page_after(newest_first, lambda c: t.CHECKPOINT + c.id, after, limit,
                       unknown=f"after: no checkpoint {excerpt(after)} in this job")
    return _list([t.checkpoint_object(c, job, caller.team_name) for c in saved.data], saved)


# ------------------------------------------------------------------ models


@router.get("/models")
def list_models(session: SessionDep, caller: CallerDep):
    """The registered base models (the registry is small and the same for every team). A team's
    fine-tuned models, one per succeeded job, are not listed (there may be any number): each is read
    by its name, and listed as jobs.list()'s succeeded jobs."""
    return {"object": "list", "data": [t.model_object(m.name, m.created_at, "system") for m in models.list_models(session)]}


@router.get("/models/{model:path}")
def retrieve_model(model: str, session: SessionDep, caller: CallerDep):
    return _model(session, caller, model)


@router.delete("/models/{model:path}")
def delete_model(model: str, session: SessionDep, caller: CallerDep):
    """This service serves no inference, so there is no model to take down: a fine-tuned model is its
    job's artifacts, deleted as such. Refused, after the model is found (404 first, as for any id)."""
    _model(session, caller, model)
    raise Invalid("model: this service serves no models to delete: a fine-tuned model's weights are its job's "
                  "artifacts (DELETE /jobs/{id}/artifacts/adapter and /merged), a base model is removed from the "
                  "registry by an admin (DELETE /models/{name})", details=field_errors([("model", "not deleted here")]))


def _model(session: Session, caller: Caller, name: str) -> dict:
    """A base model by its registered name, or a fine-tuned one by the name its succeeded job gave it
    (another team's, or a job that has not succeeded, is as missing as a wrong name)."""
    job_id = t.fine_tuned_job_id(name)
    if job_id is None:
        return t.model_object(name, models.get_model(session, name).created_at, "system")
    try:
        job = jobs.get(session, caller, job_id)
    except NotFound:
        job = None
    if job is None or job.status != states.SUCCEEDED or t.fine_tuned_model(job, caller.team_name) != name:
        raise NotFound(f"no fine-tuned model {excerpt(name)}; its name is the fine_tuned_model of a succeeded job")
    return t.model_object(name, job.finished_at, caller.team_name)
