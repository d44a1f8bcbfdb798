"""The pre-quantized base cache: the first job on a model stores its 4-bit weights, later jobs load
them (checked by sha256), a damaged entry is replaced, never trusted, and the API's reaper prunes an entry
no job has loaded for QLORA_QUANTIZED_CACHE_KEEP_DAYS, row and object, after which a job quantizes afresh."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import boto3
import pytest
from botocore.exceptions import ClientError
from sqlalchemy import select, text, update

from app.db import session_scope, utcnow
from app.jobs import repository
from app.jobs.quantized_cache import prune
from app.jobs.tables import QuantizedBase
from app.storage.base import make_key, storage_from_settings
from tests.deployment import BUCKET, upload, wait_for_status
from worker.training.tiny import demo_spec


def run_job(client, deployment, dataset_id: str, model: str = "tiny-cached") -> dict:
    spec = demo_spec(model)
    spec["training"].update(max_steps=4, logging_steps=2, save_steps=4)
    # No merge and no eval report: what is checked is how training loaded its base (and its losses, two logged
    # steps). A merge (the base dequantized, the merged model saved, reloaded, its fidelity measured and uploaded)
    # cost each of this file's five jobs more than its training.
    spec["output"], spec["eval"] = {"merge": False}, {"prompts": 0}
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
    # Loading it is a use: the reaper keeps an entry QLORA_QUANTIZED_CACHE_KEEP_DAYS from its last one.
    (used,) = [row for row in cache_rows(deployment) if row.key == new[0].key]
    assert used.last_used_at > new[0].last_used_at and used.created_at == new[0].created_at
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


def stored(deployment, storage_key: str) -> bool:
    s3 = boto3.client("s3", endpoint_url=deployment.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = deployment.settings.storage_url.split("/", 3)[3]
    try:
        s3.head_object(Bucket=BUCKET, Key=f"{prefix}/{storage_key}")
        return True
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in ("404", "NoSuchKey"), exc.response
        return False


def set_last_use(deployment, key: str, ago: timedelta) -> None:
    with session_scope(deployment.settings.database_url) as session:
        session.execute(update(QuantizedBase).where(QuantizedBase.key == key).values(last_used_at=utcnow() - ago))


def test_the_reaper_prunes_an_entry_unused_for_keep_days_with_its_object_and_the_next_job_quantizes_afresh(
        deployment, worker, team_a, demo_data, tiny_model_dir):
    deployment.register_model("tiny-retired", tiny_model_dir)
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    before = {row.key for row in cache_rows(deployment)}
    assert run_job(team_a, deployment, dataset_id, "tiny-retired")["job"]["summary"]["quantized_base"] == "quantized"
    (unused,) = [row for row in cache_rows(deployment) if row.key not in before]
    # Another entry, last loaded within the 30 days the deployment keeps them (the default).
    storage = storage_from_settings(deployment.settings)
    with storage.writer(make_key("shared", "quantized-bases")) as writer:
        writer.write(b"a recently used base")
        recent_object = writer.commit()
    with session_scope(deployment.settings.database_url) as session:
        repository.add_quantized_base(session, "e" * 64, recent_object.key, recent_object.size, recent_object.sha256,
                                      {"model": "tiny-recent"})
    set_last_use(deployment, "e" * 64, timedelta(days=29))
    set_last_use(deployment, unused.key, timedelta(days=31))

    # The API process's reaper (every 15 s, the "reaper" lease's holder) prunes it on its own.
    deadline = time.monotonic() + 120
    while unused.key in {row.key for row in cache_rows(deployment)}:
        assert time.monotonic() < deadline, f"the reaper did not prune the entry:\n{deployment.log('api')}"
        time.sleep(0.5)
    assert not stored(deployment, unused.storage_key)
    assert "e" * 64 in {row.key for row in cache_rows(deployment)} and stored(deployment, recent_object.key)
    assert "pruned 1 quantized base unused since" in deployment.log("api")

    again = run_job(team_a, deployment, dataset_id, "tiny-retired")
    assert again["loaded"] == "quantized the base model; saved for the cache"
    (restored,) = [row for row in cache_rows(deployment) if row.identity.get("model") == "tiny-retired"]
    assert restored.key == unused.key and restored.storage_key != unused.storage_key

    with session_scope(deployment.settings.database_url) as session:  # the made-up entry, for the next tests
        repository.drop_quantized_base(session, "e" * 64, recent_object.key)
    storage.delete(recent_object.key)


def waiting_on_a_lock(database_url: str) -> bool:
    with session_scope(database_url) as session:
        return bool(session.scalar(text("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                                         "WHERE NOT l.granted AND a.datname = current_database()")))


@pytest.mark.parametrize("committed_first", ["the job's use", "the prune"])
def test_a_prune_and_a_jobs_use_of_the_entry_at_once_either_keep_it_or_let_the_job_miss(database_url, committed_first):
    """On Postgres the prune's DELETE waits for a job's UPDATE of the row (worker/supervisor.py marks an entry
    used before it looks it up) and checks its condition again once that commits: the entry stays. A prune
    that commits first leaves nothing for the job's lookup to find: it quantizes afresh."""
    with session_scope(database_url) as session:
        repository.add_quantized_base(session, "f" * 64, "shared/quantized-bases/" + "0" * 32, 10, "0" * 64, {})
        session.flush()
        session.execute(update(QuantizedBase).values(last_used_at=utcnow() - timedelta(days=40)))

    class NoObjects:
        def delete(self, key: str) -> None:
            pass

    job = session_scope(database_url)
    job_session = job.__enter__()
    if committed_first == "the prune":
        with session_scope(database_url) as session:
            assert len(prune(session, NoObjects(), 30 * 86400).entries) == 1  # type: ignore[arg-type]
        assert not repository.mark_quantized_base_used(job_session, "f" * 64, utcnow())
        job.__exit__(None, None, None)
        with session_scope(database_url) as session:
            assert repository.quantized_base(session, "f" * 64) is None
        return
    assert repository.mark_quantized_base_used(job_session, "f" * 64, utcnow())  # holds the row's lock
    pruned: list = []

    def prune_now():
        with session_scope(database_url) as session:
            pruned.append(prune(session, NoObjects(), 30 * 86400))  # type: ignore[arg-type]

    pruner = threading.Thread(target=prune_now)
    pruner.start()
    deadline = time.monotonic() + 30
    while not waiting_on_a_lock(database_url):  # the prune's DELETE, on the job's row
        assert pruner.is_alive() and time.monotonic() < deadline, "the prune did not wait for the job's UPDATE"
        time.sleep(0.05)
    job.__exit__(None, None, None)
    pruner.join(30)
    assert pruned and pruned[0].entries == []
    with session_scope(database_url) as session:
        assert repository.quantized_base(session, "f" * 64) is not None
