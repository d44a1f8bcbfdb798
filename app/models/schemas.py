from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    path: str | None
    hub_id: str | None
    revision: str | None
    description: str
    config: dict | None
    created_at: datetime


class ModelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    path: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    description: str = ""
    config: dict | None = None  # the model's config.json; read from `path` when the API host sees it
