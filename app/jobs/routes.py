from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import RedirectResponse, StreamingResponse

from app.deps import CallerDep, SessionDep, SettingsDep, StorageDep
from app.errors import Invalid, NotFound
from app.jobs import repository, service, states
from app.jobs.schemas import ArtifactOut, CheckpointOut, EventOut, JobOut, JobPage, MetricsOut
from app.pagination import page

router = APIRouter(prefix="/jobs", tags=["jobs"])

CREATE_EXAMPLE = {
    "name": "support-bot-v1",
    "dataset_id": "<id from POST /datasets>",
    "base_model": "tiny-demo",
    "lora": {"r": 16, "alpha": 32},
    "training": {"epochs": 3, "learning_rate": 2e-4},
}


@router.post("", response_model=JobOut, status_code=201)
def create_job(body: Annotated[dict[str, Any], Body(examples=[CREATE_EXAMPLE])], session: SessionDep,
               settings: SettingsDep, caller: CallerDep):
    """The engine's job spec (base_model, quantization, lora, training, output) plus dataset_id,
    an optional validation_dataset_id, name and gpu_class. Answers 201 with the job queued."""
    return JobOut.of(service.create(session, settings, caller, body))


@router.get("", response_model=JobPage)
def list_jobs(session: SessionDep, caller: CallerDep, status: str | None = None, cursor: str | None = None,
              limit: int = 50):
    if status is not None and status not in states.ALL:
        raise Invalid(f"status: must be one of {', '.join(states.ALL)}, got {status!r}")
    rows, next_cursor = page(repository.list_page(session, caller.team_id, status, cursor, limit), limit)
    return {"data": [JobOut.of(job) for job in rows], "next_cursor": next_cursor}


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, caller: CallerDep):
    return JobOut.of(service.get(session, caller, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep, caller: CallerDep):
    return JobOut.of(service.cancel(session, caller, job_id))


@router.get("/{job_id}/events", response_model=list[EventOut])
def job_events(job_id: str, session: SessionDep, caller: CallerDep, after: int | None = None, limit: int = 200):
    """Events oldest first; pass the last id seen as `after` to get only newer ones."""
    job = service.get(session, caller, job_id)
    return repository.events(session, job.id, after, min(max(limit, 1), 1000))


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def job_metrics(job_id: str, session: SessionDep, caller: CallerDep):
    """The loss curve: one train point per logging step, one eval point per evaluation."""
    job = service.get(session, caller, job_id)
    points = repository.metrics(session, job.id)
    return {"job_id": job.id, "train": [p for p in points if p.kind == "train"],
            "eval": [p for p in points if p.kind == "eval"]}


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut])
def job_checkpoints(job_id: str, session: SessionDep, caller: CallerDep):
    """Complete checkpoints in storage, oldest first: the newest few and the best by eval loss.
    A job that loses its worker resumes from the newest."""
    job = service.get(session, caller, job_id)
    return repository.checkpoints(session, job.id)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def job_artifacts(job_id: str, request: Request, session: SessionDep, caller: CallerDep):
    job = service.get(session, caller, job_id)
    return [ArtifactOut(kind=a.kind, bytes=a.bytes, sha256=a.sha256, created_at=a.created_at,
                        download_url=str(request.url_for("download_artifact", job_id=job.id, kind=a.kind)))
            for a in repository.artifacts(session, job.id)]


@router.get("/{job_id}/artifacts/{kind}", name="download_artifact")
def download_artifact(job_id: str, kind: str, session: SessionDep, storage: StorageDep, settings: SettingsDep,
                      caller: CallerDep):
    """The artifact as one tar archive (adapter/ or merged/). On S3 this redirects to a presigned URL."""
    job = service.get(session, caller, job_id)
    artifact = repository.artifact(session, job.id, kind)
    if artifact is None:
        raise NotFound(f"job {job.id} has no {kind!r} artifact" + ("" if job.status == states.SUCCEEDED
                                                                   else f" (it is {job.status})"))
    filename = f"{job.name or job.id}-{kind}.tar".replace("/", "_").replace('"', "")
    url = storage.presigned_url(artifact.storage_key, settings.presign_expires_s, filename=filename)
    headers = {"X-Checksum-Sha256": artifact.sha256}
    if url:
        return RedirectResponse(url, status_code=307, headers=headers)
    return StreamingResponse(storage.open(artifact.storage_key), media_type="application/x-tar", headers={
        **headers, "Content-Length": str(artifact.bytes), "Content-Disposition": f'attachment; filename="{filename}"'})
