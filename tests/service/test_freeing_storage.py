"""A team frees what its finished jobs keep in storage: their checkpoints (DELETE /jobs/{id}/checkpoints)
and any artifact (DELETE /jobs/{id}/artifacts/{kind}), through the API on S3 and the CLI. The objects
leave the store, storage_gib counts less, the job's events say so; a job that has not finished keeps its
checkpoints, an adapter a pending job starts from stays, and another team's job is a 404."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.db import session_scope
from app.jobs import states
from app.jobs.tables import Artifact, Checkpoint, Job
from app.storage import make_key, storage_from_settings
from tests.service.test_cli_client import clean_env, qlora
from tests.service.test_preference_jobs import succeeded_job


@pytest.fixture(scope="module")
def storage(deployment):
    return storage_from_settings(deployment.settings)


def stored(storage, team_id: str, kind: str, size: int) -> tuple[str, int, str]:
    data = bytes(size)
    with storage.writer(make_key(team_id, kind)) as writer:
        writer.write(data)
        return writer.commit().key, size, hashlib.sha256(data).hexdigest()


def finished_job_keeping(deployment, storage, team: str, status: str = states.SUCCEEDED,
                         checkpoints: int = 2) -> tuple[str, list[str], dict[str, str]]:
    """A finished job as its worker leaves it: checkpoints and adapter and merged artifacts, each a stored
    object; its id, the checkpoints' keys and the artifacts' keys by kind."""
    job_id = succeeded_job(deployment, team, adapter=False, status=status)
    with session_scope(deployment.settings.database_url) as session:
        job = session.get(Job, job_id)
        checkpoint_keys = []
        for step in range(1, checkpoints + 1):
            key, size, sha = stored(storage, job.team_id, "checkpoints", 40_000)
            session.add(Checkpoint(job_id=job_id, attempt=1, step=step * 10, storage_key=key, bytes=size, sha256=sha))
            checkpoint_keys.append(key)
        artifact_keys = {}
        for kind, size in (("adapter", 30_000), ("merged", 500_000)):
            key, size, sha = stored(storage, job.team_id, "artifacts", size)
            session.add(Artifact(job_id=job_id, kind=kind, storage_key=key, bytes=size, sha256=sha))
            artifact_keys[kind] = key
    return job_id, checkpoint_keys, artifact_keys


def storage_bytes(client) -> int:
    return client.get("/quota").json()["use"]["storage_bytes"]


def test_a_finished_jobs_checkpoints_and_merged_model_are_deleted_and_free_their_bytes(
        deployment, storage, team_a):
    job_id, checkpoint_keys, artifact_keys = finished_job_keeping(deployment, storage, "team-a")
    before = storage_bytes(team_a)

    freed = team_a.delete(f"/jobs/{job_id}/checkpoints")
    assert freed.status_code == 200, freed.text
    assert freed.json() == {"job_id": job_id, "deleted": 2, "bytes": 80_000}
    assert team_a.get(f"/jobs/{job_id}/checkpoints").json() == []
    assert not any(storage.exists(key) for key in checkpoint_keys)
    assert storage_bytes(team_a) == before - 80_000
    again = team_a.delete(f"/jobs/{job_id}/checkpoints")  # nothing left: nothing more to free
    assert again.status_code == 200 and again.json()["deleted"] == 0

    merged = team_a.delete(f"/jobs/{job_id}/artifacts/merged")
    assert merged.status_code == 200, merged.text
    assert merged.json() == {"job_id": job_id, "kind": "merged", "deleted": True, "bytes": 500_000}
    assert [a["kind"] for a in team_a.get(f"/jobs/{job_id}/artifacts").json()] == ["adapter"]
    assert not storage.exists(artifact_keys["merged"]) and storage.exists(artifact_keys["adapter"])
    assert storage_bytes(team_a) == before - 580_000
    gone = team_a.delete(f"/jobs/{job_id}/artifacts/merged")
    assert gone.status_code == 404 and "no 'merged' artifact" in gone.json()["error"]["message"]

    events = [(e["type"], e["message"]) for e in team_a.get(f"/jobs/{job_id}/events").json()]
    assert ("checkpoints_deleted", "2 checkpoints deleted (78.1 KiB freed)") in events
    assert ("artifact_deleted", "merged deleted (488.3 KiB freed)") in events


def test_a_job_that_has_not_finished_keeps_its_checkpoints(deployment, storage, team_a):
    job_id, checkpoint_keys, _ = finished_job_keeping(deployment, storage, "team-a", status=states.PAUSED)
    refused = team_a.delete(f"/jobs/{job_id}/checkpoints")
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "job_not_finished"
    assert error["message"] == (f"job {job_id} is paused: its checkpoints are what it resumes from; cancel it, or "
                                "wait for it to finish")
    assert len(team_a.get(f"/jobs/{job_id}/checkpoints").json()) == 2
    assert all(storage.exists(key) for key in checkpoint_keys)


def test_an_adapter_a_pending_job_starts_from_stays_until_that_job_finishes(deployment, storage, team_a):
    job_id, _, artifact_keys = finished_job_keeping(deployment, storage, "team-a")
    with session_scope(deployment.settings.database_url) as session:
        follower = session.get(Job, succeeded_job(deployment, "team-a", adapter=False, status=states.QUEUED))
        follower.initial_job_id = job_id
        follower_id = follower.id
    refused = team_a.delete(f"/jobs/{job_id}/artifacts/adapter")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "artifact_in_use"
    assert f"{follower_id} (queued)" in refused.json()["error"]["message"]
    assert storage.exists(artifact_keys["adapter"])

    team_a.post(f"/jobs/{follower_id}/cancel")
    assert team_a.delete(f"/jobs/{job_id}/artifacts/adapter").status_code == 200
    assert not storage.exists(artifact_keys["adapter"])


def test_another_teams_job_is_not_found_and_keeps_everything(deployment, storage, team_b):
    job_id, checkpoint_keys, artifact_keys = finished_job_keeping(deployment, storage, "team-a")
    for path in (f"/jobs/{job_id}/checkpoints", f"/jobs/{job_id}/artifacts/merged"):
        answer = team_b.delete(path)
        assert answer.status_code == 404, answer.text
    assert all(storage.exists(key) for key in [*checkpoint_keys, *artifact_keys.values()])


def test_the_cli_deletes_them_and_says_what_it_freed(deployment, storage, tmp_path):
    job_id, checkpoint_keys, artifact_keys = finished_job_keeping(deployment, storage, "team-a")
    env = clean_env(tmp_path) | {"QLORA_URL": deployment.url, "QLORA_API_KEY": deployment.team_key("team-a")}
    done = qlora(env, "jobs", "delete-checkpoints", job_id)  # on a pipe: JSON
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"job_id": job_id, "deleted": 2, "bytes": 80_000}
    done = qlora(env | {"COLUMNS": "200"}, "jobs", "delete-artifact", job_id, "--kind", "merged", "--table")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"job {job_id}: merged deleted, 488.3 KiB freed"
    refused = qlora(env, "jobs", "delete-artifact", job_id, "--kind", "merged")
    assert refused.returncode != 0 and "no 'merged' artifact" in refused.stderr


def test_two_deletes_at_once_free_the_checkpoints_once(deployment, storage, team_a):
    """Without the team's row taken first, the second deleted rows the first had deleted: a 500."""
    from concurrent.futures import ThreadPoolExecutor

    job_id, checkpoint_keys, _ = finished_job_keeping(deployment, storage, "team-a", checkpoints=3)
    clients = [deployment.client(deployment.team_key("team-a")) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda client: client.delete(f"/jobs/{job_id}/checkpoints"), clients))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert sorted(a.json()["deleted"] for a in answers) == [0, 3]
    assert not any(storage.exists(key) for key in checkpoint_keys)
