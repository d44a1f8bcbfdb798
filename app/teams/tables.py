from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, IdMixin, UTCDateTime


class Team(IdMixin, Base):
    __tablename__ = "teams"

    name: Mapped[str] = mapped_column(String(100), unique=True)
    # The team's quota, set by an admin (app/quotas/); null: the deployment's default (QLORA_DEFAULT_*).
    weight: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queued: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gpu_hours_per_month: Mapped[float | None] = mapped_column(Float, nullable=True)
    storage_gib: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The team's finished GPU time, decayed (Slurm's usage with PriorityDecayHalfLife), in GPU-seconds as
    # of fair_share_at: what its fair share remembers of the past (app/scheduling/policy.py).
    fair_share_usage_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    fair_share_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Set by an admin to retire the team (app/teams/admin.py): its keys answer 401 and its jobs do not start;
    # nothing of it is deleted, so its usage history stays for accounting. Null: the team is enabled.
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Who disabled it (an admin key, or `qlora admin` on a host) and the reason they gave, shown to admins and to
    # the team's own refused requests. Cleared with disabled_at.
    disabled_by: Mapped[str | None] = mapped_column(String(300), nullable=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)


class ApiKey(IdMixin, Base):
    __tablename__ = "api_keys"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    # The first characters of the key, shown in listings so a person can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    # sha256 of the whole key. Keys are 256-bit random, so a fast hash is enough: nothing to brute-force.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
