from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime


class Lease(Base):
    """A role exactly one process plays at a time (the reaper; a scheduler), however many run: the
    process named by `holder` plays it until `expires_at`, and keeps it by renewing before then. A
    holder that dies stops renewing, and another process takes the role over once it expires
    (app/operations/lease.py)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))  # host:pid:random, see lease.holder_id()
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())  # when this holder took it (renewals keep it)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Worker(Base):
    """A training worker that is up, as it last said so: the worker's main process upserts its row every
    WORKER_BEAT_S, busy or idle (app/operations/workers.py), and deletes it when it stops cleanly. A row
    whose seen_at is older than WORKER_ALIVE_S is a worker that died or was cut off without a word. Jobs'
    heartbeats say the same only of a worker that trains: this is what tells an operator that the GPUs of a
    class are gone while its jobs wait."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # as in jobs.worker: `qlora worker --name`
    queue: Mapped[str] = mapped_column(String(100))  # the one queue (GPU class) it serves
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())  # when this worker process started beating
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # What its training processes run on (workers.training_device): "cuda" or "cpu"; null from an older release. A
    # queued job's wait is worded by it: a class served by the CPU has no GPU to wait for.
    device: Mapped[str | None] = mapped_column(String(8), nullable=True)
