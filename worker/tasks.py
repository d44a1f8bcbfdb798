"""The worker's Celery task: the broker says "job X is ready"; the database decides what happens."""

from __future__ import annotations

import logging
import socket

from app.broker import RUN_JOB_TASK, celery_for
from app.config import get_settings
from worker.supervisor import JobRun

log = logging.getLogger(__name__)

celery_app = celery_for(get_settings())


@celery_app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> None:
    """Claim the best queued job of this job's GPU class (this one, or one fair share puts first:
    app/scheduling/service.claim_next), supervise its training process, record the outcome. A no-op
    when no job of the class may start (this one cancelled or already claimed, the rest held back)."""
    settings = get_settings()
    worker = celery_app.conf.get("qlora_worker_name") or socket.gethostname()
    JobRun(settings, job_id, worker).run()
