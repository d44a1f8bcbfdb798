"""Removing a base model on Postgres while a job on it is being created: the removal waits for the job's
transaction, then sees the job and is refused. Without the lock it counted no job, removed the model, and the job
committed after it failed when a worker took it ("base model ... is no longer registered")."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.config import Settings
from app.datasets.tables import Dataset
from app.db import session_scope, sessionmaker_for
from app.errors import Conflict, Invalid
from app.jobs import runs, states
from app.jobs import service as jobs_service
from app.jobs.tables import Job
from app.models import service as models
from app.models.tables import RegisteredModel
from app.quotas.service import lock_team
from app.teams.service import Caller, create_key, create_team
from tests.deployment import wait_for_a_lock_wait
from tests.fast.conftest import job_spec
from tests.fast.test_scheduling_service import QUEUE
from tests.model_configs import LLAMA3_8B


def removal_during_a_creation(database_url: str, *, force: bool, running: bool) -> tuple[object, str, str | None]:
    """A team with a dataset (and, `running`, a job running on the model); a job being created on the model, at its
    last read of it (under its team's row, after the preflight: POST /jobs and the OpenAI route both read it so);
    the model's removal (`force` or not) started meanwhile, and the job committed once the removal waits. The
    removal's outcome ("removed", or what it raised), the created job's id and the running one's."""
    with session_scope(database_url) as session:
        session.add(RegisteredModel(name="llama-3-8b", path="/models/llama"))
        team = create_team(session, "team-a")
        session.add(Dataset(id="data", team_id=team.id, filename="d.jsonl", storage_key="k", bytes=10, sha256="0" * 64,
                            status="ready"))
        team_id, running_id = team.id, None
        if running:
            job = Job(team_id=team.id, status=states.RUNNING, attempt=1, worker="w1", base_model="llama-3-8b",
                      queue=QUEUE, dataset_id="data", spec=job_spec().model_dump(mode="json"), priority=1)
            session.add(job)
            session.flush()
            running_id = job.id
    creating = sessionmaker_for(database_url)()
    try:
        model = jobs_service._registered_model(creating, job_spec())
        jobs_service._still_registered(creating, job_spec(), model)
        removal: dict[str, object] = {}

        def remove() -> None:
            try:
                with session_scope(database_url) as session:
                    models.remove_model(session, model.name, force=force)
                removal["outcome"] = "removed"
            except Exception as exc:  # noqa: BLE001 - the caller asserts what it is
                removal["outcome"] = exc

        remover = threading.Thread(target=remove)
        remover.start()
        wait_for_a_lock_wait(database_url, "the removal, on the model's row,")
        created = Job(team_id=team_id, status=states.QUEUED, base_model=model.name, queue=QUEUE, dataset_id="data",
                      spec=job_spec().model_dump(mode="json"), priority=1)
        creating.add(created)
        creating.commit()
        created_id = created.id
        remover.join(30)
    finally:
        creating.close()
    return removal.get("outcome"), created_id, running_id


def test_a_model_removed_while_a_job_on_it_is_created_is_refused_once_the_job_commits(database_url):
    outcome, _created, _running = removal_during_a_creation(database_url, force=False, running=False)
    assert isinstance(outcome, Conflict), outcome
    assert "1 queued" in str(outcome)
    with session_scope(database_url) as session:
        assert [m.name for m in models.list_models(session)] == ["llama-3-8b"]


def test_a_model_removed_or_registered_again_during_a_jobs_preflight_refuses_the_job(database_url):
    """The preflight commits to give its connection back while the child works, and the model's row lock went with
    it: a removal then counted no job and went ahead, and the job committed after it. Read again before the job
    is made: gone, the job is refused as naming no model; registered again, it is refused as admitted on another."""
    for registered_again in (False, True):
        with session_scope(database_url) as session:
            session.add(RegisteredModel(name="llama-3-8b", path="/models/llama"))
        creating = sessionmaker_for(database_url)()
        try:
            model = jobs_service._registered_model(creating, job_spec())
            creating.commit()  # what preflight.check does before it asks the child
            with session_scope(database_url) as session:
                models.remove_model(session, model.name)  # not held up: the creation holds no lock now
                if registered_again:
                    session.add(RegisteredModel(name="llama-3-8b", path="/models/llama-v2"))
            with pytest.raises(Conflict if registered_again else Invalid, match="base_model"):
                jobs_service._still_registered(creating, job_spec(), model)
        finally:
            creating.close()
        with session_scope(database_url) as session:
            session.query(RegisteredModel).delete()


def test_a_models_removal_does_not_wait_for_the_preflight_of_a_job_on_it(database_url):
    """The creation's first read of the model (_checked_inputs) took its row shared, held through the preflight (the
    wait for a child, the datasets' download: minutes) and by POST /jobs/preflight, which makes no job: a removal
    waited all that time, and for as long as creations on the model overlapped (Postgres lets a shared lock past a
    waiting FOR UPDATE). Only the last read, after the preflight, holds it; a removal before it refuses the job."""
    with session_scope(database_url) as session:
        session.add(RegisteredModel(name="llama-3-8b", path="/models/llama"))
        team = create_team(session, "team-a")
        key, _secret = create_key(session, "team-a")
        session.add(Dataset(id="data", team_id=team.id, filename="d.jsonl", storage_key="k", bytes=10, sha256="0" * 64,
                            status="ready", format="text"))
        caller = Caller(team_id=team.id, team_name="team-a", key_id=key.id, is_admin=False)
    creating = sessionmaker_for(database_url)()
    try:
        model, _tokens = jobs_service._checked_inputs(creating, caller, {"dataset_id": "data"}, job_spec())
        # the preflight under way: its transaction still open
        with session_scope(database_url) as session:
            session.execute(text("SET LOCAL lock_timeout = '10s'"))  # the old code waited here, then failed
            models.remove_model(session, model.name)
        with pytest.raises(Invalid, match="not a registered model"):
            jobs_service._still_registered(creating, job_spec(), model)
    finally:
        creating.close()


def test_a_model_removed_by_force_while_a_job_on_it_is_created_cancels_that_job_and_stops_the_running_one(database_url):
    """Forced, the removal still waits for the job being created on the model, then ends it with the others: a job
    committed after it would fail when a worker took it. A running job is asked to stop as a cancel asks it."""
    outcome, created_id, running_id = removal_during_a_creation(database_url, force=True, running=True)
    assert outcome == "removed", outcome
    why = "base model llama-3-8b was removed by an admin"
    with session_scope(database_url) as session:
        assert models.list_models(session) == []
        assert (session.get(Job, created_id).status, session.get(Job, created_id).error) == (states.CANCELLED, why)
        assert (session.get(Job, running_id).status, session.get(Job, running_id).error) == (states.CANCELLING, why)


def request_finish_and_forced_removal(database_url: str, team_id: str, running_id: str,
                                      request: tuple[str, Callable[[Session], object]]) -> dict[str, object]:
    """With the team's row held a moment (another request of the team), in turn each to its wait: `request` (a
    creation, a resume), the worker ending job `running_id`, and the base model's forced removal; then the team's row
    let go, the request first in line for it. What each returned, or raised, by name ("finish", "remove")."""
    outcomes: dict[str, object] = {}

    def run(name: str, work: Callable[[Session], object]) -> None:
        try:
            with session_scope(database_url) as session:
                outcomes[name] = work(session)
        except Exception as exc:  # noqa: BLE001 - the caller asserts what it is
            outcomes[name] = exc

    holder = sessionmaker_for(database_url)()
    try:
        lock_team(holder, team_id)
        threads = [threading.Thread(target=run, args=(name, work)) for name, work in (
            request,
            ("finish", lambda s: runs.finish(s, running_id, 1, states.SUCCEEDED)),
            ("remove", lambda s: models.remove_model(s, "llama-3-8b", force=True)))]
        for waiting, thread in enumerate(threads, start=1):  # each in turn, to its wait
            thread.start()
            wait_for_a_lock_wait(database_url, f"{thread.name}", count=waiting)
        holder.commit()
        for thread in threads:
            thread.join(30)
    finally:
        holder.close()
    return outcomes


def test_a_forced_removal_a_workers_end_and_a_creation_of_its_team_at_once_do_not_deadlock(database_url, tmp_path):
    """The removal holds the model's row and waits for a running job's; that job's worker, ending it, holds its row and
    waits for its team's (usage.ledger); a creation of that team held the team's row and waited for the model's
    (taken after the team's): Postgres ended one of the three with "deadlock detected". Now the creation takes the
    model's first: the removal waits for it, then cancels its job with the others."""
    settings = Settings(home=tmp_path, database_url=database_url, storage_url=f"file://{tmp_path / 'storage'}",
                        broker_url="").model_copy(update={"gpu_classes": {"l4": 24}})
    with session_scope(database_url) as session:
        session.add(RegisteredModel(name="llama-3-8b", hub_id="meta-llama/Meta-Llama-3-8B", revision="main",
                                    config=LLAMA3_8B))
        team = create_team(session, "team-a")
        key, _secret = create_key(session, "team-a")
        dataset = Dataset(team_id=team.id, filename="t.jsonl", storage_key="k", bytes=1, sha256="0" * 64,
                          status="ready", format="chat", rows=1)
        session.add(dataset)
        session.flush()
        running = Job(team_id=team.id, status=states.QUEUED, base_model="llama-3-8b", queue=QUEUE,
                      dataset_id=dataset.id, spec=job_spec().model_dump(mode="json"), priority=1)
        session.add(running)
        session.flush()
        caller, team_id, dataset_id, running_id = Caller.of(team, key), team.id, dataset.id, running.id
    with session_scope(database_url) as session:
        assert runs.claim(session, running_id, "w1") is not None
    payload = {"dataset_id": dataset_id, "base_model": "llama-3-8b", "training": {"max_steps": 10}}
    outcomes = request_finish_and_forced_removal(
        database_url, team_id, running_id, ("create", lambda s: jobs_service.create(s, settings, caller, dict(payload)).id))
    assert not [outcome for outcome in outcomes.values() if isinstance(outcome, Exception)], outcomes
    assert outcomes["finish"] is True
    with session_scope(database_url) as session:
        created = session.get(Job, outcomes["create"])
        assert (created.status, created.error) == (states.CANCELLED, "base model llama-3-8b was removed by an admin")
        assert session.get(Job, running_id).status == states.SUCCEEDED


def test_a_forced_removal_a_workers_end_and_a_resume_of_its_team_at_once_do_not_deadlock(database_url, tmp_path):
    """The removal holds a paused job's row (jobs in id order) and waits for a running one's; that job's worker, ending
    it, holds its row and waits for its team's (usage.ledger); a resume of the paused job held the team's row (its
    max_queued check) and waited for the job's: Postgres ended one of the three with "deadlock detected". Now the
    resume takes the job's row first, as a worker does: the removal waits for it, then cancels the job queued again."""
    settings = Settings(home=tmp_path, database_url=database_url, storage_url=f"file://{tmp_path / 'storage'}",
                        broker_url="")
    with session_scope(database_url) as session:
        session.add(RegisteredModel(name="llama-3-8b", path="/models/llama"))
        team = create_team(session, "team-a")
        key, _secret = create_key(session, "team-a")
        session.add(Dataset(id="data", team_id=team.id, filename="d.jsonl", storage_key="k", bytes=10, sha256="0" * 64,
                            status="ready"))
        paused_id, running_id = "a" * 32, "b" * 32  # the paused job first in id order, as the removal locks them
        for job_id, status in ((paused_id, states.PAUSED), (running_id, states.QUEUED)):
            session.add(Job(id=job_id, team_id=team.id, status=status, base_model="llama-3-8b", queue=QUEUE,
                            dataset_id="data", spec=job_spec().model_dump(mode="json"), priority=1))
        caller, team_id = Caller.of(team, key), team.id
    with session_scope(database_url) as session:
        assert runs.claim(session, running_id, "w1") is not None
    outcomes = request_finish_and_forced_removal(
        database_url, team_id, running_id, ("resume", lambda s: jobs_service.resume(s, settings, caller, paused_id).status))
    assert outcomes == {"resume": states.QUEUED, "finish": True, "remove": None}, outcomes
    with session_scope(database_url) as session:
        resumed = session.get(Job, paused_id)
        assert (resumed.status, resumed.error) == (states.CANCELLED, "base model llama-3-8b was removed by an admin")
        assert session.get(Job, running_id).status == states.SUCCEEDED
