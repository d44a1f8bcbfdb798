"""Storage out of reach as the training process uploads a checkpoint: the job is handed back after the
worker's wait (QLORA_OUT_OF_REACH_WAIT_S), as for the worker's own uploads, rather than at once: an outage
of a minute used to take a job's three attempts in a row and fail it, each with a traceback. The wait is
the service's: the team's GPU time for the attempt ends where it stopped, before the wait."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from app.db import session_scope
from app.jobs.tables import JobAttempt
from tests.deployment import upload, wait_for_status
from tests.faults.throttle import ThrottlingProxy
from worker.training.tiny import demo_spec


def test_a_checkpoint_upload_storage_refuses_is_another_attempt_after_a_wait(deployment_of_its_own, demo_data):
    d = deployment_of_its_own
    team = d.client(d.team_key("outage"))
    dataset_id = upload(team, demo_data["train"]).json()["id"]
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=4, save_steps=2, logging_steps=1, eval_steps=10_000)
    spec["output"] = {"merge": False}
    spec["eval"] = {"prompts": 0}
    proxy = ThrottlingProxy(d.settings.s3_endpoint_url)
    proxy.refuse("PUT", "/checkpoints/", times=3)  # boto's standard mode: 3 tries of the first checkpoint's upload
    worker = d.start_worker(name="outage", extra_env={"QLORA_S3_ENDPOINT_URL": proxy.url})
    try:
        job_id = team.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()["id"]
        done = wait_for_status(team, job_id, ("succeeded", "failed"), deployment=d)
        assert proxy.refused == 3
        assert done["status"] == "succeeded" and done["attempt"] == 2, done["error"]
        events = team.get(f"/jobs/{job_id}/events").json()
        (requeued,) = [e for e in events if e["type"] == "requeued"]
        message = requeued["message"]
        assert message.startswith("storage or the database was out of reach (TrainerOutOfReach: "), message
        assert "ServiceUnavailable" in message and "PutObject" in message, message
        assert "Traceback" not in message
        # Saved means stored: the refused upload announced no checkpoint, each stored one was announced.
        saved = [(e["attempt"], e["step"]) for e in events if e["type"] == "checkpoint_saved"]
        assert saved == [(2, 2), (2, 4)], saved
        stored = {c["step"] for c in team.get(f"/jobs/{job_id}/checkpoints").json()}
        assert stored >= {2, 4}, stored
        with session_scope(d.settings.database_url) as session:
            first = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.attempt == 1)).one()
        assert first.ended_at is not None and first.outcome == "queued"
        # The 5 s wait came between the attempt's stop and its requeue; it was billed to the team before.
        waited = datetime.fromisoformat(requeued["created_at"]) - first.ended_at
        assert waited.total_seconds() >= d.settings.out_of_reach_wait_s - 0.5, (first.ended_at, requeued["created_at"])
    finally:
        d.stop(worker)
        proxy.close()
