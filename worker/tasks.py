"""The worker's Celery task: the broker says "job X is ready"; the database decides what happens."""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path

from celery.exceptions import Reject
from celery.signals import worker_process_init

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
    stopping = celery_app.conf.get("qlora_stopping")  # set by the worker process as it is asked to stop
    if stopping is not None and stopping.value:
        # The message came in Celery's last read after the signal: claim nothing, and put the message back for
        # the next worker, rather than start an attempt that the stop then kills (app/cli/processes.py).
        raise Reject("the worker is stopping", requeue=True)
    settings = get_settings()
    worker = celery_app.conf.get("qlora_worker_name") or socket.gethostname()
    held = celery_app.conf.get("qlora_held_marker")  # set by the worker process as it starts
    # Read again once a claim lands: a stop that comes after the check above finds no job to hand back yet.
    JobRun(settings, job_id, worker, home_lock_fd=celery_app.conf.get("qlora_home_lock_fd"),
           held=Path(held) if held else None,
           stopping=None if stopping is None else lambda: bool(stopping.value)).run()


@worker_process_init.connect(weak=False)
def _leave_termination_to_the_worker(**_) -> None:
    """The pool process ignores SIGTERM; the worker's main process takes it and hands the running job back (saved
    at a checkpoint after its current step, queued again: app/cli/processes._hand_back_on_shutdown), then the pool
    process ends with its task. Celery resets SIGTERM to its default in a pool process (billiard then installs its
    own exit handler over anything but SIG_IGN), so SIGTERM to the worker's whole process group (systemd's default
    KillMode=control-group, `kill -- -PGID`), not only to its main process as `docker stop` sends it, killed the
    pool process at once: the supervisor was gone, its training process stopped by itself, and everything since
    the last checkpoint was lost and counted a lost worker. A kill that must end it (SIGKILL, a stop grace
    period's end) still does; SIGINT (Ctrl-C to a terminal's group) the pool ignores already. The training
    process it starts inherits the ignored signal and restores it (worker/runner.py). `serve`'s local worker leaves
    SIGHUP (its terminal closed) to `serve` alike, which then stops it (app/cli/processes._leave_stopping_to_serve)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if celery_app.conf.get("qlora_ignore_hangup"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
