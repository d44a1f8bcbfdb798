"""The eval report through the service: a job trained by the real worker stack makes it, the job row
serves it at GET /jobs/{id}/report (team-scoped, with an ETag), it is stored as the job's "report"
artifact, its tuned answers are what the downloaded merged model says, and `qlora jobs report` prints it."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.deployment import lane, upload, wait_for_status
from tests.service.test_cli_client import clean_env, qlora
from worker.training.tiny import demo_spec

MAX_STEPS = 40  # a short job: the report's numbers need not be good here to be checked against the model
PROMPTS = 4
MAX_NEW_TOKENS = 24


def job_body(train_id: str, validation_id: str | None, *, training: dict, **sections) -> dict:
    spec = demo_spec("tiny")
    spec["training"].update(training)
    return {"name": "report", "dataset_id": train_id, "validation_dataset_id": validation_id, **spec, **sections}


@pytest.fixture(scope="module")
def datasets(team_a, demo_data):
    train = upload(team_a, demo_data["train"])
    assert train.status_code == 201, train.text
    validation = upload(team_a, demo_data["validation"], name="validation.jsonl")
    return train.json()["id"], validation.json()["id"]


@pytest.fixture(scope="module")
def reported_job(deployment, worker, team_a, datasets):
    body = job_body(*datasets, training={"max_steps": MAX_STEPS, "logging_steps": 10, "eval_steps": MAX_STEPS,
                                         "save_steps": MAX_STEPS},
                    eval={"prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS})
    created = team_a.post("/jobs", json=body)
    assert created.status_code == 201, created.text
    job = wait_for_status(team_a, created.json()["id"], ("succeeded", "failed", "cancelled"), deployment=deployment)
    assert job["status"] == "succeeded", job["error"]
    response = team_a.get(f"/jobs/{job['id']}/report")
    assert response.status_code == 200, response.text
    return job, response


def download(client: httpx.Client, job_id: str, kind: str, into) -> dict:
    """The artifact's tar from the store (a presigned URL), checked against its sha256 and unpacked."""
    listing = {a["kind"]: a for a in client.get(f"/jobs/{job_id}/artifacts").json()}
    redirect = client.get(f"/jobs/{job_id}/artifacts/{kind}")
    assert redirect.status_code == 307, redirect.text
    blob = httpx.get(redirect.headers["location"], timeout=60).content
    assert hashlib.sha256(blob).hexdigest() == listing[kind]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return listing


def test_get_report_serves_what_the_worker_made(reported_job, team_a, demo_data):
    job, response = reported_job
    report = response.json()
    assert report["job_id"] == job["id"] and report["prompts_from"] == "validation"
    assert len(report["rows"]) == PROMPTS and report["generation"]["max_new_tokens"] == MAX_NEW_TOKENS
    assert job["summary"]["report"] == report["metrics"]  # the job's summary keeps the means
    lines = [json.loads(line) for line in demo_data["validation"].read_text().splitlines()]
    for row in report["rows"]:
        messages = lines[row["line"] - 1]["messages"]
        assert (row["prompt"], row["reference"]) == (messages[0]["content"], messages[1]["content"])
        assert set(row["base"]) == set(row["tuned"]) == {"answer", "stopped", "exact_match", "f1"}
    assert report["metrics"]["loss_rows"] == 48 and report["metrics"]["tuned"]["loss"] < report["metrics"]["base"]["loss"]

    # An unchanged report answers 304 to its ETag.
    again = team_a.get(f"/jobs/{job['id']}/report", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and not again.content


def test_another_teams_key_gets_404(reported_job, team_b):
    job, _ = reported_job
    response = team_b.get(f"/jobs/{job['id']}/report")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_the_report_artifact_and_the_merged_model_agree_with_it(reported_job, team_a, tmp_path):
    """The report artifact is the served report; the tuned answers are what transformers generates with
    the downloaded merged model, prompt by prompt."""
    job, response = reported_job
    report = response.json()
    listing = download(team_a, job["id"], "report", tmp_path)
    assert set(listing) == {"adapter", "merged", "report"}
    stored = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {"job_id": job["id"], **stored} == report

    merged = tmp_path / "merged"
    download(team_a, job["id"], "merged", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    for row in report["rows"]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                               tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer == row["tuned"]["answer"]
        assert row["tuned"]["exact_match"] == (answer.strip() == row["reference"].strip())


def test_the_cli_prints_the_report(reported_job, deployment, team_a, tmp_path):
    job, response = reported_job
    key = team_a.headers["authorization"].removeprefix("Bearer ")
    env = clean_env(tmp_path) | {"QLORA_URL": deployment.url, "QLORA_API_KEY": key}
    piped = qlora(env, "jobs", "report", job["id"])  # a pipe: the API's JSON
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == response.json()

    table = qlora(env, "jobs", "report", job["id"], "--table")
    assert table.returncode == 0, table.stderr
    report = response.json()
    for row in report["rows"]:
        assert row["prompt"] in table.stdout and row["reference"] in table.stdout
    for heading in ("prompt", "reference", "base", "tuned", "exact match", "perplexity"):
        assert heading in table.stdout
    assert f"{report['metrics']['tuned']['loss']:.4f}" in table.stdout

    shown = qlora(env, "jobs", "show", job["id"], "--table")  # the summary's means
    assert shown.returncode == 0 and "eval report (tuned / base)" in shown.stdout, shown.stdout

    fetched = qlora(env, "jobs", "download", job["id"], "--kind", "report", "--out", str(tmp_path / "dl"))
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads((tmp_path / "dl" / "report" / "report.json").read_text())["rows"] == report["rows"]

    missing = qlora(env, "jobs", "report", "0" * 32)
    assert missing.returncode == 1 and "no job" in missing.stderr


def test_a_job_without_a_report_says_why(deployment, worker, team_a, datasets):
    train_id, _ = datasets
    queued = team_a.post("/jobs", json=job_body(train_id, None, training={}, gpu_class=lane("nobody-listens"))).json()
    waiting = team_a.get(f"/jobs/{queued['id']}/report")
    assert waiting.status_code == 409 and waiting.json()["error"]["code"] == "report_not_ready"
    assert "it is queued" in waiting.json()["error"]["message"]
    team_a.post(f"/jobs/{queued['id']}/cancel")
    cancelled = team_a.get(f"/jobs/{queued['id']}/report")
    assert cancelled.status_code == 404 and cancelled.json()["error"]["code"] == "no_report"
    assert "cancelled" in cancelled.json()["error"]["message"]

    # eval.prompts 0 asks for none: the job succeeds without one.
    body = job_body(train_id, None, training={"max_steps": 2, "save_steps": 2, "per_device_batch_size": 4},
                    output={"merge": False}, eval={"prompts": 0})
    created = team_a.post("/jobs", json=body).json()
    job = wait_for_status(team_a, created["id"], ("succeeded", "failed", "cancelled"), deployment=deployment)
    assert job["status"] == "succeeded", job["error"]
    assert job["summary"]["report"] is None
    answer = team_a.get(f"/jobs/{job['id']}/report")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "no_report"
    assert "eval.prompts is 0" in answer.json()["error"]["message"]
    assert {a["kind"] for a in team_a.get(f"/jobs/{job['id']}/artifacts").json()} == {"adapter"}
