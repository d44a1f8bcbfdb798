"""Every query on datasets. A team reads through readable_datasets(team_id), so a read that forgets
the team cannot be written."""

from __future__ import annotations

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.datasets.tables import Dataset
from app.jobs.repository import readable_jobs
from app.jobs.tables import Job
from app.pagination import newest_first


def readable_datasets(team_id: str) -> Select[Dataset]:
    """The datasets a team may read: where every read of datasets starts."""
    return select(Dataset).where(Dataset.team_id == team_id)


def get(session: Session, team_id: str, dataset_id: str) -> Dataset | None:
    return session.scalars(readable_datasets(team_id).where(Dataset.id == dataset_id)).one_or_none()


def list_page(session: Session, team_id: str, cursor: str | None, limit: int) -> list[Dataset]:
    return list(session.scalars(newest_first(readable_datasets(team_id), Dataset, cursor, limit)))


def active_jobs_using(session: Session, team_id: str, dataset_id: str, active_statuses: tuple[str, ...]) -> list[Job]:
    """The team's jobs not yet finished that train or evaluate on the dataset (a job can only use its
    own team's datasets)."""
    query = readable_jobs(team_id).where(
        (Job.dataset_id == dataset_id) | (Job.validation_dataset_id == dataset_id),
        Job.status.in_(active_statuses),
    )
    return list(session.scalars(query))
