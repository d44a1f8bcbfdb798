"""Sending "job X is ready" to the workers. The database stays the truth: a lost message leaves
the job queued, and the worker's compare-and-set claim makes a duplicate message harmless."""

from __future__ import annotations

import logging

from app.broker import RUN_JOB_TASK, celery_for
from app.config import Settings
from app.db import database_now, session_scope
from app.jobs import repository

log = logging.getLogger(__name__)


def send(settings: Settings, job_id: str, queue: str) -> bool:
    """Hand "job X is ready" to the broker and remember when, so the reaper sends it again only if the
    job is still unclaimed QLORA_REDISPATCH_AFTER_S later. False where the broker refused it (it stays queued)."""
    if not dispatch(settings, job_id, queue):
        return False
    # Often after a request's commit, where the request pool must not be waited for (app/db.py)
    with session_scope(settings.database_url, bookkeeping=True) as session:
        repository.mark_dispatched(session, job_id, database_now(session))  # the scheduler's clock
    return True


def dispatch(settings: Settings, job_id: str, queue: str) -> bool:
    try:
        celery_for(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
        return True
    except Exception:  # a broker outage must not fail the request that already committed the job
        log.exception("could not send job %s to queue %s; it stays queued and is sent again later", job_id, queue)
        return False
