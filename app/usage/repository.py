"""Queries on what teams used: GPU time from the attempts ledger (job_attempts), storage from the
objects' rows. The scheduler reads the month's GPU time for budgets; GET /usage reads the rest."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import Select, false, func, or_, select
from sqlalchemy.orm import Session

from app.datasets.tables import Dataset
from app.jobs.tables import Artifact, Checkpoint, Job, JobAttempt


class Span(Protocol):
    """What overlap_s needs of an attempt: a JobAttempt or an AttemptSpan."""

    @property
    def claimed_at(self) -> datetime: ...

    @property
    def ended_at(self) -> datetime | None: ...


def _overlapping(query: Select, since: datetime, until: datetime, now: datetime,
                 team_ids: Collection[str] | None) -> Select:
    """Attempts that held a GPU at some time in [since, until): claimed before until, and not ended
    before since (or still running, where since is before `now`, the database's clock: a running attempt
    holds no GPU in the future). None: of every team."""
    running = JobAttempt.ended_at.is_(None) if since < now else false()
    query = query.where(JobAttempt.claimed_at < until, or_(running, JobAttempt.ended_at >= since))
    if team_ids is not None:
        query = query.where(JobAttempt.team_id.in_(team_ids))
    return query.order_by(JobAttempt.claimed_at)


def month_start(now: datetime) -> datetime:
    """The start of the UTC calendar month of `now`: where monthly budgets and the default usage window begin."""
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def attempts_overlapping(session: Session, since: datetime, until: datetime, now: datetime,
                         team_ids: Collection[str] | None = None) -> list[JobAttempt]:
    """Attempts that held a GPU at some time in [since, until): claimed before until, and not ended
    before since (or still running). None: of every team."""
    return list(session.scalars(_overlapping(select(JobAttempt), since, until, now, team_ids)))


@dataclass(frozen=True, slots=True)
class AttemptSpan:
    """One attempt as GET /usage reads it, with what it shows of the attempt's job. Plain values, not
    rows: a year of a busy team's attempts is read at once."""

    job_id: str
    team_id: str
    claimed_at: datetime
    ended_at: datetime | None  # None: still running
    trained_tokens: int  # of an ended attempt
    tokens_at_claim: int
    job_name: str
    job_status: str
    job_trained_tokens: int  # the job's count now: a running attempt has trained this less tokens_at_claim

    @property
    def tokens(self) -> int:
        """What the attempt trained: at its end, or so far while it runs."""
        if self.ended_at is not None:
            return self.trained_tokens
        return max(self.job_trained_tokens - self.tokens_at_claim, 0)


def attempt_spans(session: Session, since: datetime, until: datetime, now: datetime,
                  team_ids: Collection[str] | None = None) -> list[AttemptSpan]:
    """attempts_overlapping, with their jobs' names, states and token counts, in one query."""
    query = _overlapping(select(JobAttempt.job_id, JobAttempt.team_id, JobAttempt.claimed_at, JobAttempt.ended_at,
                                JobAttempt.trained_tokens, JobAttempt.tokens_at_claim, Job.name, Job.status,
                                Job.trained_tokens).join(Job, Job.id == JobAttempt.job_id), since, until, now, team_ids)
    return [AttemptSpan(job_id, team_id, claimed_at, ended_at, trained or 0, at_claim or 0, name or "", status,
                        job_trained or 0)
            for job_id, team_id, claimed_at, ended_at, trained, at_claim, name, status, job_trained
            in session.execute(query)]


def overlap_s(attempt: Span, since: datetime, until: datetime, now: datetime) -> float:
    """The attempt's GPU-seconds inside [since, until); a running one counts up to now."""
    end = min(attempt.ended_at or now, until)
    start = max(attempt.claimed_at, since)
    return max((end - start).total_seconds(), 0.0)


def gpu_seconds_by_team(session: Session, since: datetime, until: datetime, now: datetime,
                        team_ids: Collection[str] | None = None) -> dict[str, float]:
    """GPU-seconds each team's attempts held in [since, until) (teams with none are absent); a running one
    counts up to `now`, which must be the database's clock (app.db.database_now), as claimed_at is."""
    used: dict[str, float] = {}
    for attempt in attempts_overlapping(session, since, until, now, team_ids):
        used[attempt.team_id] = used.get(attempt.team_id, 0.0) + overlap_s(attempt, since, until, now)
    return used


def storage_bytes(session: Session, team_id: str) -> int:
    """What the team keeps in object storage: its datasets, and its jobs' artifacts and checkpoints."""
    return storage_bytes_by_team(session, [team_id]).get(team_id, 0)


def storage_bytes_by_team(session: Session, team_ids: Collection[str] | None = None) -> dict[str, int]:
    """storage_bytes of each team (None: of every team), in three queries whatever the number of
    teams; teams that keep nothing are absent."""
    datasets = select(Dataset.team_id, func.sum(Dataset.bytes)).group_by(Dataset.team_id)
    artifacts = select(Job.team_id, func.sum(Artifact.bytes)).join(Job, Job.id == Artifact.job_id).group_by(Job.team_id)
    checkpoints = (select(Job.team_id, func.sum(Checkpoint.bytes)).join(Job, Job.id == Checkpoint.job_id)
                   .group_by(Job.team_id))
    if team_ids is not None:
        datasets = datasets.where(Dataset.team_id.in_(team_ids))
        artifacts = artifacts.where(Job.team_id.in_(team_ids))
        checkpoints = checkpoints.where(Job.team_id.in_(team_ids))
    kept: dict[str, int] = {}
    for query in (datasets, artifacts, checkpoints):
        for team_id, total in session.execute(query):
            kept[team_id] = kept.get(team_id, 0) + int(total or 0)
    return kept
