"""A worker whose disk fills while a job trains: the job is handed back, saying which disk and how full,
rather than failed, and trains to the end once there is room again (worker/runner.py's EXIT_NO_SPACE,
worker/supervisor.py). The disk fills for real: the worker runs under a file-size limit
(tests/full_disk.py) that refuses the checkpoint's adapter file, and the test lifts it as an operator
frees space."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.deployment import start_deployment, stop_deployment, upload, wait_for_status
from tests.full_disk import file_size_limit, fill_up, lift_file_size_limit
from worker.training.tiny import demo_spec

# Past every file a worker writes before its first checkpoint (the data, its records and logs), short of
# the checkpoint's adapter (about 1 MB for the tiny model).
LIMIT = 512 * 1024


def wait_until_ready(d, log_name: str) -> None:
    deadline = time.monotonic() + 120
    while " ready." not in d.log(log_name):
        assert time.monotonic() < deadline, d.log(log_name)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def full_disk_deployment(backing_services, tmp_path_factory, tiny_model_dir):
    """One deployment for this file's two tests (an API process, its first preflight, cost ~15 s of a loaded
    machine each), each test starting its own worker with the limit it needs; each test's job ends before it
    does. As deployment_of_its_own: a worker waits 5 s (QLORA_OUT_OF_REACH_WAIT_S) before it hands back a job
    it could not run for no fault of the job's."""
    d = start_deployment(tmp_path_factory.mktemp("full-disk"), backing_services, tiny_model_dir, out_of_reach_wait_s="5")
    yield d
    stop_deployment(d)


def training_processes_for(job_id: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", f"worker.runner .*{job_id}"], capture_output=True, text=True).stdout.split()


def test_a_job_whose_checkpoint_the_full_disk_refuses_is_handed_back_and_finishes_once_there_is_room(
        full_disk_deployment, demo_data):
    d = full_disk_deployment
    team = d.client(d.team_key("full-disk"))
    dataset_id = upload(team, demo_data["train"]).json()["id"]
    spec = demo_spec("tiny")
    # No quantized base to cache (its files are larger than the limit): the checkpoint is the first large write.
    spec["quantization"] = {"bits": "none"}
    spec["training"].update(max_steps=4, save_steps=2, logging_steps=1, eval_steps=10_000)
    spec["output"] = {"merge": False}
    spec["eval"] = {"prompts": 0}
    with file_size_limit(LIMIT):
        worker = d.start_worker(name="full-disk")  # it, and the training processes it starts, inherit the limit
    try:
        job_id = team.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()["id"]
        wait_for_status(team, job_id, ("running",), deployment=d)
        deadline = time.monotonic() + 300
        while not training_processes_for(job_id):  # the first attempt's training process starts...
            assert time.monotonic() < deadline, d.log("worker-full-disk")
            time.sleep(0.1)
        while training_processes_for(job_id):  # ...and stops at its first checkpoint, the disk full
            assert time.monotonic() < deadline, d.log("worker-full-disk")
            time.sleep(0.1)
        # The worker waits (QLORA_OUT_OF_REACH_WAIT_S) before it hands the job back; meanwhile, room again.
        lift_file_size_limit(worker.pid)

        done = wait_for_status(team, job_id, ("succeeded", "failed"), deployment=d)
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 2
        requeued = [e for e in team.get(f"/jobs/{job_id}/events").json() if e["type"] == "requeued"]
        assert len(requeued) == 1, requeued
        message = requeued[0]["message"]
        assert message.startswith("a disk was full (the training process stopped; on worker full-disk: "), message
        assert f"free for {d.settings.work_dir}" in message and "free space there" in message, message
        assert "requeued for try 2" in message
        assert [a["kind"] for a in team.get(f"/jobs/{job_id}/artifacts").json()] == ["adapter"]
    finally:
        d.stop(worker)


def test_a_work_directory_too_full_for_the_attempts_first_file_hands_the_job_back_at_once_paused_at_the_last(
        full_disk_deployment, demo_data):
    """The first file an attempt writes is the worker's note of the attempt it holds (for its SIGTERM
    handback): written before the attempt's error handling began, a full disk ended the task there, and the
    job stayed running and silent until the reaper's heartbeat deadline (2 minutes by default).
    With QLORA_MAX_ATTEMPTS=1 that one attempt is the last: the job is paused, not failed (a full disk is
    the operator's to free, not the job's fault), and its team resumes it once there is room."""
    d = full_disk_deployment
    team = d.client(d.team_key("full-disk"))
    dataset_id = upload(team, demo_data["train"]).json()["id"]
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=2, save_steps=10_000, eval_steps=10_000)
    spec["output"] = {"merge": False}
    spec["eval"] = {"prompts": 0}
    # A name (and so a log) of its own: the other test's worker, on the same deployment, said " ready." too.
    worker = d.start_worker(name="full-disk-last", extra_env={"QLORA_MAX_ATTEMPTS": "1"})
    try:
        wait_until_ready(d, "worker-full-disk-last")
        fill_up(worker.pid, 40)  # short of the worker's note of the attempt (60 bytes)
        job_id = team.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()["id"]
        # Well within the heartbeat deadline (the worker waits QLORA_OUT_OF_REACH_WAIT_S, 5 s here, first).
        paused = wait_for_status(team, job_id, ("paused", "failed"), deployment=d, timeout=60)
        assert paused["status"] == "paused" and paused["error"] is None, paused
        (event,) = [e for e in team.get(f"/jobs/{job_id}/events").json() if e["type"] == "paused"]
        assert event["message"].startswith("the job lost 1 attempts (last: a disk was full (OSError: [Errno 27] "
                                           "File too large"), event
        assert "paused rather than failed after QLORA_MAX_ATTEMPTS=1" in event["message"], event
        lift_file_size_limit(worker.pid)
        assert team.post(f"/jobs/{job_id}/resume").status_code == 200
        done = wait_for_status(team, job_id, ("succeeded", "failed"), deployment=d)
        assert (done["status"], done["attempt"]) == ("succeeded", 2), done
    finally:
        d.stop(worker)
