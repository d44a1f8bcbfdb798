"""A deployment with short deadlines, so lost workers are noticed in seconds, and a record of
every fault injected (what, whether the job survived, how many steps were lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests import services
from tests.deployment import Deployment, start_deployment, stop_deployment, upload
from worker.runner import FAULT_RELEASE

HEARTBEAT_DEADLINE_S = 5
REDISPATCH_AFTER_S = 4
# Uploads left open this long are removed by an API started with it (a test's "restarted" API). The
# deployment's own API keeps the default, or it would abort another API's upload while it is alive.
STALE_UPLOAD_S = 3


# GPU classes the fault tests send jobs to (see lane()), served by a worker a test starts or by none.
LANES = ("twice", "nobody-listens", "restart", "blip", "slow", "limited", "idle-behind", "claim-landed", "cut-off",
         "cancel-late")


@pytest.fixture(scope="session")
def faults_redis(tmp_path_factory):
    """The fault deployment's broker, its own: the Redis outage test stops it."""
    redis = services.RedisServer(tmp_path_factory.mktemp("faults-redis"))
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture(scope="session")
def faulty(backing_services, faults_redis, tmp_path_factory, tiny_model_dir):
    default = f"f{uuid.uuid4().hex[:8]}"  # queues no other test run listens to
    d = start_deployment(
        tmp_path_factory.mktemp("faults"), backing_services, tiny_model_dir, broker_url=faults_redis.url,
        heartbeat_deadline_s=HEARTBEAT_DEADLINE_S, reaper_interval_s=1, scheduler_interval_s=1, keep_checkpoints=2,
        max_upload_bytes=64 * 1024 * 1024, redispatch_after_s=REDISPATCH_AFTER_S, out_of_reach_wait_s=1,
        default_gpu_class=default, extra_gpu_classes=json.dumps([f"{default}-{name}" for name in LANES]),
    )
    yield d
    stop_deployment(d)


@pytest.fixture(scope="session")
def tenant(faulty):
    return faulty.client(faulty.team_key("faults"))


@pytest.fixture(scope="session")
def dataset_id(tenant, demo_data):
    return upload(tenant, demo_data["train"]).json()["id"]


@pytest.fixture(scope="session")
def fault_report():
    """Each test appends {fault, injected, survived, steps_lost}; written where QLORA_FAULT_REPORT
    says (tests/faults/report.py turns several runs into docs/reliability.md)."""
    rows: list[dict] = []
    yield rows
    path = os.environ.get("QLORA_FAULT_REPORT")
    if path:
        Path(path).write_text(json.dumps(rows, indent=2))


def job_body(dataset_id: str, max_steps: int, save_steps: int = 10, gpu_class: str | None = None) -> dict:
    from worker.training.tiny import demo_spec

    spec = demo_spec("tiny")
    spec["training"].update(max_steps=max_steps, save_steps=save_steps, logging_steps=1, eval_steps=100_000,
                            per_device_batch_size=8)
    spec["output"] = {"merge": False}
    spec["eval"] = {"prompts": 0}  # no eval report: these tests are about transfers and attempts
    return {"dataset_id": dataset_id, **spec} | ({"gpu_class": gpu_class} if gpu_class else {})


def lane(d: Deployment, name: str) -> str:
    """A GPU class of this test session's own: a queue that no other session's workers (another
    suite running on the same Redis) can take a message from."""
    assert name in LANES, f"add {name!r} to LANES, the classes the deployment serves"
    return f"{d.settings.default_gpu_class}-{name}"


def attempt_dir(d: Deployment, job_id: str, attempt: int = 1) -> Path:
    return d.home / "work" / job_id / f"attempt-{attempt}"


def release(d: Deployment, job_id: str, attempt: int = 1) -> None:
    """Let a training process held by QLORA_FAULT_HOLD_AT_STEP go on."""
    (attempt_dir(d, job_id, attempt) / FAULT_RELEASE).touch()


def trainer_pids(job_id: str, attempt: int | None = None) -> list[int]:
    pattern = f"worker.runner .*{job_id}/attempt-{attempt if attempt is not None else ''}"
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def kill_worker_and_trainer(d: Deployment, worker: subprocess.Popen, job_id: str) -> None:
    """SIGKILL the worker (its main and pool processes) and the training process it spawned."""
    pids = trainer_pids(job_id)
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait()


def curve_steps(client, job_id: str) -> list[int]:
    return [p["step"] for p in client.get(f"/jobs/{job_id}/metrics").json()["train"]]


def events(client, job_id: str) -> list[dict]:
    return client.get(f"/jobs/{job_id}/events").json()
