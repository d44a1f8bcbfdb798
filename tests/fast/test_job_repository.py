"""Compare-and-set on a real database: two writers never both win, and a worker that lost its job
can no longer change it (its attempt number is a fencing token)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.db import utcnow
from app.jobs import repository, states
from app.jobs.states import ALL, TRANSITIONS
from app.jobs.tables import Job
from tests.fast.conftest import open_session


def stored(settings, job_id) -> Job:
    """The job as another connection reads it once the writer committed."""
    with open_session(settings) as reader:
        return reader.get(Job, job_id)


def status(settings, job_id):
    job = stored(settings, job_id)
    return job.status, job.attempt


@pytest.mark.parametrize("source", ALL)
def test_transition_makes_exactly_the_moves_in_the_table(settings, session, make_job, source):
    for target in ALL:
        job_id = make_job(source)
        moved = repository.transition(session, job_id, target)
        session.commit()
        assert moved == (target in TRANSITIONS[source]), f"{source} -> {target}"
        assert status(settings, job_id) == ((target if moved else source), 0)


def test_of_two_writers_from_the_same_state_only_the_first_wins(settings, session, make_job):
    job_id = make_job(states.RUNNING, attempt=1)
    other = open_session(settings)
    assert other.get(Job, job_id).status == states.RUNNING
    assert repository.transition(session, job_id, states.SUCCEEDED, attempt=1, finished_at=utcnow())
    session.commit()
    # The second writer read "running" too, but its compare-and-set finds the job already finished.
    assert not repository.transition(other, job_id, states.CANCELLING)
    assert not repository.transition(other, job_id, states.FAILED, attempt=1, error="late")
    other.commit()
    other.close()
    job = stored(settings, job_id)
    assert (job.status, job.error) == (states.SUCCEEDED, None)


def test_only_from_narrows_the_legal_sources(settings, session, make_job):
    job_id = make_job(states.PAUSING, attempt=1)
    # Legal from pausing, but the caller only acts if the job is still running (what it read).
    assert not repository.transition(session, job_id, states.CANCELLING, only_from=[states.RUNNING])
    assert repository.transition(session, job_id, states.CANCELLING, only_from=[states.PAUSING])
    session.commit()
    assert status(settings, job_id) == (states.CANCELLING, 1)


def test_claim_takes_a_queued_job_once_with_a_new_attempt(settings, session, make_job):
    job_id = make_job(states.QUEUED, error="an old error from a lost worker")
    now = utcnow()
    assert repository.claim(session, job_id, "worker-1", now) == 1
    session.commit()
    # A duplicate message: the second worker finds the job no longer queued and does nothing.
    with open_session(settings) as other:
        assert repository.claim(other, job_id, "worker-2", now) is None
        other.commit()
    job = stored(settings, job_id)
    assert (job.status, job.attempt, job.worker, job.error) == (states.RUNNING, 1, "worker-1", None)
    assert job.started_at == now and job.heartbeat_at == now


@pytest.mark.parametrize("state", [s for s in ALL if s != states.QUEUED])
def test_only_a_queued_job_can_be_claimed(settings, session, make_job, state):
    job_id = make_job(state, attempt=1)
    assert repository.claim(session, job_id, "worker-1", utcnow()) is None
    session.commit()
    assert status(settings, job_id) == (state, 1)


def test_a_requeued_job_fences_out_the_worker_that_lost_it(settings, session, make_job):
    job_id = make_job(states.QUEUED)
    first_claim = utcnow() - timedelta(hours=1)
    assert repository.claim(session, job_id, "worker-1", first_claim) == 1
    assert repository.touch(session, job_id, 1, step=10, heartbeat_at=utcnow())
    # The reaper finds worker-1 silent and requeues the job; worker-2 claims it.
    assert repository.transition(session, job_id, states.QUEUED, only_from=states.WORKER_OWNED, dispatched_at=None)
    assert repository.claim(session, job_id, "worker-2", utcnow()) == 2
    session.commit()
    # worker-1 wakes up: its heartbeat, its progress and its outcome are all refused.
    with open_session(settings) as stale:
        assert not repository.touch(stale, job_id, 1, step=99, heartbeat_at=utcnow())
        assert not repository.transition(stale, job_id, states.SUCCEEDED, attempt=1, finished_at=utcnow())
        assert not repository.transition(stale, job_id, states.FAILED, attempt=1, error="from the old worker")
        stale.commit()
    job = stored(settings, job_id)
    assert (job.status, job.attempt, job.worker, job.step, job.error) == (states.RUNNING, 2, "worker-2", 10, None)
    assert job.started_at == first_claim  # a job started once keeps its first start time
    # The current runner still writes.
    assert repository.touch(session, job_id, 2, step=11)
    assert repository.transition(session, job_id, states.SUCCEEDED, attempt=2, finished_at=utcnow())
    session.commit()
    assert status(settings, job_id) == (states.SUCCEEDED, 2)


@pytest.mark.parametrize("state", ALL)
def test_touch_writes_only_while_a_worker_owns_the_job(settings, session, make_job, state):
    job_id = make_job(state, attempt=3, step=5)
    written = repository.touch(session, job_id, 3, step=6)
    session.commit()
    assert written == (state in states.WORKER_OWNED)
    assert stored(settings, job_id).step == (6 if written else 5)


def test_a_missing_job_is_never_changed(session):
    assert not repository.transition(session, "no-such-job", states.CANCELLED)
    assert repository.claim(session, "no-such-job", "worker-1", utcnow()) is None
    assert not repository.touch(session, "no-such-job", 1, step=1)


def test_an_artifact_a_lost_attempt_stored_is_replaced_by_the_next_attempts(settings, session, make_job):
    """A worker lost between its adapter's upload and its merged model's left an adapter row; the next
    attempt's insert of its own hit the unique (job, kind), and the job failed with all training done."""
    from app.jobs import runs
    from app.jobs.tables import Artifact

    job_id = make_job(states.RUNNING, attempt=1)
    assert runs.add_artifact(session, job_id, 1, "adapter", "t/artifacts/a1", 10, "1" * 64) is None
    session.commit()
    session.execute(sa.update(Job).where(Job.id == job_id).values(attempt=2))  # requeued and claimed again
    session.commit()
    assert runs.add_artifact(session, job_id, 2, "adapter", "t/artifacts/a2", 20, "2" * 64) == "t/artifacts/a1"
    assert runs.add_artifact(session, job_id, 2, "merged", "t/artifacts/m2", 30, "3" * 64) is None
    session.commit()
    with open_session(settings) as reader:
        rows = reader.scalars(sa.select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.kind)).all()
        assert [(a.kind, a.storage_key, a.bytes) for a in rows] == [("adapter", "t/artifacts/a2", 20),
                                                                    ("merged", "t/artifacts/m2", 30)]
    with pytest.raises(runs.LeaseLost):  # the lost attempt itself can no longer record one
        runs.add_artifact(session, job_id, 1, "merged", "t/artifacts/m1", 30, "3" * 64)


def test_an_artifact_recorded_again_is_not_taken_for_one_it_replaces(settings, session, make_job):
    """The worker records an artifact again when the answer to its commit was lost with the connection (a
    database restart as it recorded: worker/supervisor.py tries again). The row is its own: the same key must
    not come back as a replaced object, which the worker deletes (the job's artifact, gone from storage)."""
    from app.jobs import runs

    job_id = make_job(states.RUNNING, attempt=1)
    assert runs.add_artifact(session, job_id, 1, "adapter", "t/artifacts/a1", 10, "1" * 64) is None
    session.commit()
    assert runs.add_artifact(session, job_id, 1, "adapter", "t/artifacts/a1", 10, "1" * 64) is None


def test_a_quantized_base_reported_again_is_not_taken_for_another_jobs_duplicate(settings, session, make_job):
    """A report tried again after its commit landed unheard finds its own cache entry: its object is the one the
    entry names and must not come back as unkept, which the worker deletes (the cache entry naming an object gone,
    every later job of the base failing to fetch it, a 65B base quantized again). Another job's object for the
    same key is still a duplicate."""
    from app.jobs import runs
    from worker.training.protocol import QuantizedBaseStored

    def stored_base(storage_key: str) -> QuantizedBaseStored:
        return QuantizedBaseStored(key="k" * 64, storage_key=storage_key, size=10, sha256="1" * 64, identity={})

    job_id = make_job(states.RUNNING, attempt=1)
    assert runs.report(session, job_id, 1, [stored_base("shared/quantized-bases/a")], None)[1] == []
    session.commit()
    assert runs.report(session, job_id, 1, [stored_base("shared/quantized-bases/a")], None)[1] == []
    session.commit()
    other = make_job(states.RUNNING, attempt=1)
    assert runs.report(session, other, 1, [stored_base("shared/quantized-bases/b")], None)[1] == [
        "shared/quantized-bases/b"]
    session.commit()
    assert repository.quantized_base(session, "k" * 64).storage_key == "shared/quantized-bases/a"
    assert repository.recorded_storage_keys(session, ["shared/quantized-bases/a", "shared/quantized-bases/b"]) == {
        "shared/quantized-bases/a"}
