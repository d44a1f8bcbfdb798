"""Bad input gets a clear error and leaves nothing behind: no partial row, no stray object."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import unicodedata
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import boto3
import httpx
import pytest
from sqlalchemy import func, select

from app.datasets.tables import Dataset
from app.db import session_scope
from app.jobs.tables import Artifact, Job
from app.storage.base import make_key
from app.storage.local import LocalStorage
from tests import services
from tests.deployment import BUCKET, lane, upload
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


def test_true_where_a_number_goes_is_refused_and_nothing_is_made(team_a, ready_dataset, unchanged):
    """`"learning_rate": true` made a job that trained at 1.0 (and /v1's `"seed": true` one of seed 1): a JSON
    boolean is no number, natively or through /v1, and the answer names the field."""
    spec = demo_spec("tiny")
    spec["training"]["learning_rate"] = True
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, "gpu_class": lane("nobody-listens"), **spec})
    assert response.status_code == 422, response.text
    assert {"field": "training.learning_rate", "message": "a number, not true or false"} in response.json()["error"]["details"]
    response = team_a.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": f"file-{ready_dataset}",
                                                         "gpu_class": lane("nobody-listens"), "seed": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed", response.text


def test_deleting_a_dataset_in_use_is_refused_until_the_job_is_done(team_a, demo_data):
    dataset = upload(team_a, demo_data["validation"]).json()
    job = team_a.post("/jobs", json={"dataset_id": dataset["id"], "gpu_class": lane("nobody-listens"),
                                     **demo_spec("tiny")}).json()
    response = team_a.delete(f"/datasets/{dataset['id']}")
    assert response.status_code == 409 and job["id"] in response.json()["error"]["message"]
    assert team_a.get(f"/datasets/{dataset['id']}/content").content == demo_data["validation"].read_bytes()
    team_a.post(f"/jobs/{job['id']}/cancel")
    assert team_a.delete(f"/datasets/{dataset['id']}").status_code == 204
    assert team_a.get(f"/datasets/{dataset['id']}").status_code == 404
    assert team_a.get(f"/jobs/{job['id']}").json()["dataset_id"] is None  # the job's record stays


def test_a_cancelled_queued_job_stays_cancelled(team_a, ready_dataset):
    job = team_a.post("/jobs", json={"dataset_id": ready_dataset, "gpu_class": lane("nobody-listens"),
                                     **demo_spec("tiny")}).json()
    assert team_a.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert team_a.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    events = [e["type"] for e in team_a.get(f"/jobs/{job['id']}/events").json()]
    assert events == ["created", "preflight", "cancelled"]


# ------------------------------------------------------------------ hostile input: a 4xx naming what is wrong, never a 500


def deeply_nested(depth: int = 100_000) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"


def test_a_line_json_cannot_read_is_a_bad_line_not_a_500(team_a):
    """Nesting past the parser's recursion limit, or a number past Python's digit limit: the parser
    raises something other than a decode error, and the line is still just a bad line."""
    good = json.dumps({"text": "fine"}).encode()
    response = upload(team_a, content=b"\n".join([good, deeply_nested(), good, b'{"text": ' + b"7" * 5000 + b"}"]))
    assert response.status_code == 201, response.text
    record = response.json()
    assert (record["status"], record["rows"], record["error_count"]) == ("invalid", 2, 2)
    by_line = {e["line"]: e["message"] for e in record["errors"]}
    assert "nested too deeply" in by_line[2]
    assert "a number too long" in by_line[4]


def test_an_error_echoes_an_excerpt_of_what_was_sent(team_a, ready_dataset, unchanged):
    """A 2 MB value comes back as a short excerpt that says how long it was, in a dataset's stored
    errors (returned in every list) as in a refused job."""
    huge = "r" * (2 * 1024 * 1024)
    row = {"messages": [{"role": huge, "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    dataset = upload(team_a, content=json.dumps(row).encode()).json()
    message = dataset["errors"][0]["message"]
    assert "is not one of system, user, assistant" in message and "2,097,152 characters" in message
    assert len(message) < 300
    listed = team_a.get("/datasets", params={"limit": 1}).json()["data"][0]
    assert listed["id"] == dataset["id"] and len(json.dumps(listed)) < 2000
    team_a.delete(f"/datasets/{dataset['id']}")

    spec = demo_spec("tiny")
    spec["training"]["per_device_batch_size"] = huge
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, huge: 1, **spec})
    assert response.status_code == 422 and len(response.text) < 2000, response.text[:500]
    fields = {d["field"]: d["message"] for d in response.json()["error"]["details"]}
    assert "2,097,152 characters" in fields["training.per_device_batch_size"]
    response = team_a.post("/jobs", json={"dataset_id": huge, **demo_spec("tiny")})
    assert response.status_code == 404 and len(response.text) < 1000
    # The same in the lookups by id that other routes answer, and the OpenAI-compatible API's.
    long = "x" * 5000
    for path, params in [(f"/datasets/{long}", None), ("/v1/files", {"after": f"file-{long}"}), (f"/v1/models/{long}", None)]:
        response = team_a.get(path, params=params)
        assert response.status_code in (400, 404) and len(response.text) < 1000, (path, response.text[:300])
    response = team_a.post("/v1/files", files={"file": ("a.jsonl", b'{"text": "hi"}\n')}, data={"purpose": long})
    assert response.status_code == 400 and len(response.text) < 1000, response.text[:300]


def test_a_file_upload_without_purpose_says_it_is_required(team_a):
    # Not what a missing value prints as ("got None"): that it is required, and what to send.
    response = team_a.post("/v1/files", files={"file": ("a.jsonl", b'{"text": "hi"}\n')})
    assert response.status_code == 400, response.text[:300]
    message = response.json()["error"]["message"]
    assert "purpose is required" in message and "purpose=fine-tune" in message and "None" not in message, message
    assert response.json()["error"]["param"] == "purpose"  # OpenAI's error shape: the field is its `param`


@pytest.mark.parametrize("path", ["/jobs", "/datasets"])
@pytest.mark.parametrize("inside", [
    json.dumps(["2024-05-01T12:00:00", "x"]).encode(),  # a timestamp without a timezone
    json.dumps(["0001-01-01T00:00:00+05:00", "x"]).encode(),  # before year 1 in UTC
    b"[" * 5000,  # nested past the parser's limit
])
def test_a_forged_cursor_is_a_422_naming_it(team_a, path, inside):
    cursor = base64.urlsafe_b64encode(inside).decode().rstrip("=")
    response = team_a.get(path, params={"cursor": cursor})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [{"field": "cursor", "message": "not a cursor this API returned"}]


@pytest.fixture(scope="module")
def queued_job(team_a, ready_dataset):
    job = team_a.post("/jobs", json={"dataset_id": ready_dataset, "gpu_class": lane("nobody-listens"), **demo_spec("tiny")})
    assert job.status_code == 201, job.text
    yield job.json()
    team_a.post(f"/jobs/{job.json()['id']}/cancel")


def test_an_openai_checkpoint_after_that_is_none_echoes_an_excerpt(team_a, queued_job):
    response = team_a.get(f"/v1/fine_tuning/jobs/ftjob-{queued_job['id']}/checkpoints", params={"after": "x" * 5000})
    assert response.status_code in (400, 404) and len(response.text) < 1000, response.text[:300]
    assert "5,000 characters" in response.json()["error"]["message"]


# 2**31: past Postgres' `integer`, the type of the ids and steps, but within 64 bits: it was a 500.
@pytest.mark.parametrize("after", ["ftevent-²", "ftevent-" + "9" * 5000, "ftevent-" + str(2**64), "ftevent--1",
                                   "ftevent-" + str(2**31), "ftevent-m" + str(2**31)])
def test_an_openai_after_that_is_no_event_id_is_a_400_naming_it(team_a, queued_job, after):
    response = team_a.get(f"/v1/fine_tuning/jobs/ftjob-{queued_job['id']}/events", params={"after": after})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "after" and len(response.text) < 1000


def test_an_openai_list_page_after_a_file_deleted_since_names_after_and_what_to_do(team_a, team_b):
    """A script deleting the files it lists asks for the next page after the last file it deleted (the SDK's
    `for f in client.files.list(): client.files.delete(f.id)` does): the answer was a bare 404 `no file`, with
    no `param`, as if the list were not there. It is still a 404 (another team's id answers as a missing one),
    naming `after` and what to do."""
    row = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}) + "\n"
    ids = [team_a.post("/v1/files", files={"file": ("d.jsonl", row.encode())}, data={"purpose": "fine-tune"}).json()["id"]
           for _ in range(3)]
    page = team_a.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == ids[:0:-1] and page["has_more"], page
    for file in page["data"]:
        assert team_a.delete(f"/v1/files/{file['id']}").status_code == 200
    theirs = team_b.post("/v1/files", files={"file": ("d.jsonl", row.encode())}, data={"purpose": "fine-tune"}).json()["id"]
    for after in (ids[1], "file-" + "f" * 32, theirs):
        response = team_a.get("/v1/files", params={"limit": 2, "after": after})
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["param"] == "after" and "deleted since" in error["message"] and "without after" in error["message"]
    missing_job = team_a.get("/v1/fine_tuning/jobs", params={"after": "ftjob-" + "0" * 32})
    assert missing_job.status_code == 404 and missing_job.json()["error"]["param"] == "after", missing_job.text
    assert ids[0] in [f["id"] for f in team_a.get("/v1/files", params={"limit": 2}).json()["data"]]  # from the start
    team_a.delete(f"/v1/files/{ids[0]}")
    team_b.delete(f"/v1/files/{theirs}")


@pytest.mark.parametrize(("path", "param", "value"), [
    ("events", "after", 10**30), ("events", "after", 2**31),
    ("metrics", "after_step", 2**31), ("metrics", "after_eval_step", 2**31),
])
def test_a_native_after_beyond_any_event_id_is_a_422(team_a, queued_job, path, param, value):
    response = team_a.get(f"/jobs/{queued_job['id']}/{path}", params={param: value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == f"query.{param}"
    assert str(2**31 - 1) in response.json()["error"]["message"]  # the largest it takes


@pytest.mark.parametrize(("body", "param"), [
    ({"hyperparameters": [1, 2]}, "hyperparameters"),
    ({"training": "fast"}, "training"),
    ({"hyperparameters": {"batch_size": 8}, "training": {"per_device_batch_size": 0}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 10**400}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": 10**400}}, "hyperparameters.n_epochs"),
    ({"validation_file": ""}, "validation_file"),
])
def test_openai_bodies_of_the_wrong_shape_are_a_400_naming_the_param(team_a, ready_dataset, unchanged, body, param):
    response = team_a.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": f"file-{ready_dataset}",
                                                         **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_empty_validation_dataset_id_is_refused_not_ignored(team_a, ready_dataset, unchanged):
    """An empty id is a client's bug (a blank template variable), not a way to say "none": null is."""
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, "validation_dataset_id": "",
                                          **demo_spec("tiny")})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "validation_dataset_id"


@pytest.mark.parametrize(("fields", "status", "field"), [
    ({"name": "line\nbreak"}, 422, "name"), ({"name": "nul\x00byte"}, 422, "name"), ({"name": "bell\x07"}, 422, "name"),
    ({"base_model": "ti\x00ny"}, 422, "base_model"),  # Postgres fails a lookup of a text with NUL
    ({"validation_dataset_id": "a\x00b"}, 404, None),  # as missing as a wrong id
])
def test_job_fields_with_control_characters_are_refused(team_a, ready_dataset, unchanged, fields, status, field):
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, **demo_spec("tiny"), **fields})
    assert response.status_code == status, response.text
    if field:
        assert response.json()["error"]["details"][0]["field"] == field


def test_a_gpu_class_no_worker_serves_is_refused_naming_those_served(deployment, team_a, ready_dataset, unchanged):
    """Without QLORA_GPU_CLASSES the served classes are the default and QLORA_EXTRA_GPU_CLASSES;
    a job for another would wait forever, and its class would show on the public /metrics."""
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, "gpu_class": "nobody-serves-this",
                                          **demo_spec("tiny")})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert f"'nobody-serves-this' is not a class the workers serve ({deployment.settings.default_gpu_class}, " in message
    response = team_a.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": f"file-{ready_dataset}",
                                                         "gpu_class": "nobody-serves-this"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "gpu_class"
    assert "nobody-serves-this" not in deployment.client(None).get("/metrics").text


CEILINGS = {"QLORA_MAX_SEQ_LENGTH": "1024", "QLORA_MAX_STEPS": "500", "QLORA_MAX_MICRO_BATCH": "8"}


@pytest.fixture(scope="module")
def local_api(deployment, team_a, tmp_path_factory):
    """A second API process on the same database, with local storage (the API streams downloads
    itself) and operator ceilings; it answers to team_a's key."""
    port = services.free_port()
    store = tmp_path_factory.mktemp("local-store")
    proc = deployment.spawn("serve", "--no-worker", log_name="api-local", extra_env={
        "QLORA_PORT": str(port), "QLORA_STORAGE_URL": f"file://{store}", "QLORA_REAPER_INTERVAL_S": "0", **CEILINGS})
    url = f"http://127.0.0.1:{port}"
    assert services.wait_until_up(url + "/health", proc, need_ok=True), deployment.log("api-local")
    yield httpx.Client(base_url=url, headers=team_a.headers, timeout=60), LocalStorage(store)
    deployment.stop(proc)


def test_a_job_name_in_any_script_downloads_under_that_name(deployment, local_api, demo_data):
    """The name goes into Content-Disposition: an ASCII fallback and the exact name as RFC 5987's
    filename*, so a name outside Latin-1, or one stored with control characters, is never a 500."""
    client, storage = local_api
    dataset = upload(client, demo_data["validation"]).json()
    spec = demo_spec("tiny")
    spec["training"]["per_device_batch_size"] = 8  # the ceiling this API process has
    job = client.post("/jobs", json={"dataset_id": dataset["id"], "gpu_class": lane("nobody-listens"), "name": "v1",
                                     **spec}).json()
    name = "модель «v2» 数据\r\nX-Injected: 1\t"  # control characters: as a row written before names were checked
    with session_scope(deployment.settings.database_url) as session:
        row = session.get(Job, job["id"])
        row.name, row.status = name, "succeeded"
        with storage.writer(make_key(row.team_id, "artifacts")) as writer:
            writer.write(b"archive bytes")
            stored = writer.commit()
        session.add(Artifact(job_id=job["id"], kind="adapter", storage_key=stored.key, bytes=stored.size,
                             sha256=stored.sha256))
    response = client.get(f"/jobs/{job['id']}/artifacts/adapter")
    assert response.status_code == 200, response.text
    assert response.content == b"archive bytes" and "x-injected" not in response.headers
    disposition = response.headers["content-disposition"]
    assert disposition.isascii() and disposition.startswith("attachment; filename=\"")
    saved_as = unquote(disposition.split("filename*=UTF-8''", 1)[1])
    assert saved_as.startswith("модель «v2» 数据") and saved_as.endswith("-adapter.tar")
    assert not any(unicodedata.category(c) == "Cc" for c in saved_as)


def test_operator_ceilings_refuse_a_spec_naming_the_field_and_the_ceiling(local_api, demo_data):
    client, _ = local_api
    dataset = upload(client, demo_data["validation"]).json()
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=501, max_seq_length=2048, per_device_batch_size=16)
    response = client.post("/jobs", json={"dataset_id": dataset["id"], **spec})
    assert response.status_code == 422, response.text
    details = {d["field"]: d["message"] for d in response.json()["error"]["details"]}
    assert details == {"training.max_steps": "at most 500 on this service (QLORA_MAX_STEPS)",
                       "training.max_seq_length": "at most 1024 on this service (QLORA_MAX_SEQ_LENGTH)",
                       "training.per_device_batch_size": "at most 8 on this service (QLORA_MAX_MICRO_BATCH)"}
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": f"file-{dataset['id']}",
                                                          "training": {"max_seq_length": 4096}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "training.max_seq_length"
    assert "at most 1024" in response.json()["error"]["message"]


# ------------------------------------------------------------------ what a hostile-input probe found (2026-12-05)


def job_bytes(ready_dataset: str, extra: str) -> bytes:
    """A POST /jobs body as raw bytes: an escape such as \\udc80 must reach the server as written."""
    spec = json.dumps({"dataset_id": ready_dataset, "gpu_class": lane("nobody-listens"), **demo_spec("tiny")})
    return (spec[:-1] + ", " + extra + "}").encode()


@pytest.mark.parametrize(("extra", "key"), [
    ('"metadata": {"\\udc80": "x"}', None),  # stored, it made the job unreadable: no cancel, no claim
    ('"metadata": {"k": "\\ud800"}', None),
    ('"name": "half \\udfff pair"', None),
    ('"x": "\\ud800"', "k-surrogate"),  # the key's digest failed on it
])
def test_a_lone_surrogate_escape_anywhere_in_a_json_body_is_refused_and_nothing_is_made(team_a, ready_dataset,
                                                                                          unchanged, extra, key):
    headers = {"Content-Type": "application/json", **({"Idempotency-Key": key} if key else {})}
    response = team_a.post("/jobs", content=job_bytes(ready_dataset, extra), headers=headers)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["field"] == "body" and "not valid JSON" in detail["message"] and "line 1 column" in detail["message"]
    # The team's jobs are all still readable, as the worker's claim reads them.
    assert team_a.get("/v1/fine_tuning/jobs").status_code == 200


@pytest.mark.parametrize(("extra", "key"), [
    # ("training" is given twice here too: the innermost repeat is named first)
    ('"training": {"max_steps": 5, "learning_rate": 0.0002, "learning_rate": 0.9}', "learning_rate"),
    ('"dataset_id": "another"', "dataset_id"),  # the body's first dataset_id is the ready one: the last was taken
])
def test_a_key_given_twice_in_a_json_body_is_refused_naming_it(team_a, ready_dataset, unchanged, extra, key):
    """A script that joins JSON by hand gave a key twice: the job trained with the last value, silently."""
    response = team_a.post("/jobs", content=job_bytes(ready_dataset, extra), headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["field"] == "body" and f"the key '{key}' appears twice in one object" in detail["message"], detail
    openai = team_a.post("/v1/fine_tuning/jobs", content=b'{"model": "tiny", "model": "tiny", "training_file": "x"}',
                         headers={"Content-Type": "application/json"})
    assert openai.status_code == 400 and "the key 'model' appears twice" in openai.json()["error"]["message"], openai.text


def test_a_keyed_creation_whose_body_is_not_json_is_a_422_not_a_500(team_a, unchanged):
    response = team_a.post("/jobs", content=b"dataset_id=x&base_model=tiny", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Idempotency-Key": "k-form"})
    assert response.status_code == 422, response.text
    assert "JSON object" in response.json()["error"]["message"]


def test_a_body_of_too_many_values_is_413_and_many_unknown_fields_answer_in_a_few_kib(team_a, ready_dataset, unchanged):
    many = {f"f{i}": 1 for i in range(20_000)}
    response = team_a.post("/jobs/preflight", json={"dataset_id": ready_dataset, **demo_spec("tiny"),
                                                    "training": many})
    assert response.status_code == 413, response.text
    assert "10,000 values" in response.json()["error"]["message"]
    # Under that bound, thousands of unknown fields are named 20 at a time: the answer stays small.
    response = team_a.post("/jobs", json={"dataset_id": ready_dataset, **demo_spec("tiny"),
                                          "training": {f"f{i}": 1 for i in range(4_000)}})
    assert response.status_code == 422 and len(response.content) < 20_000, len(response.content)
    details = response.json()["error"]["details"]
    assert len(details) == 21 and details[-1]["field"] == "(more)" and "3980 more fields" in details[-1]["message"]


@pytest.mark.parametrize("path", ["/jobs", "/datasets"])
def test_a_cursor_whose_id_holds_a_nul_is_a_422(team_a, path):
    cursor = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", "a\x00b"]).encode()).decode()
    response = team_a.get(path, params={"cursor": cursor.rstrip("=")})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "cursor"


def test_a_file_name_with_a_nul_or_a_tab_is_refused_and_nothing_is_kept(team_a, unchanged):
    for name in (b"a\x00b.jsonl", b"a\tb.jsonl", "a\u202eb.jsonl".encode()):  # raw: httpx would percent-encode them
        body = (b'--BB\r\nContent-Disposition: form-data; name="file"; filename="' + name + b'"\r\n\r\n'
                b'{"text": "hi"}\n\r\n--BB--\r\n')
        response = team_a.post("/datasets", content=body, headers={"Content-Type": "multipart/form-data; boundary=BB"})
        assert response.status_code == 422, response.text
        assert "control character" in response.json()["error"]["message"]


def test_a_row_with_half_a_surrogate_pair_is_a_bad_line_and_a_whole_pair_is_text(team_a):
    rows = [b'{"messages": [{"role": "user", "content": "hi \\udfff"}, {"role": "assistant", "content": "yo"}]}',
            b'{"\\ud800": "x"}',
            b'{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}, {"role": "assistant", "content": "yo"}]}']
    response = upload(team_a, content=b"\n".join(rows) + b"\n")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["status"] == "invalid" and [e["line"] for e in dataset["errors"]] == [1, 2]
    assert "surrogate" in dataset["errors"][0]["message"]
    team_a.delete(f"/datasets/{dataset['id']}")


CHAT_ROW = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}).encode()


@pytest.mark.parametrize(("data", "rows", "error"), [
    (b"\xef\xbb\xbf" + CHAT_ROW + b"\n" + CHAT_ROW, 2, None),  # Notepad's "UTF-8"
    (CHAT_ROW + b"\r\n" + CHAT_ROW + b"\r\n", 2, None),  # Windows line ends
    (CHAT_ROW + b"\x00\n" + CHAT_ROW, 0, (1, "it holds NUL bytes")),
    (CHAT_ROW + b"\n" + CHAT_ROW[:-2] + b"\x00]}", 1, (2, "not valid JSON")),
    (CHAT_ROW + b"\n7\n", 1, (2, "expected a JSON object, got a number (7)")),
    (CHAT_ROW + b"\n[1, 2]\n", 1, (2, "expected a JSON object, got an array")),
    (CHAT_ROW + b"\nnull\n", 1, (2, "expected a JSON object, got null")),
    (b"", 0, (1, "the file has no rows")),
    (b"\n  \n\r\n", 0, (3, "the file has no rows")),
    (CHAT_ROW + b"\r" + CHAT_ROW + b"\r", 0, (1, "the file's lines end with \\r alone")),  # old Mac line ends
    # Python's json keeps the last of a key given twice: the row would train on its second conversation alone.
    (CHAT_ROW[:-1] + b', "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     0, (1, "the key 'messages' appears twice in one object")),
])
def test_a_carelessly_saved_file_is_read_as_meant_or_refused_naming_the_line(team_a, data, rows, error):
    response = upload(team_a, content=data)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["rows"] == rows, dataset
    if error is None:
        assert dataset["status"] == "ready" and dataset["format"] == "chat", dataset
    else:
        (first,) = dataset["errors"]
        assert dataset["status"] == "invalid" and first["line"] == error[0] and error[1] in first["message"], dataset
        job = team_a.post("/jobs", json={"dataset_id": dataset["id"], **demo_spec("tiny")})
        assert job.status_code == 422 and f"line {error[0]}" in job.json()["error"]["message"], job.text
    team_a.delete(f"/datasets/{dataset['id']}")


def test_a_multipart_body_cut_off_before_its_closing_boundary_keeps_nothing(deployment, team_a, unchanged):
    """A client that stops early but ends its body cleanly (a chunked body's last chunk sent) must not
    leave a shorter dataset recorded as complete."""
    cut = (b'--BB\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
           b'{"text": "row 1"}\n{"text": "row 2"}\n')
    response = team_a.post("/datasets", content=cut, headers={"Content-Type": "multipart/form-data; boundary=BB"})
    assert response.status_code == 422, response.text
    assert "closing boundary" in response.json()["error"]["message"]
    whole = cut + b"\r\n--BB--\r\n"
    response = team_a.post("/datasets", content=whole, headers={"Content-Type": "multipart/form-data; boundary=BB"})
    assert response.status_code == 201 and response.json()["rows"] == 2, response.text
    team_a.delete(f"/datasets/{response.json()['id']}")


def test_a_multipart_boundary_too_long_to_parse_is_a_422(team_a, unchanged):
    boundary = "B" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\nx\r\n--{boundary}--\r\n'
    response = team_a.post("/datasets", content=body.encode(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 422, response.text
    assert "boundary" in response.json()["error"]["message"]


@pytest.mark.parametrize("kind", [[], {}, ["dpo"]])
def test_an_openai_method_type_that_is_no_string_is_a_400(team_a, ready_dataset, unchanged, kind):
    response = team_a.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": f"file-{ready_dataset}",
                                                         "method": {"type": kind}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "method.type"


def test_a_download_whose_stored_file_is_gone_is_a_404_not_a_500(deployment, team_a):
    """A download racing a delete: the row was read, then the object was gone (13 of 180 such reads answered 500)."""
    from app.storage.base import storage_from_settings

    dataset = upload(team_a, content=b'{"text": "hi"}\n').json()
    with session_scope(deployment.settings.database_url) as session:
        key = session.get(Dataset, dataset["id"]).storage_key
    storage_from_settings(deployment.settings).delete(key)
    try:
        response = team_a.get(f"/datasets/{dataset['id']}/content")
        assert response.status_code == 404 and "deleted meanwhile" in response.json()["error"]["message"], response.text
        response = team_a.get(f"/v1/files/file-{dataset['id']}/content")
        assert response.status_code == 404 and "deleted meanwhile" in response.json()["error"]["message"], response.text
    finally:
        team_a.delete(f"/datasets/{dataset['id']}")


def test_registering_a_model_whose_config_is_not_json_or_whose_name_races_is_a_4xx(deployment, tmp_path):
    admin = deployment.client(deployment.team_key("registry-admins", admin=True))
    for name, content in [("not-json", b"{oops"), ("not-utf8", b"\xff\xfe{}"), ("a-list", b"[1, 2]")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_bytes(content)
        response = admin.post("/models", json={"name": f"bad-{name}", "path": str(tmp_path / name)})
        assert response.status_code == 422, response.text  # was 500
        assert response.json()["error"]["details"][0]["field"] == "path"
    # A name the registry cannot hold names its field and the rule, as every other refusal's details do
    # (it had a field and no message).
    response = admin.post("/models", json={"name": "../up", "hub_id": "org/up", "revision": "v1"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [{"field": "name", "message": "1-200 letters, digits and _ . : / -"}]
    # The same name from several admins at once: one registers it, the others learn it is taken.
    name = f"raced-{uuid.uuid4().hex[:6]}"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: admin.post("/models", json={
            "name": name, "hub_id": "org/raced", "revision": "v1"}).status_code, range(6)))
    assert sorted(answers) == [201] + [409] * 5, answers  # some were 500 (the unique index's violation)
    assert admin.delete(f"/models/{name}").status_code == 204


def test_a_model_path_must_be_a_model_directory_under_a_model_root(deployment, tiny_model_dir, tmp_path):
    """POST /models registered any directory of the API host (its config.json served to every team by GET /models,
    its files loaded by workers): only a directory with a config.json under QLORA_MODEL_ROOTS is, by where it
    leads and not only what it is called. The deployment's root is the test run's temporary tree."""
    admin = deployment.client(deployment.team_key("registry-admins", admin=True))
    (root,) = deployment.settings.allowed_model_roots
    outside = Path(tempfile.mkdtemp(prefix="qlora-outside-"))  # /tmp itself, not under the root
    try:
        shutil.copy(tiny_model_dir / "config.json", outside / "config.json")
        (tmp_path / "escape").symlink_to(outside)
        (tmp_path / "empty").mkdir()
        (tmp_path / "a-file").write_text("{}")
        up = "/".join([".."] * len(tmp_path.relative_to("/").parts))  # to / from tmp_path, lexically
        refused = {"/etc": "is not under a model root",
                   f"{tmp_path}/{up}{outside}": "is not under a model root",
                   str(outside): "is not under a model root",
                   str(tmp_path / "escape"): "leads out of the model roots through a symbolic link",
                   str(tmp_path / "empty"): "has no config.json",
                   str(tmp_path / "a-file"): "is not a directory",
                   "relative/dir": "is not absolute"}
        for path, why in refused.items():
            response = admin.post("/models", json={"name": "refused", "path": path})
            assert response.status_code == 422, (path, response.text)  # all 201 before, /etc included
            (detail,) = response.json()["error"]["details"]
            assert detail["field"] == "path" and detail["message"].startswith(why), (path, detail)
            assert str(root) in detail["message"] and str(root) in response.json()["error"]["message"]
        assert "refused" not in {m["name"] for m in admin.get("/models").json()}
        shutil.copytree(tiny_model_dir, tmp_path / "inside")
        through_a_link = tmp_path / "linked"
        through_a_link.symlink_to(tmp_path / "inside")  # a link that stays under the root is fine
        for name, path in [("inside", tmp_path / "inside"), ("linked", through_a_link)]:
            created = admin.post("/models", json={"name": f"rooted-{name}", "path": str(path)})
            assert created.status_code == 201, created.text
            assert created.json()["path"] == str(path) and created.json()["config"]["model_type"] == "llama"
            assert admin.delete(f"/models/rooted-{name}").status_code == 204
    finally:
        shutil.rmtree(outside)


def test_a_job_request_without_a_body_names_the_body(team_a, unchanged):
    for headers in ({}, {"Content-Type": "application/json"}):
        response = team_a.post("/jobs", headers=headers)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["message"] == "body: a JSON object is required" and error["details"][0]["field"] == "body"


def test_a_download_of_an_artifact_a_job_has_not_says_what_it_has(team_a, queued_job):
    response = team_a.get(f"/jobs/{queued_job['id']}/artifacts/weights")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == (
        f"job {queued_job['id']} has no 'weights' artifact; it has none yet (it is queued; a job's artifacts "
        "are stored as it ends)")
