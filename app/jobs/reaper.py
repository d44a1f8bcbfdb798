"""Finds jobs whose worker is gone and gives them another attempt (or fails them after too many),
and sends "job X is ready" again for queued jobs whose message never reached a worker that claimed them.

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
import threading
from datetime import timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit, session_scope, utcnow
from app.jobs import repository, states
from app.jobs.dispatch import send
from app.operations.lease import LeaseHolder

log = logging.getLogger(__name__)

# A job is sent to the broker right after the commit that created it; only if that failed (broker
# down) does the reaper send it, once the job is older than this. (A job sent but still unclaimed
# QLORA_REDISPATCH_AFTER_S later is sent again: its message may have been taken by a failed claim.)
SEND_UNSENT_AFTER_S = 10

LEASE = "reaper"
# The lease lasts this many reaper intervals: its holder renews it every interval, so it must miss two
# renewals in a row (dead, frozen, cut off from the database) before another process takes over.
LEASE_TTL_INTERVALS = 3
# How long stop() waits for a pass under way to end (and the lease to be released) before giving up:
# the lease then expires on its own.
STOP_WAIT_S = 5


def reap(session: Session, settings: Settings) -> dict[str, int]:
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "paused": 0, "dispatched": 0, "redispatched": 0}
    for job in repository.stale_jobs(session, now - timedelta(seconds=settings.heartbeat_deadline_s)):
        silent = f"worker {job.worker} stopped sending heartbeats at step {job.step}"
        attempt, only_from = job.attempt, [job.status]  # the fence: only if nothing moved the job meanwhile
        if job.status == states.CANCELLING:
            if repository.transition(session, job.id, states.CANCELLED, attempt=attempt, only_from=only_from,
                                     finished_at=now):
                repository.add_event(session, job.id, "cancelled", "warning", f"{silent} while cancelling",
                                     attempt=job.attempt)
                counts["cancelled"] += 1
        elif job.status == states.PAUSING:
            # It was stopping anyway: paused, resumable from its newest checkpoint.
            if repository.transition(session, job.id, states.PAUSED, attempt=attempt, only_from=only_from,
                                     worker=None):
                repository.add_event(session, job.id, "paused", "warning",
                                     f"{silent} while pausing; it resumes from its newest checkpoint",
                                     attempt=job.attempt, step=job.step)
                counts["paused"] += 1
        elif job.lost_workers + 1 >= settings.max_attempts:
            error = (f"the job lost its worker {job.lost_workers + 1} times (last: {silent}); giving up after "
                     f"QLORA_MAX_ATTEMPTS={settings.max_attempts}. Look at the workers' health (memory, "
                     "preemption, driver errors) and start a new job")
            if repository.transition(session, job.id, states.FAILED, attempt=attempt, only_from=only_from,
                                     finished_at=now, error=error):
                repository.add_event(session, job.id, "failed", "error", error, attempt=job.attempt)
                counts["failed"] += 1
        elif repository.transition(session, job.id, states.QUEUED, attempt=attempt, only_from=only_from, worker=None,
                                   dispatched_at=None, lost_workers=job.lost_workers + 1):
            repository.add_event(
                session, job.id, "requeued", "warning",
                f"{silent}; requeued for try {job.lost_workers + 2} of QLORA_MAX_ATTEMPTS={settings.max_attempts}, "
                "which resumes from the newest checkpoint", attempt=job.attempt, step=job.step)
            counts["requeued"] += 1
    session.flush()
    # Each is sent once the pass commits, and marked sent again (dispatched_at): one message per job
    # per deadline, however long it waits for a free worker of its GPU class.
    for job in repository.undispatched(session, created_before=now - timedelta(seconds=SEND_UNSENT_AFTER_S),
                                       dispatched_before=now - timedelta(seconds=settings.redispatch_after_s)):
        after_commit(session, functools.partial(send, settings, job.id, job.queue))
        counts["dispatched" if job.dispatched_at is None else "redispatched"] += 1
    return counts


def housekeeping(settings: Settings, storage) -> dict[str, int]:
    """One pass: give lost jobs another attempt, and remove uploads that died half-written."""
    with session_scope(settings.database_url) as session:
        counts = reap(session, settings)
    counts["stale_writes_removed"] = storage.abort_stale_writes(settings.stale_upload_s)
    return counts


class ReaperThread(threading.Thread):
    """Runs housekeeping() at start and every reaper_interval_s inside a long-lived process (each
    API process has one; `qlora reaper` runs it alone), while it holds the reaper lease."""

    def __init__(self, settings: Settings, storage):
        super().__init__(name="qlora-reaper", daemon=True)
        self.settings = settings
        self.storage = storage
        self.lease = LeaseHolder(settings.database_url, LEASE, LEASE_TTL_INTERVALS * settings.reaper_interval_s)
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while True:
                try:
                    counts = self.pass_once()
                    if counts and any(counts.values()):
                        log.info("reaper: %s", counts)
                except Exception:  # a database or storage blip must not end the loop
                    log.exception("reaper pass failed; trying again in %ss", self.settings.reaper_interval_s)
                if self.stopped.wait(self.settings.reaper_interval_s):
                    return
        finally:
            self.lease.release()  # so a restart hands over at once, not once the lease expires

    def pass_once(self) -> dict[str, int] | None:
        """One pass if this process holds (or can take) the lease; None while another one does."""
        if not self.lease.renew():
            return None
        return housekeeping(self.settings, self.storage)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(STOP_WAIT_S)
