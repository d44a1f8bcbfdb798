"""A team's quota as the API shows and takes it. QuotaChanges holds the allowed ranges: the admin
routes and `qlora admin set-quota` both validate with it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.config import MAX_WEIGHT, MIN_WEIGHT

# Bounds on what an admin may set: generous, but finite, so a typo cannot store 1e308 and every value
# stays a plain number in JSON. Strict: `true` is not a count, "5" is not a weight.
MAX_COUNT = 1_000_000
MAX_GPU_HOURS_PER_MONTH = 10_000_000.0  # over a thousand GPUs all month
MAX_STORAGE_GIB = 1_000_000_000.0  # about an exbibyte


class QuotaChanges(BaseModel):
    """The fields to change: a value sets it for the team, null resets it to the deployment's default
    (QLORA_DEFAULT_*), a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    weight: float | None = Field(None, ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False, strict=True,
                                 description="The team's share of the GPU pool against the others'.")
    max_running: int | None = Field(None, ge=0, le=MAX_COUNT, strict=True,
                                    description="Jobs training at once; 0 starts none.")
    max_queued: int | None = Field(None, ge=0, le=MAX_COUNT, strict=True,
                                   description="Jobs waiting at once; 0 refuses every new job.")
    gpu_hours_per_month: float | None = Field(None, ge=0, le=MAX_GPU_HOURS_PER_MONTH, allow_inf_nan=False,
                                              strict=True, description="GPU-hours per calendar month (UTC).")
    storage_gib: float | None = Field(None, ge=0, le=MAX_STORAGE_GIB, allow_inf_nan=False, strict=True,
                                      description="Datasets, artifacts and checkpoints kept, in GiB.")

    @field_validator("max_running", "max_queued", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> Any:
        """A count given as a whole float (3.0) is that count, as `qlora admin set-quota --max-running 3.0`
        takes it: JSON does not tell 3 from 3.0 (a JavaScript client cannot even send 3.0). 3.5 is still
        refused, and so are true and "3"."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


# What each field accepts, for the error that names it.
ALLOWED = {
    "weight": f"a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}",
    "max_running": f"a whole number from 0 to {MAX_COUNT:,}",
    "max_queued": f"a whole number from 0 to {MAX_COUNT:,}",
    "gpu_hours_per_month": f"a number from 0 to {MAX_GPU_HOURS_PER_MONTH:,.0f}",
    "storage_gib": f"a number from 0 to {MAX_STORAGE_GIB:,.0f}",
}


class QuotaValues(BaseModel):
    """The quota in force: the team's own values, else the defaults. null: no limit."""

    weight: float
    max_running: int | None
    max_queued: int | None
    gpu_hours_per_month: float | None
    storage_gib: float | None


class QuotaOwn(BaseModel):
    """The values set for this team; null: it has the default."""

    weight: float | None = None
    max_running: int | None = None
    max_queued: int | None = None
    gpu_hours_per_month: float | None = None
    storage_gib: float | None = None


class QuotaUse(BaseModel):
    """What the team holds now, against the quota."""

    running: int = Field(description="Jobs holding a GPU (running, pausing or cancelling).")
    queued: int = Field(description="Jobs waiting for a GPU.")
    gpu_hours_this_month: float = Field(description="GPU-hours used since the start of this month (UTC).")
    storage_bytes: int = Field(description="Datasets, artifacts and checkpoints kept in object storage.")


class QuotaOut(BaseModel):
    team: str
    quota: QuotaValues
    own: QuotaOwn
    use: QuotaUse
