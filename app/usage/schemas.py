from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field

# A team's by_job is cut here (most GPU time kept): a year of a busy team's jobs stays one bounded answer.
MAX_JOBS_PER_TEAM = 1000


class JobUsage(BaseModel):
    job_id: str
    name: str
    status: str = Field(description="The job's state now.")
    gpu_seconds: float = Field(description="GPU time of its attempts inside the window, pauses excluded.")
    trained_tokens: int = Field(description="Tokens its attempts that ended in the window trained (a running one: so far).")
    attempts: int = Field(description="Its attempts that held a GPU in the window.")


class DayUsage(BaseModel):
    date: dt.date = Field(description="A UTC day; only days with usage are listed.")
    gpu_seconds: float = Field(description="GPU time inside this day: an attempt over midnight counts in both days.")
    trained_tokens: int = Field(description="Tokens of the attempts that ended this day (a running one's so far: today).")


class TeamUsage(BaseModel):
    team: str = Field(description="The team's name.")
    gpu_seconds: float
    gpu_hours: float
    trained_tokens: int
    storage_bytes: int = Field(description="Datasets, artifacts and checkpoints the team keeps now (not in the window).")
    jobs: int = Field(description="Jobs with usage in the window, all of them (by_job may list fewer).")
    by_job: list[JobUsage] = Field(description=f"Most GPU time first, at most {MAX_JOBS_PER_TEAM}.")
    by_job_truncated: bool = Field(description="True when by_job was cut at its cap: ask for a shorter window.")
    by_day: list[DayUsage] = Field(description="Oldest first.")


class UsageReport(BaseModel):
    """GET /usage: what each team used in [from, to), counted from its jobs' attempts."""

    model_config = ConfigDict(populate_by_name=True)

    from_: dt.datetime = Field(alias="from", description="The window's start (UTC), included.")
    to: dt.datetime = Field(description="The window's end (UTC), excluded.")
    as_of: dt.datetime = Field(description="Running attempts count up to this time.")
    teams: list[TeamUsage] = Field(description="Your team; with all_teams, every team, most GPU time first.")
