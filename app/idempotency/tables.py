from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class IdempotencyKey(Base):
    """A creation's Idempotency-Key (app/idempotency/service.py): for a day, the same key sent again by the
    same team to the same endpoint is answered with what it made (a job, or a dataset), not a second one."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_team_created", "team_id", "created_at"),)

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(50), primary_key=True)  # the endpoint: "POST /jobs", ...
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))  # of the request: the same key for another is refused
    # What it made: one of the two. The key goes with it when it is deleted (then the key is free again).
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
