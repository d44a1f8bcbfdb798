"""Finds jobs whose worker is gone and gives them another attempt (or pauses them after too many).
(Sending "job X is ready" again for queued jobs whose message never reached a worker that claimed them
is the scheduler's: app/scheduling/service.py.)

Every API process (and `qlora reaper`) runs a ReaperThread, and only the one holding the "reaper"
lease works (app/operations/lease.py): one pass per interval for the whole deployment, however many
API processes run, and another process takes over within about the lease's TTL when the holder dies.
Belt and braces, each change is still a compare-and-set on (status, attempt), so two reapers looking
at the same silent job (clocks that disagree, a pass outliving its lease) still requeue it once.
Requeueing bumps nothing itself; the next claim takes attempt + 1, and from then on the old worker's
writes, fenced by its attempt number, change nothing.

Silence is the only evidence of a lost worker it has, anywhere: a worker on another host may be alive and cut
off for a while. One case has proof instead: a `serve` on the embedded default that takes its home's lock knows
the local worker of the one before it is gone (that worker held the lock), and requeues at once the jobs that
worker's claims took (reap_claims_of_gone_worker) rather than leaving them to this deadline.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit, database_now, session_scope
from app.jobs import quantized_cache, repository
from app.jobs.dispatch import send
from app.jobs.runs import attempt_lost
from app.jobs.tables import Job
from app.operations import workers
from app.operations.lease import LeasedLoop

log = logging.getLogger(__name__)

LEASE = "reaper"


def reap(session: Session, settings: Settings) -> dict[str, int]:
    now = database_now(session)  # the clock heartbeats are written with
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "paused": 0}
    deadline = now - timedelta(seconds=settings.heartbeat_deadline_s)
    for job in repository.stale_jobs(session, deadline):
        outcome = _worker_lost(session, settings, job, f"worker {job.worker} stopped sending heartbeats at step {job.step}",
                               now, silent_before=deadline)
        if outcome is not None:
            counts[outcome] += 1
    session.flush()
    return counts


def reap_claims_of_gone_worker(session: Session, settings: Settings, claim_tokens: Collection[str],
                               why: Callable[[Job], str]) -> dict[str, str]:
    """The jobs that the claims marked `claim_tokens` took, still in the attempts they took, given another attempt
    (or paused, cancelled, as reap() does), at once: their worker is known to be gone (`serve` on the embedded
    default, holding its home's lock that the worker held). `why(job)` says how it went, for the job's event. A
    job requeued is sent to its queue once this commits: the scheduler would send it only once the lease of the
    `serve` that died ran out. {job id: what became of it} ("requeued", "paused", "cancelled", "failed"); a send that
    fails (the broker out of reach) says so in its job's entry once the commit is done, rather than raise out of the
    commit: the job is queued all the same, and the scheduler sends it (said "could not requeue", it was not true)."""
    now = database_now(session)
    became: dict[str, str] = {}
    for job in repository.claimed_with(session, claim_tokens):
        outcome = _worker_lost(session, settings, job, why(job), now)
        if outcome is not None:
            became[job.id] = outcome
        if outcome == "requeued":
            after_commit(session, functools.partial(_send_requeued, settings, job.id, job.queue, became))
    session.flush()
    return became


def _send_requeued(settings: Settings, job_id: str, queue: str, became: dict[str, str]) -> None:
    """After the commit. Raised out of it, a failure here had `serve` say it could not requeue jobs it had requeued."""
    try:
        sent = send(settings, job_id, queue)
    except Exception:  # sent, its time not recorded (the database): the scheduler may send it again, which is harmless
        log.warning("job %s requeued and sent, but its dispatch time was not recorded", job_id, exc_info=True)
        return
    if not sent:
        became[job_id] = "requeued, but its message could not be sent to its queue (see above): the scheduler sends it"


def _worker_lost(session: Session, settings: Settings, job: Job, why: str, now: datetime,
                 silent_before: datetime | None = None) -> str | None:
    """The attempt `job` runs lost with its worker (runs.attempt_lost). Its GPU time ends with its last sign of life,
    whatever comes of the job. A worker lost is the host's doing, not the job's: the worker's heartbeats come from a
    thread of its own, beside a training process it watches (a training process killed or stuck is the worker's to
    report, and the time limit's), so silence means a host killed or preempted, a frozen VM, a partition, or the
    database out of reach for longer than the worker waits. Past the last attempt such a job is paused, resumable
    from its newest checkpoint, not failed: three spot preemptions must not lose a day's training."""
    return attempt_lost(session, job, why, settings.max_attempts, job.heartbeat_at or job.claimed_at or now,
                        settings.fair_share_half_life_s, outside_the_job=True, silent_before=silent_before)


def housekeeping(settings: Settings, storage) -> dict[str, int]:
    """One pass: give lost jobs another attempt, forget workers long silent, remove uploads that died
    half-written, and prune the quantized bases no job has used for QLORA_QUANTIZED_CACHE_KEEP_DAYS (a
    DELETE that finds nothing on a table of a few rows, on most passes)."""
    with session_scope(settings.database_url) as session:
        counts = reap(session, settings)
        counts["workers_forgotten"] = workers.forget_silent(session, database_now(session))  # seen_at's clock
    counts["stale_writes_removed"] = storage.abort_stale_writes(settings.stale_upload_s)
    counts.update(quantized_cache.prune_unused(settings, storage))
    return counts


class ReaperThread(LeasedLoop):
    """Runs housekeeping() at start and every reaper_interval_s inside a long-lived process (each
    API process has one; `qlora reaper` runs it alone), while it holds the reaper lease."""

    def __init__(self, settings: Settings, storage):
        super().__init__(settings.database_url, LEASE, settings.reaper_interval_s)
        self.settings = settings
        self.storage = storage

    def work(self) -> dict[str, int]:
        return housekeeping(self.settings, self.storage)
