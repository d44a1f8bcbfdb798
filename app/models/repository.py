from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models.tables import RegisteredModel


def by_name(session: Session, name: str, *, lock: str | None = None) -> RegisteredModel | None:
    """The model; `lock` "share" (a job being created on it) or "update" (its removal) holds its row until the
    transaction ends, so a removal waits for a job created meanwhile and then sees it (Postgres; SQLite runs one
    writer at a time)."""
    query = select(RegisteredModel).where(RegisteredModel.name == name)
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    return session.scalars(query).one_or_none()


def list_all(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))
