"""The service's processes: `serve` (the API), `worker` (one per GPU), `reaper`, `migrate`.

Each reads its settings from QLORA_* (app.config) when it starts.
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from app.cli.render import out

commands = typer.Typer()


@commands.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (QLORA_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (QLORA_PORT).")] = None,
    worker: Annotated[Optional[bool], typer.Option("--worker/--no-worker", help="Also run one local worker. "
                      "Default: on with the embedded queue, off when QLORA_BROKER_URL points at a server.")] = None,
) -> None:
    """Start the API. With no configuration: SQLite, local storage, a local queue and one worker."""
    import subprocess
    import sys

    import uvicorn

    from app.config import get_settings
    from app.main import create_app

    settings = get_settings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    if settings.embedded or settings.database_url.startswith("sqlite"):
        from app.bootstrap import bootstrap_embedded
        from worker.training.tiny import build_tiny_model  # torch only inside, when it builds

        bootstrap_embedded(settings, announce=lambda msg: out.print(msg, highlight=False),
                           build_demo_model=build_tiny_model)
    run_worker = settings.embedded if worker is None else worker
    child = None
    if run_worker:
        env = {**os.environ, "QLORA_HOME": str(settings.home)}
        child = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env)
        out.print(f"started a local worker (pid {child.pid})")
    out.print(f"API on http://{settings.host}:{settings.port} (docs at /docs)")
    try:
        from app import logs

        logs.configure("api", settings.log_format)
        # log_config=None: uvicorn keeps the handlers configured above instead of installing its own.
        # timeout_graceful_shutdown: open dashboard streams must not hold a restart until their jobs end.
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", log_config=None,
                    timeout_graceful_shutdown=10)
    finally:
        if child is not None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


@commands.command()
def worker(
    gpu: Annotated[Optional[str], typer.Option(help="GPU index to pin this worker to (sets CUDA_VISIBLE_DEVICES).")] = None,
    gpu_class: Annotated[Optional[str], typer.Option(help="Serve the queue of this GPU class (QLORA_DEFAULT_GPU_CLASS).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Worker name in job records; default host:gpu.")] = None,
) -> None:
    """Run one training worker: one job at a time, on one GPU (or the CPU)."""
    if gpu is not None:
        # Before anything can import torch: the training processes inherit it and see one GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import socket

    from app.config import get_settings

    settings = get_settings()
    settings.check_timing()
    queue = settings.queue_for(gpu_class)
    worker_name = name or f"{socket.gethostname()}:{'gpu' + gpu if gpu is not None else 'cpu'}"

    from celery.signals import setup_logging

    from app import logs

    # Celery leaves logging alone when this signal has a receiver: one JSON stream for the worker,
    # its Celery internals and (relayed by the supervisor) its training processes.
    setup_logging.connect(lambda **_: logs.configure("worker", settings.log_format), weak=False)
    logs.configure("worker", settings.log_format)  # already for what Celery says before it sets up

    from worker.tasks import celery_app  # registers the task

    celery_app.conf.qlora_worker_name = worker_name
    celery_app.worker_main(["--quiet", "worker", "-Q", queue, "-c", "1", "-P", "prefork", "--prefetch-multiplier", "1",
                            "-n", f"{worker_name}@%h", "-l", "INFO", "--without-gossip", "--without-mingle"])


@commands.command()
def reaper() -> None:
    """Requeue jobs whose worker was lost and clear dead uploads, in a loop (every API process also does this)."""
    from app.config import get_settings
    from app.jobs.reaper import ReaperThread
    from app.storage.base import storage_from_settings

    settings = get_settings()
    settings.check_timing()
    thread = ReaperThread(settings, storage_from_settings(settings))
    out.print(f"reaper running every {settings.reaper_interval_s}s (heartbeat deadline {settings.heartbeat_deadline_s}s)")
    thread.run()


@commands.command()
def migrate() -> None:
    """Bring the database (QLORA_DATABASE_URL) to the newest schema."""
    from app.config import get_settings
    from app.migrate import upgrade

    upgrade(get_settings().database_url)
    out.print("database is at the newest schema")
