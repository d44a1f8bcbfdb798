"""Teams as the admin routes (GET /admin/teams, POST /admin/teams/{team}/disable|enable) and `qlora admin
list-teams` show them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class TeamOut(BaseModel):
    name: str
    id: str
    created_at: datetime
    disabled: bool = Field(description="An admin disabled it: its keys answer 401, its jobs do not start.")
    disabled_at: datetime | None
    keys_live: int = Field(description="API keys not revoked (they authenticate unless the team is disabled).")
    admin_keys_live: int = Field(description="Of those, the keys that may administer.")
    queued: int = Field(description="Jobs waiting for a GPU.")
    running: int = Field(description="Jobs holding a GPU (running, pausing or cancelling).")
    paused: int = Field(description="Jobs paused, kept with their checkpoints until resumed or cancelled.")
    gpu_hours_this_month: float = Field(description="GPU-hours used since the start of this month (UTC).")
    storage_bytes: int = Field(description="Datasets, artifacts and checkpoints kept in object storage.")


class TeamDisabled(TeamOut):
    pausing: list[str] = Field(description="Ids of the running jobs this request asked to pause: each saves a "
                                           "checkpoint after its current step, then stops.")
