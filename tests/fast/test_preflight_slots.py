"""The preflight processes' slots (app/jobs/preflight.py, TeamSlots): a freed slot goes to the waiting
team served longest ago, so one team's stream of preflights never keeps another's waiting behind it."""

from __future__ import annotations

import threading
import time

from app.jobs.preflight import TeamSlots


def queue_up(slots: TeamSlots, waiters: list[tuple[str, str]], order: list[str]) -> list[threading.Thread]:
    """A thread per (team, name), each waiting for a slot, noting its name when it gets one and giving
    the slot back; each is waiting before the next starts, so they come in the order given."""
    threads = []
    for team, name in waiters:
        def wait(team: str = team, name: str = name) -> None:
            assert slots.acquire(team, timeout=30)
            order.append(name)
            slots.release()
        threads.append(threading.Thread(target=wait))
        threads[-1].start()
        until_waiting(slots, len(threads))
    return threads


def until_waiting(slots: TeamSlots, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(slots._waiting) < count:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.001)


def test_a_freed_slot_goes_to_the_team_served_longest_ago_not_to_the_earliest_waiter():
    slots, order = TeamSlots(1), []
    assert slots.acquire("a", timeout=0)  # team a holds the one slot...
    threads = queue_up(slots, [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("b", "b2"), ("c", "c1")], order)
    slots.release()
    for thread in threads:
        thread.join()
    # ...so b and c, never served, come first (in the order they came), then the teams alternate; a team's
    # own waiters keep their order. A first-come order would be a1 a2 a3 b1 b2 c1.
    assert order == ["b1", "c1", "a1", "b2", "a2", "a3"]


def test_a_waiter_that_gives_up_leaves_the_line_and_the_next_gets_the_slot():
    slots, order = TeamSlots(2), []
    assert slots.acquire("a", timeout=0) and slots.acquire("b", timeout=0)
    assert not slots.acquire("c", timeout=0.05)  # both slots held: it waits, gives up, and is gone
    assert slots._waiting == []
    threads = queue_up(slots, [("d", "d1")], order)
    slots.release()
    threads[0].join()
    assert order == ["d1"]
    assert slots.acquire("c", timeout=0) and not slots.acquire("e", timeout=0)  # two slots, two holders
