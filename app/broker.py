"""The broker's half of the API-worker contract: the task name and the Celery settings, imported by
both sides (the API sends "job X is ready", the worker registers the task under the same name).

Celery settings for hours-long training tasks:

- acks late + reject on worker lost: a message is removed only once its job has been handled, so
  a worker that dies mid-job leaves the message to be delivered again (the claim makes that safe).
- prefetch 1, concurrency 1: a worker holds one job at a time; a second waits in the broker where
  another GPU can take it, not in this worker's memory.
- a broker visibility timeout longer than the longest job: Redis redelivers an unacked message
  after it, and a healthy job must never look lost.
"""

from __future__ import annotations

from celery import Celery

from app.config import Settings

RUN_JOB_TASK = "qlora.run_job"  # the one task: "job X is ready"; its only argument is the job id

_apps: dict[str, Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """One Celery app per distinct configuration (the API and the tests may hold several)."""
    key = settings.model_dump_json()
    if key not in _apps:
        _apps[key] = _make_celery(settings)
    return _apps[key]


def _make_celery(settings: Settings) -> Celery:
    app = Celery("qlora", broker=settings.broker_url)
    # Redis redelivers an unacked message after this; it must outlast any task that can still be
    # running (Settings.check_timing). A redelivered message is harmless: the claim is a compare-and-set.
    transport_options: dict = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.embedded:
        queue_dir = settings.broker_dir / "queue"
        queue_dir.mkdir(parents=True, exist_ok=True)
        # One folder for both directions: the API writes messages where the local worker reads them.
        # control_folder too: kombu's default is ./control, relative to wherever the process started.
        transport_options.update(data_folder_in=str(queue_dir), data_folder_out=str(queue_dir),
                                 control_folder=str(settings.broker_dir / "control"),
                                 store_processed=False, polling_interval=0.5)
        # kombu's filesystem transport, its messages written whole and an unreadable one skipped (app/local_queue.py)
        app.conf.broker_transport = "app.local_queue:Transport"
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_ignore_result=True,  # outcomes live in the jobs table, not in a result backend
        task_time_limit=settings.task_time_limit_s,
        task_default_queue=settings.queue_for(),
        worker_hijack_root_logger=False,
        # The supervisor relays its training process's JSON log lines to stderr as they are.
        worker_redirect_stdouts=False,
        # When the broker connection drops mid-job, keep training: the job's truth is in the
        # database, and a running job must not be abandoned because Redis restarted.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
    )
    return app



def broker_answers(settings: Settings) -> None:
    """Raises where the broker cannot be reached (GET /ready): a connection made as sending a task makes one, which
    for Redis is a PING (kombu's channel sends one as it opens), given up after one try."""
    with celery_for(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)  # 0: one try, no retry
        connection.default_channel  # noqa: B018 (opening the channel is the look)
