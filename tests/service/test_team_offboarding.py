"""Offboarding a team with a real worker, Postgres, Redis and the admin routes: disabled, its keys answer 401
saying why, its running job pauses at a checkpoint (kept), its queued job is held with the reason while the
worker stands free; enabled, the queued job runs and the paused one stays paused. And migration 0018 on
SQLite and Postgres."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa
from alembic import command

from app.db import engine_for, session_scope
from app.jobs.tables import Checkpoint, Job
from app.migrate import alembic_config, upgrade
from app.scheduling import service as scheduling
from app.teams import admin
from tests.deployment import upload, wait_for_status
from worker.training.tiny import demo_spec

FINISHED = ("succeeded", "failed", "cancelled")


def job_body(dataset_id: str, max_steps: int) -> dict:
    spec = demo_spec("tiny")
    spec["training"].update(max_steps=max_steps, logging_steps=1, eval_steps=1000, save_steps=1000)
    spec["output"], spec["eval"] = {"merge": False}, {"prompts": 0}
    return {"dataset_id": dataset_id, **spec}


def job_row(deployment, job_id: str) -> Job:
    with session_scope(deployment.settings.database_url) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def until(check, timeout: float = 120, what: str = ""):
    for _ in range(int(timeout / 0.2)):
        found = check()
        if found:
            return found
        threading.Event().wait(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_a_disabled_team_is_refused_its_job_paused_and_held_and_enabled_again(deployment, worker, demo_data):
    name, ops_name = f"leaving-{uuid.uuid4().hex[:6]}", f"ops-{uuid.uuid4().hex[:6]}"
    team = deployment.client(deployment.team_key(name))
    ops = deployment.client(deployment.team_key(ops_name, admin=True))
    dataset_id = upload(team, demo_data["train"]).json()["id"]
    long_job = team.post("/jobs", json=job_body(dataset_id, 400)).json()
    until(lambda: team.get(f"/jobs/{long_job['id']}").json()["progress"]["step"] >= 3, what="the long job trains")
    held = team.post("/jobs", json=job_body(dataset_id, 3)).json()  # the one worker is busy: it waits

    assert ops.post(f"/admin/teams/{ops_name}/disable").json()["error"]["code"] == "own_team"  # 409: not itself
    disabled = ops.post(f"/admin/teams/{name}/disable")
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["pausing"] == [long_job["id"]] and disabled.json()["disabled"]

    refused = team.get(f"/jobs/{long_job['id']}")  # this API process forgot the team's keys at once
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "team_disabled"
    assert f"team '{name}' is disabled" in refused.json()["error"]["message"]

    # The worker saw the pause, saved a checkpoint and stopped: paused, the checkpoint kept, the GPU free.
    paused = until(lambda: (j := job_row(deployment, long_job["id"])).status == "paused" and j, what="the pause")
    with session_scope(deployment.settings.database_url) as session:
        steps = list(session.scalars(sa.select(Checkpoint.step).where(Checkpoint.job_id == long_job["id"])))
    assert steps == [paused.step] and 3 <= paused.step < 400
    # The free worker took the held job's message and found nothing it may start: still queued, saying why.
    until(lambda: job_row(deployment, held["id"]).dispatched_at is None, what="the held job's message spent")
    queued = job_row(deployment, held["id"])
    assert queued.status == "queued" and queued.attempt == 0
    with session_scope(deployment.settings.database_url) as session:
        standing = scheduling.standings(session, deployment.settings, queued.queue)[held["id"]]
    assert standing.waiting_for == "team_disabled"

    listed = {t["name"]: t for t in ops.get("/admin/teams").json()}
    shown = listed[name]
    assert (shown["disabled"], shown["keys_live"], shown["queued"], shown["running"], shown["paused"]) == (True, 1, 1, 0, 1)
    assert shown["gpu_hours_this_month"] > 0 and shown["storage_bytes"] > 0
    assert team.get("/admin/teams").status_code == 401  # (enabled, a team key is answered 403 here)

    assert ops.post("/admin/teams/nosuch-team/disable").status_code == 404
    enabled = ops.post(f"/admin/teams/{name}/enable")
    assert enabled.status_code == 200 and not enabled.json()["disabled"]
    assert team.get("/admin/teams").status_code == 403  # its key works again, and is no admin's
    # The scheduler sends the held job's message again; the worker runs it. The paused one stays paused.
    done = wait_for_status(team, held["id"], FINISHED, timeout=180, deployment=deployment)
    assert done["status"] == "succeeded", done["error"]
    still = team.get(f"/jobs/{long_job['id']}").json()
    assert still["status"] == "paused" and still["progress"]["step"] == paused.step
    events = [e["type"] for e in team.get(f"/jobs/{long_job['id']}/events").json()]
    assert events.count("pause_requested") == 1 and "paused" in events
    assert team.get(f"/datasets/{dataset_id}").status_code == 200  # nothing of the team was deleted
    assert team.post(f"/jobs/{long_job['id']}/cancel").json()["status"] == "cancelled"


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_migration_0018_enables_every_team_and_downgrades_keeping_them(database, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'qlora.db'}" if database == "sqlite" else request.getfixturevalue("database_url")
    if database == "sqlite":
        command.upgrade(alembic_config(url), "0017")
    else:
        command.downgrade(alembic_config(url), "0017")
    with engine_for(url).begin() as conn:
        conn.execute(sa.text("INSERT INTO teams (id, name, weight, fair_share_usage_s, created_at) "
                             "VALUES ('t1', 'research', 2.0, 0, CURRENT_TIMESTAMP)"))
    engine_for(url).dispose()

    upgrade(url)
    with session_scope(url) as session:
        [research] = admin.list_teams(session)
        assert (research.name, research.disabled, research.disabled_at) == ("research", False, None)
        assert admin.disable_team(session, "research").disabled
    engine_for(url).dispose()

    command.downgrade(alembic_config(url), "0017")
    with engine_for(url).connect() as conn:
        assert conn.execute(sa.text("SELECT name, weight FROM teams")).all() == [("research", 2.0)]
        assert "disabled_at" not in {c["name"] for c in sa.inspect(conn).get_columns("teams")}
    engine_for(url).dispose()
    upgrade(url)
