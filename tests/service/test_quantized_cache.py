"""The pre-quantized base cache: the first job on a model stores its 4-bit weights, later jobs load
them (checked by sha256), and a damaged entry is replaced, never trusted."""

from __future__ import annotations

import boto3
from sqlalchemy import select

from app.db import session_scope
from app.jobs.tables import QuantizedBase
from tests.deployment import BUCKET, upload, wait_for_status
from worker.training.tiny import demo_spec


def run_job(client, deployment, dataset_id: str) -> dict:
    spec = demo_spec("tiny-cached")
    spec["training"].update(max_steps=10, logging_steps=5, save_steps=10)
    spec["eval"] = {"prompts": 0}  # no eval report: what is checked is how training loaded its base
    job = client.post("/jobs", json={"dataset_id": dataset_id, **spec}).json()
    done = wait_for_status(client, job["id"], ("succeeded", "failed", "cancelled"), deployment=deployment)
    assert done["status"] == "succeeded", done["error"]
    loaded = [e for e in client.get(f"/jobs/{job['id']}/events").json() if e["type"] == "base_loaded"]
    return {"job": done, "loaded": loaded[0]["message"]}


def cache_rows(deployment) -> list[QuantizedBase]:
    with session_scope(deployment.settings.database_url) as session:
        return list(session.scalars(select(QuantizedBase)))


def test_first_job_fills_the_cache_and_later_jobs_load_from_it(deployment, worker, team_a, demo_data, tiny_model_dir):
    deployment.register_model("tiny-cached", tiny_model_dir)
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    before = {row.key for row in cache_rows(deployment)}

    first = run_job(team_a, deployment, dataset_id)
    assert first["loaded"] == "quantized the base model; saved for the cache"
    assert first["job"]["summary"]["quantized_base"] == "quantized"
    new = [row for row in cache_rows(deployment) if row.key not in before]
    assert len(new) == 1 and new[0].identity["model"] == "tiny-cached" and new[0].bytes > 0

    second = run_job(team_a, deployment, dataset_id)
    assert second["loaded"] == "loaded the pre-quantized base from the cache"
    assert second["job"]["summary"]["quantized_base"] == "cache"
    # Same weights, same data, same seed: the same training, to the bit.
    curves = [team_a.get(f"/jobs/{r['job']['id']}/metrics").json()["train"] for r in (first, second)]
    assert [p["train_loss"] for p in curves[0]] == [p["train_loss"] for p in curves[1]]

    # Damage the stored entry: the next job notices the checksum, quantizes afresh and re-caches.
    s3 = boto3.client("s3", endpoint_url=deployment.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = deployment.settings.storage_url.split("/", 3)[3]
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{new[0].storage_key}", Body=b"not a tar")
    third = run_job(team_a, deployment, dataset_id)
    assert third["loaded"] == "quantized the base model; saved for the cache"
    replaced = [row for row in cache_rows(deployment) if row.key == new[0].key]
    assert len(replaced) == 1 and replaced[0].storage_key != new[0].storage_key
