"""Work that must not be lost where the other fault tests do not look: a checkpoint that went bad in storage
after it was recorded; worker hosts whose clocks disagree with the reaper's; the database out of reach just as a
finished run's outcome is recorded."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import boto3
from sqlalchemy import select
from sqlalchemy.engine import make_url

from app.db import FAULT_CLOCK_SKEW, session_scope
from app.jobs.tables import Artifact, Checkpoint
from app.operations import workers
from app.operations.service import QueueHealth, queue_health
from app.scheduling.repository import idle_workers
from tests.deployment import BUCKET, wait_for_status, wait_until
from tests.faults.conftest import (
    HEARTBEAT_DEADLINE_S,
    attempt_dir,
    curve_steps,
    events,
    job_body,
    kill_worker_and_trainer,
    lane,
    release,
    trainer_pids,
)
from tests.faults.tcp_link import CuttableLink
from tests.faults.throttle import ThrottlingProxy
from worker.runner import FAULT_HOLD_AT_STEP
from worker.supervisor import FAULT_HOLD_END, fault_hold_end_markers
from worker.training.host_claims import HOST_CLAIMS_DIR

FINISHED = ("succeeded", "failed", "cancelled")


def _checkpoint_keys(d, job_id: str) -> dict[int, str]:
    with session_scope(d.settings.database_url) as session:
        return {c.step: c.storage_key for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id))}


def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(faulty, tenant, dataset_id, fault_report):
    """The checkpoint a resume needs rotted in storage (other bytes under its key): the job failed at once, "the
    worker failed: ChecksumMismatch: object '<key>' is corrupt ... so upload it again", though the checkpoint
    before it was whole. Now the attempt drops it and resumes from that one."""
    # Held after step 25 (checkpoints 10 and 20 recorded: the deployment keeps 2), so the kill lands mid-run.
    worker = faulty.start_worker(name="bitrot", extra_env={FAULT_HOLD_AT_STEP: "25"})
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=40)).json()
    s3 = boto3.client("s3", endpoint_url=faulty.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = faulty.settings.storage_url.split("/", 3)[3]
    try:
        def held(attempt: int):
            now = tenant.get(f"/jobs/{job['id']}").json()
            return (now["attempt"] == attempt and max(curve_steps(tenant, job["id"]), default=0) >= 24
                    and sorted(_checkpoint_keys(faulty, job["id"])) == [10, 20])

        wait_until(lambda: held(1), 180, "attempt 1 held after step 25, checkpoints 10 and 20 recorded")
        rotten = _checkpoint_keys(faulty, job["id"])[20]
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{rotten}", Body=b"rotten")
        (trainer,) = trainer_pids(job["id"], attempt=1)
        os.kill(trainer, signal.SIGKILL)  # attempt 2, on the same worker, resumes from the newest checkpoint
        wait_until(lambda: held(2) or tenant.get(f"/jobs/{job['id']}").json()["status"] in FINISHED, 240,
                   "attempt 2 held after step 25 in its turn")
        if tenant.get(f"/jobs/{job['id']}").json()["status"] not in FINISHED:  # it failed at once, before
            release(faulty, job["id"], attempt=2)
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 2 and curve_steps(tenant, job["id"]) == list(range(1, 41))
        resumed = [e for e in events(tenant, job["id"]) if e["type"] == "resumed"]
        assert [e["step"] for e in resumed] == [20, 10] and resumed[-1]["level"] == "warning"
        assert ("the checkpoint at step 20 is unusable and was dropped: its bytes no longer match the sha256"
                in resumed[-1]["message"])
        assert sorted(_checkpoint_keys(faulty, job["id"])) == [30, 40]
        # The rotten copy went with its row: nothing of it is left for a sweep to find.
        assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/{rotten}")
        fault_report.append({"fault": "the checkpoint to resume from corrupt in storage", "injected": 1,
                             "survived": 1, "steps_lost": 25 - 10})
    finally:
        faulty.stop(worker)


def test_a_worker_whose_clock_runs_behind_keeps_its_job(faulty, tenant, dataset_id, fault_report):
    """A worker host whose clock runs behind the reaper's by more than the heartbeat deadline (120 s in
    production; NTP down, a VM resumed from suspend) wrote heartbeats that looked that old as they landed."""
    worker = faulty.start_worker(name="clock-behind", extra_env={FAULT_CLOCK_SKEW: str(-12 * HEARTBEAT_DEADLINE_S)})
    try:
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=10, save_steps=5)).json()
        done = wait_for_status(tenant, job["id"], ("paused", *FINISHED), timeout=240, deployment=faulty)
        story = events(tenant, job["id"])
        assert done["status"] == "succeeded" and done["attempt"] == 1, [(e["type"], e["message"]) for e in story]
        assert "requeued" not in [e["type"] for e in story]
        fault_report.append({"fault": "a worker's clock a minute behind the reaper's", "injected": 1,
                             "survived": 1, "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_an_idle_worker_whose_clock_runs_behind_counts_as_alive(faulty, fault_report):
    """A worker's liveness (its row's seen_at, every WORKER_BEAT_S) was written with its host's clock and judged by
    the reader's: idle on a host whose clock ran WORKER_ALIVE_S behind, it counted as dead while it beat. The
    scheduler did not send a lost message again for it to take (no idle worker), and `qlora admin status` and
    /metrics called its queue stranded, its worker last heard from a minute ago."""
    gpu_class = lane(faulty, "idle-behind")
    queue = faulty.settings.queue_for(gpu_class)
    behind = str(-2 * workers.WORKER_ALIVE_S)
    worker = faulty.start_worker(gpu_class=gpu_class, name="idle-behind", extra_env={FAULT_CLOCK_SKEW: behind})

    def heard() -> QueueHealth | None:
        with session_scope(faulty.settings.database_url) as session:
            health = {q.queue: q for q in queue_health(session, faulty.settings)}.get(queue)
        return health if health is not None and health.last_seen is not None else None

    try:
        health = wait_until(heard, 60, "the worker's first beat")
        assert health.last_seen is not None and health.last_seen.name == "idle-behind"
        assert health.workers_alive == 1 and health.last_seen_s is not None
        assert health.last_seen_s < workers.WORKER_ALIVE_S
        with session_scope(faulty.settings.database_url) as session:  # the scheduler's view: one idle worker
            assert idle_workers(session, queue, workers.alive_since(session)) == 1
        fault_report.append({"fault": "an idle worker's clock a minute behind the readers'", "injected": 1,
                             "survived": 1, "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_a_dead_worker_whose_clock_ran_ahead_loses_its_job_within_the_deadline(faulty, tenant, dataset_id,
                                                                                fault_report):
    """A worker host whose clock runs ahead wrote heartbeats dated in the future: killed, its job looked alive
    for as long as its clock was ahead."""
    ahead = faulty.start_worker(name="clock-ahead", extra_env={FAULT_CLOCK_SKEW: "3600", FAULT_HOLD_AT_STEP: "6"})
    rescuer = None
    try:
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=10, save_steps=5)).json()
        wait_until(lambda: max(curve_steps(tenant, job["id"]), default=0) >= 5, 180, "attempt 1 held after step 6")
        kill_worker_and_trainer(faulty, ahead, job["id"])
        # The reaper gives it another attempt once it is silent for the deadline (was: an hour later).
        wait_until(lambda: tenant.get(f"/jobs/{job['id']}").json()["status"] == "queued", 12 * HEARTBEAT_DEADLINE_S,
                   "the dead worker's job to be requeued")
        rescuer = faulty.start_worker(name="clock-right")
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
        assert curve_steps(tenant, job["id"]) == list(range(1, 11))
        fault_report.append({"fault": "a dead worker's clock an hour ahead of the reaper's", "injected": 1,
                             "survived": 1, "steps_lost": 1})
    finally:
        faulty.stop(ahead)
        if rescuer is not None:
            faulty.stop(rescuer)


def test_a_training_run_whose_hosts_clock_steps_ahead_goes_on(faulty, tenant, dataset_id, fault_report):
    """The worker host's wall clock stepped an hour ahead (NTP correcting it, a VM resumed) while a job trained: the
    training process judged its heartbeat file by its age on the wall clock, took the live worker for gone until
    the worker's next touch, and stopped, "cancelled at step 4"; the worker could not record a cancel nobody
    asked for, the job went silent, and the reaper queued it again as a lost worker's (attempt 2 trained again
    from checkpoint 2). Now the file counts as stale only once it has not changed for the deadline."""
    worker = faulty.start_worker(name="clock-step", extra_env={FAULT_HOLD_AT_STEP: "3"})
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=6, save_steps=2)).json()
    try:
        wait_until(lambda: max(curve_steps(tenant, job["id"]), default=0) >= 2, 180, "attempt 1 held after step 3")
        heartbeat = attempt_dir(faulty, job["id"]) / "heartbeat"

        def touched_since(moment: float) -> bool:  # or gone: the attempt ended (the old code's way)
            try:
                return heartbeat.stat().st_mtime > moment
            except FileNotFoundError:
                return True

        for _ in range(5):  # each step ahead lasts until the worker's next touch; the held run looks every 0.1 s
            ahead = time.time() - 3600  # the file's time, an hour before "now" on the stepped clock
            with contextlib.suppress(FileNotFoundError):
                os.utime(heartbeat, (ahead, ahead))
            wait_until(lambda ahead=ahead: touched_since(ahead + 1800), 30, "the worker's next touch")
        with contextlib.suppress(FileNotFoundError):
            release(faulty, job["id"])

        def settled() -> dict | None:  # finished, or given another attempt (held at step 3 in its turn)
            now = tenant.get(f"/jobs/{job['id']}").json()
            return now if now["status"] in FINISHED or now["attempt"] > 1 else None

        done = wait_until(settled, 240, "the job to finish")
        story = events(tenant, job["id"])
        assert done["status"] == "succeeded" and done["attempt"] == 1, [(e["type"], e["message"]) for e in story]
        assert not {"cancelled", "requeued"} & {e["type"] for e in story}
        assert curve_steps(tenant, job["id"]) == list(range(1, 7))
        fault_report.append({"fault": "a worker host's wall clock stepped an hour ahead mid-run", "injected": 1,
                             "survived": 1, "steps_lost": 0})
    finally:
        tenant.post(f"/jobs/{job['id']}/cancel")
        faulty.stop(worker)


def test_a_merged_model_of_a_lost_attempt_goes_when_the_next_one_builds_none(faulty, tenant, dataset_id,
                                                                                  fault_report):
    """Attempt 1 stored and recorded its adapter and merged model and was lost before its end (its worker killed);
    attempt 2, on a host without the memory to merge, saved the adapter alone ("merge_skipped: the merged model was
    not built") and succeeded, and the job still served attempt 1's merged model, of another run, its fidelity never
    recorded. Now a succeeding attempt's artifacts are the job's, all of them: the earlier merged model goes, row
    and object."""
    first = faulty.start_worker(name="merged-then-lost", extra_env={FAULT_HOLD_END: "1"})
    body = job_body(dataset_id, max_steps=2, save_steps=2) | {"output": {"merge": True}}
    job = tenant.post("/jobs", json=body).json()
    held, release_end = fault_hold_end_markers(faulty.settings, job["id"])
    second = claim = None
    try:
        wait_until(held.exists, 240, "attempt 1's artifacts recorded, its worker held before its end")
        earlier = _artifact_keys(faulty, job["id"])
        assert sorted(earlier) == ["adapter", "merged"]
        claim = _claim_all_host_memory(faulty)  # another run of this host holds its memory: no room to merge
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        second = faulty.start_worker(name="no-room-to-merge")
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        story = events(tenant, job["id"])
        assert done["status"] == "succeeded" and done["attempt"] == 2, [(e["type"], e["message"]) for e in story]
        assert [e["attempt"] for e in story if e["type"] == "merge_skipped"] == [2]
        assert [a["kind"] for a in tenant.get(f"/jobs/{job['id']}/artifacts").json()] == ["adapter"]
        s3 = boto3.client("s3", endpoint_url=faulty.settings.s3_endpoint_url, region_name="us-east-1")
        prefix = faulty.settings.storage_url.split("/", 3)[3]
        for key in earlier.values():  # attempt 1's objects went with their rows
            assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/{key}")
        fault_report.append({"fault": "worker killed after its artifacts were recorded; the next attempt could not merge",
                             "injected": 1, "survived": 1, "steps_lost": 0})
    finally:
        release_end.touch()
        if claim is not None:
            claim.kill()
            claim.wait()
        faulty.stop(first)
        if second is not None:
            faulty.stop(second)
        release_end.unlink(missing_ok=True)


def _artifact_keys(d, job_id: str) -> dict[str, str]:
    with session_scope(d.settings.database_url) as session:
        return {a.kind: a.storage_key for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}


def _claim_all_host_memory(d) -> subprocess.Popen:
    """A process that claims more host memory than there is, in the workers' shared claims
    (worker/training/host_claims.py), as another run of the host about to take it would; until it is killed."""
    code = ("import sys, time; from pathlib import Path; from worker.training.host_claims import HostClaims; "
            "HostClaims(Path(sys.argv[1]), 'test').claim(1 << 50); print('claimed', flush=True); time.sleep(3600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(d.settings.work_dir / HOST_CLAIMS_DIR)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("claimed")
    return proc


def test_a_database_outage_as_the_outcome_is_recorded_costs_no_attempt(faulty, tenant, dataset_id, fault_report):
    """Postgres restarted (or failed over) just as the worker recorded a finished run's artifacts: the record was
    not tried again, so the attempt counted as lost, and the next one trained to the end from the newest
    checkpoint and merged and uploaded everything again (tens of minutes on a real model). Now the worker
    rides the outage out, up to the heartbeat deadline, and the job succeeds on its first attempt."""
    url = make_url(faulty.settings.database_url)
    link = CuttableLink((url.host or "127.0.0.1", url.port or 5432))
    s3 = ThrottlingProxy(faulty.settings.s3_endpoint_url)
    through_link = url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
    worker = faulty.start_worker(name="db-outage", extra_env={"QLORA_DATABASE_URL": through_link,
                                                              "QLORA_S3_ENDPOINT_URL": s3.url})
    cut_at: list[bool] = []
    log = faulty.home / "worker-db-outage.log"

    def outage() -> None:  # the adapter is in the store, and the worker is about to record it
        link.cut()
        cut_at.append(True)
        # Back once the record has met it (the worker says so), not after a timer that a slow upload outlasted.
        link.restore_when(lambda: "could not record the adapter of job" in log.read_text(errors="replace"))

    s3.trip("PUT", "/artifacts/", outage)
    try:
        body = job_body(dataset_id, max_steps=4, save_steps=2) | {"output": {"merge": True}}
        job = tenant.post("/jobs", json=body).json()
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        story = events(tenant, job["id"])
        assert cut_at, "the outage never began: no artifact was uploaded"
        assert done["status"] == "succeeded" and done["attempt"] == 1, [(e["type"], e["message"]) for e in story]
        assert "requeued" not in [e["type"] for e in story]
        # The outage met the record (not only the heartbeats around it), and it was ridden out.
        worker_log = (faulty.home / "worker-db-outage.log").read_text(errors="replace")
        assert link.refused and f"could not record the adapter of job {job['id']}" in worker_log
        # Each artifact was uploaded once: what the store took under /artifacts/ is what is recorded, nothing more.
        with session_scope(faulty.settings.database_url) as session:
            recorded = {a.kind: a.storage_key for a in session.scalars(select(Artifact).where(
                Artifact.job_id == job["id"]))}
        uploaded = {path.split("?")[0].split("/", 2)[2] for method, path in s3.requests
                    if method in ("PUT", "POST") and "/artifacts/" in path}
        prefix = faulty.settings.storage_url.split("/", 3)[3]
        assert sorted(recorded) == ["adapter", "merged"]
        assert uploaded == {f"{prefix}/{key}" for key in recorded.values()}
        fault_report.append({"fault": "the database out of reach as a finished run's artifacts are recorded",
                             "injected": 1, "survived": 1, "steps_lost": 0})
    finally:
        link.restore()
        faulty.stop(worker)
        s3.close()
        link.close()
