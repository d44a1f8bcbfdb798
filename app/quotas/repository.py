"""What a team holds now, counted for its quota. Every query is of one team."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs.tables import Job


def count_jobs(session: Session, team_id: str, statuses: Collection[str]) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.team_id == team_id, Job.status.in_(statuses))) or 0
