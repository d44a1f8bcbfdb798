"""Every object belongs to a team: another team's ids answer 404 like missing ones; no key or a revoked key, 401."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.deployment import lane, upload
from worker.training.tiny import demo_spec


@pytest.fixture(scope="module")
def a_objects(team_a, demo_data):
    dataset = upload(team_a, demo_data["validation"]).json()
    body = {"dataset_id": dataset["id"], "gpu_class": lane("nobody-listens"), **demo_spec("tiny")}
    job = team_a.post("/jobs", json=body).json()
    return dataset["id"], job["id"]


# Path parameters that name one of a team's objects ({kind} only ever follows a job's id).
OBJECT_PARAMS = {"{dataset_id}", "{job_id}", "{file_id}", "{kind}"}
MISSING_DATASET, MISSING_JOB = "f" * 32, "0" * 32


def routes_taking_ids(deployment, dataset_id: str, job_id: str) -> list[tuple[str, str]]:
    """Every route whose path names a team's object, read from /openapi.json (so a route added later is
    checked without being listed here), with these ids in it: /v1's take them with OpenAI's prefixes."""
    paths = deployment.client(None).get("/openapi.json").json()["paths"]
    routes = []
    for path, operations in paths.items():
        params = set(re.findall(r"\{\w+\}", path))
        if not params or not params <= OBJECT_PARAMS:  # /models/{name}, /admin/teams/{team}: nobody's object
            continue
        v1 = path.startswith("/v1/")
        filled = (path.replace("{job_id}", ("ftjob-" if v1 else "") + job_id).replace("{dataset_id}", dataset_id)
                  .replace("{file_id}", "file-" + dataset_id).replace("{kind}", "adapter"))
        routes += [(method.upper(), filled) for method in operations if method != "head"]
    assert len(routes) >= 25, routes  # the datasets', the jobs' and /v1's: the schema was read
    return routes


def as_missing(text: str, dataset_id: str, job_id: str) -> str:
    return text.replace(dataset_id, MISSING_DATASET).replace(job_id, MISSING_JOB)


def signed_by(deployment, client, path: str) -> str:
    """A route a browser's download link names (no key: a signature instead), signed as the client's own
    key may sign it: a link's holder cannot sign, and a key's holder may sign only as its own team."""
    from app.db import session_scope
    from app.jobs.service import link_message
    from app.teams import service as teams

    match = re.fullmatch(r"/jobs/(\w+)/artifacts/(\w+)/signed", path)
    if match is None:
        return path
    expires = int(time.time()) + 600
    with session_scope(deployment.settings.database_url) as session:
        caller = teams.authenticate(session, teams.hash_key(client.headers["authorization"].removeprefix("Bearer ")))
        signature = teams.sign(session, caller, link_message(*match.groups(), expires))
    return f"{path}?key_id={caller.key_id}&expires={expires}&signature={signature}"


def test_other_teams_ids_answer_404_everywhere(deployment, a_objects, team_a, team_b):
    dataset_id, job_id = a_objects
    for method, path in routes_taking_ids(deployment, dataset_id, job_id):
        response = team_b.request(method, signed_by(deployment, team_b, path))
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
        # ...answered as a missing id is, word for word: nothing tells that the object exists.
        missing = team_b.request(method, signed_by(deployment, team_b, as_missing(path, dataset_id, job_id)))
        assert missing.status_code == 404 and missing.text == as_missing(response.text, dataset_id, job_id), (path, missing.text)
    # /v1's lists page after an id: another team's is as missing there too.
    for path in (f"/v1/files?after=file-{dataset_id}", f"/v1/fine_tuning/jobs?after=ftjob-{job_id}"):
        response, missing = team_b.get(path), team_b.get(as_missing(path, dataset_id, job_id))
        assert response.status_code == 404 and missing.text == as_missing(response.text, dataset_id, job_id), path
    # ...and nothing team B tried changed anything of team A's.
    assert team_a.get(f"/datasets/{dataset_id}").status_code == 200
    assert team_a.get(f"/jobs/{job_id}").json()["status"] == "queued"
    # Team B cannot train on team A's data, validate with it, start from A's job, nor preflight any of
    # them, natively or through /v1: each answers as a missing id.
    own = upload(team_b, content=b'{"prompt": "a", "completion": "b"}\n').json()["id"]
    spec = {"gpu_class": lane("nobody-listens"), **demo_spec("tiny")}
    native = [{"dataset_id": dataset_id}, {"dataset_id": own, "validation_dataset_id": dataset_id},
              {"dataset_id": own, "initial_job_id": job_id}]
    for path, body in [*((p, {**b, **spec}) for p in ("/jobs", "/jobs/preflight") for b in native),
                       ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": f"file-{dataset_id}"}),
                       ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": f"file-{own}",
                                                 "validation_file": f"file-{dataset_id}"})]:
        response = team_b.post(path, json=body)
        assert response.status_code == 404, (path, body, response.text)
        missing = team_b.post(path, json=json.loads(as_missing(json.dumps(body), dataset_id, job_id)))
        assert missing.text == as_missing(response.text, dataset_id, job_id), (path, body, missing.text)
    # Lists show only one's own.
    assert dataset_id not in {d["id"] for d in team_b.get("/datasets").json()["data"]}
    assert job_id not in {j["id"] for j in team_b.get("/jobs").json()["data"]}
    assert f"file-{dataset_id}" not in {f["id"] for f in team_b.get("/v1/files").json()["data"]}
    assert f"ftjob-{job_id}" not in {j["id"] for j in team_b.get("/v1/fine_tuning/jobs").json()["data"]}


def test_missing_and_revoked_keys_answer_401(deployment, a_objects):
    dataset_id, job_id = a_objects
    anonymous = deployment.client(None)
    wrong = deployment.client("qlk_not-a-key")
    key = deployment.team_key("team-revoked")
    revoked = deployment.client(key)
    assert revoked.get("/jobs").status_code == 200
    read_by = time.monotonic()  # the API has read the key by now, and keeps what it read from then at the latest
    from app.db import session_scope
    from app.teams import service

    with session_scope(deployment.settings.database_url) as session:
        service.revoke_key(session, key[:12])
    # The API trusts what it read of a key for QLORA_KEY_CACHE_S: the revocation holds once that has passed
    # since its last read. Waited out from the read itself (not polled against a window after the revoke,
    # which a loaded machine's slow answers could outlast while the key was refused all along).
    time.sleep(max(0.0, read_by + deployment.settings.key_cache_s - time.monotonic()))
    assert revoked.get("/jobs").status_code == 401, "the revoked key still works past QLORA_KEY_CACHE_S"
    # A browser's download link takes no key, but its key's signature: a revoked key's links answer 403
    # (test_resumable_downloads.py, test_a_local_link_altered_expired_or_of_a_revoked_key_is_refused).
    keyed = [(method, path) for method, path in routes_taking_ids(deployment, dataset_id, job_id)
             if not path.endswith("/signed")]
    for client in (anonymous, wrong, revoked):
        for method, path in [("GET", "/jobs"), ("GET", "/datasets"), ("GET", "/models"), ("POST", "/jobs"), *keyed]:
            response = client.request(method, path)
            assert response.status_code == 401, (method, path, response.text)
    assert "Bearer" in anonymous.get("/jobs").json()["error"]["message"]



def test_a_request_is_one_key_or_none(deployment, team_a):
    """A key is read as its header says, however it is spelled; but two Authorization headers are refused,
    whichever comes first: a proxy in front that read the other one would disagree on who is calling."""
    anonymous = deployment.client(None)
    key = team_a.headers["Authorization"].removeprefix("Bearer ")
    for spelled in (f"bearer {key}", f"BEARER {key}", f"Bearer   {key}"):
        assert anonymous.get("/quota", headers={"Authorization": spelled}).status_code == 200, spelled
    admin = deployment.team_key("ops", admin=True)
    for pair in ((key, "qlk_not-a-key"), ("qlk_not-a-key", key), (key, admin), (admin, key), (key, key)):
        headers = [("Authorization", f"Bearer {k}") for k in pair]
        for path in ("/quota", "/usage?all_teams=true"):
            response = anonymous.get(path, headers=headers)
            assert response.status_code == 401, (pair, path, response.text)
            assert "2 Authorization headers" in response.json()["error"]["message"]
    for header in (f"Bearer {key}, Bearer {admin}", f"Basic {key}", key, "Bearer qlk_" + "a" * 60_000):
        assert anonymous.get("/quota", headers={"Authorization": header}).status_code == 401, header[:40]
    assert anonymous.get("/admin/teams/team-a/quota", headers={"Authorization": f"Bearer {key}"}).status_code == 403

def test_only_admin_keys_manage_the_registry(deployment, team_a, tiny_model_dir):
    body = {"name": "another", "path": str(tiny_model_dir)}
    assert team_a.post("/models", json=body).status_code == 403
    admin = deployment.client(deployment.team_key("ops", admin=True))
    created = admin.post("/models", json=body)
    assert created.status_code == 201, created.text
    assert "another" in {m["name"] for m in team_a.get("/models").json()}
    assert admin.post("/models", json=body).status_code == 409
    assert team_a.delete("/models/another", params={"force": "true"}).status_code == 403  # forced, still admins only
    assert admin.delete("/models/another", params={"force": "true"}).status_code == 204
