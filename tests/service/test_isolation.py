"""Every object belongs to a team: another team's ids answer 404 like missing ones; no key or a revoked key, 401."""

from __future__ import annotations

import time

import pytest

from tests.deployment import upload
from worker.training.tiny import demo_spec


@pytest.fixture(scope="module")
def a_objects(team_a, demo_data):
    dataset = upload(team_a, demo_data["validation"]).json()
    body = {"dataset_id": dataset["id"], "gpu_class": "nobody-listens", **demo_spec("tiny")}
    job = team_a.post("/jobs", json=body).json()
    return dataset["id"], job["id"]


def routes_taking_ids(dataset_id: str, job_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/datasets/{dataset_id}"),
        ("GET", f"/datasets/{dataset_id}/content"),
        ("DELETE", f"/datasets/{dataset_id}"),
        ("GET", f"/jobs/{job_id}"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/metrics"),
        ("GET", f"/jobs/{job_id}/artifacts"),
        ("GET", f"/jobs/{job_id}/artifacts/adapter"),
        ("GET", f"/jobs/{job_id}/report"),
    ]


def test_other_teams_ids_answer_404_everywhere(a_objects, team_a, team_b):
    dataset_id, job_id = a_objects
    for method, path in routes_taking_ids(dataset_id, job_id):
        response = team_b.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    # ...and nothing team B tried changed anything of team A's.
    assert team_a.get(f"/datasets/{dataset_id}").status_code == 200
    assert team_a.get(f"/jobs/{job_id}").json()["status"] == "queued"
    # Team B cannot train on team A's data either.
    body = {"dataset_id": dataset_id, **demo_spec("tiny")}
    assert team_b.post("/jobs", json=body).status_code == 404
    # Lists show only one's own.
    assert dataset_id not in {d["id"] for d in team_b.get("/datasets").json()["data"]}
    assert job_id not in {j["id"] for j in team_b.get("/jobs").json()["data"]}


def test_missing_and_revoked_keys_answer_401(deployment, a_objects):
    dataset_id, job_id = a_objects
    anonymous = deployment.client(None)
    wrong = deployment.client("qlk_not-a-key")
    key = deployment.team_key("team-revoked")
    revoked = deployment.client(key)
    assert revoked.get("/jobs").status_code == 200
    from app.db import session_scope
    from app.teams import service

    with session_scope(deployment.settings.database_url) as session:
        service.revoke_key(session, key[:12])
    # The API trusts what it read of a key for QLORA_KEY_CACHE_S: the revocation holds within that.
    revoked_at = time.monotonic()
    while revoked.get("/jobs").status_code != 401:
        assert time.monotonic() - revoked_at < deployment.settings.key_cache_s + 5, "the revoked key still works"
        time.sleep(0.1)
    for client in (anonymous, wrong, revoked):
        for method, path in [("GET", "/jobs"), ("GET", "/datasets"), ("GET", "/models"), ("POST", "/jobs"),
                             *routes_taking_ids(dataset_id, job_id)]:
            response = client.request(method, path)
            assert response.status_code == 401, (method, path, response.text)
    assert "Bearer" in anonymous.get("/jobs").json()["error"]["message"]


def test_only_admin_keys_manage_the_registry(deployment, team_a, tiny_model_dir):
    body = {"name": "another", "path": str(tiny_model_dir)}
    assert team_a.post("/models", json=body).status_code == 403
    admin = deployment.client(deployment.team_key("ops", admin=True))
    created = admin.post("/models", json=body)
    assert created.status_code == 201, created.text
    assert "another" in {m["name"] for m in team_a.get("/models").json()}
    assert admin.post("/models", json=body).status_code == 409
    assert admin.delete("/models/another").status_code == 204
