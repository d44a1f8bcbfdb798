"""The job state machine as a table: which moves exist, and what they promise a user."""

from __future__ import annotations

import pytest

from app.jobs import states
from app.jobs.states import (
    ACTIVE,
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
    WORKER_OWNED,
    sources_of,
)


def reachable_from(state: str) -> set[str]:
    seen, todo = set(), [state]
    while todo:
        for target in TRANSITIONS[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_state_is_in_the_table_once_and_every_move_leads_to_a_known_state():
    assert len(ALL) == len(set(ALL)) == 8
    assert set(TRANSITIONS) == set(ALL)
    assert set(ACTIVE) | set(FINISHED) == set(ALL) and not set(ACTIVE) & set(FINISHED)
    assert all(target in ALL and target != source for source, targets in TRANSITIONS.items() for target in targets)


def test_a_finished_job_never_changes_again():
    for state in FINISHED:
        assert TRANSITIONS[state] == ()
        assert reachable_from(state) == set()


def test_every_job_can_finish_and_every_state_can_be_reached_from_queued():
    assert reachable_from(QUEUED) == set(ALL)  # queued itself again: after a lost worker, or a resume
    for state in ACTIVE:
        assert reachable_from(state) & set(FINISHED), f"a {state} job could never finish"
        assert CANCELLED in reachable_from(state), f"a {state} job could never be cancelled"


def test_only_a_worker_records_how_training_ended():
    """Succeeded and failed are a training process's outcome: no state without a worker leads there."""
    for outcome in (SUCCEEDED, FAILED):
        assert set(sources_of(outcome)) == set(WORKER_OWNED)
    assert set(WORKER_OWNED) == {RUNNING, CANCELLING, PAUSING}
    # A job nobody runs is cancelled at once; one that runs is asked to stop and ends when its worker says so.
    assert set(sources_of(CANCELLED)) == {QUEUED, PAUSED, CANCELLING}
    assert set(sources_of(CANCELLING)) == {RUNNING, PAUSING}


def test_the_moves_that_recover_and_resume():
    assert set(sources_of(QUEUED)) == {RUNNING, PAUSED}  # a lost worker's job, a resumed one
    assert sources_of(RUNNING) == (QUEUED,)  # only a claim starts training
    # A pause passes through saving a checkpoint; a job whose attempts keep ending on a full disk or an outage
    # is paused, not failed, after its last (runs.attempt_lost), from the checkpoints it has.
    assert set(sources_of(PAUSED)) == {PAUSING, RUNNING}
    assert sources_of(PAUSING) == (RUNNING,)
    # A cancel that arrives as the last step finishes may still end in succeeded: that is the truth.
    assert SUCCEEDED in TRANSITIONS[CANCELLING]
    assert CANCELLING in TRANSITIONS[PAUSING]


@pytest.mark.parametrize("target", ALL)
def test_sources_of_is_the_table_read_backwards(target):
    assert set(sources_of(target)) == {s for s in ALL if target in TRANSITIONS[s]}


def test_the_constants_are_the_names_the_api_shows():
    assert {states.QUEUED, states.RUNNING, states.CANCELLING, states.PAUSING, states.PAUSED, states.SUCCEEDED,
            states.FAILED, states.CANCELLED} == {"queued", "running", "cancelling", "pausing", "paused", "succeeded",
                                                 "failed", "cancelled"}
