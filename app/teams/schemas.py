"""Teams as the admin routes (GET /admin/teams, POST /admin/teams/{team}/disable|enable) and `qlora admin
list-teams` show them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.text import has_control_characters


class TeamOut(BaseModel):
    name: str
    id: str
    created_at: datetime
    disabled: bool = Field(description="An admin disabled it: its keys answer 401, its jobs do not start.")
    disabled_at: datetime | None
    disabled_by: str | None = Field(description="Who disabled it: an admin key (its prefix and team), or `qlora admin` "
                                                "(the user and host it ran as).")
    disabled_reason: str | None = Field(description="The reason the admin gave, if any; shown to the team's refused "
                                                    "requests too.")
    keys_live: int = Field(description="API keys not revoked (they authenticate unless the team is disabled).")
    admin_keys_live: int = Field(description="Of those, the keys that may administer.")
    queued: int = Field(description="Jobs waiting for a GPU.")
    running: int = Field(description="Jobs holding a GPU (running, pausing or cancelling).")
    paused: int = Field(description="Jobs paused, kept with their checkpoints until resumed or cancelled.")
    gpu_hours_this_month: float = Field(description="GPU-hours used since the start of this month (UTC).")
    storage_bytes: int = Field(description="Datasets, artifacts and checkpoints kept in object storage.")


MAX_REASON = 500  # teams.disabled_reason


class DisableTeam(BaseModel):
    """POST /admin/teams/{team}/disable's body, optional."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, min_length=1, max_length=MAX_REASON,
                               description="Why, for the team and the other admins: shown in list-teams and in the 401 "
                                           "every key of the team gets.")

    @field_validator("reason")
    @classmethod
    def _one_line(cls, reason: str | None) -> str | None:
        # It is printed in terminals and error messages: no line breaks, escapes or bidi overrides.
        if reason is not None and has_control_characters(reason):
            raise ValueError("control characters")
        return reason


class TeamDisabled(TeamOut):
    pausing: list[str] = Field(description="Ids of the running jobs this request asked to pause: each saves a "
                                           "checkpoint after its current step, then stops.")
