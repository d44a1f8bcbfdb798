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
