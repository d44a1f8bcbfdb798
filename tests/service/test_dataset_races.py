"""A dataset deleted while a job on it is being created, on Postgres: the creation answers 404, or the
delete 409, never a 500 (a failed insert) and never a queued job whose dataset is gone (the foreign
key's SET NULL). Both sides take the team's row (quotas.lock_team).

The two orders are set up with the service functions the routes call, each in its own connection:
the delete lands in the preflight's seconds (the window a probe hit through the API with a 1.4 MB
dataset), or while the creation's transaction is still open."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import select

from app.datasets import service as datasets
from app.db import session_scope, sessionmaker_for
from app.errors import Conflict, NotFound
from app.jobs import preflight
from app.jobs import service as jobs
from app.jobs.tables import Job
from app.storage.base import storage_from_settings
from app.teams.service import Caller, authenticate, hash_key
from tests.deployment import upload, wait_for_a_lock_wait
from worker.training.tiny import demo_spec


@pytest.fixture
def team_dataset(deployment, demo_data) -> tuple[Caller, str]:
    name = f"race-{uuid.uuid4().hex[:6]}"
    key = deployment.team_key(name)
    dataset_id = upload(deployment.client(key), demo_data["train"]).json()["id"]
    with session_scope(deployment.settings.database_url) as session:
        return authenticate(session, hash_key(key)), dataset_id  # the caller the key is (a job's creation reads it again)


def job_body(dataset_id: str) -> dict:
    return {"dataset_id": dataset_id, **demo_spec("tiny")}


def jobs_of(deployment, caller: Caller) -> list[Job]:
    with session_scope(deployment.settings.database_url) as session:
        return list(session.scalars(select(Job).where(Job.team_id == caller.team_id)))


def test_a_dataset_deleted_during_the_preflight_makes_the_creation_a_404(deployment, team_dataset, monkeypatch):
    caller, dataset_id = team_dataset
    settings, storage = deployment.settings, storage_from_settings(deployment.settings)

    def delete_meanwhile(*args, **kwargs) -> preflight.Checked:  # the preflight's seconds, and a delete in them
        with session_scope(settings.database_url) as other:
            datasets.delete(other, storage, caller, dataset_id)
        return preflight.Checked(None, "preflight not run")
    monkeypatch.setattr(jobs.preflight, "check", delete_meanwhile)

    session = sessionmaker_for(settings.database_url)()
    try:
        with pytest.raises(NotFound, match=f"dataset_id: no dataset '{dataset_id}'"):  # was a foreign-key violation
            jobs.create(session, settings, caller, job_body(dataset_id), storage=storage)
    finally:
        session.rollback()
        session.close()
    assert jobs_of(deployment, caller) == []


def test_a_delete_during_an_uncommitted_creation_waits_and_answers_409(deployment, team_dataset):
    caller, dataset_id = team_dataset
    settings, storage = deployment.settings, storage_from_settings(deployment.settings)
    session = sessionmaker_for(settings.database_url)()
    refused: list[Conflict] = []

    def delete() -> None:
        try:
            with session_scope(settings.database_url) as other:
                datasets.delete(other, storage, caller, dataset_id)
        except Conflict as exc:
            refused.append(exc)
    try:
        job = jobs.create(session, settings, caller, job_body(dataset_id))
        deleting = threading.Thread(target=delete)
        deleting.start()
        wait_for_a_lock_wait(settings.database_url, "the delete")  # it waits for the creation's transaction
        session.commit()
        deleting.join(30)
    finally:
        session.close()
    with session_scope(settings.database_url) as session:
        # The job is queued for the shared worker: cancelled, it leaves the next test's jobs a free worker
        # instead of a 160-step run to wait behind.
        jobs.cancel(session, caller, job.id)
    # Before, the delete went through once the creation committed, and the queued job's dataset_id became NULL.
    assert refused and f"used by jobs that have not finished: {job.id} (queued)" in str(refused[0])
    (stored,) = jobs_of(deployment, caller)
    assert stored.dataset_id == dataset_id


