"""What a worker may do to a job: claim it, report on it, finish it. Every write after the claim
carries the attempt number it was given; once the job has moved on (requeued to another worker,
finished), the write changes nothing and the worker learns it has lost the job."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from app.datasets.tables import Dataset
from app.db import utcnow
from app.jobs import repository, states
from app.models import repository as models


class LeaseLost(Exception):
    """This worker no longer owns the job: stop training and write nothing more."""


@dataclass
class DatasetRef:
    id: str
    storage_key: str
    sha256: str


@dataclass
class ClaimedJob:
    id: str
    team_id: str
    attempt: int
    spec: dict
    base_model: dict  # name, path, hub_id, revision
    train: DatasetRef
    validation: DatasetRef | None
    resumed_from_step: int = 0
    metadata: dict = field(default_factory=dict)


def claim(session: Session, job_id: str, worker: str) -> ClaimedJob | None:
    """queued → running. None when the job is not queued (cancelled, or another worker has it)."""
    attempt = repository.claim(session, job_id, worker, utcnow())
    if attempt is None:
        return None
    job = repository.get_any_team(session, job_id)
    session.refresh(job)
    model = models.by_name(session, job.base_model)
    train = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    validation = session.get(Dataset, job.validation_dataset_id) if job.validation_dataset_id else None
    repository.add_event(session, job.id, "claimed", message=f"{worker} took the job (attempt {attempt})",
                         attempt=attempt, data={"worker": worker})
    if model is None or train is None:
        missing = f"base model {job.base_model!r} is no longer registered" if model is None \
            else "its training dataset was deleted"
        finish(session, job.id, attempt, states.FAILED, error=f"cannot start: {missing}")
        return None
    return ClaimedJob(
        id=job.id, team_id=job.team_id, attempt=attempt, spec=job.spec,
        base_model={"name": model.name, "path": model.path, "hub_id": model.hub_id, "revision": model.revision},
        train=DatasetRef(train.id, train.storage_key, train.sha256),
        validation=DatasetRef(validation.id, validation.storage_key, validation.sha256) if validation else None,
    )


def report(session: Session, job_id: str, attempt: int, records: list[dict], progress: dict | None) -> str:
    """Write the training process's metrics and events and a heartbeat; returns the job's status
    (cancelling means: stop). Raises LeaseLost when this attempt no longer owns the job."""
    values: dict = {"heartbeat_at": utcnow()}
    if progress:
        values["step"] = progress["step"]
        values["total_steps"] = progress.get("total_steps")
        values["trained_tokens"] = progress.get("tokens_seen", 0)
    if not repository.touch(session, job_id, attempt, **values):
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer owns it")
    for record in records:
        kind = record.get("kind")
        if kind in ("train", "eval"):
            repository.upsert_metric(session, job_id, _metric_values(record))
        elif kind == "event":
            repository.add_event(session, job_id, record.get("type", "event"), record.get("level", "info"),
                                 record.get("message", ""), attempt=attempt, step=record.get("step"),
                                 data={k: v for k, v in record.items()
                                       if k not in ("kind", "type", "level", "message", "step", "time")} or None)
    status = repository.status_of(session, job_id)
    return status[0] if status else states.FAILED


_METRIC_FIELDS = ("step", "epoch", "train_loss", "eval_loss", "learning_rate", "grad_norm", "tokens_seen",
                  "tokens_per_second", "peak_memory_bytes")


def _metric_values(record: dict) -> dict:
    values = finite_json({k: record.get(k) for k in _METRIC_FIELDS})
    values["kind"] = record["kind"]
    return values


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
           summary: dict | None = None) -> bool:
    """running/cancelling → succeeded | failed | cancelled, fenced by attempt. False: someone else decided."""
    values: dict = {"finished_at": utcnow(), "error": error, "heartbeat_at": utcnow()}
    if summary is not None:
        values["summary"] = finite_json(summary)
    won = repository.transition(session, job_id, status, attempt=attempt,
                                only_from=[states.RUNNING, states.CANCELLING], **values)
    if won:
        level = {"succeeded": "info", "cancelled": "warning"}.get(status, "error")
        repository.add_event(session, job_id, status, level, error or f"job {status}", attempt=attempt)
    return won


def add_artifact(session: Session, job_id: str, attempt: int, kind: str, key: str, size: int, sha256: str) -> None:
    if not repository.touch(session, job_id, attempt, heartbeat_at=utcnow()):
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer owns it")
    repository.add_artifact(session, job_id, kind, key, size, sha256)
