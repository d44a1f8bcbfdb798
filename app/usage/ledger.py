"""The attempts ledger: every attempt's GPU time, written where attempts start and end (the claim,
the worker's final state, the reaper), and folded into its team's decayed usage for fair share.

An attempt ends when its job leaves a worker: finished, paused (by its team or preempted), or its
worker lost (then it ends at the worker's last heartbeat, not when the loss was noticed). Paused
time is between attempts, so it is never counted.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.jobs.tables import Job, JobAttempt
from app.quotas.service import lock_team
from app.scheduling.policy import fold
from app.teams.tables import Team


def start(session: Session, job: Job, claimed_at: datetime) -> None:
    """The claim of job.attempt: a new row, open until end()."""
    session.add(JobAttempt(job_id=job.id, team_id=job.team_id, attempt=job.attempt, queue=job.queue,
                           worker=job.worker, claimed_at=claimed_at, tokens_at_claim=job.trained_tokens or 0))


def resumes_at(session: Session, job_id: str, attempt: int, tokens: int) -> None:
    """The attempt resumes from a checkpoint that had trained `tokens` (0: it starts over). It counts what
    it trains from there, the steps the lost attempt had already run included: the GPU does them twice. The
    job's count goes back there too, as the resumed run reports it."""
    row = _open_attempt(session, job_id, attempt)
    if row is not None:
        row.tokens_at_claim = tokens
    job = session.get(Job, job_id)
    if job is not None:
        job.trained_tokens = tokens


def end(session: Session, job_id: str, attempt: int, ended_at: datetime, outcome: str,
        half_life_s: float | None = None) -> JobAttempt | None:
    """Close the attempt (once: a second end changes nothing) and add its GPU time to its team's
    decayed usage. None when there is no open row (an attempt claimed before the ledger existed)."""
    row = _open_attempt(session, job_id, attempt)
    if row is None:
        return None
    ended_at = max(ended_at, row.claimed_at)
    tokens_now = session.scalar(select(Job.trained_tokens).where(Job.id == job_id)) or 0
    row.ended_at, row.outcome = ended_at, outcome
    row.trained_tokens = max(tokens_now - row.tokens_at_claim, 0)
    _fold(session, row, half_life_s or get_settings().fair_share_half_life_s)
    return row


def _open_attempt(session: Session, job_id: str, attempt: int) -> JobAttempt | None:
    return session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt,
                                                    JobAttempt.ended_at.is_(None))).one_or_none()


def _fold(session: Session, row: JobAttempt, half_life_s: float) -> None:
    """usage(now) = usage(then) decayed to now + this attempt's GPU time decayed to now. The team's row
    is locked first (lock_team), so two attempts of one team ending at once both count."""
    if session.get(Team, row.team_id) is None:
        return  # gone with its team
    team = lock_team(session, row.team_id)
    assert row.ended_at is not None
    value, at = fold(team.fair_share_usage_s or 0.0, team.fair_share_at.timestamp() if team.fair_share_at else None,
                     row.claimed_at.timestamp(), row.ended_at.timestamp(), half_life_s)
    team.fair_share_usage_s, team.fair_share_at = value, datetime.fromtimestamp(at, UTC)
