from __future__ import annotations

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, deferred, mapped_column

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
    # The model's config.json (its shape), read when it is registered: the API estimates a job's
    # memory from it without ever reaching the weights, which live on the worker hosts.
    config: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Its tokenizer files ({file name: text}: tokenizer.json, tokenizer_config.json, the chat template),
    # read from `path` when it is registered or first needed: preflight tokenizes a job's data with them
    # (app/jobs/preflight.py). Megabytes for a large vocabulary, so read only when asked for.
    tokenizer: Mapped[dict | None] = deferred(mapped_column(JSON, nullable=True))
