"""Storage refusing the upload of the quantized base a run made for the cache, once the run has finished: the
cache is only a shortcut for later jobs, so the job ends as it trained, with its adapter and merged model, on its
first attempt. The upload came after the run's result was made and before it was written: the training
process exited saying storage was out of reach, with no result, and the whole run (its evaluation, merge and
eval report) was thrown away and done again by another attempt; a refusal that lasted lost every attempt."""

from __future__ import annotations

from sqlalchemy import select

from app.db import session_scope
from app.jobs.tables import QuantizedBase
from tests.deployment import upload, wait_for_status
from tests.faults.throttle import ThrottlingProxy
from worker.training.tiny import demo_spec


def test_a_cache_upload_storage_refuses_costs_the_finished_run_nothing(deployment_of_its_own, demo_data):
    d = deployment_of_its_own
    team = d.client(d.team_key("cache-outage"))
    dataset_id = upload(team, demo_data["train"]).json()["id"]
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=2, save_steps=2, logging_steps=1, eval_steps=10_000)
    spec["eval"] = {"prompts": 0}
    proxy = ThrottlingProxy(d.settings.s3_endpoint_url)
    # A multipart upload's parts go up by PUT, as a small object does: each of boto's 3 tries of the first
    # request refused, for every attempt this job could have.
    proxy.refuse("PUT", "/quantized-bases/", times=3 * d.settings.max_attempts)
    worker = d.start_worker(name="cache-outage", extra_env={"QLORA_S3_ENDPOINT_URL": proxy.url})
    try:
        job_id = team.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()["id"]
        done = wait_for_status(team, job_id, ("succeeded", "failed", "cancelled", "paused"), deployment=d)
        assert done["status"] == "succeeded" and done["attempt"] == 1, (done["status"], done["attempt"], done["error"])
        assert proxy.refused == 3  # the one share this run tried, and nothing else of the job's
        assert {a["kind"] for a in team.get(f"/jobs/{job_id}/artifacts").json()} == {"adapter", "merged"}
        events = team.get(f"/jobs/{job_id}/events").json()
        assert not [e for e in events if e["type"] == "requeued"], events
        (warning,) = [e for e in events if e["type"] == "quantized_base_not_cached"]
        assert warning["level"] == "warning" and "ServiceUnavailable" in warning["message"], warning
        with session_scope(d.settings.database_url) as session:
            assert list(session.scalars(select(QuantizedBase))) == []  # nothing recorded that was not stored
    finally:
        d.stop(worker)
        proxy.close()
