"""Fault injection against real Postgres, Redis, Celery workers and S3 over HTTP.

Each test breaks something the way production breaks (a killed host, a frozen VM, a restarted
Redis, a dead API mid-upload) and checks what a user would see: the job finishes once, with its
exact step count, no step twice in its curve, and nothing left behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import boto3
from sqlalchemy import func, select

from app.broker import RUN_JOB_TASK, celery_for
from app.datasets.tables import Dataset
from app.db import session_scope
from app.jobs import runs
from tests import services
from tests.deployment import BUCKET, wait_for_status
from tests.faults.conftest import (
    HEARTBEAT_DEADLINE_S,
    curve_steps,
    events,
    job_body,
    kill_worker_and_trainer,
    trainer_pids,
    wait_until,
)
from worker.runner import FAULT_STALL_CHECKPOINT

FINISHED = ("succeeded", "failed", "cancelled")


def checkpoint_steps(client, job_id: str) -> list[int]:
    return [c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints").json()]


def test_sigkilled_worker_and_trainer_resume_from_the_last_checkpoint(faulty, tenant, dataset_id, fault_report):
    doomed = faulty.start_worker(name="doomed")
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=60)).json()

    def mid_run():
        saved = checkpoint_steps(tenant, job["id"])
        step = tenant.get(f"/jobs/{job['id']}").json()["progress"]["step"]
        return saved and saved[-1] >= 20 and step > saved[-1] and step < 60 and (saved[-1], step)

    newest, step_at_kill = wait_until(mid_run, 180, "a checkpoint at step 20 or later, mid-run")
    kill_worker_and_trainer(faulty, doomed, job["id"])
    step_at_kill = max(step_at_kill, max(curve_steps(tenant, job["id"])))

    rescuer = faulty.start_worker(name="rescuer")
    try:
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 2 and done["progress"]["step"] == done["progress"]["total_steps"] == 60
        assert curve_steps(tenant, job["id"]) == list(range(1, 61))  # every step once: none lost, none twice
        story = events(tenant, job["id"])
        requeued = [e for e in story if e["type"] == "requeued"]
        resumed = [e for e in story if e["type"] == "resumed"]
        assert len(requeued) == 1 and "doomed" in requeued[0]["message"]
        assert len(resumed) == 1 and resumed[0]["step"] >= newest and resumed[0]["attempt"] == 2
        fault_report.append({"fault": "worker and training process SIGKILLed mid-run", "injected": 1,
                             "survived": 1, "steps_lost": step_at_kill - resumed[0]["step"]})
    finally:
        faulty.stop(rescuer)


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(faulty, tenant, dataset_id, fault_report):
    stalling = faulty.start_worker(name="stalling", extra_env={FAULT_STALL_CHECKPOINT: "20"})
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=40)).json()
    stalled = faulty.home / "work" / job["id"] / "attempt-1" / "fault-stalled"
    wait_until(stalled.exists, 180, "the training process to be in the middle of writing checkpoint 20")
    assert checkpoint_steps(tenant, job["id"]) == [10]  # 20 is half-written: not visible
    kill_worker_and_trainer(faulty, stalling, job["id"])

    rescuer = faulty.start_worker(name="rescuer2")
    try:
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded", done["error"]
        assert done["progress"]["step"] == 40 and curve_steps(tenant, job["id"]) == list(range(1, 41))
        resumed = [e for e in events(tenant, job["id"]) if e["type"] == "resumed"]
        assert [e["step"] for e in resumed] == [10]
        assert checkpoint_steps(tenant, job["id"]) == [30, 40]  # keep_checkpoints=2; the half one never appeared
        fault_report.append({"fault": "training process killed while writing a checkpoint", "injected": 1,
                             "survived": 1, "steps_lost": 20 - 10})
    finally:
        faulty.stop(rescuer)
    # The half-written checkpoint's upload was never completed, and is cleared as stale.
    s3 = boto3.client("s3", endpoint_url=faulty.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = faulty.settings.storage_url.split("/", 3)[3] + "/"
    wait_until(lambda: not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads"), 30,
               "the stalled multipart upload to be aborted")


def test_a_job_delivered_twice_runs_once(faulty, tenant, dataset_id, fault_report):
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=20, gpu_class="twice")).json()
    celery_for(faulty.settings).send_task(RUN_JOB_TASK, args=[job["id"]], queue="gpu-twice")  # the duplicate
    worker = faulty.start_worker(gpu_class="twice", name="twice")
    try:
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=180, deployment=faulty)
        assert done["status"] == "succeeded" and done["attempt"] == 1
        wait_until(lambda: "is not queued any more" in faulty.log("worker-twice"), 30, "the second delivery")
        assert [e["type"] for e in events(tenant, job["id"])].count("claimed") == 1
        fault_report.append({"fault": "the same job message delivered twice", "injected": 1, "survived": 1,
                             "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_twenty_concurrent_claimers_one_wins(faulty, tenant, dataset_id, fault_report):
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=20, gpu_class="nobody-listens")).json()
    start = threading.Barrier(20)
    won: list = []

    def claimer(i: int) -> None:
        start.wait()
        with session_scope(faulty.settings.database_url) as session:
            claimed = runs.claim(session, job["id"], f"claimer-{i}")
        if claimed is not None:
            won.append((i, claimed.attempt))

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0][1] == 1
    state = tenant.get(f"/jobs/{job['id']}").json()
    assert state["status"] == "running" and state["attempt"] == 1
    with session_scope(faulty.settings.database_url) as session:
        runs.finish(session, job["id"], 1, "cancelled", error="test done")
    fault_report.append({"fault": "20 workers claiming one job at once", "injected": 1, "survived": 1,
                         "steps_lost": 0})


def test_frozen_worker_is_fenced_out_and_the_job_finishes_elsewhere(faulty, tenant, dataset_id, fault_report):
    frozen = faulty.start_worker(name="frozen")
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=80)).json()
    wait_until(lambda: checkpoint_steps(tenant, job["id"]), 180, "a first checkpoint")
    os.killpg(frozen.pid, signal.SIGSTOP)  # the worker's processes freeze; its training process does not
    frozen_at = time.monotonic()
    healthy = faulty.start_worker(name="healthy")
    try:
        wait_until(lambda: tenant.get(f"/jobs/{job['id']}").json()["attempt"] == 2, 60, "the job to be requeued")
        # The first training process notices its supervisor is silent and stops by itself.
        wait_until(lambda: not trainer_pids(job["id"], attempt=1), HEARTBEAT_DEADLINE_S + 30,
                   "the frozen worker's training process to stop")
        assert time.monotonic() - frozen_at > HEARTBEAT_DEADLINE_S
        os.killpg(frozen.pid, signal.SIGCONT)
        wait_until(lambda: "lease lost" in faulty.log("worker-frozen"), 30, "the old worker to notice")

        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
        assert curve_steps(tenant, job["id"]) == list(range(1, 81))
        story = events(tenant, job["id"])
        requeued_at = next(i for i, e in enumerate(story) if e["type"] == "requeued")
        # After the requeue, nothing from attempt 1: its writes were refused.
        assert all(e["attempt"] == 2 for e in story[requeued_at + 1:])
        assert frozen.poll() is None  # the worker itself lives on and can take the next job
        resumed = next(e for e in story if e["type"] == "resumed")
        fault_report.append({"fault": "worker frozen (SIGSTOP) past the heartbeat deadline", "injected": 1,
                             "survived": 1, "steps_lost": story[requeued_at]["step"] - resumed["step"]})
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
        faulty.stop(frozen)
        faulty.stop(healthy)


def test_redis_down_for_30_seconds_mid_job(faulty, tenant, dataset_id, fault_report):
    worker = faulty.start_worker(name="outage")
    try:
        # Long enough (about a minute here) that the whole outage falls inside the run.
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=800, save_steps=200)).json()
        wait_until(lambda: tenant.get(f"/jobs/{job['id']}").json()["progress"]["step"] > 0, 120, "training")
        services.stop_redis()
        try:
            time.sleep(30)
            assert tenant.get(f"/jobs/{job['id']}").json()["status"] == "running"
        finally:
            services.ensure_redis()
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done["error"]
        assert [e["type"] for e in events(tenant, job["id"])].count("claimed") == 1
        assert curve_steps(tenant, job["id"]) == list(range(1, 801))
        # The worker reconnected: it takes the next job.
        after = tenant.post("/jobs", json=job_body(dataset_id, max_steps=10)).json()
        assert wait_for_status(tenant, after["id"], FINISHED, timeout=120, deployment=faulty)["status"] == "succeeded"
        fault_report.append({"fault": "Redis stopped for 30 s mid-job", "injected": 1, "survived": 1,
                             "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_cancelled_jobs_never_run_again_after_a_worker_restart(faulty, tenant, dataset_id, fault_report):
    gpu_class = "restart"
    queued = tenant.post("/jobs", json=job_body(dataset_id, max_steps=20, gpu_class=gpu_class)).json()
    assert tenant.post(f"/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    worker = faulty.start_worker(gpu_class=gpu_class, name="restart-1")
    running = tenant.post("/jobs", json=job_body(dataset_id, max_steps=100_000, gpu_class=gpu_class)).json()
    wait_until(lambda: tenant.get(f"/jobs/{running['id']}").json()["progress"]["step"] > 0, 120, "training")
    tenant.post(f"/jobs/{running['id']}/cancel")
    assert wait_for_status(tenant, running["id"], FINISHED, timeout=60)["status"] == "cancelled"
    faulty.stop(worker)  # a warm shutdown puts unacknowledged messages back in the queue

    worker = faulty.start_worker(gpu_class=gpu_class, name="restart-2")
    try:
        probe = tenant.post("/jobs", json=job_body(dataset_id, max_steps=5, gpu_class=gpu_class)).json()
        assert wait_for_status(tenant, probe["id"], FINISHED, timeout=120)["status"] == "succeeded"
        for job in (queued, running):
            after = tenant.get(f"/jobs/{job['id']}").json()
            assert after["status"] == "cancelled"
            assert [e["type"] for e in events(tenant, job["id"])].count("claimed") == (0 if job is queued else 1)
        fault_report.append({"fault": "cancelled jobs, then the worker restarted", "injected": 2, "survived": 2,
                             "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_api_killed_during_an_upload_leaves_nothing(faulty, tenant, fault_report):
    second_api = faulty.spawn("serve", "--no-worker", log_name="api-2",
                              extra_env={"QLORA_PORT": str(port := services.free_port())})
    client = faulty.client(None)
    client.base_url = f"http://127.0.0.1:{port}"
    client.headers.update(tenant.headers)
    wait_until(lambda: _answers(client), 60, "the second API")
    s3 = boto3.client("s3", endpoint_url=faulty.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = faulty.settings.storage_url.split("/", 3)[3] + "/"
    with session_scope(faulty.settings.database_url) as session:
        rows_before = session.scalar(select(func.count()).select_from(Dataset))
    keys_before = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}

    row = b'{"prompt": "' + b"p" * 200 + b'", "completion": "c"}\n'
    sent = threading.Event()

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for i in range(200):
            yield row * 5000  # ~1 MiB
            if i == 12:  # past one 8 MiB part: a multipart upload is open in the store
                sent.set()
                time.sleep(300)  # held open until the API is killed under it

    def send():
        try:
            client.post("/datasets", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        except Exception:
            pass  # the server died under it: that is the point

    uploader = threading.Thread(target=send, daemon=True)
    uploader.start()
    sent.wait(60)
    # Generous: the API validates every line before a part goes out, and a loaded CI machine once
    # took over 30 s for the first 8 MiB.
    wait_until(lambda: s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads"), 180,
               "the upload to reach the store")
    os.killpg(second_api.pid, signal.SIGKILL)
    second_api.wait()

    # A new API process clears writes that died half-way (older than QLORA_STALE_UPLOAD_S=3).
    restarted = faulty.spawn("serve", "--no-worker", log_name="api-3",
                             extra_env={"QLORA_PORT": str(services.free_port())})
    try:
        wait_until(lambda: not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads"), 60,
                   "the dead upload to be aborted")
        with session_scope(faulty.settings.database_url) as session:
            assert session.scalar(select(func.count()).select_from(Dataset)) == rows_before
        assert {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])} == keys_before
        fault_report.append({"fault": "API SIGKILLed during a 200 MiB upload", "injected": 1, "survived": 1,
                             "steps_lost": 0})
    finally:
        faulty.stop(restarted)


def _answers(client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except Exception:
        return False
