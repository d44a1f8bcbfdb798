"""The fast tier: rules that need no deployment, on a SQLite file per test, in seconds.

Nothing here may use the session fixtures of tests/conftest.py that start Postgres, Redis or S3.
Settings are built from explicit arguments pointing into the test's tmp_path (the embedded default:
SQLite, a local storage directory, Celery's filesystem transport), with every QLORA_* variable of
the caller's environment removed, so a run never reads or writes the user's ~/.qlora.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from app.broker import celery_for
from app.config import Settings
from app.datasets.tables import Dataset
from app.db import engine_for, sessionmaker_for
from app.jobs import states
from app.jobs.tables import Job
from app.migrate import upgrade
from app.models.tables import RegisteredModel
from app.teams.service import Caller, create_key, create_team
from worker.training.spec import JobSpec


@pytest.fixture(autouse=True)
def _no_qlora_environment(monkeypatch, tmp_path):
    """The caller's QLORA_* variables (a real deployment's URLs, GPU classes) must not leak in."""
    for name in [n for n in os.environ if n.startswith("QLORA_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("QLORA_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory) -> Path:
    """The schema built once by the project's Alembic migrations; each test gets a copy of the file."""
    path = tmp_path_factory.mktemp("schema") / "qlora.db"
    upgrade(f"sqlite:///{path}")
    return path


def make_settings(home: Path, **overrides) -> Settings:
    return Settings(home=home, database_url=f"sqlite:///{home / 'qlora.db'}", storage_url=f"file://{home / 'storage'}",
                    broker_url="", **overrides)


@pytest.fixture
def settings(tmp_path, migrated_template) -> Iterator[Settings]:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(migrated_template, home / "qlora.db")
    settings = make_settings(home)
    yield settings
    engine_for(settings.database_url).dispose()


@pytest.fixture
def session(settings) -> Iterator[Session]:
    session = sessionmaker_for(settings.database_url)()
    yield session
    session.rollback()
    session.close()


def open_session(settings: Settings) -> Session:
    """A second connection, as another request or a worker would have."""
    return sessionmaker_for(settings.database_url)()


@pytest.fixture
def caller(session) -> Caller:
    team = create_team(session, "team-a")
    key, _secret = create_key(session, "team-a")
    session.commit()
    return Caller.of(team, key)


@pytest.fixture
def client(settings, session):
    """The API in this process (fastapi's TestClient), with team-a's key. A server's error is answered
    as the server answers it (a 500), not raised into the test."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    create_team(session, "team-a")
    _row, key = create_key(session, "team-a")
    session.commit()
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}, raise_server_exceptions=False)


@pytest.fixture
def world(session):
    """Two teams, a registered model, and a dataset each: what a claim needs to start a job."""
    session.add(RegisteredModel(name="llama-3-8b", path="/models/llama"))
    teams = {}
    for name in ("team-a", "team-b"):
        team = create_team(session, name)
        teams[name] = (team, Caller.of(team, create_key(session, name)[0]))
        session.add(Dataset(id=f"data-{name}", team_id=team.id, filename="d.jsonl", storage_key=f"{name}/d",
                            bytes=10, sha256="0" * 64, status="ready"))
    session.commit()
    return teams


def job_spec(**training) -> JobSpec:
    return JobSpec.parse({"base_model": "llama-3-8b", "training": {"max_steps": 10, **training}})


@pytest.fixture
def make_job(session, caller) -> Callable[..., str]:
    """A committed job of the caller's team in any state, as the API and the workers leave them."""

    def make(status: str = states.QUEUED, *, attempt: int = 0, **values) -> str:
        job = Job(team_id=caller.team_id, status=status, attempt=attempt, base_model="llama-3-8b",
                  spec=job_spec().model_dump(mode="json"), queue="gpu-default", **values)
        session.add(job)
        session.commit()
        return job.id

    return make


def received(settings: Settings, queue: str) -> list[tuple[str, list]]:
    """(task name, args) of each message waiting on `queue`, taken off it as a worker would."""
    out = []
    with celery_for(settings).connection_for_read() as connection:
        waiting = connection.SimpleQueue(queue)
        try:
            while True:
                try:
                    message = waiting.get(block=False)
                except waiting.Empty:
                    break
                out.append((message.headers["task"], message.payload[0]))
                message.ack()
        finally:
            waiting.close()
    return out
