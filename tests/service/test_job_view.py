"""What a job's own view says before and around training: its planned steps while it waits, and what it waits for."""

from __future__ import annotations

from app.db import session_scope, utcnow
from app.jobs import runs, states
from app.operations import workers
from app.scheduling import service as scheduling
from tests.deployment import lane, upload
from worker.training.protocol import Progress, phase_event
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


def test_a_running_job_says_which_phase_it_is_in_until_it_ends(deployment, demo_data):
    """A job sat at "step 160/160" (99% in a progress bar) through its final evaluation, the adapter's save, the merge,
    the eval report and the uploads, and nothing told whether it was done. The worker's phase events (the recipe's and
    the supervisor's, through runs.report and runs.heartbeat as a worker sends them) set the job's `phase`, which its
    answers show while a worker holds it, and which goes once it ends."""
    with deployment.client(deployment.team_key("job-phases")) as client:
        dataset_id = upload(client, demo_data["validation"]).json()["id"]
        job_id = client.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                            **demo_spec("tiny")}).json()["id"]
        assert client.get(f"/jobs/{job_id}").json()["phase"] is None  # queued: no worker has it
        database_url = deployment.settings.database_url
        with session_scope(database_url) as session:  # as the worker of its class claims it
            claimed = runs.claim(session, job_id, "hand:gpu0")
            assert claimed is not None
        assert client.get(f"/jobs/{job_id}").json()["phase"] == "preparing"  # downloading, loading the base
        with session_scope(database_url) as session:  # the training process's records, as the worker relays them
            runs.report(session, job_id, claimed.attempt, [phase_event("training", "training from step 0", step=0)],
                        Progress(step=0, total_steps=160, tokens_seen=0))
        assert client.get(f"/jobs/{job_id}").json()["phase"] == "training"
        with session_scope(database_url) as session:
            runs.report(session, job_id, claimed.attempt, [phase_event("saving", "saving the adapter", step=160),
                                                           phase_event("merging", "merging", step=160)],
                        Progress(step=160, total_steps=160, tokens_seen=10_000))
        job = client.get(f"/jobs/{job_id}").json()
        assert (job["status"], job["progress"]["fraction"], job["phase"]) == ("running", 1.0, "merging")
        assert client.get("/jobs").json()["data"][0]["phase"] == "merging"
        with session_scope(database_url) as session:  # the worker's own, with a heartbeat, as it uploads
            runs.heartbeat(session, job_id, claimed.attempt, [phase_event("uploading", "uploading the adapter")])
        assert client.get(f"/jobs/{job_id}").json()["phase"] == "uploading"
        events = client.get(f"/jobs/{job_id}/events").json()
        assert [e["data"]["phase"] for e in events if e["type"] == "phase"] == ["training", "saving", "merging", "uploading"]
        with session_scope(database_url) as session:
            assert runs.finish(session, job_id, claimed.attempt, states.SUCCEEDED, summary={})
        done = client.get(f"/jobs/{job_id}").json()
        assert done["status"] == "succeeded" and done["phase"] is None, done


def test_a_job_queued_for_a_worker_without_a_gpu_does_not_say_it_waits_for_a_gpu(deployment, demo_data):
    """On a laptop with no GPU (the embedded default) a queued job said it was "waiting for a free GPU of its class":
    the machine has none, and its worker trains on the CPU. Each worker says in its beat what it trains on
    (workers.training_device), and the job's wait is worded for that."""
    queue = deployment.settings.queue_for(lane("cpu-only"))
    database_url, started = deployment.settings.database_url, utcnow()
    with session_scope(database_url) as session:  # what the CPU worker of the class writes every WORKER_BEAT_S
        workers.beat(session, "laptop:cpu", queue, started, device="cpu")
    try:
        with deployment.client(deployment.team_key("cpu-wait")) as client:
            dataset_id = upload(client, demo_data["validation"]).json()["id"]
            created = client.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("cpu-only"), **demo_spec("tiny")})
            job = client.get(f"/jobs/{created.json()['id']}").json()
            assert job["waiting_for"] == "cpu", job
            assert "(laptop:cpu) has no GPU and trains on the CPU, one job at a time" in job["waiting_detail"], job
            with session_scope(database_url) as session:  # the same class served from a GPU machine: a GPU it waits for
                workers.beat(session, "laptop:cpu", queue, started, device="cuda")
                assert {(s.waiting_for, s.detail) for s in scheduling.standings(session, deployment.settings, queue).values()} \
                    == {("gpu", None)}
            client.post(f"/jobs/{job['id']}/cancel")
    finally:
        with session_scope(database_url) as session:
            workers.forget(session, "laptop:cpu", started)
