from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.datasets.tables import Dataset
from app.jobs.tables import Job
from app.pagination import newest_first


def get(session: Session, team_id: str, dataset_id: str) -> Dataset | None:
    return session.scalars(select(Dataset).where(Dataset.id == dataset_id, Dataset.team_id == team_id)).one_or_none()


def list_page(session: Session, team_id: str, cursor: str | None, limit: int) -> list[Dataset]:
    query = newest_first(select(Dataset).where(Dataset.team_id == team_id), Dataset, cursor, limit)
    return list(session.scalars(query))


def active_jobs_using(session: Session, dataset_id: str, active_statuses: tuple[str, ...]) -> list[Job]:
    query = select(Job).where(
        (Job.dataset_id == dataset_id) | (Job.validation_dataset_id == dataset_id),
        Job.status.in_(active_statuses),
    )
    return list(session.scalars(query))
