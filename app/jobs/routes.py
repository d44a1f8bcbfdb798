from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.orm import Session

from app.conditional import POLLED, json_answer, polled, polled_off_loop
from app.db import read_only
from app.deps import CallerDep, IdempotencyKeyHeader, JobId, SessionDep, SettingsDep, StorageDep, TeamTurnDep
from app.idempotency import service as idempotency
from app.jobs import service
from app.jobs.schemas import (
    ArtifactOut,
    CheckpointOut,
    EventOut,
    JobOut,
    JobPage,
    JobReport,
    MetricsOut,
    PreflightOut,
    ThinnedMetricsOut,
    curve_json,
    job_json,
    job_page_json,
)
from app.jobs.stream import job_stream
from app.pagination import MAX_ID
from app.ranges import RANGED, RangeDep, RangeRequest, stored_object_response
from app.routing import CheckedJSONRoute
from app.storage.base import Storage, StoredObject, attachment_disposition
from app.urls import public_url_for

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=CheckedJSONRoute)

CREATE_EXAMPLE = {
    "name": "support-bot-v1",
    "dataset_id": "<id from POST /datasets>",
    "base_model": "tiny-demo",
    "lora": {"r": 16, "alpha": 32},
    "training": {"epochs": 3, "learning_rate": 2e-4},
}


@router.post("", response_model=JobOut, status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}, "examples": {"a job": {"value": CREATE_EXAMPLE}}}}}})
def create_job(body: Annotated[Any, Body()], request: Request, session: SessionDep, settings: SettingsDep,
               storage: StorageDep, caller: CallerDep, _turn: TeamTurnDep, idempotency_key: IdempotencyKeyHeader = None):
    """The engine's job spec (base_model, quantization, lora, training, output, eval) plus dataset_id,
    an optional validation_dataset_id, name and gpu_class. Answers 201 with the job queued, or 422
    (`preflight_refused`) for a job whose data leaves it nothing to learn (see POST /jobs/preflight).
    Sent with an `Idempotency-Key` header, the same request sent again within a day answers with the
    job the first one made (`Idempotent-Replayed: true`) instead of making another.

    The body is read as any JSON and validated by the service with JobCreate (the schema shown), so
    one answer names every bad field in the service's words."""
    keyed = idempotency.requested(idempotency_key, "POST /jobs", body)
    job, replayed = service.create_once(session, settings, caller, body, keyed, storage=storage,
                                        runner=request.app.state.preflight)
    return encoded(JobOut.of(job), status_code=201, replayed=replayed)


@router.post("/preflight", response_model=PreflightOut, openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}}}}})
def preflight_job(body: Annotated[Any, Body()], request: Request, session: SessionDep, settings: SettingsDep,
                  storage: StorageDep, caller: CallerDep, _turn: TeamTurnDep):
    """What a job with this body would train on, computed with the base model's tokenizer and chat
    template, and where it would run; nothing is created. The body of POST /jobs, plus `examples`
    (0-5, default 1): rows shown token by token, each marked trained or not."""
    return service.preflight_report(session, settings, storage, request.app.state.preflight, caller, body)


# The reads every poller makes (a job, a page of jobs, a curve, the events) are `async def` and read
# through app.conditional.polled: on the async driver, answered with an ETag.
@router.get("", response_model=JobPage, responses=POLLED)
async def list_jobs(request: Request, caller: CallerDep, status: str | None = None, cursor: str | None = None,
                    limit: int = 50):
    def read(session: Session) -> bytes:
        jobs = service.view_page(session, caller, status, cursor, limit)
        return job_page_json(jobs.data, jobs.next_cursor)

    return await polled(request, read)


@router.get("/{job_id}", response_model=JobOut, responses=POLLED)
async def get_job(job_id: JobId, request: Request, caller: CallerDep):
    settings = request.app.state.settings
    row = await read_only(settings.database_url, lambda session: service.view(session, caller, job_id))
    return json_answer(request, job_json(row, await service.standing(settings, request.app.state.standings, row)))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: JobId, session: SessionDep, caller: CallerDep):
    return encoded(JobOut.of(service.cancel(session, caller, job_id)))


@router.post("/{job_id}/pause", response_model=JobOut)
def pause_job(job_id: JobId, session: SessionDep, caller: CallerDep):
    """Save a checkpoint after the current step and stop, freeing the GPU; the job becomes paused."""
    return encoded(JobOut.of(service.pause(session, caller, job_id)))


@router.post("/{job_id}/resume", response_model=JobOut)
def resume_job(job_id: JobId, session: SessionDep, settings: SettingsDep, caller: CallerDep):
    """Queue a paused job again; it continues from its pause checkpoint with the same final step count."""
    return encoded(JobOut.of(service.resume(session, settings, caller, job_id)))


def encoded(answer: BaseModel, status_code: int = 200, *, replayed: bool = False) -> Response:
    """A write's answer, encoded in its route's thread. FastAPI validates and encodes a plain `def` route's
    return value in a second trip to the thread pool, after the route and before the request's session
    commits: the row locks the write took (the team's, the job's) are still held. When a burst of requests
    waiting on such a lock holds every thread of the pool, that trip waits for them and they wait for it,
    until the database pool's timeout fails them (500s): measured with 50 concurrent POST /jobs of one team."""
    headers = {idempotency.REPLAYED_HEADER: "true"} if replayed else None
    return Response(answer.model_dump_json(), status_code=status_code, media_type="application/json", headers=headers)


@router.get("/{job_id}/events", response_model=list[EventOut], responses=POLLED)
async def job_events(job_id: JobId, request: Request, caller: CallerDep,
                     after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None, limit: int = 200):
    """Events oldest first; pass the last id seen as `after` to get only newer ones."""
    def read(session: Session) -> bytes:
        return EVENT_LIST.dump_json(EVENT_LIST.validate_python(service.events(session, caller, job_id, after, limit),
                                                               from_attributes=True))

    return await polled(request, read)


EVENT_LIST = TypeAdapter(list[EventOut])


@router.get("/{job_id}/metrics", response_model=MetricsOut | ThinnedMetricsOut, responses=POLLED)
async def job_metrics(job_id: JobId, request: Request, caller: CallerDep,
                      after_step: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
                      after_eval_step: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
                      # The range is checked by the service, whose 422 names it; the schema shows it too.
                      limit: Annotated[int, Query(description=f"Points per page, 1 to {service.MAX_POINTS}.",
                                                  json_schema_extra={"minimum": 1, "maximum": service.MAX_POINTS})]
                      = service.MAX_POINTS,
                      points: Annotated[int | None, Query(
                          description=f"A thinned view of the whole curve instead of a page: at most this many points "
                                      f"({service.MIN_THINNED} to {service.MAX_THINNED}) that keep its shape. Not with "
                                      "after_step, after_eval_step or limit.",
                          json_schema_extra={"minimum": service.MIN_THINNED, "maximum": service.MAX_THINNED})] = None):
    """The loss curve, a page at a time: one train point per logging step, one eval point per
    evaluation, at most `limit` points (default and most: 10,000) in step order. Pass the last train
    step you have as `after_step` and the last eval step you have as `after_eval_step` (0 when you have
    none; it defaults to `after_step`) to get only the points past them: `next` holds both for the
    curve read so far. While `has_more` is true, ask again at once with `next` for the rest; then poll
    with it for new points. An evaluation at step N is recorded after step N's train point, so one
    `after_step` alone can skip it. A job that resumed from a checkpoint logs the steps past it again:
    when `attempt` changes, read the curve from the start once more.

    With `points=N`, the shape of the whole curve instead, for a chart: at most N points (`thinned`,
    `bucket_steps`): the steps are cut into N/8 buckets of `bucket_steps` steps, and in each, each series
    keeps its first and last point and those of its lowest and highest loss. `next` is the end of the
    curve, to poll on from with `after_step` and `after_eval_step`."""
    if points is not None:
        paged = [name for name in ("after_step", "after_eval_step", "limit") if name in request.query_params]

        def thinned(session: Session) -> service.CurveRead:
            return service.thinned_curve(session, caller, job_id, points, paged)

        # One read per (job, points) at a time: each starts from the completed buckets the one before it kept.
        return await polled_off_loop(request, thinned, encode_curve, read_in_thread=False,
                                     one_read_per=("thinned", job_id, points))

    def read(session: Session) -> service.CurveRead:
        return service.curve_page(session, caller, job_id, after_step, after_eval_step, limit)

    return await polled_off_loop(request, read, encode_curve)


def encode_curve(read: service.CurveRead) -> bytes:
    """A page or thinned view's JSON, built and encoded (in a worker thread: polled_off_loop)."""
    return curve_json(read.curve())


@router.get("/{job_id}/report", response_model=JobReport, responses={
    **POLLED, 404: {"description": "No such job, or (`no_report`) a finished job that made no report, saying why."},
    409: {"description": "`report_not_ready`: the job has not finished; the report is made when it succeeds."}})
async def job_report(job_id: JobId, request: Request, caller: CallerDep):
    """The eval report made when the job succeeded (the spec's `eval` section): for each prompt the base
    model's answer and the tuned model's beside the reference, exact match and token F1 per row and on
    average, and the loss and perplexity of both on held-out rows. A dpo job's adds each pair's rejected
    answer and the reward accuracy and margin on the validation pairs, first and final. Also the job's
    `report` artifact."""
    def read(session: Session) -> bytes:
        report = JobReport.model_validate(service.eval_report(session, caller, job_id))
        # exclude_unset: the dpo-only keys stay out of an sft report (and out of one made before them).
        return report.model_dump_json(exclude_unset=True).encode()

    return await polled(request, read)


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut])
def job_checkpoints(job_id: JobId, session: SessionDep, caller: CallerDep):
    """Complete checkpoints in storage, oldest first: the newest few and the best by eval loss.
    A job that loses its worker resumes from the newest."""
    return service.checkpoints(session, caller, job_id)


@router.delete("/{job_id}/checkpoints", responses={
    409: {"description": "`job_not_finished`: a job that has not finished resumes from its checkpoints."}})
def delete_checkpoints(job_id: JobId, session: SessionDep, storage: StorageDep, caller: CallerDep):
    """Delete a finished job's checkpoints, to free what they take of the team's storage_gib. The job, its
    curve, events and artifacts stay; its `checkpoints` list is empty after. Answers what was freed."""
    freed = service.delete_checkpoints(session, storage, caller, job_id)
    return {"job_id": job_id, "deleted": freed.objects, "bytes": freed.bytes}


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def job_artifacts(job_id: JobId, request: Request, session: SessionDep, settings: SettingsDep, caller: CallerDep):
    return [ArtifactOut(kind=a.kind, bytes=a.bytes, sha256=a.sha256, created_at=a.created_at,
                        download_url=str(public_url_for(request, settings, "download_artifact", job_id=a.job_id,
                                                        kind=a.kind)))
            for a in service.artifacts(session, caller, job_id)]


@router.get("/{job_id}/artifacts/{kind}", name="download_artifact", responses={
    **RANGED, 307: {"description": "On S3: the presigned URL, which takes a Range header too."}})
@router.head("/{job_id}/artifacts/{kind}", include_in_schema=False)
def download_artifact(job_id: JobId, kind: str, session: SessionDep, storage: StorageDep, settings: SettingsDep,
                      caller: CallerDep, asked: RangeDep):
    """The artifact as one tar archive (adapter/ or merged/). On S3 this redirects to a presigned URL.
    Resumable: Range (one byte range, 206) with If-Range set to the ETag, the quoted sha256. HEAD answers
    the headers (size, ETag) on every storage: a presigned URL is signed for GET only."""
    found = service.download(session, storage, settings, caller, job_id, kind)
    if found.url and not asked.head:
        return RedirectResponse(found.url, status_code=307, headers={"X-Checksum-Sha256": found.artifact.sha256})
    return archive_response(asked, storage, found)


@router.get("/{job_id}/artifacts/{kind}/signed", name="download_signed", responses={
    **RANGED, 403: {"description": "`forbidden`: the link's signature does not match, its key was revoked, or it "
                                   "expired."}})
@router.head("/{job_id}/artifacts/{kind}/signed", include_in_schema=False)
def download_signed(job_id: str, kind: str, key_id: str, expires: int, signature: str, session: SessionDep,
                    storage: StorageDep, settings: SettingsDep, asked: RangeDep):
    """The artifact as the route above streams it, with no API key: for a browser, which navigates to the
    `url` the link route below answers on local storage (on S3 that is the store's presigned URL). Valid for
    QLORA_PRESIGN_EXPIRES_S, and only while the key that asked for it is not revoked. Resumable, the same way."""
    return archive_response(asked, storage, service.signed_download(session, storage, settings, job_id, kind, key_id,
                                                                    expires, signature))


def archive_response(asked: RangeRequest, storage: Storage, found: service.Download) -> Response:
    artifact = found.artifact
    return stored_object_response(asked, storage, StoredObject(artifact.storage_key, artifact.bytes, artifact.sha256),
                                  "application/x-tar", {"X-Checksum-Sha256": artifact.sha256,
                                                        "Content-Disposition": attachment_disposition(found.filename)},
                                  key_id=found.key_id)


@router.delete("/{job_id}/artifacts/{kind}", responses={
    409: {"description": "`job_not_finished`, or `artifact_in_use`: the adapter is where a job that has not "
                         "finished starts (initial_job_id)."}})
def delete_artifact(job_id: JobId, kind: str, session: SessionDep, storage: StorageDep, caller: CallerDep):
    """Delete one artifact of a finished job (a merged model once downloaded, say), to free what it takes
    of the team's storage_gib. Answers what was freed."""
    freed = service.delete_artifact(session, storage, caller, job_id, kind)
    return {"job_id": job_id, "kind": kind, "deleted": True, "bytes": freed.bytes}


@router.get("/{job_id}/artifacts/{kind}/link")
def artifact_link(job_id: JobId, kind: str, request: Request, session: SessionDep, storage: StorageDep,
                  settings: SettingsDep, caller: CallerDep):
    """Where a browser can download the artifact without the API key, for QLORA_PRESIGN_EXPIRES_S: the
    presigned URL on S3; on local storage the signed route above, signed with the asking key (revoking
    the key revokes the link).

    A page cannot follow the download route's 307 as a download (a navigation carries no key, and
    fetch() would need the store to allow the page's origin and would hold the archive in memory),
    so it asks here with its key and then navigates to the URL.
    """
    found = service.browser_download(session, storage, settings, caller, job_id, kind)
    url = found.url or str(public_url_for(request, settings, "download_signed", job_id=found.artifact.job_id,
                                          kind=found.artifact.kind).include_query_params(**(found.signed or {})))
    return {"kind": found.artifact.kind, "bytes": found.artifact.bytes, "sha256": found.artifact.sha256,
            "filename": found.filename, "url": url}


@router.get("/{job_id}/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}},
                       429: {"description": "The key already holds QLORA_MAX_STREAMS_PER_KEY live streams."}})
def stream_job(job_id: JobId, request: Request, session: SessionDep, settings: SettingsDep, caller: CallerDep,
               after_step: Annotated[int | None, Query(
                   ge=0, le=MAX_ID, description="Only the points of steps past this one (a chart that already "
                                                "holds the curve through it: the `next` of GET /jobs/{id}/metrics).")] = None,
               after_event: Annotated[int | None, Query(
                   ge=0, le=MAX_ID, description="Only the events past the one with this id.")] = None,
               last_event_id: Annotated[str | None, Header(
                   alias="Last-Event-ID", description="On a reconnect: the `id:` of the last metric or event message "
                                                      "received; the stream goes on right after it.")] = None):
    """Server-Sent Events for one job: `job` (the job, whenever it changed), `metric` (each point of the
    loss curve, with its `kind`: train or eval) and `event` (each job event). Everything so far comes
    first (past `after_step` and `after_event` when given), then news about every second; the stream ends
    after the final state of a finished job, or with an `error` event if the key is revoked meanwhile.
    Each metric and event message has an `id:`; a client that reconnects with the last one as
    Last-Event-ID goes on from there, with no point or event twice or missed. A key holds at most
    QLORA_MAX_STREAMS_PER_KEY streams at once (429 beyond). Browsers: EventSource cannot send the API key,
    read this with fetch()."""
    job = service.get(session, caller, job_id)  # another team's job answers 404 here, before any byte is streamed
    start = service.stream_start(session, caller, job, after_step, after_event, last_event_id)  # 422 before any byte
    slot = request.app.state.stream_slots.take(caller.key_id)  # 429 at the cap, before any byte is streamed
    # The request's session is committed and closed when this function returns: the stream reads through its
    # job's feed in this app (app.state.job_feeds: one poll per job, however many streams watch it) and its own sessions.
    return StreamingResponse(job_stream(request.app.state, settings.database_url, caller.team_id, caller.key_id, job.id, slot, start),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
