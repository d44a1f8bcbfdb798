"""A real deployment for the tests: Postgres, Redis, S3 over HTTP (moto's server), the API under
uvicorn and Celery workers, each in its own process, wired only by QLORA_* environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from app.config import Settings
from app.db import session_scope
from app.models import service as models_service
from app.teams import service as teams_service
from tests import services
from worker.training.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]  # the checkout: `python -m app.cli` runs its code
BUCKET = "qlora-test"

# The GPU classes service tests send jobs to: served by a worker a test starts, or by none (to keep a
# job queued). Each is named for this test session (see lane()).
LANES = ("nobody-listens", "nobody", "cancel-test", "metrics-queue", "fair-share", "claims", "cpu-only")
_SESSION = uuid.uuid4().hex[:6]


def lane(name: str) -> str:
    """A GPU class of this test session's own. Redis is shared by every suite running on the machine,
    and a worker of another session serving a same-named queue would take this session's messages
    (its claim finds no such job, so the message is spent and the job waits for the scheduler)."""
    return f"{name}-{_SESSION}"


class Deployment:
    def __init__(self, env: dict[str, str], home: Path):
        self.env = env
        self.home = home
        self.settings = Settings(**{k.removeprefix("QLORA_").lower(): v for k, v in env.items()
                                    if k.startswith("QLORA_")})
        self.url = f"http://127.0.0.1:{env['QLORA_PORT']}"
        self.procs: list[subprocess.Popen] = []

    # --- processes
    def spawn(self, *args: str, log_name: str, extra_env: dict | None = None,
              wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
        log = open(self.home / f"{log_name}.log", "ab")
        proc = subprocess.Popen([*wrapper, sys.executable, "-m", "app.cli", *args], cwd=ROOT, env={**self.env, **(extra_env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_api(self) -> None:
        proc = self.spawn("serve", "--no-worker", log_name="api")
        if not services.wait_until_up(self.url + "/health", proc, timeout_s=60, need_ok=True):
            raise RuntimeError(f"the API did not start:\n{self.log('api')}")

    def start_worker(self, gpu_class: str | None = None, name: str | None = None,
                     extra_env: dict | None = None, container: bool = False) -> subprocess.Popen:
        """`container`: in a process-id namespace of its own, as a worker in docker-compose.yml (`init: true`: an
        init as PID 1, the worker beside it), where every worker has the same small pid. An unprivileged user
        namespace lets a test run that is not root make one."""
        args = ["worker"]
        if gpu_class:
            args += ["--gpu-class", gpu_class]
        name = name or f"w{len(self.procs)}"
        wrapper = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                   "sh", "-c", '"$@" & wait', "init") if container else ()
        return self.spawn(*args, "--name", name, log_name=f"worker-{name}", extra_env=extra_env, wrapper=wrapper)

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else "(no log)"

    # --- data, as an operator would set it up
    def team_key(self, team: str, admin: bool = False) -> str:
        with session_scope(self.settings.database_url) as session:
            from app.teams import repository

            if repository.team_by_name(session, team) is None:
                teams_service.create_team(session, team)
            return teams_service.create_key(session, team, admin=admin)[1]

    def register_model(self, name: str, path: Path) -> None:
        with session_scope(self.settings.database_url) as session:
            models_service.add_model(session, name, path=str(path), roots=self.settings.allowed_model_roots)

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def start_deployment(home: Path, s3_endpoint: str, model_dir: Path, **settings: str) -> Deployment:
    """A fresh database, a storage prefix and queue names of its own, and a running API process.
    `settings` override QLORA_* values (lowercase names without the prefix)."""
    database_url = services.create_migrated_postgres_database()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QLORA_")},
        **services.s3_env(s3_endpoint),
        "QLORA_HOME": str(home),
        "QLORA_DATABASE_URL": database_url,
        "QLORA_BROKER_URL": "redis://127.0.0.1:6379/0",
        "QLORA_STORAGE_URL": f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}",
        "QLORA_S3_ENDPOINT_URL": s3_endpoint,
        "QLORA_PORT": str(services.free_port()),
        "QLORA_DEFAULT_GPU_CLASS": f"t{uuid.uuid4().hex[:8]}",  # queues no other test run listens to
        "QLORA_EXTRA_GPU_CLASSES": json.dumps([lane(name) for name in LANES]),
        "QLORA_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024),
        "QLORA_SUPERVISE_INTERVAL_S": "0.5",
        "QLORA_CANCEL_GRACE_S": "60",
        # The test run's temporary tree, where the tiny model and the models tests make are (tmp_path)
        "QLORA_MODEL_ROOTS": json.dumps([os.path.commonpath([home, model_dir])]),
        **{f"QLORA_{k.upper()}": str(v) for k, v in settings.items()},
    }
    d = Deployment(env, home)
    d.start_api()
    d.register_model("tiny", model_dir)
    return d


def stop_deployment(d: Deployment) -> None:
    for proc in d.procs:
        d.stop(proc, timeout=10)
    services.drop_postgres_database(d.settings.database_url)


def stored_spec(base_model: str = "tiny", raw: dict | None = None) -> dict:
    """A job's spec as the service stores it (every field, defaults filled in), for a job row a test writes
    itself: the routes read it as they read any job's (/v1 lists a team's jobs with their hyperparameters)."""
    return JobSpec.parse(raw or {"base_model": base_model, "training": {"max_steps": 4}}).model_dump(mode="json")


def wait_until(condition, timeout: float, what, interval: float = 0.2):
    """condition()'s first truthy value; after `timeout` s (generous: CI is a loaded 2-core machine) a failure that
    says what never came, never a hang. `what` is a text, or a function that makes one when it fails (a log then,
    not at the start)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def wait_for_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 420,
                    deployment: Deployment | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                             for p in sorted(deployment.home.glob("*.log"))) if deployment else ""
            raise AssertionError(f"job {job_id} is {job['status']} after {timeout}s, expected {statuses}\n{logs}")
        time.sleep(0.5)


def upload(client: httpx.Client, path: Path | None = None, content: bytes | None = None, name: str = "data.jsonl"):
    data = content if content is not None else Path(path).read_bytes()
    return client.post("/datasets", files={"file": (name, data, "application/jsonl")})


def wait_for_a_lock_wait(database_url: str, what: str, count: int = 1) -> None:
    """Until `count` connections of this database wait on a lock (pg_stat_activity): the moment a race is set up.
    `what` names the wait in the failure, after 30 s."""
    from sqlalchemy import text

    deadline = time.monotonic() + 30
    with session_scope(database_url) as session:
        while session.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                  "AND wait_event_type = 'Lock'")) < count:
            assert time.monotonic() < deadline, f"{what} never waited"
            time.sleep(0.02)
            session.rollback()  # a new snapshot of the statistics each look
