"""The pre-quantized base cache when storage fails around it: the cache is a shortcut for later jobs, so
neither the job that fills it nor the good entry itself pays for an outage.

- Storage refusing the upload of the base a run made, once the run has finished: the job ends as it trained, on
  its first attempt. The upload came after the run's result was made and before it was written: the training
  process exited saying storage was out of reach, with no result, and the whole run (its evaluation, merge and
  eval report) was thrown away and done again by another attempt; a refusal that lasted lost every attempt.
- Storage out of reach as a job downloads a good entry: the job quantizes afresh, and the entry stays. It was
  taken for a damaged one and deleted, row and object, for every later job of every team.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.jobs import repository
from app.jobs.tables import QuantizedBase
from app.storage.base import storage_from_settings
from tests.deployment import start_deployment, stop_deployment, upload, wait_for_status
from tests.faults.throttle import ThrottlingProxy
from worker.training.tiny import demo_spec


@pytest.fixture(scope="module")
def outage_deployment(backing_services, tmp_path_factory, tiny_model_dir):
    """One deployment for this file's two tests (an API process and its first preflight cost ~15 s of a loaded
    machine each), each test with a worker of its own behind a proxy of its own. Each test starts on an empty
    cache and leaves it so: the first stores nothing, the second drops the entry it made."""
    d = start_deployment(tmp_path_factory.mktemp("cache-outages"), backing_services, tiny_model_dir,
                         out_of_reach_wait_s="5")
    yield d
    stop_deployment(d)


def test_a_cache_upload_storage_refuses_costs_the_finished_run_nothing(outage_deployment, demo_data):
    d = outage_deployment
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


def run_job(team, deployment, dataset_id: str) -> dict:
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=2, save_steps=2, logging_steps=1, eval_steps=10_000)
    spec["output"] = {"merge": False}
    spec["eval"] = {"prompts": 0}
    job_id = team.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()["id"]
    done = wait_for_status(team, job_id, ("succeeded", "failed", "cancelled", "paused"), deployment=deployment)
    assert done["status"] == "succeeded" and done["attempt"] == 1, (done["status"], done["attempt"], done["error"])
    loaded = [e["message"] for e in team.get(f"/jobs/{job_id}/events").json() if e["type"] == "base_loaded"]
    assert len(loaded) <= 1, loaded
    return {"job": done, "loaded": loaded[0] if loaded else None}  # None: the run used no cache


def cache_rows(deployment) -> list[tuple[str, str]]:
    with session_scope(deployment.settings.database_url) as session:
        return [(row.key, row.storage_key) for row in session.scalars(select(QuantizedBase))]


def test_storage_out_of_reach_as_a_cached_base_downloads_keeps_the_entry(outage_deployment, demo_data):
    d = outage_deployment
    team = d.client(d.team_key("cache-download-outage"))
    dataset_id = upload(team, demo_data["train"]).json()["id"]
    proxy = ThrottlingProxy(d.settings.s3_endpoint_url)
    worker = d.start_worker(name="cache-download-outage", extra_env={"QLORA_S3_ENDPOINT_URL": proxy.url})
    try:
        assert run_job(team, d, dataset_id)["loaded"] == "quantized the base model; saved for the cache"
        (entry,) = cache_rows(d)

        proxy.refuse("GET", "/quantized-bases/", times=3)  # boto's 3 tries of the download
        # Quantized afresh, and not stored again: the worker would only delete the copy, the entry being there.
        assert run_job(team, d, dataset_id)["loaded"] is None
        assert proxy.refused == 3
        assert cache_rows(d) == [entry]  # the same entry, still pointing at the same object
        assert storage_from_settings(d.settings).exists(entry[1])
        with session_scope(d.settings.database_url) as session:  # an empty cache again, for the other test
            assert repository.drop_quantized_base(session, *entry)
        storage_from_settings(d.settings).delete(entry[1])
    finally:
        d.stop(worker)
        proxy.close()
