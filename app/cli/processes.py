"""The service's processes: `serve` (the API), `worker` (one per GPU), `reaper`, `migrate`.

Each reads its settings from QLORA_* (app.config) when it starts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from app.cli.render import Commands, err, out

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.jobs.tables import Job

commands = Commands()

# What each API process gives open requests (dashboard streams, say) when told to stop, before it
# closes them: a restart must not wait until the jobs they watch end.
GRACEFUL_SHUTDOWN_S = 10


def listening_line(settings) -> str:
    """What `serve` prints once it is about to listen: where the API and the dashboard are, and where the key to
    sign in with is. A start after the first printed the address alone, and the dashboard's sign-in page asks
    for a key that first start had shown once, scrolled away since (it is in the credentials file)."""
    from app.bootstrap import api_url

    processes = f" in {settings.api_workers} processes" if settings.api_workers > 1 else ""
    key = (f"; sign in with the key in {settings.credentials_path}"
           if settings.embedded and settings.credentials_path.exists() else "")
    return f"API and dashboard on {api_url(settings)}{processes} (docs at /docs{key})"


@commands.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (QLORA_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (QLORA_PORT).")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, max=64, help="API processes sharing the port "
                       "(QLORA_API_WORKERS, default 1); the reaper works in one of them at a time.")] = None,
    worker: Annotated[Optional[bool], typer.Option("--worker/--no-worker", help="Also run one local worker. "
                      "Default: on with the embedded queue, off when QLORA_BROKER_URL points at a server.")] = None,
) -> None:
    """Start the API. With no configuration: SQLite, local storage, a local queue and one worker."""
    import uvicorn

    from app import logs
    from app.config import get_settings
    from app.connections import raise_open_file_limit

    # Through the environment, as every other setting: with --workers, each API process is a fresh
    # interpreter that reads its settings there (api_process_app), and so does the local worker.
    for name, value in (("QLORA_HOST", host), ("QLORA_PORT", port), ("QLORA_API_WORKERS", workers)):
        if value is not None:
            os.environ[name] = str(value)
    get_settings.cache_clear()
    settings = get_settings()
    _check_port_free(settings.host, settings.port)  # before a first start makes a key for this address
    if settings.embedded:
        _hold_home(settings)
    if settings.embedded or settings.database_url.startswith("sqlite"):
        # Here, once, before any API process starts: they all find the schema and the demo team ready.
        from app.bootstrap import bootstrap_embedded
        from app.migrate import NewerSchema
        from worker.training.tiny import build_tiny_model  # torch only inside, when it builds

        try:
            bootstrap_embedded(settings, announce=lambda msg: out.print(msg, highlight=False),
                               build_demo_model=build_tiny_model)
        except NewerSchema as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    else:
        _check_schema(settings.database_url)
    if settings.embedded:  # the home's lock is this process's now: the last serve's local worker is gone
        _requeue_what_the_last_serve_held(settings)
    raise_open_file_limit()  # connections need descriptors: the hard limit, not a default soft one (for its children too)
    run_worker = settings.embedded if worker is None else worker
    child: LocalWorker | None = None
    # One API process: uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler
    # it found. Under the default one, this process would end on the spot, before the `finally` below
    # stops the local worker, which would run on orphaned (holding its GPU, taking jobs): a supervisor's
    # stop, `kill PID` and `docker stop` signal this process alone. So SIGTERM is an exception here
    # until the worker has stopped; then this process ends by the signal after all, as its sender expects.
    # (With several API processes uvicorn's supervisor keeps SIGTERM to itself and returns.)
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under `nohup` it stays ignored, as asked
        signal.signal(signal.SIGHUP, _terminate_on_hangup)
    terminated = False
    try:
        if run_worker:
            child = LocalWorker(settings, {**os.environ, "QLORA_HOME": str(settings.home)})
            child.start()
        logs.configure("api", settings.log_format)  # this process's; each API process sets up its own too
        _announce(listening_line(settings), settings.log_format)
        # An import string, which uvicorn needs to start several processes (and uses alike for one).
        # With several, uvicorn's parent process only supervises: SIGTERM to it stops every API process,
        # each after its own graceful shutdown, and it replaces one that dies.
        # log_config=None: uvicorn keeps the handlers logs.configure() installs instead of its own.
        # http: uvicorn's own protocol with deadlines for slow clients and a bound on headers (app/connections.py).
        uvicorn.run(f"{__name__}:api_process_app", factory=True, workers=settings.api_workers,
                    host=settings.host, port=settings.port, log_level="info", log_config=None,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                    http="app.connections:GuardedHttpToolsProtocol")
    except _Terminated:
        terminated = True
    finally:
        if child is not None:
            child.stop()
    if terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


def _announce(message: str, log_format: str) -> None:
    """What a process says as it starts (its address, its loops): a line for the person at a terminal, else one JSON
    log record like every other line. Printed to stdout, it reached a log collector (docker's, which takes both
    streams) as the one line of text among JSON ones, and cut at 80 columns into two (rich's width off a terminal)."""
    from app import logs

    if logs.resolve_format(log_format) == "json":
        logging.getLogger("qlora.start").info(message)
    else:
        out.print(message, highlight=False)


def _check_schema(database_url: str, *, unreachable_ok: bool = False) -> None:
    """Exit 2 saying what to run where the database is not at this release's schema (the embedded default
    migrates by itself). The database out of reach is said here too, rather than by the first request; a
    worker (unreachable_ok) starts anyway and waits for it, as it waits for a database lost later."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.migrate import schema_problem

    try:
        problem = schema_problem(database_url)
    except SQLAlchemyError as exc:
        if unreachable_ok:
            return
        problem = f"cannot reach the database at QLORA_DATABASE_URL: {str(exc).splitlines()[0]}"
    if problem:
        err.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


WAIT_LOOK_S = 0.25  # how often a `serve` waiting for a killed one's worker looks at the home's lock again
_HOME_LOCK: list = []  # the open lock file of the home this `serve` runs on, held while it runs


def _hold_home(settings) -> None:
    """Exit 2, saying so, where another `serve` runs on this QLORA_HOME: each would run a local worker, and
    the two would train two jobs at once on this machine (its one GPU: out of memory, or its CPU). The lock
    is the kernel's (flock): it goes with the process however that ends, so a `serve` killed outright never
    leaves one behind.

    Its local worker holds the lock too (LocalWorker passes it on): a `serve` killed outright left a worker that
    went on for as long as it took to hand its job back (a checkpoint saved, a merge finished), and a `serve`
    started meanwhile took the lock and started a second worker beside it, which took the next queued job. So
    where the holder named is a `serve` that is gone, this one waits for its worker to stop, saying so. It looks
    again every WAIT_LOOK_S rather than block on the lock: of two `serve`s waiting so, the one that did not get
    the lock saw the other's pid written there and blocked on until that one stopped, then started unannounced.
    The worker's training processes hold it as well: each runs in a session of its own, so a SIGKILL to `serve`'s
    process group leaves it running, orphaned, until it stops by itself after its current step (or the merge it is
    making); the wait lasts until then, so the job it ran resumes, at once, on this `serve`'s worker alone. One that
    does not stop (inside a model's load, a merge, an upload, or a call that hangs: it looks for its worker only
    between steps) held this `serve` for ever, naming only the dead `serve`: the wait names the training processes
    it is for (worker/supervisor.training_processes_left), and past QLORA_HEARTBEAT_DEADLINE_S says to kill them."""
    import fcntl

    from worker.supervisor import training_processes_left

    home = settings.home
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(home / "serve.lock", "a+")  # noqa: SIM115 (held open for the process's life)
    said = named = False
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return _took_home(lock)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process"
        if not _gone(holder.removeprefix("pid ")):
            break
        if not said:
            training = "".join(f"; training process pid {pid} (job {job_id})"
                               for pid, job_id in training_processes_left(settings).items())
            err.print(f"the last qlora serve on QLORA_HOME={escape(str(home))} ({escape(holder)}) was stopped outright; "
                      "waiting for its local worker to hand its job back and stop, and for the training process it ran "
                      f"to stop after its current step{escape(training)} (Ctrl-C to give up)", highlight=False,
                      soft_wrap=True)
            said = True
        if not named and time.monotonic() - started > settings.heartbeat_deadline_s:
            named = True
            left = training_processes_left(settings)
            for pid, job_id in left.items():
                err.print(f"pid {pid} (training job {escape(job_id)}) still holds QLORA_HOME={escape(str(home))}, "
                          f"QLORA_HEARTBEAT_DEADLINE_S={settings.heartbeat_deadline_s:g} s on: `kill {pid}` to go on; "
                          "the job resumes from its newest checkpoint", highlight=False, soft_wrap=True)
            if not left:
                err.print(f"a process still holds {escape(str(home / 'serve.lock'))}, QLORA_HEARTBEAT_DEADLINE_S="
                          f"{settings.heartbeat_deadline_s:g} s on: `fuser -v {escape(str(home / 'serve.lock'))}` "
                          "names it; kill it to go on", highlight=False, soft_wrap=True)
        time.sleep(WAIT_LOOK_S)
    err.print(f"[red]error:[/red] another qlora serve ({escape(holder)}) runs on QLORA_HOME={escape(str(home))}: "
              "its local worker and this one would train two jobs at once on this machine. Stop it first; "
              "for a second service set QLORA_HOME to another directory, for more API processes use "
              "--workers N.", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _requeue_what_the_last_serve_held(settings) -> None:
    """Requeue at once the jobs that the local worker of the last `serve` on this home held when it was killed (with
    `serve`: SIGKILL to its process group, the out-of-memory killer, the machine crashed), to resume from their newest
    checkpoints. That worker held the home's lock, which this `serve` now holds: it is gone for certain. The reaper
    knows a worker lost only by its silence (one on another host may be alive and cut off), and left such a job
    `running` until its heartbeats were QLORA_HEARTBEAT_DEADLINE_S (2 minutes) old. Only the claims
    that worker marked (worker/supervisor.local_claims_left), fenced by the attempt each took: never a job that
    another worker runs. Should the database refuse, the reaper requeues them at its deadline, as before."""
    from worker.supervisor import local_claims_left

    def why(job) -> str:
        return (f"the last qlora serve on this QLORA_HOME stopped outright at step {job.step} (killed with its local "
                f"worker {job.worker}: SIGKILL to its process group, the out-of-memory killer, or the machine went "
                "down) without handing the job back; the next serve found that worker gone (it no longer held the "
                "home's lock)")

    def say(text: str, failed: bool) -> None:
        (err if failed else out).print(escape(text), highlight=False, soft_wrap=True)

    _requeue_claims_left(settings, local_claims_left(settings), why, "the last qlora serve's local worker",
                         "was stopped outright", say)


def _requeue_claims_left(settings, left: dict[str, Path], why: Callable[[Job], str], whose: str, how: str,
                         say: Callable[[str, bool], None]) -> None:
    """End, at once, the attempts that the claims `left` (token: its held_marker file) of a local worker known to be
    gone took, as the reaper ends a silent worker's (app/jobs/reaper.reap_claims_of_gone_worker: fenced by each
    claim's attempt, the job requeued and sent to its queue), `why(job)` saying how in its event; then remove the
    markers. `say(text, failed)` tells the operator what became of each job, or that the database refused (the
    reaper then requeues them at its deadline)."""
    from app.db import session_scope
    from app.jobs.reaper import reap_claims_of_gone_worker

    if not left:
        return
    try:
        with session_scope(settings.database_url) as session:
            became = reap_claims_of_gone_worker(session, settings, left.keys(), why)
    except Exception as exc:
        say(f"could not requeue the jobs {whose} held ({exc}); they are requeued once their heartbeats are "
            "QLORA_HEARTBEAT_DEADLINE_S old", True)
        return
    for marker in left.values():
        marker.unlink(missing_ok=True)
    for job_id, outcome in became.items():
        say(f"job {job_id}, which {whose} held as it {how}: {outcome}", False)


def _took_home(lock) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    _HOME_LOCK.append(lock)


def _gone(pid: str) -> bool:
    """Whether `pid` (as the lock file names it) is a process that no longer exists."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's: it exists
        pass
    return False


def _check_port_free(host: str, port: int) -> None:
    """Exit 2, saying so, where the address is taken. uvicorn would find out only after `serve` had made
    the first start's team and key, saved with this address (another server's) in credentials.json,
    and started its worker."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port's TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            err.print(f"[red]error:[/red] cannot listen on {host}:{port}: {exc.strerror}. Another process holds it: "
                      "stop it, or set QLORA_PORT (or --port) to a free port.", highlight=False)
            raise typer.Exit(2) from None


class LocalWorker:
    """`serve`'s local worker, started again should it end abnormally while `serve` runs (killed by hand or by
    the out-of-memory killer, a crash): with none, jobs would wait queued with nothing to say why, behind an
    API that answers. A job it held is requeued at once, before the next one starts (_requeue_what_it_held). A
    worker that stops cleanly (SIGTERM, Ctrl-C, which the terminal sends it too as `serve` shuts down) is not
    replaced."""

    CLEAN = frozenset({0, -signal.SIGTERM, -signal.SIGINT})
    MAX_DELAY_S = 60

    def __init__(self, settings, env: dict[str, str]):
        import threading

        self.settings = settings
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0  # when the current one started
        self._lock = threading.Lock()  # no start after stop() began
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._restart_when_ended, name="local-worker-watch", daemon=True)

    def start(self) -> None:
        self._start()
        self._watch.start()

    def _start(self) -> None:
        import sys

        with self._lock:
            if self._stopping.is_set():
                return
            # --stop-with: a `serve` killed outright (SIGKILL, the OOM killer) cannot stop its worker; the worker
            # then stops by itself, as on SIGTERM, instead of running on beside the next `serve`'s own.
            # The home's lock, held by the worker too (and its pool processes, forked from it): a `serve` started
            # after this one was killed outright waits until this worker has handed back its job (_hold_home).
            home_lock = [f"--home-lock-fd={lock.fileno()}" for lock in _HOME_LOCK]  # for its training processes too
            proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--stop-with", str(os.getpid()), *home_lock],
                                    env=self.env, pass_fds=[lock.fileno() for lock in _HOME_LOCK])
            self.proc, self.started = proc, time.monotonic()
        out.print(f"started a local worker (pid {proc.pid})")

    def _restart_when_ended(self) -> None:
        delay = 1.0
        while not self._stopping.wait(1):
            proc = self.proc
            code = proc.poll() if proc is not None else None
            if proc is None or code is None:
                continue
            if code in self.CLEAN:
                return
            # One that dies as it starts (a broken install, say) is started again less and less often.
            delay = 1.0 if time.monotonic() - self.started > self.MAX_DELAY_S else min(delay * 2, self.MAX_DELAY_S)
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            logging.getLogger("serve").warning("the local worker (pid %s) %s; starting another in %g s", proc.pid,
                                               how, delay)
            self._requeue_what_it_held(proc.pid, how)  # first: the next one's start removes a dead worker's markers
            if self._stopping.wait(delay):
                return
            self._start()

    def _requeue_what_it_held(self, pid: int, how: str) -> None:
        """The job the worker that ended (`how`) held, requeued now, to resume from its newest checkpoint on the next
        worker, rather than left `running` until its heartbeats were QLORA_HEARTBEAT_DEADLINE_S old (2 minutes): the
        reaper knows a worker lost only by its silence, `serve` saw this one end. Once nothing of the attempt runs any
        more (worker/supervisor.claims_of_ended_local_worker: its pool process ended with it, its training process
        killed), so it never runs twice; through the path a `serve` starting after one killed outright takes."""
        from worker.supervisor import claims_of_ended_local_worker

        serve_log = logging.getLogger("serve")

        def why(job) -> str:
            return (f"the local worker {job.worker} (pid {pid}) {how} at step {job.step} without handing the job back; "
                    "qlora serve, which started it, saw it end and made sure its training process had stopped")
        try:
            left = claims_of_ended_local_worker(self.settings)
        except Exception:  # the work directory unreadable, say: the reaper requeues the job at its deadline
            serve_log.exception("could not read what the local worker (pid %s) held; a job it held is requeued once "
                                "its heartbeats are QLORA_HEARTBEAT_DEADLINE_S old", pid)
            return
        _requeue_claims_left(self.settings, left, why, f"the local worker (pid {pid})", "ended",
                             lambda text, failed: serve_log.warning(text))

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Terminated(Exception):
    """SIGTERM, while `serve` has its local worker to stop first."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _terminate_on_hangup(signum, frame) -> None:
    """SIGHUP: the terminal `make run` ran in was closed (or its SSH session dropped), which signals its whole
    process group. By default it ended `serve` on the spot and its local worker's pool process with it: the job
    it trained stayed `running` until the reaper's deadline (QLORA_HEARTBEAT_DEADLINE_S), then lost that attempt
    and the steps since its last checkpoint. Now a hangup stops `serve` as SIGTERM does: the API gracefully, then
    the local worker, which hands its job back (the worker itself ignores the hangup: `_leave_stopping_to_serve`).
    With several API processes uvicorn's supervisor takes SIGHUP over (it restarts them) and `serve` runs on."""
    os.kill(os.getpid(), signal.SIGTERM)


def api_process_app() -> FastAPI:
    """What each API process serves (uvicorn's factory). With --workers N uvicorn starts each in a fresh
    interpreter (spawn): it reads its settings from the environment `serve` prepared, and sets up its
    own logging before uvicorn's first line."""
    from app import logs
    from app.config import get_settings
    from app.main import create_app

    settings = get_settings()
    logs.configure("api", settings.log_format)
    return create_app(settings)


@commands.command()
def worker(
    gpu: Annotated[Optional[str], typer.Option(help="GPU index to pin this worker to (sets CUDA_VISIBLE_DEVICES).")] = None,
    gpu_class: Annotated[Optional[str], typer.Option(help="Serve the queue of this GPU class (QLORA_DEFAULT_GPU_CLASS).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Worker name in job records; default host:gpuN (--gpu N) or host:cpu.")] = None,
    stop_with: Annotated[Optional[int], typer.Option(hidden=True, help="Stop (as on SIGTERM) once the process "
                         "with this pid is no longer this worker's parent: `serve`'s local worker.")] = None,
    home_lock_fd: Annotated[Optional[int], typer.Option(hidden=True, help="The descriptor of the home's lock that "
                            "`serve` passed to its local worker: its training processes hold it too.")] = None,
) -> None:
    """Run one training worker: one job at a time, on one GPU (or the CPU)."""
    if gpu is not None:
        # Before anything can import torch: the training processes inherit it and see one GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import socket

    from app.config import get_settings
    from app.operations.workers import worker_problems

    settings = get_settings()
    settings.check_timing()
    queue = settings.queue_for(gpu_class)
    worker_name = name if name is not None else f"{socket.gethostname()}:{'gpu' + gpu if gpu is not None else 'cpu'}"
    problems = worker_problems(worker_name, gpu_class or settings.default_gpu_class,  # before Celery starts
                               settings.served_gpu_classes)
    for problem in problems:
        err.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(2)
    # A worker of this release on a database `qlora migrate` has not brought to its schema (a rolling upgrade
    # that updated the workers first) took each job's message and failed it on a missing column, over and over.
    _check_schema(settings.database_url, unreachable_ok=True)

    from celery.signals import setup_logging

    from app import logs

    # Celery leaves logging alone when this signal has a receiver: one JSON stream for the worker,
    # its Celery internals and (relayed by the supervisor) its training processes.
    setup_logging.connect(lambda **_: logs.configure("worker", settings.log_format), weak=False)
    logs.configure("worker", settings.log_format)  # already for what Celery says before it sets up

    from app.bootstrap import make_private_dir
    from worker.tasks import celery_app  # registers the task

    make_private_dir(settings.home)  # its attempts' data, logs and checkpoints: a team's, not other local users'
    celery_app.conf.qlora_worker_name = worker_name
    _hand_back_on_shutdown(settings, worker_name, celery_app)
    _announce_while_up(settings, worker_name, queue)
    # Read by the pool processes, forked from this one: each attempt's marker says the lock proves this worker gone
    # once the next `serve` holds it (_requeue_what_the_last_serve_held), and its training process holds it too.
    celery_app.conf.qlora_home_lock_fd = home_lock_fd
    if stop_with is not None:
        _stop_when_parent_gone(stop_with)
        _leave_stopping_to_serve(celery_app)
    served = settings.served_gpu_classes
    if (gpu_class or settings.default_gpu_class) not in served:
        logging.getLogger("worker").warning(
            "GPU class %r is not one the API serves with these settings (%s): it refuses jobs for it, so this "
            "worker will wait for nothing; list the class in QLORA_EXTRA_GPU_CLASSES or QLORA_GPU_CLASSES for "
            "every process", gpu_class or settings.default_gpu_class, ", ".join(served))
    from worker.supervisor import sweep_work_dir

    try:
        for path in sweep_work_dir(settings):  # what attempts killed before they cleaned up left behind
            logging.getLogger("worker").info("removed %s: left by an attempt that no longer runs", path)
    except Exception:  # the database not up yet, say: the worker starts all the same, and its claims wait for it
        logging.getLogger("worker").exception("could not clear the work directory of ended attempts")
    code = _run_celery_worker(celery_app, ["--quiet", "worker", "-Q", queue, "-c", "1", "-P", "prefork",
                                           "--prefetch-multiplier", "1", "-n", f"{worker_name}@%h", "-l", "INFO",
                                           "--without-gossip", "--without-mingle"])
    if code:
        raise typer.Exit(code)


def _run_celery_worker(celery_app, argv: list[str]) -> int:
    """Run the Celery worker; its exit status, 0 when it was asked to stop (SIGTERM, Ctrl-C, `serve` gone).

    `celery_app.worker_main()` drops the status: a worker that Celery ended on an unrecoverable error (its
    consumer crashed, say on a message file the local queue could not decode) exited 0, so `serve` took it
    for a clean stop and never started another, and a supervisor's restart-on-failure did not either; jobs
    then waited queued for ever behind an API that answered. A stop someone asked for stays 0 whatever
    Celery says (it ends a Ctrl-C with 1): `serve` must not replace a worker that its own Ctrl-C stopped."""
    import threading

    from celery.bin.celery import celery as celery_cli
    from celery.signals import worker_shutting_down

    asked_to_stop = threading.Event()
    worker_shutting_down.connect(lambda **_: asked_to_stop.set(), weak=False)
    celery_cli.params[0].default = celery_app  # as celery_app.start() does
    try:
        code = celery_cli.main(args=argv, standalone_mode=False)
    finally:
        celery_cli.params[0].default = None
    code = code if isinstance(code, int) else 0
    if code and not asked_to_stop.is_set():
        logging.getLogger("worker").error("the Celery worker ended on an error (exit status %s); see above", code)
        return code
    return 0


def _hand_back_on_shutdown(settings, worker_name: str, celery_app) -> None:
    """On SIGTERM (a deploy, a scale-down) Celery stops taking messages and waits for the job it runs: the
    job is handed back (app/jobs/runs.py hand_back), so it saves a checkpoint after its current step,
    stops, and is queued again for another worker, and the wait is a step and a checkpoint, not the rest
    of the job. Off the signal handler, in a thread of its own: it writes to the database."""
    import multiprocessing
    import threading

    from celery.signals import worker_shutting_down

    from app.db import session_scope
    from app.jobs import runs
    from worker.supervisor import held_attempt, held_marker, session_url

    log = logging.getLogger("worker")
    # Shared with the pool process, forked from this one: it claims nothing once this is set. Celery's loop over
    # the local queue reads messages once more after the signal, for up to 2 s; a job handed back within that
    # freed the pool process, which took the next message and claimed again (the job just handed back, as its
    # attempt 2), an attempt `serve` killed 30 s later, leaving the job `running` until the reaper's deadline.
    stopping = multiprocessing.RawValue("b", 0)
    celery_app.conf.qlora_stopping = stopping
    # This worker's own, in the work directory its host's workers share; its pool process, forked from this one,
    # names there the attempt it runs (worker/tasks.py).
    try:
        marker = held_marker(settings)
        celery_app.conf.qlora_held_marker = str(marker)
    except OSError:  # a full disk, say: the worker starts all the same (its attempts say what is wrong)
        log.exception("no marker for the attempt this worker runs: a SIGTERM will not hand its job back")
        marker = None

    def hand_back() -> None:
        held = held_attempt(marker) if marker is not None else None  # what this worker's pool process runs, if anything
        if held is None:
            return
        try:
            # The worker's connection settings: a database that drops packets fails the hand-back in seconds,
            # and the reaper takes the job, instead of holding the shutdown.
            with session_scope(session_url(settings)) as session:
                handed = runs.hand_back(session, worker_name, *held)
            if handed:
                log.info("shutting down: handed back job %s; it saves a checkpoint and is queued again", held[0])
        except Exception:  # the reaper requeues the job anyway once this worker is gone
            log.exception("shutting down: could not hand back the running job")

    def on_shutting_down(**_) -> None:
        stopping.value = 1
        threading.Thread(target=hand_back, daemon=True).start()

    worker_shutting_down.connect(on_shutting_down, weak=False)


def _announce_while_up(settings, worker_name: str, queue: str) -> None:
    """Say in the database that this worker is up, idle or busy, from when Celery is ready to take messages
    until it stops (app/operations/workers.py): /metrics and `qlora admin status` count it for its queue."""
    from celery.signals import worker_ready, worker_shutdown

    from app.operations.workers import WorkerBeat
    from worker.supervisor import session_url

    beat = WorkerBeat(session_url(settings), worker_name, queue)  # a beat unanswered is given up as any write
    worker_ready.connect(lambda **_: beat.start(), weak=False)
    worker_shutdown.connect(lambda **_: beat.stop(), weak=False)


def _leave_stopping_to_serve(celery_app) -> None:
    """`serve`'s local worker ignores SIGHUP, in its main process and its pool processes (worker/tasks.py): a closed
    terminal signals the whole process group, and `serve` stops this worker, which then hands its job back
    (_terminate_on_hangup). Left to Celery, the hangup killed the pool process that supervised the training (the
    job lost its attempt), and the main process with it on a terminal, or, with its output sent to a file, made it
    restart itself (Celery's SIGHUP handler) without handing anything back. Set before Celery starts, and again once
    it is ready: it installs its restart handler at its start where its output is not a terminal."""
    from celery.signals import worker_ready

    celery_app.conf.qlora_ignore_hangup = True  # read by the pool processes, forked from this one
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker_ready.connect(lambda **_: signal.signal(signal.SIGHUP, signal.SIG_IGN), weak=False)


def _stop_when_parent_gone(parent: int) -> None:
    """`serve` stops its local worker on SIGTERM; killed with SIGKILL it cannot, and the worker ran on orphaned:
    its job trained on with no API in front of it, and the next `serve` on the same QLORA_HOME started a second
    worker beside it, both taking jobs from the local queue. So the worker watches its parent and, once that is
    gone, sends itself SIGTERM: Celery stops taking messages and the job it runs is handed back (saved at a
    checkpoint and queued again, see _hand_back_on_shutdown), for the next `serve`'s worker to resume."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:  # reparented (to init, or a subreaper) once the parent is gone
            time.sleep(1)
        logging.getLogger("worker").warning("the serve process (pid %s) that started this worker is gone; stopping, "
                                            "as on SIGTERM", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@commands.command()
def reaper() -> None:
    """The background loops alone: requeue jobs whose worker was lost, clear dead uploads, and schedule
    (messages held back by quotas, preemption). Every API process runs them too; one holder of each lease works."""
    import threading

    from app.config import get_settings
    from app.jobs.reaper import ReaperThread
    from app.scheduling.service import SchedulerThread
    from app.storage.base import storage_from_settings

    settings = get_settings()
    settings.check_timing()
    # As `serve` does: on a database `qlora migrate` has not brought to this release's schema (started before it, or
    # updated first in a rolling upgrade) every pass of both loops failed on a missing table or column, a traceback
    # in the log each time, while it ran on as if it worked.
    _check_schema(settings.database_url)
    if settings.reaper_interval_s <= 0 or settings.scheduler_interval_s <= 0:
        raise typer.BadParameter("QLORA_REAPER_INTERVAL_S and QLORA_SCHEDULER_INTERVAL_S must be above 0 for "
                                 "`qlora reaper` (0 turns those loops off)")
    from app import logs

    logs.configure("reaper", settings.log_format)  # its passes, and when it takes over or loses a lease
    loops = [ReaperThread(settings, storage_from_settings(settings)), SchedulerThread(settings)]
    stop = threading.Event()
    # Stop between passes and release the leases, so another process takes over at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _announce(f"reaper every {settings.reaper_interval_s}s (heartbeat deadline {settings.heartbeat_deadline_s}s) and "
              f"scheduler every {settings.scheduler_interval_s}s, each while it holds its lease; API processes "
              "compete for them too", settings.log_format)
    for loop in loops:
        loop.start()
    stop.wait()
    for loop in loops:
        loop.stop()


@commands.command()
def migrate() -> None:
    """Bring the database (QLORA_DATABASE_URL) to the newest schema."""
    from app.bootstrap import make_private_dir
    from app.config import get_settings, sqlite_url
    from app.migrate import NewerSchema, upgrade

    settings = get_settings()
    if settings.database_url == sqlite_url(settings.home / "qlora.db"):
        make_private_dir(settings.home)  # the embedded default, before a first `qlora serve` made its home
    try:
        upgrade(settings.database_url)
    except NewerSchema as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print("database is at the newest schema")
