"""Pause a running job (a checkpoint, then paused, the GPU freed) and resume it to the same end."""

from __future__ import annotations

from tests.deployment import upload, wait_for_status, wait_until
from tests.service.test_cancel import training_processes_for
from worker.training.tiny import demo_spec


def test_pause_then_resume_finishes_with_the_same_step_count(deployment, worker, team_a, demo_data):
    dataset_id = upload(team_a, demo_data["train"]).json()["id"]
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=120, save_steps=100, logging_steps=1, per_device_batch_size=8)
    spec["output"] = {"merge": False}
    job = team_a.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()
    wait_until(lambda: team_a.get(f"/jobs/{job['id']}").json()["progress"]["step"] >= 5, 300,
               lambda: f"the job past step 5\n{deployment.log('worker-shared')}")

    assert team_a.post(f"/jobs/{job['id']}/pause").json()["status"] == "pausing"
    paused = wait_for_status(team_a, job["id"], ("paused", "succeeded", "failed"), timeout=60, deployment=deployment)
    assert paused["status"] == "paused" and paused["finished_at"] is None
    assert not training_processes_for(job["id"])  # the GPU is free
    pause_step = paused["progress"]["step"]
    checkpoints = [c["step"] for c in team_a.get(f"/jobs/{job['id']}/checkpoints").json()]
    assert checkpoints == [pause_step] and 5 <= pause_step < 100  # saved at the pause, not at save_steps
    assert team_a.post(f"/jobs/{job['id']}/pause").json()["status"] == "paused"  # already paused: no change
    assert team_a.post(f"/jobs/{job['id']}/resume").json()["status"] == "queued"

    done = wait_for_status(team_a, job["id"], ("succeeded", "failed", "cancelled"), deployment=deployment)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
    assert done["progress"]["step"] == 120
    curve = [p["step"] for p in team_a.get(f"/jobs/{job['id']}/metrics").json()["train"]]
    assert curve == list(range(1, 121))
    events = team_a.get(f"/jobs/{job['id']}/events").json()
    types = [e["type"] for e in events]
    for expected in ("pause_requested", "paused", "resume_requested", "resumed", "succeeded"):
        assert expected in types, types
    assert types.count("paused") == 1
    resumed = next(e for e in events if e["type"] == "resumed")
    assert resumed["level"] == "info"  # the plan after a pause; a lost attempt's resume is a warning (tests/faults)
    assert team_a.post(f"/jobs/{job['id']}/resume").status_code == 409  # succeeded: nothing to resume
