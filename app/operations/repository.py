"""The operators' queries that span every team: which stored objects the database refers to.

Not team-scoped, unlike every domain's repository: these serve `qlora admin`, which runs against the
whole database, never a request.
"""

from __future__ import annotations

from sqlalchemy import exists, select, union_all
from sqlalchemy.orm import Session

from app.datasets.tables import Dataset
from app.jobs.tables import Artifact, Checkpoint, QuantizedBase
from app.operations.tables import Worker
from app.teams.tables import Team

# Every column that holds a storage key: an object no row of these names is a stray. A table that comes
# to hold a key must be added here, or the sweep (app/operations/storage_sweep.py) would take its objects
# for strays; tests/fast/test_storage_sweep.py fails until it is.
STORAGE_KEY_COLUMNS = (Dataset.storage_key, Checkpoint.storage_key, Artifact.storage_key, QuantizedBase.storage_key)


def referenced_keys(session: Session) -> set[str]:
    """The storage keys some row refers to, of every table above, in one query."""
    return set(session.scalars(union_all(*(select(column) for column in STORAGE_KEY_COLUMNS))))


def is_referenced(session: Session, key: str) -> bool:
    """Whether a row refers to `key` now (as of the session's transaction)."""
    return any(session.scalar(select(exists().where(column == key))) for column in STORAGE_KEY_COLUMNS)


def team_names(session: Session, team_ids: set[str]) -> dict[str, str]:
    """Names of those of `team_ids` that are teams (a deleted team's objects name none)."""
    if not team_ids:
        return {}
    return dict(session.execute(select(Team.id, Team.name).where(Team.id.in_(team_ids))).tuples().all())


def workers(session: Session) -> list[Worker]:
    """Every worker that has said it is up and not since stopped cleanly, alive or gone silent."""
    return list(session.scalars(select(Worker).order_by(Worker.queue, Worker.name)))
