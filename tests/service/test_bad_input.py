"""Bad input gets a clear error and leaves nothing behind: no partial row, no stray object."""

from __future__ import annotations

import json

import boto3
import pytest
from sqlalchemy import func, select

from app.datasets.tables import Dataset
from app.db import session_scope
from app.jobs.tables import Job
from tests.deployment import BUCKET, upload
from worker.training.tiny import demo_spec


def stored_state(deployment) -> tuple[int, int, set[str], int]:
    """Rows of datasets and jobs, the keys in object storage, pending multipart uploads."""
    with session_scope(deployment.settings.database_url) as session:
        datasets = session.scalar(select(func.count()).select_from(Dataset))
        jobs = session.scalar(select(func.count()).select_from(Job))
    s3 = boto3.client("s3", endpoint_url=deployment.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = deployment.settings.storage_url.split("/", 3)[3] + "/"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}
    pending = len(s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", []))
    return datasets, jobs, keys, pending


@pytest.fixture
def unchanged(deployment):
    """Asserts that the test left the database and the store as it found them (apart from what it says)."""
    before = stored_state(deployment)
    yield before
    assert stored_state(deployment) == before


def test_malformed_jsonl_is_stored_as_invalid_with_line_numbers(team_a):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        '{"messages": [',  # broken JSON
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}),
        "",  # blank lines are skipped, but still counted
    ]
    body = "\n".join(lines).encode() + b"\n\xff\xfe\n"  # line 7: not UTF-8
    response = upload(team_a, content=body)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["status"] == "invalid" and record["rows"] == 1 and record["error_count"] == 5
    by_line = {e["line"]: e["message"] for e in record["errors"]}
    assert by_line[2].startswith("not valid JSON")
    assert "no assistant message" in by_line[3] or "must be from the assistant" in by_line[3]
    assert "role 'robot' is not one of system, user, assistant" in by_line[4]
    assert '"content" is empty' in by_line[5]
    assert "not valid UTF-8" in by_line[7]
    # An invalid dataset cannot train.
    job = team_a.post("/jobs", json={"dataset_id": record["id"], **demo_spec("tiny")})
    assert job.status_code == 422 and "line 2" in job.json()["error"]["message"]


def test_unknown_format_names_the_expected_shapes(team_a):
    record = upload(team_a, content=b'{"question": "q", "answer": "a"}\n').json()
    assert record["status"] == "invalid"
    assert record["errors"][0]["line"] == 1
    assert "unknown format (keys: answer, question)" in record["errors"][0]["message"]
    assert '{"prompt": ..., "completion": ...}' in record["errors"][0]["message"]


def test_oversized_upload_is_refused_with_413_and_nothing_kept(deployment, team_a, unchanged):
    limit = deployment.settings.max_upload_bytes
    row = json.dumps({"prompt": "p" * 100, "completion": "c" * 100}).encode() + b"\n"
    body = row * (limit // len(row) + 50)  # just over the limit
    response = upload(team_a, content=body)
    assert response.status_code == 413, response.text
    assert "limit of 4.0 MiB" in response.json()["error"]["message"]


def test_oversized_upload_without_a_length_is_cut_off_mid_stream(deployment, team_a, unchanged):
    """A chunked upload declares no size: the limit is enforced on the bytes as they arrive,
    after part of the file is already in the store, and that part is removed."""
    limit = deployment.settings.max_upload_bytes
    row = json.dumps({"prompt": "p" * 100, "completion": "c" * 100}).encode() + b"\n"
    boundary = "qlora-test-boundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
               "Content-Type: application/jsonl\r\n\r\n").encode()
        for _ in range(limit // (len(row) * 100) + 3):
            yield row * 100
        yield f"\r\n--{boundary}--\r\n".encode()

    response = team_a.post("/datasets", content=body(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, response.text


def test_no_file_and_not_multipart_are_explained(team_a, unchanged):
    response = team_a.post("/datasets", content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "multipart/form-data" in response.json()["error"]["message"]
    response = team_a.post("/datasets", data={"purpose": "fine-tune"}, files={"other": ("x", b"y")})
    assert response.status_code == 422 and "no file" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def ready_dataset(team_a, demo_data):
    return upload(team_a, demo_data["validation"]).json()["id"]


def test_unknown_dataset_or_model_in_a_job(team_a, ready_dataset, unchanged):
    response = team_a.post("/jobs", json={"dataset_id": "0" * 32, **demo_spec("tiny")})
    assert response.status_code == 404 and "dataset_id" in response.json()["error"]["message"]
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, **demo_spec("llama-9000")})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"][0]["field"] == "base_model" and "tiny" in error["message"]
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, **demo_spec("/etc")})
    assert response.status_code == 422  # a path is not a registered model: a spec never names files


def test_out_of_range_hyperparameters_name_the_field_and_range(team_a, ready_dataset, unchanged):
    spec = demo_spec("tiny")
    spec["lora"]["r"] = 0
    spec["training"]["learning_rate"] = -1
    spec["training"]["lr_scheduler"] = "sometimes"
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, **spec})
    assert response.status_code == 422
    details = {d["field"]: d["message"] for d in response.json()["error"]["details"]}
    assert "allowed: >= 1 and <= 1024" in details["lora.r"]
    assert "allowed: > 0 and <= 1" in details["training.learning_rate"]
    assert "'cosine' | 'linear' | 'constant'" in details["training.lr_scheduler"]
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, "base_model": "tiny", "training": {},
                                          "learning_rat": 1})
    fields = {d["field"] for d in response.json()["error"]["details"]}
    assert {"training.epochs / max_steps", "learning_rat"} <= fields


def test_deleting_a_dataset_in_use_is_refused_until_the_job_is_done(team_a, demo_data):
    dataset = upload(team_a, demo_data["validation"]).json()
    job = team_a.post("/jobs", json={"dataset_id": dataset["id"], "gpu_class": "nobody-listens",
                                     **demo_spec("tiny")}).json()
    response = team_a.delete(f"/datasets/{dataset['id']}")
    assert response.status_code == 409 and job["id"] in response.json()["error"]["message"]
    assert team_a.get(f"/datasets/{dataset['id']}/content").content == demo_data["validation"].read_bytes()
    team_a.post(f"/jobs/{job['id']}/cancel")
    assert team_a.delete(f"/datasets/{dataset['id']}").status_code == 204
    assert team_a.get(f"/datasets/{dataset['id']}").status_code == 404
    assert team_a.get(f"/jobs/{job['id']}").json()["dataset_id"] is None  # the job's record stays


def test_a_cancelled_queued_job_stays_cancelled(team_a, ready_dataset):
    job = team_a.post("/jobs", json={"dataset_id": ready_dataset, "gpu_class": "nobody-listens",
                                     **demo_spec("tiny")}).json()
    assert team_a.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert team_a.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    events = [e["type"] for e in team_a.get(f"/jobs/{job['id']}/events").json()]
    assert events == ["created", "cancelled"]
