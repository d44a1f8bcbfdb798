"""What a job's own view says before and around training: its planned steps while it waits, and what it waits for."""

from __future__ import annotations

from tests.deployment import lane, upload
from worker.training.tiny import demo_spec


def test_a_queued_job_shows_the_steps_its_preflight_planned(team_a, demo_data):
    """A queued (or loading) job showed "step 0/?" in `jobs show`, `jobs watch` and the dashboard, though the preflight
    at its creation had counted its steps: the job's own answer carries that count from the start, marked planned."""
    dataset = upload(team_a, demo_data["train"]).json()["id"]
    spec = demo_spec("tiny")
    created = team_a.post("/jobs", json={"dataset_id": dataset, "gpu_class": lane("nobody-listens"), **spec})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    try:
        preflight = next(e for e in team_a.get(f"/jobs/{job_id}/events").json() if e["type"] == "preflight")
        planned = preflight["data"]["steps"]
        assert planned == 160  # 480 rows, the demo spec's batch and epochs
        for answer in (created.json(), team_a.get(f"/jobs/{job_id}").json(), team_a.get("/jobs").json()["data"][0]):
            assert answer["id"] == job_id
            assert answer["total_steps"] == planned
            assert answer["progress"] == {"step": 0, "total_steps": planned, "fraction": 0.0, "planned": True}
    finally:
        team_a.post(f"/jobs/{job_id}/cancel")
