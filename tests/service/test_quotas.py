"""Team quotas: admins set and read them (defaults where unset), a team reads its own, and a request
over one answers 429 quota_exceeded naming the limit, the use and what frees it: an upload over
storage_gib before a byte is stored (or, without a Content-Length, where it passes, keeping nothing),
a job past max_queued however many arrive at once. Under /v1 the refusals are in OpenAI's shape."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import boto3
import pytest

from app.db import session_scope
from app.teams import repository as teams
from tests.deployment import BUCKET, lane, upload
from worker.training.tiny import demo_spec

BOUNDARY = "qlora-quota"
ROW = json.dumps({"prompt": "What does a goat eat?", "completion": "Hay."}).encode() + b"\n"
MIB = 2**20


def fresh_team(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def admin(deployment):
    with deployment.client(deployment.team_key(fresh_team("admins"), admin=True)) as client:
        yield client


def set_quota(admin, team: str, **changes) -> dict:
    response = admin.put(f"/admin/teams/{team}/quota", json=changes)
    assert response.status_code == 200, response.text
    return response.json()


def rows(n_bytes: int) -> bytes:
    return ROW * (n_bytes // len(ROW) + 1)


def team_objects(deployment, team: str) -> tuple[set[str], int]:
    """The keys stored under the team's prefix and its pending multipart uploads."""
    with session_scope(deployment.settings.database_url) as session:
        team_id = teams.team_by_name(session, team).id
    s3 = boto3.client("s3", endpoint_url=deployment.settings.s3_endpoint_url, region_name="us-east-1")
    prefix = f"{deployment.settings.storage_url.split('/', 3)[3]}/{team_id}/"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}
    return keys, len(s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", []))


def chunked_upload(client, content: bytes, path: str = "/datasets", fields: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None):
    """A multipart body from a generator: httpx sends it chunked, with no Content-Length to check up front."""
    def body():
        for name, value in (fields or {}).items():
            yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="farm.jsonl"\r\n'
               "Content-Type: application/jsonl\r\n\r\n").encode()
        for start in range(0, len(content), 256 * 1024):
            yield content[start:start + 256 * 1024]
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    return client.post(path, content=body(),
                       headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})})


# ------------------------------------------------------------------ setting and reading quotas


def test_only_admin_keys_read_or_set_another_teams_quota(deployment, admin):
    team = fresh_team("plain")
    with deployment.client(deployment.team_key(team)) as member:
        for response in (member.get(f"/admin/teams/{team}/quota"),
                         member.put(f"/admin/teams/{team}/quota", json={"max_queued": 10**6})):
            assert response.status_code == 403, response.text
            assert "admin key" in response.json()["error"]["message"]
    for response in (admin.get("/admin/teams/no-such-team/quota"),
                     admin.put("/admin/teams/no-such-team/quota", json={"weight": 2})):
        assert response.status_code == 404, response.text
        assert "no team 'no-such-team'" in response.json()["error"]["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("weight", 0), ("weight", 1e-320), ("weight", 1000.5), ("weight", "2"), ("max_running", -1), ("max_queued", 1.5),
    ("max_queued", True), ("max_queued", 10**7), ("gpu_hours_per_month", -0.5), ("storage_gib", 1e12),
    ("max_gpus", 3),
])
def test_a_quota_out_of_range_is_refused_naming_the_field(deployment, admin, field, value):
    team = fresh_team("ranges")
    deployment.team_key(team)
    response = admin.put(f"/admin/teams/{team}/quota", json={field: value})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid" and [d["field"] for d in error["details"]] == [field]
    # what it allows, as `qlora admin set-quota` says it (it said only "Input should be a valid integer")
    assert "; allowed: " in error["message"] and "or null for the default" in error["message"]
    assert admin.get(f"/admin/teams/{team}/quota").json()["own"] == {
        "weight": None, "max_running": None, "max_queued": None, "gpu_hours_per_month": None, "storage_gib": None}


def test_an_infinite_quota_is_refused(deployment, admin):
    team = fresh_team("ranges")
    deployment.team_key(team)
    response = admin.put(f"/admin/teams/{team}/quota", content=b'{"storage_gib": Infinity}',
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "storage_gib"


def test_set_quota_changes_what_is_given_and_null_resets_to_the_default(deployment, admin):
    team = fresh_team("set")
    defaults = deployment.settings
    with deployment.client(deployment.team_key(team)) as member:
        before = member.get("/quota").json()
        assert before == {
            "team": team,
            "quota": {"weight": defaults.default_weight, "max_running": defaults.default_max_running,
                      "max_queued": defaults.default_max_queued,
                      "gpu_hours_per_month": defaults.default_gpu_hours_per_month,
                      "storage_gib": defaults.default_storage_gib},
            "own": {"weight": None, "max_running": None, "max_queued": None, "gpu_hours_per_month": None,
                    "storage_gib": None},
            "use": {"running": 0, "queued": 0, "gpu_hours_this_month": 0.0, "storage_bytes": 0},
        }

        changed = set_quota(admin, team, weight=3, max_queued=7, gpu_hours_per_month=12.5)
        assert changed["quota"] == {**before["quota"], "weight": 3.0, "max_queued": 7, "gpu_hours_per_month": 12.5}
        assert changed["own"] == {"weight": 3.0, "max_running": None, "max_queued": 7, "gpu_hours_per_month": 12.5,
                                  "storage_gib": None}
        assert member.get("/quota").json() == changed == admin.get(f"/admin/teams/{team}/quota").json()

        # null resets one field; the fields left out stay as they are
        reset = set_quota(admin, team, weight=None, max_running=0)
        assert reset["own"] == {"weight": None, "max_running": 0, "max_queued": 7, "gpu_hours_per_month": 12.5,
                                "storage_gib": None}
        assert reset["quota"]["weight"] == defaults.default_weight and reset["quota"]["max_running"] == 0


def test_quota_routes_are_documented(deployment):
    with deployment.client(None) as anonymous:
        schema = anonymous.get("/openapi.json").json()
    assert schema["paths"]["/quota"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    put = schema["paths"]["/admin/teams/{team}/quota"]["put"]
    body = put["requestBody"]["content"]["application/json"]["schema"]
    assert put["requestBody"]["required"] and body["additionalProperties"] is False
    assert set(body["properties"]) == {"weight", "max_running", "max_queued", "gpu_hours_per_month", "storage_gib"}


# ------------------------------------------------------------------ storage_gib on uploads


def test_an_upload_over_storage_gib_is_refused_before_a_byte_is_stored(deployment, admin):
    team = fresh_team("storage")
    with deployment.client(deployment.team_key(team)) as member:
        set_quota(admin, team, storage_gib=1 / 1024)  # 1 MiB
        small = upload(member, content=rows(100 * 1024))
        assert small.status_code == 201, small.text
        kept = small.json()["bytes"]
        stored_before = team_objects(deployment, team)

        over = upload(member, content=rows(2 * MIB))  # with a Content-Length
        assert over.status_code == 429, over.text
        error = over.json()["error"]
        assert error["code"] == "quota_exceeded"
        assert "storage_gib" in error["message"] and "limit of 1.0 MiB" in error["message"]
        assert "DELETE /datasets/{id}" in error["message"] and "set-quota" in error["message"]
        assert error["details"] == {"limit": "storage_gib", "allowed_bytes": MIB, "current_bytes": kept,
                                    "in_flight_bytes": 0, "left_bytes": MIB - kept}
        assert [d["id"] for d in member.get("/datasets").json()["data"]] == [small.json()["id"]]
        assert team_objects(deployment, team) == stored_before
        assert member.get("/quota").json()["use"]["storage_bytes"] == kept


def test_an_upload_over_storage_gib_is_answered_before_its_body_is_read(deployment, admin):
    """With Expect: 100-continue the server says when it starts reading the body: here it answers 429
    instead, so not a byte of it was sent, let alone stored."""
    team = fresh_team("storage")
    key = deployment.team_key(team)
    set_quota(admin, team, storage_gib=1 / 1024)
    parts = urlsplit(deployment.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock, sock.makefile("rb") as reader:
        sock.sendall((f"POST /datasets HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                      f"Content-Length: {2 * MIB}\r\nExpect: 100-continue\r\n\r\n").encode())
        assert reader.readline().decode().startswith("HTTP/1.1 429"), "the server asked for the body"


def test_an_upload_in_progress_holds_its_room_so_uploads_at_once_cannot_fill_the_disk(deployment, admin):
    """Each upload was checked against the room read when it began: twenty slow uploads at once of a team
    with 10 MB of room had 200 MB on disk together before all but one were refused at their end."""
    team = fresh_team("storage")
    key = deployment.team_key(team)
    set_quota(admin, team, storage_gib=1 / 1024)  # 1 MiB
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.jsonl"\r\n\r\n'.encode()
            + rows(700 * 1024)[:700 * 1024 - 1] + b"\n" + f"\r\n--{BOUNDARY}--\r\n".encode())
    parts = urlsplit(deployment.url)
    with (socket.create_connection((parts.hostname, parts.port), timeout=30) as slow, slow.makefile("rb") as reader,
          deployment.client(key) as member):
        slow.sendall((f"POST /datasets HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        assert reader.readline().startswith(b"HTTP/1.1 100"), "the first upload was not let through"
        reader.readline()
        # The first holds 700 KiB of the room while it streams: a second as large no longer fits.
        second = upload(member, content=rows(700 * 1024))
        assert second.status_code == 429, second.text  # was 201: the first was not yet recorded
        error = second.json()["error"]
        assert "other uploads in progress hold" in error["message"] and error["details"]["in_flight_bytes"] > 600 * 1024
        slow.sendall(body)
        assert reader.readline().startswith(b"HTTP/1.1 201"), "the first upload was not kept"
    # Once recorded, what it holds is what the team keeps; a small one still fits beside it.
    with deployment.client(key) as member:
        assert upload(member, content=rows(100 * 1024)).status_code == 201
        assert member.get("/quota").json()["use"]["storage_bytes"] > 800 * 1024


def test_a_chunked_upload_is_cut_off_where_it_passes_storage_gib(deployment, admin):
    team = fresh_team("storage")
    with deployment.client(deployment.team_key(team)) as member:
        set_quota(admin, team, storage_gib=1 / 1024)
        response = chunked_upload(member, rows(3 * MIB))  # under QLORA_MAX_UPLOAD_BYTES (4 MiB), over the quota
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "quota_exceeded" and "storage_gib" in error["message"]
        assert "nothing of this upload was kept" in error["message"]
        assert member.get("/datasets").json()["data"] == []
        assert team_objects(deployment, team) == (set(), 0)

        # What fits is still taken, the same way.
        fits = chunked_upload(member, rows(512 * 1024))
        assert fits.status_code == 201, fits.text


def test_uploads_that_each_fit_alone_are_not_both_kept_past_the_limit(deployment, admin):
    """Both begin with room for either; the second to be recorded finds the first's bytes counted
    (under the team's lock) and is refused, its stored object removed."""
    team = fresh_team("storage")
    key = deployment.team_key(team)
    set_quota(admin, team, storage_gib=1 / 1024)
    start = threading.Barrier(2)

    def send(_):
        with deployment.client(key) as client:
            start.wait()
            return chunked_upload(client, rows(700 * 1024))

    with ThreadPoolExecutor(2) as pool:
        answers = sorted(pool.map(send, range(2)), key=lambda r: r.status_code)
    assert [r.status_code for r in answers] == [201, 429], [r.text for r in answers]
    assert answers[1].json()["error"]["code"] == "quota_exceeded"
    with deployment.client(key) as member:
        assert [d["id"] for d in member.get("/datasets").json()["data"]] == [answers[0].json()["id"]]
    keys, pending = team_objects(deployment, team)
    assert len(keys) == 1 and pending == 0


def test_an_upload_sent_again_with_its_key_gets_its_dataset_though_the_team_has_no_room_for_a_second(deployment,
                                                                                                       admin):
    """A replay keeps nothing, so storage_gib need not have room for it. The same key with a larger file
    cannot be a replay: refused as the key's reuse where it passes the first file's size, nothing kept."""
    team, key = fresh_team("storage"), {"Idempotency-Key": str(uuid.uuid4())}
    content = rows(700 * 1024)
    with deployment.client(deployment.team_key(team)) as member:
        set_quota(admin, team, storage_gib=1 / 1024)  # 1 MiB: room for the file once, not twice

        def send(data: bytes, chunked: bool = False):
            if chunked:
                return chunked_upload(member, data, headers=key)
            return member.post("/datasets", files={"file": ("farm.jsonl", data, "application/jsonl")}, headers=key)

        first = send(content)
        assert first.status_code == 201, first.text
        stored = team_objects(deployment, team)
        for chunked in (False, True):  # with a Content-Length, and without
            again = send(content, chunked)
            assert again.status_code == 201, again.text
            assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
            larger = send(content + ROW, chunked)
            assert larger.status_code == 422, larger.text
            error = larger.json()["error"]
            assert error["code"] == "idempotency_key_reused" and first.json()["id"] in error["message"]
            assert team_objects(deployment, team) == stored
        # A new key is a new upload, and the quota holds it to the room that is left.
        other = member.post("/datasets", files={"file": ("farm.jsonl", content, "application/jsonl")},
                            headers={"Idempotency-Key": str(uuid.uuid4())})
        assert other.status_code == 429 and other.json()["error"]["code"] == "quota_exceeded"
        assert [d["id"] for d in member.get("/datasets").json()["data"]] == [first.json()["id"]]
        assert team_objects(deployment, team) == stored


def test_a_team_at_its_storage_limit_uploads_nothing(deployment, admin):
    team = fresh_team("storage")
    with deployment.client(deployment.team_key(team)) as member:
        set_quota(admin, team, storage_gib=0)
        response = upload(member, content=ROW)
        assert response.status_code == 429, response.text
        assert "has no room for another upload" in response.json()["error"]["message"]
        assert member.get("/datasets").json()["data"] == []


def test_openai_file_upload_over_storage_gib_answers_in_openais_shape(deployment, admin):
    team = fresh_team("storage")
    with deployment.client(deployment.team_key(team)) as member:
        set_quota(admin, team, storage_gib=1 / 1024)
        sized = member.post("/v1/files", data={"purpose": "fine-tune"},
                            files={"file": ("farm.jsonl", rows(2 * MIB), "application/jsonl")})
        chunked = chunked_upload(member, rows(2 * MIB), path="/v1/files", fields={"purpose": "fine-tune"})
        for response in (sized, chunked):
            assert response.status_code == 429, response.text
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "insufficient_quota" and error["code"] == "quota_exceeded"
            assert error["param"] is None and "storage_gib" in error["message"]
        assert member.get("/v1/files").json()["data"] == []
        assert team_objects(deployment, team) == (set(), 0)


# ------------------------------------------------------------------ max_queued


def job_body(dataset_id: str) -> dict:
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=5, save_steps=10_000, eval_steps=10_000)
    return {"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"), **spec}  # no worker: it stays queued


def test_max_queued_holds_under_20_concurrent_submissions(deployment, admin, demo_data):
    team = fresh_team("queue")
    key = deployment.team_key(team)
    set_quota(admin, team, max_queued=5)
    with deployment.client(key) as member:
        dataset_id = upload(member, demo_data["train"]).json()["id"]
        start = threading.Barrier(20)

        def submit(_):
            with deployment.client(key) as client:
                start.wait()
                return client.post("/jobs", json=job_body(dataset_id))

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(submit, range(20)))
        accepted = [r.json()["id"] for r in answers if r.status_code == 201]
        refused = [r for r in answers if r.status_code != 201]
        try:
            assert len(accepted) == 5, [r.text for r in answers]
            assert len(refused) == 15 and all(r.status_code == 429 for r in refused), [r.text for r in refused]
            for response in refused:
                error = response.json()["error"]
                assert error["code"] == "quota_exceeded" and error["message"].startswith("max_queued:")
                assert "5 jobs queued" in error["message"] and "cancel" in error["message"]
            assert member.get("/quota").json()["use"]["queued"] == 5

            # A cancelled job frees its place for one more, and one only.
            assert member.post(f"/jobs/{accepted.pop()}/cancel").status_code == 200
            again = member.post("/jobs", json=job_body(dataset_id))
            assert again.status_code == 201, again.text
            accepted.append(again.json()["id"])
            assert member.post("/jobs", json=job_body(dataset_id)).status_code == 429

            # The OpenAI-compatible route refuses in OpenAI's shape.
            openai = member.post("/v1/fine_tuning/jobs", json={
                "model": "tiny", "training_file": f"file-{dataset_id}", "gpu_class": lane("nobody-listens")})
            assert openai.status_code == 429, openai.text
            error = openai.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "insufficient_quota" and error["code"] == "quota_exceeded"
            assert error["message"].startswith("max_queued:")
            assert openai.headers["x-should-retry"] == "false"  # the openai SDK would send it twice more
        finally:
            for job_id in accepted:  # leave nothing waiting on the shared deployment's queues
                member.post(f"/jobs/{job_id}/cancel")


def test_max_queued_zero_refuses_every_new_job(deployment, admin, demo_data):
    team = fresh_team("queue")
    with deployment.client(deployment.team_key(team)) as member:
        dataset_id = upload(member, demo_data["train"]).json()["id"]
        set_quota(admin, team, max_queued=0)
        refused = member.post("/jobs", json=job_body(dataset_id))
        assert refused.status_code == 429, refused.text
        assert "its limit is 0" in refused.json()["error"]["message"]
