"""Leases (app/operations/lease.py): exactly one process plays a role, and another takes it over when
its holder dies or stops. On SQLite here; tests/service/test_api_workers.py races on Postgres."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import update

from app.db import session_scope, sessionmaker_for, utcnow
from app.jobs import states
from app.jobs.reaper import LEASE, ReaperThread
from app.jobs.tables import Job
from app.operations.lease import LEASE_TTL_INTERVALS, LeasedLoop, LeaseHolder, acquire_or_renew, current_holder, release
from app.operations.tables import Lease
from app.storage.base import storage_from_settings


def take(settings, holder: str, name: str = "role", ttl_s: float = 60) -> bool:
    """One call in a transaction of its own, committed, as a process makes it."""
    with session_scope(settings.database_url) as session:
        return acquire_or_renew(session, name, holder, ttl_s)


def expire(settings, name: str = "role") -> None:
    """As if its holder had stopped renewing a TTL ago."""
    with session_scope(settings.database_url) as session:
        session.execute(update(Lease).where(Lease.name == name).values(expires_at=utcnow() - timedelta(seconds=1)))


def row(settings, name: str = "role") -> Lease:
    with session_scope(settings.database_url) as session:
        found = session.get(Lease, name)
        assert found is not None
        return found


def test_the_first_process_takes_a_free_lease_and_renews_it(settings):
    assert take(settings, "a", ttl_s=60)
    first = row(settings)
    assert first.holder == "a" and first.expires_at > utcnow() + timedelta(seconds=50)
    assert take(settings, "a", ttl_s=120)
    renewed = row(settings)
    assert renewed.expires_at > first.expires_at
    assert renewed.acquired_at == first.acquired_at  # a renewal, not a new tenure


def test_another_process_is_refused_while_the_lease_is_valid(settings):
    assert take(settings, "a")
    assert not take(settings, "b")
    assert not take(settings, "b")
    assert row(settings).holder == "a"
    assert take(settings, "a")  # the holder keeps it
    assert take(settings, "b", name="another role")  # leases are independent of each other


def test_another_process_takes_over_once_the_holder_stops_renewing(settings):
    assert take(settings, "a")
    expire(settings)
    with session_scope(settings.database_url) as session:
        assert current_holder(session, "role") is None
    assert take(settings, "b")
    taken = row(settings)
    assert taken.holder == "b" and taken.expires_at > utcnow()
    assert not take(settings, "a")  # the old holder, back from a pause, is refused: it lost the role


def test_release_hands_over_at_once(settings):
    assert take(settings, "a")
    with session_scope(settings.database_url) as session:
        assert not release(session, "role", "b")  # only the holder can give it up
        assert release(session, "role", "a")
    assert take(settings, "b")
    with session_scope(settings.database_url) as session:
        assert current_holder(session, "role") == "b"


def race_for_lease(database_url: str, name: str, contenders: int = 4) -> dict[str, bool]:
    """`contenders` threads, each with a connection of its own (as each process has), call
    acquire_or_renew for a free lease at the same moment; which of them got it."""
    start = threading.Barrier(contenders)
    won: dict[str, bool] = {}

    def contend(holder: str) -> None:
        session = sessionmaker_for(database_url)()
        try:
            start.wait()
            won[holder] = acquire_or_renew(session, name, holder, 60)
            session.commit()
        finally:
            session.close()

    threads = [threading.Thread(target=contend, args=(f"p{i}",)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == contenders, f"a contender failed or hung: {won}"
    return won


def test_of_processes_racing_for_a_free_lease_exactly_one_wins(settings):
    for round in range(5):
        won = race_for_lease(settings.database_url, f"race-{round}")
        winners = [holder for holder, got in won.items() if got]
        assert len(winners) == 1, won
        assert row(settings, f"race-{round}").holder == winners[0]


def test_a_holder_logs_when_it_takes_over_and_when_it_loses_the_lease(settings, caplog):
    caplog.set_level(logging.INFO, logger="app.operations.lease")
    a = LeaseHolder(settings.database_url, "role", ttl_s=60)
    b = LeaseHolder(settings.database_url, "role", ttl_s=60)
    assert a.renew() and not b.renew()
    assert a.renew()  # a renewal says nothing
    expire(settings)
    assert b.renew() and not a.renew()
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in messages] == ["took over the 'role' lease", "took over the 'role' lease",
                                                     "lost the 'role' lease"]
    assert a.holder in messages[0] and b.holder in messages[1] and a.holder in messages[2]


def test_only_the_reaper_holding_the_lease_works(settings, make_job):
    """Two processes' reapers: one requeues the lost job, the other's pass does nothing; once the
    first stops, the second takes over at its next pass."""
    silent = make_job(states.RUNNING, attempt=1, worker="w1", heartbeat_at=utcnow() - timedelta(hours=1))
    storage = storage_from_settings(settings)
    first, second = ReaperThread(settings, storage), ReaperThread(settings, storage)
    assert first.lease.ttl_s == LEASE_TTL_INTERVALS * settings.reaper_interval_s
    counts = first.pass_once()
    assert counts is not None and counts["requeued"] == 1
    assert second.pass_once() is None
    with session_scope(settings.database_url) as session:
        assert current_holder(session, LEASE) == first.lease.holder

    first.start()  # its loop renews the lease; stopping it releases the lease
    first.stop()
    assert not first.is_alive()
    with session_scope(settings.database_url) as session:
        assert current_holder(session, LEASE) is None
    assert second.pass_once() == {**counts, "requeued": 0}  # its turn, with nothing left to do
    with session_scope(settings.database_url) as session:
        assert current_holder(session, LEASE) == second.lease.holder
        job = session.get(Job, silent)
        assert job is not None and (job.status, job.lost_workers) == (states.QUEUED, 1)


class HeldPass(LeasedLoop):
    """A loop whose pass waits for a lock: as long a pass as whoever holds the lock makes it (as a scheduler pass
    waits on a team's row that a claim holds)."""

    def __init__(self, database_url: str, lock: threading.Lock, interval_s: float):
        super().__init__(database_url, "long-pass", interval_s)
        self.lock = lock
        self.working = threading.Event()

    def work(self) -> dict[str, int]:
        self.working.set()
        with self.lock:
            return {"passes": 1}


def test_a_pass_that_outlasts_the_lease_keeps_it_and_no_other_process_overlaps_it(settings):
    """Renewed only once per pass, the lease expired under a pass longer than its TTL and another process took the
    role over while the first still played it (two schedulers sending the same messages, planning preemptions from
    the same snapshot). The holder renews during its pass, so the other is refused until the pass ends."""
    interval_s = 1.0  # TTL 3 s: the first's renewals would have to stall 2 s for the second to get in
    held = threading.Lock()
    held.acquire()
    first = HeldPass(settings.database_url, held, interval_s)
    first.start()
    try:
        assert first.working.wait(60), "the first loop never began its pass"
        expiry_at_start = row(settings, "long-pass").expires_at
        # The other process tries, try after try, until one of its tries comes after the time the lease taken at
        # the start of the pass ran out (the pass is still waiting on the lock meanwhile).
        second = HeldPass(settings.database_url, threading.Lock(), interval_s)
        deadline = time.monotonic() + 120
        while True:
            tried_at = utcnow()
            assert second.pass_once() is None, "another process took the lease over while the holder's pass ran"
            if tried_at > expiry_at_start + timedelta(seconds=interval_s):
                break
            assert time.monotonic() < deadline, "the clock never passed the lease's first expiry"
            time.sleep(interval_s / 5)
        assert row(settings, "long-pass").expires_at > expiry_at_start  # renewed during the pass
        assert row(settings, "long-pass").holder == first.lease.holder
    finally:
        held.release()
        first.stop()
    assert not first.is_alive()
    assert second.pass_once() == {"passes": 1}  # released as the first stopped: the role passes on at once
