"""Cancel a queued job (it never starts, even once a worker arrives) and a running one (it stops)."""

from __future__ import annotations

import subprocess
import time

from tests.deployment import lane, upload, wait_for_status, wait_until
from worker.training.tiny import demo_spec


def body(dataset_id: str, gpu_class: str, max_steps: int) -> dict:
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=max_steps, save_steps=10_000, eval_steps=10_000, logging_steps=1)
    spec["output"] = {"merge": False}
    return {"dataset_id": dataset_id, "gpu_class": gpu_class, **spec}


def training_processes_for(job_id: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"worker.runner .*{job_id}"], capture_output=True, text=True)
    return found.stdout.split()


def test_cancelled_queued_job_never_starts_and_a_running_one_stops(deployment, team_a, demo_data):
    dataset_id = upload(team_a, demo_data["train"]).json()["id"]
    gpu_class = lane("cancel-test")
    queued = team_a.post("/jobs", json=body(dataset_id, gpu_class, 20)).json()
    cancelled = team_a.post(f"/jobs/{queued['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]

    # Only now does a worker for that queue appear; it receives the cancelled job's message first.
    worker = deployment.start_worker(gpu_class=gpu_class, name="cancel")
    try:
        running = team_a.post("/jobs", json=body(dataset_id, gpu_class, 100_000)).json()
        wait_for_status(team_a, running["id"], ("running",), deployment=deployment)
        wait_until(lambda: team_a.get(f"/jobs/{running['id']}").json()["progress"]["step"] >= 2, 300,
                   lambda: f"the running job past step 2 (really training, not just claimed)\n{deployment.log('worker-cancel')}")
        assert training_processes_for(running["id"])

        # The first job's message was consumed before the second's (one queue, one at a time): it did nothing.
        first = team_a.get(f"/jobs/{queued['id']}").json()
        assert first["status"] == "cancelled" and first["attempt"] == 0 and first["started_at"] is None
        assert [e["type"] for e in team_a.get(f"/jobs/{queued['id']}/events").json()] == [
            "created", "preflight", "cancelled"]

        asked = time.monotonic()
        assert team_a.post(f"/jobs/{running['id']}/cancel").json()["status"] == "cancelling"
        done = wait_for_status(team_a, running["id"], ("cancelled", "failed", "succeeded"), timeout=60,
                               deployment=deployment)
        assert done["status"] == "cancelled", done
        stopped_after = time.monotonic() - asked
        assert not training_processes_for(running["id"])  # the process exited; the device is free
        assert done["progress"]["step"] < 100_000
        events = team_a.get(f"/jobs/{running['id']}/events").json()
        types = [e["type"] for e in events]
        assert types[-1] == "cancelled" and "cancel_requested" in types
        assert types.count("cancelled") == 1  # the run's own, with its step; not a second from the worker's end
        assert events[-1]["message"].startswith("cancelled at step ") and events[-1]["step"] is not None
        assert team_a.get(f"/jobs/{running['id']}/artifacts").json() == []
        print(f"cancel took {stopped_after:.1f}s")

        # The worker is still alive and takes the next job.
        assert worker.poll() is None
    finally:
        deployment.stop(worker)
