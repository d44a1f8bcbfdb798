"""Every query on idempotency keys, each scoped to the team whose keys they are."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from app.idempotency.tables import IdempotencyKey


def get(session: Session, team_id: str, scope: str, key: str) -> IdempotencyKey | None:
    return session.get(IdempotencyKey, (team_id, scope, key))


def add(session: Session, team_id: str, scope: str, key: str, request_sha256: str, created_at: datetime, *,
        job_id: str | None = None, dataset_id: str | None = None) -> None:
    session.add(IdempotencyKey(team_id=team_id, scope=scope, key=key, request_sha256=request_sha256, job_id=job_id,
                               dataset_id=dataset_id, created_at=created_at))


def forget_older(session: Session, team_id: str, made_before: datetime) -> None:
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.team_id == team_id,
                                                 IdempotencyKey.created_at < made_before))
