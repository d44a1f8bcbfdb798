"""An upgrade keeps what an older release wrote. A database at migration 0008 (the release before fair
share, eval reports, preference tuning and the spec's memory savers) holding the rows that release wrote,
brought to head as `qlora migrate` does, answers for every old job through the API, and its queued, paused
and lost jobs are claimed again with specs this release runs. (That the engine resumes a checkpoint such a
release wrote: tests/training/test_recipe.py, the pause test.)"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient

import app.bootstrap  # noqa: F401  (every table's module, as the running service has them)
from app.config import Settings, get_settings
from app.db import engine_for, sessionmaker_for, utcnow
from app.jobs import runs
from app.jobs.reaper import reap
from app.main import create_app
from app.migrate import alembic_config, upgrade
from worker.training.spec import JobSpec

# A job's spec exactly as the release at migration 0008 stored it (its JobSpec's dump): no method, eval,
# lora.dtype, activation_offload, tiled_mlp, early_stopping or use_best_checkpoint.
OLD_SPEC = {
    "base_model": "tiny-demo",
    "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
    "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear", "bias": "none",
             "use_rslora": False},
    "training": {"epochs": None, "max_steps": 12, "learning_rate": 0.003, "per_device_batch_size": 8,
                 "gradient_accumulation_steps": 1, "max_seq_length": 64, "lr_scheduler": "constant",
                 "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 0.3, "optimizer": "paged_adamw_32bit",
                 "gradient_checkpointing": True, "packing": "auto", "group_by_length": False, "kernels": "auto",
                 "train_on_inputs": False, "seed": 42, "logging_steps": 1, "eval_steps": 4, "save_steps": 4},
    "output": {"merge": True, "merge_dtype": "bfloat16"},
}
KEY = "qlk_OldRelease0123456789abcdefghijklmnopqrstuvw"
TEAM = "6f4234f6595a4fada942e629a1aa6422"


def old_release_rows(url: str, storage: Path) -> dict[str, str]:
    """What the release at 0008 left: a team, its key, a model, a dataset and a job in every state, with
    events, a loss curve, checkpoints and an adapter in storage; written through the tables as they were."""
    tables = sa.MetaData()
    tables.reflect(engine_for(url))
    now = utcnow()
    ids = {name: hashlib.md5(name.encode()).hexdigest()
           for name in ("succeeded", "failed", "cancelled", "paused", "lost", "queued")}

    def stored(kind: str, data: bytes) -> dict:
        key = f"{TEAM}/{kind}/{hashlib.md5(data).hexdigest()}"
        (storage / key).parent.mkdir(parents=True, exist_ok=True)
        (storage / key).write_bytes(data)
        return {"storage_key": key, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def row(table: str, **values) -> None:
        conn.execute(tables.tables[table].insert().values(**values))

    train = b'{"messages": [{"role": "user", "content": "cat"}, {"role": "assistant", "content": "meow"}]}\n' * 64
    with engine_for(url).begin() as conn:
        row("teams", id=TEAM, name="research", created_at=now - timedelta(days=3))
        row("api_keys", id="k" * 32, team_id=TEAM, prefix=KEY[:12], key_hash=hashlib.sha256(KEY.encode()).hexdigest(),
            is_admin=False, created_at=now - timedelta(days=3))
        row("base_models", id="m" * 32, name="tiny-demo", path="/models/tiny-demo", description="",
            created_at=now - timedelta(days=3))
        row("datasets", id="d" * 32, team_id=TEAM, filename="train.jsonl", **stored("datasets", train), status="ready",
            format="chat", rows=64, token_estimate=640, error_count=0, errors=[], created_at=now - timedelta(days=3))
        for status, attempt, step in (("succeeded", 1, 12), ("failed", 1, 0), ("cancelled", 0, 0),
                                      ("paused", 1, 8), ("lost", 1, 4), ("queued", 0, 0)):
            job_id = ids[status]
            ran = attempt > 0
            row("jobs", id=job_id, team_id=TEAM, name=f"old-{status}", spec=OLD_SPEC, base_model="tiny-demo",
                status="running" if status == "lost" else status, dataset_id="d" * 32, queue="gpu-default",
                attempt=attempt, worker="host:gpu0" if ran else None, step=step, total_steps=12 if ran else None,
                trained_tokens=100 * step, error="invalid job spec" if status == "failed" else None,
                summary={"steps": {"completed": 12, "planned": 12}} if status == "succeeded" else None,
                started_at=now - timedelta(days=2) if ran else None,
                finished_at=now - timedelta(days=1) if status in ("succeeded", "failed", "cancelled") else None,
                heartbeat_at=now - timedelta(days=1) if ran else None, created_at=now - timedelta(days=2),
                dispatched_at=now - timedelta(days=2), lost_workers=0, metadata={"probe": status})
            row("job_events", job_id=job_id, attempt=0, type="created", level="info", message="job created",
                created_at=now - timedelta(days=2))
            for s in range(1, step + 1):
                row("job_metrics", job_id=job_id, kind="train", step=s, epoch=s / 12, train_loss=3.0 - s / 10,
                    learning_rate=0.003, grad_norm=1.0, tokens_seen=100 * s, tokens_per_second=500.0,
                    peak_memory_bytes=2**20, created_at=now - timedelta(days=2))
            for s in range(4, step + 1, 4):
                row("checkpoints", id=hashlib.md5(f"{job_id}{s}".encode()).hexdigest(), job_id=job_id, attempt=1,
                    step=s, **stored("checkpoints", f"checkpoint {job_id} {s}".encode()), train_loss=2.5,
                    created_at=now - timedelta(days=2))
        row("artifacts", id="a" * 32, job_id=ids["succeeded"], kind="adapter",
            **stored("adapters", b"adapter tar of the old release"), created_at=now - timedelta(days=1))
    engine_for(url).dispose()
    return ids


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_upgraded_database_serves_and_runs_the_jobs_an_old_release_wrote(database, tmp_path, monkeypatch, request):
    home = tmp_path / "home"
    (home / "storage").mkdir(parents=True)
    url = f"sqlite:///{home / 'qlora.db'}" if database == "sqlite" else request.getfixturevalue("database_url")
    if database == "sqlite":
        command.upgrade(alembic_config(url), "0008")
    else:
        command.downgrade(alembic_config(url), "0008")
    ids = old_release_rows(url, home / "storage")

    upgrade(url)  # qlora migrate

    for name in [n for n in os.environ if n.startswith("QLORA_")]:
        monkeypatch.delenv(name)
    settings = Settings(home=home, database_url=url, storage_url=f"file://{home / 'storage'}", broker_url="",
                        reaper_interval_s=0, scheduler_interval_s=0, heartbeat_deadline_s=60)
    monkeypatch.setenv("QLORA_HOME", str(home))
    monkeypatch.setenv("QLORA_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as api:
            listed = api.get("/jobs").json()["data"]
            assert {j["name"]: j["status"] for j in listed} == {
                "old-succeeded": "succeeded", "old-failed": "failed", "old-cancelled": "cancelled",
                "old-paused": "paused", "old-lost": "running", "old-queued": "queued"}
            for job_id in ids.values():
                for path in ("", "/events", "/metrics", "/checkpoints", "/artifacts"):
                    answer = api.get(f"/jobs/{job_id}{path}")
                    assert answer.status_code == 200, (path, answer.text)
                assert api.get(f"/v1/fine_tuning/jobs/ftjob-{job_id}").status_code == 200
                assert api.get(f"/v1/fine_tuning/jobs/ftjob-{job_id}/events").status_code == 200
            done = api.get(f"/jobs/{ids['succeeded']}").json()
            assert done["metadata"] == {"probe": "succeeded"} and done["progress"]["step"] == 12
            assert len(api.get(f"/jobs/{ids['succeeded']}/metrics").json()["train"]) == 12
            assert api.get(f"/jobs/{ids['succeeded']}/artifacts/adapter").content == b"adapter tar of the old release"
            report = api.get(f"/jobs/{ids['succeeded']}/report")
            assert report.status_code == 404 and report.json()["error"]["code"] == "no_report"
            assert api.get("/usage").status_code == 200
            assert api.get(f"/datasets/{'d' * 32}/content").status_code == 200
            assert api.post(f"/jobs/{ids['paused']}/resume").json()["status"] == "queued"
            new = api.post("/jobs", json={"dataset_id": "d" * 32, "base_model": "tiny-demo",
                                          "training": {"max_steps": 4}, "eval": {"prompts": 0}})
            assert new.status_code == 201, new.text
    finally:
        get_settings.cache_clear()

    session = sessionmaker_for(url)()
    try:
        reap(session, settings)  # the job whose worker the upgrade stopped goes back to the queue
        session.commit()
        for name, attempt, resumes_at in (("queued", 1, None), ("paused", 2, 8), ("lost", 2, 4)):
            claimed = runs.claim(session, ids[name], f"new-worker-{name}")
            session.commit()
            assert claimed is not None and claimed.attempt == attempt, name
            assert (claimed.resume_step if claimed.resume_from else None) == resumes_at, name
            spec = JobSpec.parse(claimed.spec)  # as the worker's training process reads it
            assert spec.training.max_steps == 12 and spec.lora.dtype == "float32" and spec.method.type == "sft"
            assert spec.training.activation_offload == "auto" and spec.eval.prompts == 8
    finally:
        session.close()
        engine_for(url).dispose()
