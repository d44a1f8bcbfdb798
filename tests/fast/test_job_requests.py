"""cancel, pause and resume from every state, through the service and committed as a request would:
the state the job lands in, the event a user reads, 409 invalid_state where the request makes no
sense, and nothing at all where the job is already where the request leads."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.db import utcnow
from app.errors import Conflict, NotFound, QuotaExceeded
from app.jobs import repository, service, states
from app.jobs.states import (
    ALL,
    CANCELLED,
    CANCELLING,
    FAILED,
    FINISHED,
    PAUSED,
    PAUSING,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TRANSITIONS,
)
from app.jobs.tables import Job, JobEvent
from app.teams.service import Caller, create_key, create_team
from app.teams.tables import Team
from tests.fast.conftest import open_session, received

# (request, state the job is in) -> (state it lands in, event written). Written out here, not read
# from the service, so a change to what a user sees has to change this test too.
MOVES = {
    ("cancel", QUEUED): (CANCELLED, "cancelled"),
    ("cancel", PAUSED): (CANCELLED, "cancelled"),
    ("cancel", RUNNING): (CANCELLING, "cancel_requested"),
    ("cancel", PAUSING): (CANCELLING, "cancel_requested"),
    ("pause", RUNNING): (PAUSING, "pause_requested"),
    ("resume", PAUSED): (QUEUED, "resume_requested"),
}
# Already where the request leads (or on the way): answered as it is, nothing written.
ALREADY = {("cancel", CANCELLING), ("cancel", CANCELLED), ("pause", PAUSING), ("pause", PAUSED),
           ("resume", QUEUED), ("resume", RUNNING)}
REQUESTS = ("cancel", "pause", "resume")
# Refused, with what to do instead where the state alone does not say it ("cannot pause job X: it is queued"
# was all a script that paused right after creating heard). The others: "it has succeeded" and the like.
FIXES = {
    ("pause", QUEUED): "a queued job has no training to pause yet: pause it once it is running, or cancel it",
    ("pause", CANCELLING): "it stops without a pause",
    ("resume", PAUSING): "it is saving its checkpoint: resume it once it is paused",
    ("resume", CANCELLING): "it stops; it cannot be resumed",
    ("resume", SUCCEEDED): "a finished job does not run again: create a new job (initial_job_id starts one from its adapter)",
    ("resume", FAILED): "a finished job does not run again: create a new job with the same spec and data to try again",
    ("resume", CANCELLED): "a finished job does not run again: create a new job with the same spec and data to try again",
}


def ask(request, session, settings, caller, job_id):
    if request == "resume":
        return service.resume(session, settings, caller, job_id)
    return getattr(service, request)(session, caller, job_id)


def stored(settings, job_id):
    """The job and its events as another connection reads them once the request has ended."""
    with open_session(settings) as reader:
        job = reader.get(Job, job_id)
        events = reader.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return job, [(e.type, e.level, e.attempt) for e in events]


@pytest.mark.parametrize("request_", REQUESTS)
@pytest.mark.parametrize("state", ALL)
def test_a_request_from_every_state(settings, session, caller, make_job, request_, state):
    # A queued job whose message already went out: a resume of it must not send another.
    job_id = make_job(state, attempt=2, step=7, dispatched_at=utcnow() if state == QUEUED else None)
    if (request_, state) in MOVES:
        target, event = MOVES[(request_, state)]
        answered = ask(request_, session, settings, caller, job_id)
        assert answered.status == target  # the response already shows the new state
        session.commit()
        job, events = stored(settings, job_id)
        assert job.status == target and job.attempt == 2 and job.step == 7
        assert events == [(event, "warning" if request_ == "cancel" else "info", 2)]
        assert (job.finished_at is not None) == (target in FINISHED)
        if target == QUEUED:  # queued again, and the workers are told once the commit is done
            assert job.dispatched_at is not None
            assert received(settings, job.queue) == [("qlora.run_job", [job_id])]
    elif (request_, state) in ALREADY:
        answered = ask(request_, session, settings, caller, job_id)
        assert answered.status == state
        session.commit()
        job, events = stored(settings, job_id)
        assert (job.status, job.attempt, events) == (state, 2, [])
        assert received(settings, job.queue) == []
    else:
        with pytest.raises(Conflict) as refused:
            ask(request_, session, settings, caller, job_id)
        session.rollback()
        assert (refused.value.status, refused.value.code) == (409, "invalid_state")
        fix = f"; {FIXES[(request_, state)]}" if (request_, state) in FIXES else ""
        assert refused.value.message == f"cannot {request_} job {job_id}: it {states.described(state)}{fix}"
        job, events = stored(settings, job_id)
        assert (job.status, events) == (state, [])


def test_the_request_table_asks_only_for_moves_the_state_machine_allows():
    """The service moves with only_from=[the state it read], which bypasses the machine's own sources:
    a request row that named an illegal move would make it silently."""
    for request, moves in service._REQUESTS.items():
        assert not set(moves) & set(service._ALREADY[request])
        for source, (target, _event, message) in moves.items():
            assert target in TRANSITIONS[source], f"{request} from {source} -> {target}"
            assert message
    assert {(r, s) for r, moves in service._REQUESTS.items() for s in moves} == set(MOVES)
    assert {(r, s) for r, already in service._ALREADY.items() for s in already} == ALREADY


def test_a_cancel_that_races_a_claim_asks_the_new_runner_to_stop(settings, session, caller, make_job):
    job_id = make_job(QUEUED)
    assert service.get(session, caller, job_id).status == QUEUED  # the request has read the job...
    with open_session(settings) as worker:  # ...when a worker claims it
        assert repository.claim(worker, job_id, "worker-1", utcnow()) == 1
        worker.commit()
    answered = service.cancel(session, caller, job_id)
    session.commit()
    # Not "cancelled before it started": it did start, and its worker must be told to stop.
    assert answered.status == CANCELLING
    job, events = stored(settings, job_id)
    assert job.status == CANCELLING and job.finished_at is None
    assert events == [("cancel_requested", "warning", 1)]


def test_a_pause_that_races_the_end_of_training_is_refused(settings, session, caller, make_job):
    job_id = make_job(RUNNING, attempt=1)
    assert service.get(session, caller, job_id).status == RUNNING
    with open_session(settings) as worker:
        assert repository.transition(worker, job_id, states.SUCCEEDED, attempt=1, finished_at=utcnow())
        worker.commit()
    with pytest.raises(Conflict, match="it has succeeded"):
        service.pause(session, caller, job_id)
    session.rollback()
    assert stored(settings, job_id)[0].status == states.SUCCEEDED


def test_a_resume_rolled_back_sends_nothing(settings, session, caller, make_job):
    job_id = make_job(PAUSED, attempt=1)
    assert service.resume(session, settings, caller, job_id).status == QUEUED
    session.rollback()
    job, events = stored(settings, job_id)
    assert (job.status, events) == (PAUSED, [])
    assert received(settings, "gpu-default") == []


def test_resuming_a_queued_job_whose_message_was_never_sent_sends_it(settings, session, caller, make_job):
    """The broker was down when the job was created: a resume is a way to wake a worker for it."""
    job_id = make_job(QUEUED, dispatched_at=None)
    assert service.resume(session, settings, caller, job_id).status == QUEUED
    session.commit()
    job, events = stored(settings, job_id)
    assert job.dispatched_at is not None and events == []
    assert received(settings, "gpu-default") == [("qlora.run_job", [job_id])]


@pytest.mark.parametrize("request_", REQUESTS)
def test_another_teams_job_is_not_found(settings, session, make_job, request_):
    job_id = make_job(RUNNING, attempt=1)
    create_team(session, "team-b")
    key, _ = create_key(session, "team-b")
    session.commit()
    stranger = Caller.of(session.get(Team, key.team_id), key)
    with pytest.raises(NotFound):
        ask(request_, session, settings, stranger, job_id)
    session.rollback()
    assert stored(settings, job_id)[0].status == RUNNING


def test_resuming_a_paused_job_counts_against_max_queued_as_a_new_job_does(settings, session, caller, make_job):
    """Before, max_queued held POST /jobs back, and any number of paused jobs could be queued again."""
    queued, paused = make_job(QUEUED), make_job(PAUSED)
    session.get(Team, caller.team_id).max_queued = 1
    session.commit()
    with pytest.raises(QuotaExceeded, match="max_queued: team 'team-a' already has 1 job queued, its limit is 1") as refused:
        service.resume(session, settings, caller, paused)
    # The command it names runs as written: `set-quota` takes the team first (it said `set-quota --max-queued`).
    assert "(qlora admin set-quota team-a --max-queued N)" in str(refused.value)
    session.rollback()
    assert stored(settings, paused)[0].status == PAUSED
    assert service.resume(session, settings, caller, queued).status == QUEUED  # already queued: answered as it is
    service.cancel(session, caller, queued)
    session.commit()
    assert service.resume(session, settings, caller, paused).status == QUEUED


def test_a_job_that_turns_paused_as_it_is_resumed_still_counts_against_max_queued(settings, session, caller, make_job,
                                                                               monkeypatch):
    """resume() looked at the job (pausing: no quota to check), then its worker committed paused, and the
    request queued it from there unchecked: a team at max_queued got one more job queued."""
    job_id = make_job(PAUSING)
    session.get(Team, caller.team_id).max_queued = 0
    session.commit()
    real_get, looks = service.get, []

    def get(*args, **kwargs):
        job = real_get(*args, **kwargs)
        looks.append(job.status)
        if len(looks) == 1:  # the worker's commit lands right after the first look
            with open_session(settings) as other:
                assert repository.transition(other, job_id, PAUSED, only_from=[PAUSING])
                other.commit()
        return job
    monkeypatch.setattr(service, "get", get)
    # Pausing as it was read: 409 (wait for paused), or, read paused, the quota's refusal; never queued past it.
    with pytest.raises((Conflict, QuotaExceeded)):
        service.resume(session, settings, caller, job_id)
    session.rollback()
    assert stored(settings, job_id)[0].status == PAUSED
    with pytest.raises(QuotaExceeded, match="max_queued"):  # and paused now, the quota refuses it
        service.resume(session, settings, caller, job_id)


def test_a_creation_that_waited_for_its_teams_turn_in_vain_says_when_to_come_back(client, session):
    """429 `busy` came without Retry-After, so clients retried on their own short backoff (the openai SDK's
    starts under a second) into the same queue of the team's creations; it says 5 s now."""
    import asyncio

    from app.jobs.turns import Turns

    team_id = session.scalar(select(Team.id).where(Team.name == "team-a"))
    turns = Turns(wait_s=0)
    turns._gates[team_id], turns._holders[team_id] = asyncio.Semaphore(0), 1  # another creation holds the turn
    client.app.state.team_turns = turns
    answer = client.post("/jobs/preflight", json={"dataset_id": "0" * 32, "base_model": "tiny"})
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "busy", answer.text
    assert answer.headers["retry-after"] == "5"
