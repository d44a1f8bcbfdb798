from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, IdMixin


class RegisteredModel(IdMixin, Base):
    """A base model jobs may fine-tune. Only admins add them: a job names one, never a path."""

    __tablename__ = "base_models"

    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Exactly one source: a directory of safetensors weights on the worker hosts, or a hub repo
    # pinned to a revision (for hosts that reach a hub).
    path: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    hub_id: Mapped[str | None] = mapped_column(String(300), nullable=True)
    revision: Mapped[str | None] = mapped_column(String(100), nullable=True)
    description: Mapped[str] = mapped_column(String(1000), default="")
