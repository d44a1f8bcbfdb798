"""End to end against Postgres, Redis, S3 over HTTP and a real Celery worker training on the CPU."""

from __future__ import annotations

import io
import json
import tarfile

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.deployment import lane, upload, wait_for_status
from worker.training.model import load_base_model
from worker.training.spec import QuantizationSpec
from worker.training.tiny import demo_rows, demo_spec, score_demo

HELDOUT = demo_rows(0, 16, split="heldout")


def job_body(dataset_id: str, validation_id: str | None = None, gpu_class: str | None = None, **training) -> dict:
    spec = demo_spec("tiny")
    spec["training"].update({"logging_steps": 10, "eval_steps": 80, "save_steps": 80, **training})  # 160 steps
    body = {"name": "e2e", "dataset_id": dataset_id, "validation_dataset_id": validation_id, **spec}
    return body | ({"gpu_class": gpu_class} if gpu_class else {})


@pytest.fixture(scope="module")
def finished_job(deployment, worker, team_a, demo_data):
    train = upload(team_a, demo_data["train"])
    assert train.status_code == 201, train.text
    assert train.json()["status"] == "ready" and train.json()["rows"] == 480 and train.json()["format"] == "chat"
    validation = upload(team_a, demo_data["validation"], name="validation.jsonl").json()
    created = team_a.post("/jobs", json=job_body(train.json()["id"], validation["id"]))
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "queued"
    job = wait_for_status(team_a, created.json()["id"], ("succeeded", "failed", "cancelled"), deployment=deployment)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_job_succeeds_with_progress_and_summary(finished_job):
    job = finished_job
    assert job["progress"] == {"step": 160, "total_steps": 160, "fraction": 1.0, "planned": False}
    assert job["trained_tokens"] > 0 and job["attempt"] == 1
    assert job["started_at"] and job["finished_at"] and job["started_at"] <= job["finished_at"]
    assert job["summary"]["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert job["summary"]["merge_fidelity"]["eval_loss_diff"] < 0.01


def test_a_finished_job_cannot_be_cancelled(finished_job, team_a):
    response = team_a.post(f"/jobs/{finished_job['id']}/cancel")
    assert response.status_code == 409
    assert "cannot cancel job" in response.json()["error"]["message"] and "it has succeeded" in response.text


def test_metrics_endpoint_returns_a_falling_loss_curve(finished_job, team_a):
    curve = team_a.get(f"/jobs/{finished_job['id']}/metrics").json()
    steps = [p["step"] for p in curve["train"]]
    assert steps == list(range(10, 161, 10))  # one point per logging step, none twice
    losses = [p["train_loss"] for p in curve["train"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p["learning_rate"] is not None and p["tokens_per_second"] > 0 for p in curve["train"])
    assert [p["step"] for p in curve["eval"]] == [80, 160] and curve["eval"][-1]["eval_loss"] < losses[0]


def test_events_tell_the_story(finished_job, team_a):
    events = team_a.get(f"/jobs/{finished_job['id']}/events").json()
    types = [e["type"] for e in events]
    for expected in ("created", "claimed", "started", "checkpoint_saved", "adapter_saved", "merged", "succeeded"):
        assert expected in types, types
    assert types.index("created") < types.index("claimed") < types.index("succeeded")
    # Each phase as it started, the worker's upload last: what the job showed as its `phase` while it ran.
    phases = [e["data"]["phase"] for e in events if e["type"] == "phase"]
    assert phases == ["training", "saving", "merging", "reporting", "uploading"], phases
    assert finished_job["phase"] is None  # done: its status says so
    # Each says what happened; none points at the worker's disk, gone with the attempt.
    saved = next(e for e in events if e["type"] == "checkpoint_saved")
    assert saved["message"] == f"checkpoint of step {saved['step']} saved"
    assert all("path" not in (e["data"] or {}) for e in events), [e["data"] for e in events]
    newer = team_a.get(f"/jobs/{finished_job['id']}/events", params={"after": events[2]["id"]}).json()
    assert [e["id"] for e in newer] == [e["id"] for e in events[3:]]


def _download(client: httpx.Client, job_id: str, kind: str, tmp_path):
    listing = {a["kind"]: a for a in client.get(f"/jobs/{job_id}/artifacts").json()}
    assert set(listing) == {"adapter", "merged", "report"}
    response = client.get(f"/jobs/{job_id}/artifacts/{kind}")
    assert response.status_code == 307  # S3: a short-lived presigned URL, served by the store itself
    blob = httpx.get(response.headers["location"], timeout=60)
    assert blob.status_code == 200
    import hashlib

    assert hashlib.sha256(blob.content).hexdigest() == listing[kind]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(blob.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / kind


def test_adapter_downloads_and_loads_with_peft(finished_job, team_a, tiny_model_dir, tmp_path):
    adapter = _download(team_a, finished_job["id"], "adapter", tmp_path)
    # Its base by the registered name (the registry's hub id where it has one), not the worker's directory of it.
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    base = load_base_model(tiny_model_dir, QuantizationSpec(), torch.float32, "cpu")
    model = PeftModel.from_pretrained(base, adapter)
    scored = score_demo(model, AutoTokenizer.from_pretrained(adapter), HELDOUT)
    assert scored["accuracy"] >= 0.8 and scored["stop_rate"] == 1.0, scored
    # Its model card names what made it, as the job's answer does: job, datasets, the eval report and the merge.
    card = (adapter / "README.md").read_text()
    summary = finished_job["summary"]
    assert f"by qlora-service job `{finished_job['id']}`" in card, card
    assert f"| train | {finished_job['dataset_id']} | {summary['data']['train']['rows']:,} |" in card, card
    assert f"| validation | {finished_job['validation_dataset_id']} |" in card, card
    assert f"- validation loss: {summary['eval_loss_final']:.4f}" in card, card
    assert "- eval report on " in card and "max |logit diff|" in card, card


def test_merged_model_loads_with_transformers_and_generates(finished_job, team_a, tmp_path):
    merged = _download(team_a, finished_job["id"], "merged", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16
    scored = score_demo(model, AutoTokenizer.from_pretrained(merged), HELDOUT)
    assert scored["accuracy"] >= 0.8 and scored["stop_rate"] == 1.0, scored
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"


def test_listing_is_newest_first_with_a_cursor(finished_job, team_a, demo_data):
    dataset_id = finished_job["dataset_id"]
    ids = [team_a.post("/jobs", json=job_body(dataset_id, gpu_class=lane("nobody-listens"))).json()["id"] for _ in range(3)]
    first = team_a.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2]
    second = team_a.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["data"][0]["id"] == ids[0]
    queued = team_a.get("/jobs", params={"status": "queued", "limit": 50}).json()["data"]
    assert {j["id"] for j in queued} >= set(ids) and all(j["status"] == "queued" for j in queued)
    for job_id in ids:
        assert team_a.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"

