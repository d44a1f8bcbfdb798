"""Finds jobs whose worker is gone and gives them another attempt (or fails them after too many).
(Sending "job X is ready" again for queued jobs whose message never reached a worker that claimed them
is the scheduler's: app/scheduling/service.py.)

Every API process (and `qlora reaper`) runs a ReaperThread, and only the one holding the "reaper"
lease works (app/operations/lease.py): one pass per interval for the whole deployment, however many
API processes run, and another process takes over within about the lease's TTL when the holder dies.
Belt and braces, each change is still a compare-and-set on (status, attempt), so two reapers looking
at the same silent job (clocks that disagree, a pass outliving its lease) still requeue it once.
Requeueing bumps nothing itself; the next claim takes attempt + 1, and from then on the old worker's
writes, fenced by its attempt number, change nothing.
"""

from __future__ import annotations

import functools
import logging
from datetime import timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope, utcnow
from app.jobs import repository, states
from app.jobs.runs import requeue_if_preempted
from app.operations.lease import LeasedLoop
from app.usage import ledger

log = logging.getLogger(__name__)

LEASE = "reaper"


def reap(session: Session, settings: Settings) -> dict[str, int]:
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "paused": 0}
    for job in repository.stale_jobs(session, now - timedelta(seconds=settings.heartbeat_deadline_s)):
        silent = f"worker {job.worker} stopped sending heartbeats at step {job.step}"
        attempt, only_from = job.attempt, [job.status]  # the fence: only if nothing moved the job meanwhile
        # Its GPU time ends with its last sign of life, whatever comes of the job.
        last_sign = job.heartbeat_at or job.claimed_at or now
        ended = functools.partial(ledger.end, session, job.id, attempt, last_sign, half_life_s=settings.fair_share_half_life_s)
        if job.status == states.CANCELLING:
            if repository.transition(session, job.id, states.CANCELLED, attempt=attempt, only_from=only_from,
                                     finished_at=now):
                repository.add_event(session, job.id, "cancelled", "warning", f"{silent} while cancelling",
                                     attempt=job.attempt)
                ended(states.CANCELLED)
                counts["cancelled"] += 1
        elif job.status == states.PAUSING:
            # It was stopping anyway: paused, resumable from its newest checkpoint.
            if repository.transition(session, job.id, states.PAUSED, attempt=attempt, only_from=only_from,
                                     worker=None):
                repository.add_event(session, job.id, "paused", "warning",
                                     f"{silent} while pausing; it resumes from its newest checkpoint",
                                     attempt=job.attempt, step=job.step)
                ended(states.PAUSED)
                requeue_if_preempted(session, job.id, attempt)
                counts["paused"] += 1
        elif job.lost_workers + 1 >= settings.max_attempts:
            error = (f"the job lost its worker {job.lost_workers + 1} times (last: {silent}); giving up after "
                     f"QLORA_MAX_ATTEMPTS={settings.max_attempts}. Look at the workers' health (memory, "
                     "preemption, driver errors) and start a new job")
            if repository.transition(session, job.id, states.FAILED, attempt=attempt, only_from=only_from,
                                     finished_at=now, error=error):
                repository.add_event(session, job.id, "failed", "error", error, attempt=job.attempt)
                ended(states.FAILED)
                counts["failed"] += 1
        elif repository.transition(session, job.id, states.QUEUED, attempt=attempt, only_from=only_from, worker=None,
                                   dispatched_at=None, lost_workers=job.lost_workers + 1):
            repository.add_event(
                session, job.id, "requeued", "warning",
                f"{silent}; requeued for try {job.lost_workers + 2} of QLORA_MAX_ATTEMPTS={settings.max_attempts}, "
                "which resumes from the newest checkpoint", attempt=job.attempt, step=job.step)
            ended(states.QUEUED)
            counts["requeued"] += 1
    session.flush()
    return counts


def housekeeping(settings: Settings, storage) -> dict[str, int]:
    """One pass: give lost jobs another attempt, and remove uploads that died half-written."""
    with session_scope(settings.database_url) as session:
        counts = reap(session, settings)
    counts["stale_writes_removed"] = storage.abort_stale_writes(settings.stale_upload_s)
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
