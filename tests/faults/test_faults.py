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
from datetime import datetime, timedelta

import boto3
from sqlalchemy import func, select

from app.broker import RUN_JOB_TASK, celery_for
from app.datasets.tables import Dataset
from app.db import session_scope, sessionmaker_for, utcnow
from app.jobs import repository, runs
from app.jobs.reaper import LEASE
from app.jobs.tables import Job, JobAttempt
from app.operations.lease import current_holder
from app.storage.base import make_key, storage_from_settings
from app.storage.s3 import PART_SIZE
from tests import services
from tests.deployment import BUCKET, wait_for_status, wait_until
from tests.faults.conftest import (
    HEARTBEAT_DEADLINE_S,
    STALE_UPLOAD_S,
    attempt_dir,
    curve_steps,
    events,
    job_body,
    kill_worker_and_trainer,
    lane,
    release,
    trainer_pids,
)
from worker.runner import FAULT_HOLD_AT_STEP, FAULT_OUT_OF_MEMORY, FAULT_STALL_CHECKPOINT
from worker.supervisor import FAULT_HOLD_END, fault_hold_end_markers, session_url

FINISHED = ("succeeded", "failed", "cancelled")
REDIS_OUTAGE_S = 3 * HEARTBEAT_DEADLINE_S


def checkpoint_steps(client, job_id: str) -> list[int]:
    return [c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints").json()]


def test_sigkilled_worker_and_trainer_resume_from_the_last_checkpoint(faulty, tenant, dataset_id, fault_report):
    # Held after step 25 (checkpoints 10 and 20 recorded), so the kill lands mid-run however fast the machine
    # trains. (A 60-step job, killed once a poll saw checkpoint 20 or later, left the rescuer 30 to 40 steps.)
    doomed = faulty.start_worker(name="doomed", extra_env={FAULT_HOLD_AT_STEP: "25"})
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=40)).json()

    def mid_run():
        saved = checkpoint_steps(tenant, job["id"])
        step = tenant.get(f"/jobs/{job['id']}").json()["progress"]["step"]
        return saved and saved[-1] >= 20 and step > saved[-1] and (saved[-1], step)

    newest, step_at_kill = wait_until(mid_run, 180, "a checkpoint at step 20, and training past it")
    kill_worker_and_trainer(faulty, doomed, job["id"])
    step_at_kill = max(step_at_kill, max(curve_steps(tenant, job["id"])))

    rescuer = faulty.start_worker(name="rescuer")
    try:
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 2 and done["progress"]["step"] == done["progress"]["total_steps"] == 40
        assert curve_steps(tenant, job["id"]) == list(range(1, 41))  # every step once: none lost, none twice
        story = events(tenant, job["id"])
        requeued = [e for e in story if e["type"] == "requeued"]
        resumed = [e for e in story if e["type"] == "resumed"]
        assert len(requeued) == 1 and "doomed" in requeued[0]["message"]
        assert len(resumed) == 1 and resumed[0]["step"] >= newest and resumed[0]["attempt"] == 2
        fault_report.append({"fault": "worker and training process SIGKILLed mid-run", "injected": 1,
                             "survived": 1, "steps_lost": step_at_kill - resumed[0]["step"]})
    finally:
        faulty.stop(rescuer)


def test_a_training_process_killed_alone_is_another_attempt_from_the_checkpoint(faulty, tenant, dataset_id,
                                                                               fault_report):
    """The kernel's out-of-memory killer takes the training process, not its worker: the job failed at
    once ("exited with code -9 without a result"), its checkpoints stranded. Now the worker itself gives
    it another attempt, as the reaper does for a silent worker, and the attempt resumes from the newest
    checkpoint."""
    # Held after step 15 (checkpoint 10 saved), so the kill lands mid-run however fast the machine trains.
    worker = faulty.start_worker(name="oom-host", extra_env={FAULT_HOLD_AT_STEP: "15"})
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=20)).json()
    try:
        def held(attempt: int):
            # The curve, not the progress: a claim deletes the points past the checkpoint it resumes from,
            # so they come back only as this attempt's training process logs them (up to 14: step 15's
            # point is logged after the hook that holds).
            now = tenant.get(f"/jobs/{job['id']}").json()
            return (now["attempt"] == attempt and max(curve_steps(tenant, job["id"]), default=0) >= 14
                    and checkpoint_steps(tenant, job["id"]))

        newest = wait_until(lambda: held(1), 180, "attempt 1 held after step 15, checkpoint 10 recorded")[-1]
        (trainer,) = trainer_pids(job["id"], attempt=1)
        os.kill(trainer, signal.SIGKILL)  # the training process alone; its worker lives on
        step_at_kill = max(curve_steps(tenant, job["id"]))
        wait_until(lambda: held(2), 180, "attempt 2 held after step 15 in its turn")
        release(faulty, job["id"], attempt=2)
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded", done["error"]  # was failed, at once
        assert done["attempt"] == 2 and curve_steps(tenant, job["id"]) == list(range(1, 21))
        story = events(tenant, job["id"])
        (requeued,) = [e for e in story if e["type"] == "requeued"]
        assert "training process was killed by SIGKILL" in requeued["message"] and "try 2 of" in requeued["message"]
        assert "out-of-memory killer" in requeued["message"]  # what usually sends it, and where to look
        (resumed,) = [e for e in story if e["type"] == "resumed"]
        assert resumed["step"] >= newest and resumed["level"] == "warning"  # news, unlike a resume after a pause
        # The GPU ran the steps after the checkpoint twice, and both count: attempt 2 counts its tokens from
        # the checkpoint's, not from where attempt 1 was lost (which left them out).
        with session_scope(faulty.settings.database_url) as session:
            first, second = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job["id"])
                                            .order_by(JobAttempt.attempt)).all()
            assert 0 < second.tokens_at_claim < first.trained_tokens
            assert first.trained_tokens + second.trained_tokens > done["summary"]["tokens_seen"]
        fault_report.append({"fault": "training process alone SIGKILLed (out of memory)", "injected": 1,
                             "survived": 1, "steps_lost": max(step_at_kill - resumed["step"], 0)})
    finally:
        faulty.stop(worker)


def test_a_job_out_of_memory_at_a_step_continues_from_its_checkpoint_with_a_smaller_micro_batch(
        faulty, tenant, dataset_id, fault_report):
    """A step that does not fit the GPU (the estimate fell short): the job failed, naming the step and what to
    change, and whatever it trained was lost unless its team started over by hand. Now the job is queued again
    with half the micro-batch and twice the accumulation (the same rows at each step), written into its spec,
    and the next attempt resumes from its newest checkpoint.

    The worker is held once attempt 1 has ended, before it writes the retry, until a full heartbeat deadline has
    passed (what a slow database or a loaded host did by chance: the test failed with attempt 3). It used to
    stop its heartbeats before writing the end, so the reaper took the silent attempt and queued the job as it
    was: attempt 2 ran out of memory again with micro-batch 8, and attempt 3 had the smaller one. Its
    heartbeats now go on until the end is written."""
    # > 4 rows: no room; and the worker held at the end of attempt 1 (FAULT_HOLD_END)
    worker = faulty.start_worker(name="small-gpu", extra_env={FAULT_OUT_OF_MEMORY: "7:4", FAULT_HOLD_END: "1"})
    body = job_body(dataset_id, max_steps=12, save_steps=4)
    body["training"]["gradient_accumulation_steps"] = 1
    job = tenant.post("/jobs", json=body).json()
    held, release = fault_hold_end_markers(faulty.settings, job["id"])
    try:
        wait_until(held.exists, 300, "attempt 1 out of memory, its worker held before writing the retry")

        def heard() -> tuple[str, datetime]:
            with session_scope(faulty.settings.database_url) as session:
                row = session.get(Job, job["id"])
                return row.status, row.heartbeat_at

        status, held_since = heard()
        assert status == "running"
        # Until the reaper would have taken a silent attempt (the job queued again), or the worker's heartbeats
        # have gone on past a whole deadline while it is held: only then is the end written.
        wait_until(lambda: (now := heard())[0] != "running"
                   or now[1] > held_since + timedelta(seconds=HEARTBEAT_DEADLINE_S + 1), 120,
                   "a heartbeat deadline passed while the worker was held")
        release.touch()
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=300, deployment=faulty)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 2 and curve_steps(tenant, job["id"]) == list(range(1, 13))
        training = done["spec"]["training"]
        assert (training["per_device_batch_size"], training["gradient_accumulation_steps"]) == (4, 2)
        story = [e for e in events(tenant, job["id"]) if e["type"] in ("out_of_memory", "requeued", "resumed", "failed")]
        assert [(e["type"], e["level"]) for e in story] == [
            ("out_of_memory", "warning"), ("requeued", "warning"), ("resumed", "warning")]
        assert "out of memory on cpu at step 7 with micro-batch 8" in story[0]["message"]
        assert ("micro-batch 4 and gradient_accumulation_steps 2 (from 8 and 1: the same 8 rows at each optimizer "
                "step" in story[1]["message"])
        assert story[2]["step"] == 4 and story[2]["attempt"] == 2
        fault_report.append({"fault": "out of memory at a training step", "injected": 1, "survived": 1,
                             "steps_lost": 6 - 4})
    finally:
        release.touch()  # a worker still held must not hang its stop
        faulty.stop(worker)
        release.unlink(missing_ok=True)


def test_a_worker_stopped_with_sigterm_hands_its_job_back_at_a_checkpoint(faulty, tenant, dataset_id, fault_report):
    """A deploy stops a worker with SIGTERM (docker stop: the main process alone). Celery's warm shutdown
    waited for the job to end, however long; the stop grace period's SIGKILL then lost everything since
    the last checkpoint and counted as a lost worker. Now the job saves a checkpoint after its current
    step and is queued again, and the worker exits within a step of the signal. Sent here to the worker's
    whole process group, as systemd sends it (KillMode=control-group): the pool process took it too and died
    at once, losing the steps since the last checkpoint; it leaves the signal to the main process now. Another worker started
    under the same name (two hosts with one default name) keeps its job: the attempt handed back is the
    one the stopped worker runs, not every job of its name. Both run as in docker-compose.yml: each in a container
    (a process-id namespace of its own, where both have the same pid), sharing the work directory. The marker of
    the attempt a worker runs was named by that pid: the twin, starting while the first worker trained, removed
    the first's marker (its own pid's) and wrote its own there, so the SIGTERM handed back the twin's job."""
    # Held after step 3 until the pause the shutdown asks for: the run cannot end first on a fast machine.
    leaving = faulty.start_worker(name="leaving", extra_env={FAULT_HOLD_AT_STEP: "3"}, container=True)
    twin = staying = None
    both = []
    try:
        for started in range(2):
            if started:  # the twin starts once the first worker trains, as a scale-up or a restart would
                twin = faulty.start_worker(name="leaving", extra_env={FAULT_HOLD_AT_STEP: "3"}, container=True)
            # 12 steps: the checkpoint before the last is the one saved on the way out (save_steps past the end).
            one = tenant.post("/jobs", json=job_body(dataset_id, max_steps=12, save_steps=20)).json()
            both.append(one)
            wait_until(lambda one=one: tenant.get(f"/jobs/{one['id']}").json()["progress"]["step"] >= 3, 180,
                       "training under way on both workers")
        os.killpg(leaving.pid, signal.SIGTERM)  # to the pool process too, as systemd sends it
        leaving.wait(120)  # was: the rest of the job
        now = {one["id"]: tenant.get(f"/jobs/{one['id']}").json() for one in both}
        (job,) = [one for one in now.values() if one["status"] != "running"]
        (kept,) = [one for one in now.values() if one["status"] == "running"]  # the twin's: not handed back
        assert not any(e["type"] == "pause_requested" for e in events(tenant, kept["id"]))
        tenant.post(f"/jobs/{kept['id']}/cancel")
        handed = tenant.get(f"/jobs/{job['id']}").json()
        assert handed["status"] == "queued" and handed["progress"]["step"] < 12, handed
        story = events(tenant, job["id"])
        assert any(e["type"] == "pause_requested" and "leaving is shutting down" in e["message"] for e in story)
        ends = [e["type"] for e in story if e["type"] in ("paused", "requeued")]
        assert "paused" in ends and ends[-1] == "requeued", ends
        paused_at = handed["progress"]["step"]
        assert paused_at in checkpoint_steps(tenant, job["id"])  # the checkpoint it saved on its way out

        staying = faulty.start_worker(name="staying")
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 2 and done["preemptions"] == 0
        assert curve_steps(tenant, job["id"]) == list(range(1, 13))
        (resumed,) = [e for e in events(tenant, job["id"]) if e["type"] == "resumed"]
        assert resumed["step"] == paused_at
        fault_report.append({"fault": "worker stopped with SIGTERM (a deploy) mid-run", "injected": 1,
                             "survived": 1, "steps_lost": 0})
    finally:
        faulty.stop(leaving)
        if twin is not None:
            faulty.stop(twin)
        if staying is not None:
            faulty.stop(staying)


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(faulty, tenant, dataset_id, fault_report):
    stalling = faulty.start_worker(name="stalling", extra_env={FAULT_STALL_CHECKPOINT: "20"})
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=40)).json()
    stalled = attempt_dir(faulty, job["id"]) / "fault-stalled"
    wait_until(stalled.exists, 180, "the training process to be in the middle of writing checkpoint 20")
    # The worker relays checkpoint 10 within a supervise interval of its upload, which a fast machine
    # may not have reached by the time step 20 stalls; 20 is half-written and can never appear.
    saved = wait_until(lambda: checkpoint_steps(tenant, job["id"]), 30, "checkpoint 10 to be recorded")
    assert saved == [10]
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
    # The half-written checkpoint left nothing in the store: the tiny model's checkpoint fits in one part,
    # which the writer holds until its commit, so no multipart upload was even opened. (A larger one's
    # open upload is removed as stale, as the API-kill fault shows.)
    s3 = boto3.client("s3", endpoint_url=faulty.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = faulty.settings.storage_url.split("/", 3)[3] + "/"
    assert not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")


def test_a_job_delivered_twice_runs_once(faulty, tenant, dataset_id, fault_report):
    gpu_class = lane(faulty, "twice")
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=20, gpu_class=gpu_class)).json()
    celery_for(faulty.settings).send_task(RUN_JOB_TASK, args=[job["id"]],  # the duplicate
                                          queue=faulty.settings.queue_for(gpu_class))
    worker = faulty.start_worker(gpu_class=gpu_class, name="twice")
    try:
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=180, deployment=faulty)
        assert done["status"] == "succeeded" and done["attempt"] == 1
        wait_until(lambda: "no job of this class may start now" in faulty.log("worker-twice"), 30, "the second delivery")
        assert [e["type"] for e in events(tenant, job["id"])].count("claimed") == 1
        fault_report.append({"fault": "the same job message delivered twice", "injected": 1, "survived": 1,
                             "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_twenty_concurrent_claimers_one_wins(faulty, tenant, dataset_id, fault_report):
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=20, gpu_class=lane(faulty, "nobody-listens"))).json()
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
    # Ended as its worker would end it, or the reaper would requeue it and send it to a queue nobody serves.
    assert tenant.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
    with session_scope(faulty.settings.database_url) as session:
        assert runs.finish(session, job["id"], 1, "cancelled", error="test done")
    fault_report.append({"fault": "20 workers claiming one job at once", "injected": 1, "survived": 1,
                         "steps_lost": 0})


def test_frozen_worker_is_fenced_out_and_the_job_finishes_elsewhere(faulty, tenant, dataset_id, fault_report):
    frozen = faulty.start_worker(name="frozen")
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=80)).json()
    wait_until(lambda: checkpoint_steps(tenant, job["id"]), 180, "a first checkpoint")
    os.killpg(frozen.pid, signal.SIGSTOP)  # the worker's processes freeze; its training process does not
    healthy = faulty.start_worker(name="healthy")
    try:
        wait_until(lambda: tenant.get(f"/jobs/{job['id']}").json()["attempt"] == 2, 60, "the job to be requeued")
        # The first training process notices its supervisor is silent and stops by itself: only once
        # the heartbeat file, untouched since the freeze, has stayed unchanged for the deadline. (From
        # the file's last change, which the process sees within a second of it, not from the SIGSTOP:
        # the last heartbeat came up to a supervise interval before it.)
        wait_until(lambda: not trainer_pids(job["id"], attempt=1), HEARTBEAT_DEADLINE_S + 30,
                   "the frozen worker's training process to stop")
        assert time.time() - (attempt_dir(faulty, job["id"]) / "heartbeat").stat().st_mtime > HEARTBEAT_DEADLINE_S
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


def test_a_worker_frozen_inside_a_transaction_does_not_hold_up_the_requeue(faulty, tenant, dataset_id,
                                                                            fault_report):
    # A worker frozen (SIGSTOP, a stopped VM) while it reports leaves a transaction open that holds its
    # job's row. Here the same is done on the worker's own connection settings, deterministically.
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=20, gpu_class=lane(faulty, "nobody-listens"))).json()
    worker_db = session_url(faulty.settings)
    with session_scope(worker_db) as session:
        assert runs.claim(session, job["id"], "frozen-in-sql") is not None
    frozen = sessionmaker_for(worker_db)()
    try:
        assert repository.touch(frozen, job["id"], 1, heartbeat_at=utcnow())  # the row is locked, uncommitted
        # The reaper's requeue needs that row: it goes through once Postgres has ended the idle
        # transaction (after the heartbeat deadline), not whenever the frozen worker wakes.
        wait_until(lambda: tenant.get(f"/jobs/{job['id']}").json()["status"] == "queued",
                   3 * HEARTBEAT_DEADLINE_S + 10, "the reaper to requeue the job")
    finally:
        frozen.invalidate()  # its connection is dead (ended by the server), or is ended here if the wait failed
    requeued = [e for e in events(tenant, job["id"]) if e["type"] == "requeued"]
    assert len(requeued) == 1 and "frozen-in-sql" in requeued[0]["message"]
    assert tenant.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    fault_report.append({"fault": "worker frozen inside a database transaction", "injected": 1, "survived": 1,
                         "steps_lost": 0})


def test_redis_down_for_three_heartbeat_deadlines_mid_job(faulty, faults_redis, tenant, dataset_id, fault_report):
    # The training process waits after step 20 until released, so the whole outage surely falls inside
    # the run however fast or slow this machine trains (a job sized to outlast it finished first on a
    # quiet machine, and missed its deadline on a busy one). The outage outlasts the heartbeat deadline
    # three times over (as the slow transfers of test_long_attempts do): a job whose worker went silent
    # with the broker would be requeued well within it. It was 30 s, six deadlines: the other three
    # checked nothing more and cost the suite 15 s.
    worker = faulty.start_worker(name="outage", extra_env={FAULT_HOLD_AT_STEP: "20"})
    try:
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=40, save_steps=20)).json()
        wait_until(lambda: tenant.get(f"/jobs/{job['id']}").json()["progress"]["step"] > 0, 120, "training")
        faults_redis.stop()
        try:
            time.sleep(REDIS_OUTAGE_S)
            assert tenant.get(f"/jobs/{job['id']}").json()["status"] == "running"
        finally:
            faults_redis.start()
        release(faulty, job["id"])
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done["error"]
        assert [e["type"] for e in events(tenant, job["id"])].count("claimed") == 1
        assert curve_steps(tenant, job["id"]) == list(range(1, 41))
        # The worker reconnected: it takes the next job.
        after = tenant.post("/jobs", json=job_body(dataset_id, max_steps=10)).json()
        assert wait_for_status(tenant, after["id"], FINISHED, timeout=120, deployment=faulty)["status"] == "succeeded"
        fault_report.append({"fault": f"Redis stopped for {REDIS_OUTAGE_S} s mid-job", "injected": 1, "survived": 1,
                             "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_cancelled_jobs_never_run_again_after_a_worker_restart(faulty, tenant, dataset_id, fault_report):
    gpu_class = lane(faulty, "restart")
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


def test_a_cancel_as_the_worker_stores_the_adapter_ends_succeeded_saying_why(faulty, tenant, dataset_id, fault_report):
    """A cancel that comes once the run is past training (its worker storing the adapter) cannot stop it: the job
    ends succeeded, its adapter kept, and its succeeded event says why. After the cancel_requested event ("the
    training process stops after its current step") it ended in a bare "job succeeded", as if the cancel were lost."""
    gpu_class = lane(faulty, "cancel-late")
    # Held once attempt 1 has ended and its adapter is stored, before the end is recorded (FAULT_HOLD_END).
    worker = faulty.start_worker(gpu_class=gpu_class, name="cancel-late", extra_env={FAULT_HOLD_END: "1"})
    try:
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=4, save_steps=2, gpu_class=gpu_class)).json()
        held, release_end = fault_hold_end_markers(faulty.settings, job["id"])
        wait_until(held.exists, 240, "attempt 1's end, held before it is recorded")
        assert tenant.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
        release_end.touch()
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=120, deployment=faulty)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done["error"]
        assert [a["kind"] for a in tenant.get(f"/jobs/{job['id']}/artifacts").json()] == ["adapter"]
        assert curve_steps(tenant, job["id"]) == [1, 2, 3, 4]
        story = events(tenant, job["id"])
        assert [e["type"] for e in story][-2:] == ["cancel_requested", "succeeded"]
        assert story[-1]["message"] == ("job succeeded (it was past training when it was asked to cancel, so it "
                                        "finished; what it made is kept)")
        fault_report.append({"fault": "a cancel as the worker stores the adapter", "injected": 1, "survived": 1,
                             "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_an_upload_in_progress_is_not_taken_for_a_dead_one(faulty):
    # Every API process removes the writes left open by dead processes (QLORA_STALE_UPLOAD_S) on each
    # reaper pass: one opened a moment ago must survive it, or a live upload fails mid-write.
    storage = storage_from_settings(faulty.settings)
    with storage.writer(make_key("faults", "probe")) as writer:
        writer.write(b"x" * PART_SIZE)  # the first part is out: a multipart upload is open in the store
        assert storage.abort_stale_writes(older_than_s=60) == 0
        writer.write(b"y")
        stored = writer.commit()
    assert storage.size(stored.key) == PART_SIZE + 1
    storage.delete(stored.key)


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

    # A new API process clears writes that died half-way (older than QLORA_STALE_UPLOAD_S=3) once it
    # holds the reaper lease. The deployment's own API holds it: freeze that one until its lease
    # expires and the new process takes the role over, as when a holder hangs.
    restarted = faulty.spawn("serve", "--no-worker", log_name="api-3",
                             extra_env={"QLORA_PORT": str(services.free_port()),
                                        "QLORA_STALE_UPLOAD_S": str(STALE_UPLOAD_S)})
    deployment_api = faulty.procs[0]  # started first, by start_deployment
    try:
        os.killpg(deployment_api.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: _reaper_holder_pid(faulty) == restarted.pid, 60, "the new API to take the reaper lease")
        finally:
            os.killpg(deployment_api.pid, signal.SIGCONT)
        wait_until(lambda: not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads"), 60,
                   "the dead upload to be aborted")
        with session_scope(faulty.settings.database_url) as session:
            assert session.scalar(select(func.count()).select_from(Dataset)) == rows_before
        assert {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])} == keys_before
        fault_report.append({"fault": "API SIGKILLed during a 200 MiB upload", "injected": 1, "survived": 1,
                             "steps_lost": 0})
    finally:
        faulty.stop(restarted)


def _reaper_holder_pid(d) -> int | None:
    with session_scope(d.settings.database_url) as session:
        holder = current_holder(session, LEASE)
    return int(holder.rsplit(":", 2)[1]) if holder else None  # host:pid:random


def _answers(client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except Exception:
        return False


def test_a_message_taken_by_a_failed_claim_is_sent_again(faulty, tenant, dataset_id, fault_report):
    gpu_class = lane(faulty, "blip")
    # A worker whose database is unreachable takes the job's message; its claim fails, and Celery
    # acknowledges the message all the same: the job is queued, marked sent, and no message is left.
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{services.free_port()}/gone"
    blip = faulty.start_worker(gpu_class=gpu_class, name="blip", extra_env={"QLORA_DATABASE_URL": unreachable})
    try:
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=5, gpu_class=gpu_class)).json()
        wait_until(lambda: "OperationalError" in faulty.log("worker-blip"), 60, "the claim to fail")
    finally:
        faulty.stop(blip)
    assert tenant.get(f"/jobs/{job['id']}").json()["status"] == "queued"

    # The scheduler sends it again QLORA_REDISPATCH_AFTER_S after it was sent; a healthy worker claims it.
    healthy = faulty.start_worker(gpu_class=gpu_class, name="after-blip")
    try:
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=120, deployment=faulty)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done["error"]
        assert [e["type"] for e in events(tenant, job["id"])].count("claimed") == 1
        fault_report.append({"fault": "a worker's claim failed (database unreachable)", "injected": 1,
                             "survived": 1, "steps_lost": 0})
    finally:
        faulty.stop(healthy)
