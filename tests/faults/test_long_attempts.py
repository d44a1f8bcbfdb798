"""Attempts longer than a heartbeat deadline, as real model sizes make them: a merged model takes
minutes to upload, a quantized 70B base minutes to download. The worker's S3 traffic goes through a
throttling proxy (tests/faults/throttle.py) that stretches one kind of transfer to three heartbeat
deadlines; the job must still succeed on its first attempt. And the time limit, when it is hit, ends
the job as failed, saying so, instead of passing for a lost worker.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.jobs.tables import QuantizedBase
from tests.deployment import wait_for_status, wait_until
from tests.faults.conftest import HEARTBEAT_DEADLINE_S, events, job_body, lane, trainer_pids
from tests.faults.throttle import ThrottlingProxy
from worker.runner import FAULT_HOLD_AT_STEP

FINISHED = ("succeeded", "failed", "cancelled")
STRETCH_S = 3 * HEARTBEAT_DEADLINE_S
PROGRESS_EVERY_S = 2  # QLORA_TRANSFER_EVENT_INTERVAL_S of the slow lane's worker


@pytest.fixture(scope="module")
def slow_lane(faulty):
    """A worker (on a GPU class of its own) whose S3 traffic, and its training process's, goes through
    the throttling proxy."""
    proxy = ThrottlingProxy(faulty.settings.s3_endpoint_url)
    gpu_class = lane(faulty, "slow")
    worker = faulty.start_worker(gpu_class=gpu_class, name="slow", extra_env={
        "QLORA_S3_ENDPOINT_URL": proxy.url, "QLORA_TRANSFER_EVENT_INTERVAL_S": str(PROGRESS_EVERY_S)})
    yield SimpleNamespace(proxy=proxy, gpu_class=gpu_class)
    faulty.stop(worker)
    proxy.close()


def run_slow(tenant, faulty, dataset_id, gpu_class) -> tuple[dict, list[dict]]:
    job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=10, gpu_class=gpu_class)).json()
    done = wait_for_status(tenant, job["id"], FINISHED, timeout=240, deployment=faulty)
    return done, events(tenant, job["id"])


def assert_one_untroubled_attempt(done: dict, story: list[dict]) -> None:
    assert done["status"] == "succeeded" and done["attempt"] == 1, done["error"]
    types = [e["type"] for e in story]
    assert types.count("claimed") == 1 and "requeued" not in types and "resumed" not in types


def run_stretched(tenant, faulty, dataset_id, slow_lane, method: str, path_part: str):
    """A job on the slow lane while every `method` to a storage path holding `path_part` lasts
    STRETCH_S: it succeeds on its first attempt. Returns the job, the stretched transfer and the
    messages of the job's transfer events."""
    slow_lane.proxy.stretch(method, path_part, STRETCH_S)
    try:
        done, story = run_slow(tenant, faulty, dataset_id, slow_lane.gpu_class)
    finally:
        slow_lane.proxy.clear()
    assert_one_untroubled_attempt(done, story)
    [transfer] = slow_lane.proxy.stretched_matching(path_part)
    assert transfer.seconds >= STRETCH_S
    return done, transfer, [e["message"] for e in story if e["type"] == "transfer"]


def test_an_artifact_upload_three_heartbeat_deadlines_long(faulty, tenant, dataset_id, slow_lane, fault_report):
    done, upload, messages = run_stretched(tenant, faulty, dataset_id, slow_lane, "PUT", "/artifacts/")
    # The artifact was kept: listed, and what a download gives is what was uploaded.
    [adapter] = tenant.get(f"/jobs/{done['id']}/artifacts").json()
    assert adapter["kind"] == "adapter" and adapter["bytes"] == upload.bytes
    downloaded = tenant.get(adapter["download_url"], follow_redirects=True)
    assert downloaded.status_code == 200 and hashlib.sha256(downloaded.content).hexdigest() == adapter["sha256"]
    # Progress while it lasted, then the end of it.
    assert messages and all(m.startswith(("uploading adapter, ", "uploaded adapter, ")) for m in messages)
    assert messages[-1].startswith("uploaded adapter, ")
    fault_report.append({"fault": "artifact upload lasting 3x the heartbeat deadline", "injected": 1, "survived": 1,
                         "steps_lost": 0, "seconds": round(upload.seconds, 1)})


def test_a_base_download_three_heartbeat_deadlines_long(faulty, tenant, dataset_id, slow_lane, fault_report):
    queue = faulty.settings.queue_for(slow_lane.gpu_class)

    def cached() -> bool:
        with session_scope(faulty.settings.database_url) as session:
            return any(row.identity["gpu_class"] == queue for row in session.scalars(select(QuantizedBase)))

    if not cached():  # the first job on this lane quantizes the base and stores it for the next
        assert_one_untroubled_attempt(*run_slow(tenant, faulty, dataset_id, slow_lane.gpu_class))
        assert cached()
    done, download, messages = run_stretched(tenant, faulty, dataset_id, slow_lane, "GET", "/quantized-bases/")
    assert done["summary"]["quantized_base"] == "cache"  # trained on the base it downloaded so slowly
    assert messages and messages[0].startswith("downloading quantized base, ")
    assert messages[-1].startswith("downloaded quantized base, ")
    fault_report.append({"fault": "quantized base download lasting 3x the heartbeat deadline", "injected": 1,
                         "survived": 1, "steps_lost": 0, "seconds": round(download.seconds, 1)})


def stopped_while_downloading(tenant, faulty, dataset_id, slow_lane, action: str, asked: str) -> tuple[dict, list[dict]]:
    """A job on the slow lane asked to `action` (cancel, pause; the job then `asked`) while its training data
    downloads: the job once it stopped, and its events."""
    slow_lane.proxy.stretch("GET", "/datasets/", STRETCH_S)
    try:
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=10, gpu_class=slow_lane.gpu_class)).json()
        wait_until(lambda: any(e["type"] == "transfer" for e in events(tenant, job["id"])), 60,
                   "the training data's download to be under way")
        assert tenant.post(f"/jobs/{job['id']}/{action}").json()["status"] == asked
        stopped = wait_for_status(tenant, job["id"], ("paused", *FINISHED), timeout=STRETCH_S + 60, deployment=faulty)
    finally:
        slow_lane.proxy.clear()
    story = events(tenant, job["id"])
    assert "started" not in [e["type"] for e in story]  # no training process ran
    return stopped, story


def test_a_cancel_while_the_data_downloads_ends_the_attempt_there(faulty, tenant, dataset_id, slow_lane, fault_report):
    """A cancel used to be passed on only to the training process: it waited for every download (a base
    model's take minutes), the load and a first step, all on the GPU the job held."""
    done, story = stopped_while_downloading(tenant, faulty, dataset_id, slow_lane, "cancel", "cancelling")
    assert done["status"] == "cancelled" and done["error"] is None
    assert story[-1]["type"] == "cancelled"
    assert story[-1]["message"].startswith("cancelled before training started, while downloading training data")
    fault_report.append({"fault": "a cancel while the attempt downloads its data", "injected": 1, "survived": 1,
                         "steps_lost": 0})


def test_a_pause_while_the_data_downloads_ends_the_attempt_there_and_resumes(faulty, tenant, dataset_id, slow_lane,
                                                                             fault_report):
    paused, story = stopped_while_downloading(tenant, faulty, dataset_id, slow_lane, "pause", "pausing")
    assert paused["status"] == "paused" and story[-1]["type"] == "paused"
    assert story[-1]["message"].startswith("paused before training started, while downloading training data")
    assert tenant.post(f"/jobs/{paused['id']}/resume").json()["status"] == "queued"
    done = wait_for_status(tenant, paused["id"], FINISHED, timeout=240, deployment=faulty)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
    fault_report.append({"fault": "a pause while the attempt downloads its data", "injected": 1, "survived": 1,
                         "steps_lost": 0})


def test_the_time_limit_fails_the_job_saying_so(faulty, tenant, dataset_id, fault_report):
    limit_s = 30  # past the tiny model's load and two steps on a busy machine; the wait costs the suite this long
    gpu_class = lane(faulty, "limited")
    # The training process waits after step 2 (costing no CPU) until the limit stops it.
    worker = faulty.start_worker(gpu_class=gpu_class, name="limited", extra_env={
        "QLORA_JOB_TIME_LIMIT_S": str(limit_s), FAULT_HOLD_AT_STEP: "2"})
    try:
        job = tenant.post("/jobs", json=job_body(dataset_id, max_steps=20, gpu_class=gpu_class)).json()
        done = wait_for_status(tenant, job["id"], FINISHED, timeout=limit_s + 90, deployment=faulty)
        assert done["status"] == "failed" and done["attempt"] == 1
        assert "hit its time limit" in done["error"] and f"QLORA_JOB_TIME_LIMIT_S={limit_s}" in done["error"]
        assert "at step 2 of 20" in done["error"]
        types = [e["type"] for e in events(tenant, job["id"])]
        assert types.count("claimed") == 1 and "requeued" not in types  # not taken for a lost worker
        wait_until(lambda: not trainer_pids(job["id"]), 30, "the training process to be stopped")
        fault_report.append({"fault": "a job past QLORA_JOB_TIME_LIMIT_S", "injected": 1, "survived": 1,
                             "steps_lost": 0})
    finally:
        faulty.stop(worker)


def test_storage_out_of_reach_as_an_attempt_starts_is_another_attempt(tenant, faulty, dataset_id, slow_lane,
                                                                      fault_report):
    """S3 answering 503 past boto's own retries while a worker fetched a job's data failed the job at once
    ("the worker failed: ClientError"): an outage of a minute emptied the queue into failed jobs. Now the
    attempt is lost, not the job: it is queued again and the next attempt trains."""
    slow_lane.proxy.refuse("GET", "/datasets/", times=3)  # boto's standard mode: 3 tries of each request
    try:
        done, story = run_slow(tenant, faulty, dataset_id, slow_lane.gpu_class)
    finally:
        slow_lane.proxy.clear()
    assert slow_lane.proxy.refused == 3
    assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
    (requeued,) = [e for e in story if e["type"] == "requeued"]
    assert "storage or the database was out of reach" in requeued["message"]
    assert "ServiceUnavailable" in requeued["message"], requeued["message"]
    fault_report.append({"fault": "S3 answering 503 as an attempt fetches its data", "injected": 1,
                         "survived": 1, "steps_lost": 0})
