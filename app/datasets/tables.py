from __future__ import annotations

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, IdMixin


class Dataset(IdMixin, Base):
    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_team_created", "team_id", "created_at", "id"),)

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))  # metadata only; the storage key is the server's
    storage_key: Mapped[str] = mapped_column(String(300))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # ready | invalid
    format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    token_estimate: Mapped[int] = mapped_column(BigInteger, default=0)
    error_count: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list] = mapped_column(JSON, default=list)  # the first bad lines: [{"line", "message"}]
