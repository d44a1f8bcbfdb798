from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class LineErrorOut(BaseModel):
    line: int
    message: str


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    bytes: int
    sha256: str
    status: str  # ready | invalid
    format: str | None
    rows: int
    token_estimate: int
    error_count: int
    errors: list[LineErrorOut]  # the first bad lines, with their numbers
    created_at: datetime


class DatasetPage(BaseModel):
    data: list[DatasetOut]
    next_cursor: str | None
