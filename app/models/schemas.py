from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.text import has_control_characters


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

    # The lengths are the columns' (app/models/tables.py): longer would fail the insert on Postgres.
    name: str = Field(min_length=1, max_length=200)
    path: str | None = Field(None, min_length=1, max_length=1000)
    hub_id: str | None = Field(None, min_length=1, max_length=300)
    revision: str | None = Field(None, min_length=1, max_length=100)
    description: str = Field("", max_length=1000)
    config: dict | None = None  # the model's config.json; read from `path` when the API host sees it

    @field_validator("name", "path", "hub_id", "revision")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and has_control_characters(value):  # Postgres cannot store NUL; a path cannot hold it
            raise ValueError("control characters")
        return value

    @field_validator("description")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:  # line breaks may stay: it is prose
            raise ValueError("a NUL character")
        return value
