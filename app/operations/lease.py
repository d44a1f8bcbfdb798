"""Leases: a role that exactly one process plays at a time, however many run, handed over when its
holder dies.

Every process that may play a role (each API process runs a reaper thread, say) calls
`acquire_or_renew` before each pass, and every interval while the pass runs, and does the work only
when it returns True. The row is a
compare-and-set on (holder, expires_at), so of several processes racing for a free or expired lease
exactly one gets it, on Postgres and on SQLite alike. A holder that dies stops renewing: another
process takes the role over once the lease expires, within about its TTL. A holder that stops
cleanly releases it, so a restart hands over at once.

The TTL must exceed the renewal interval with a margin (the reaper's is 3 intervals): a live
holder renews long before it expires, so a slow pass or a database blip does not hand the role to
another process while the first still plays it. A lease is dated and judged on the database's clock
(app.db.database_now), as a job's heartbeats are: on each process's own, a host whose clock ran an hour
ahead took the lease from a live holder at its every pass, and, once it died, left the role unplayed for
that hour, until its expiry came on the others' clocks. Work done under a lease stays safe on its own all
the same (the reaper's changes are compare-and-sets): a holder learns it lost the lease only at its next renewal.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from datetime import timedelta
from typing import cast

from sqlalchemy import CursorResult, case, delete, or_, select, update
from sqlalchemy.orm import Session

from app.db import database_now, insert_for, session_scope
from app.operations.tables import Lease

log = logging.getLogger(__name__)


def holder_id() -> str:
    """host:pid:random. The random part tells apart two processes that get the same pid on the same
    host (a container restarted within the TTL, whose main process is pid 1 again)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def acquire_or_renew(session: Session, name: str, holder: str, ttl_s: float) -> bool:
    """Take lease `name` for `holder` for ttl_s from now if it is free, expired or already
    `holder`'s; True if `holder` now holds it. The caller commits (at once: the lease protects
    nothing until the others can see it)."""
    now = database_now(session)
    expires_at = now + timedelta(seconds=ttl_s)
    # Renew our own, or take over one whose holder stopped renewing. On Postgres a racing UPDATE
    # waits for the first to commit and then finds the row no longer expired: it changes nothing.
    renew_or_take_over = (
        update(Lease)
        .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at < now))
        .values(holder=holder, expires_at=expires_at,
                acquired_at=case((Lease.holder == holder, Lease.acquired_at), else_=now))
        .execution_options(synchronize_session=False))
    if _rows_changed(session, renew_or_take_over) == 1:
        return True
    # Nobody has held it yet (or its last holder released it). Of two processes inserting at once,
    # the unique name lets one in; the other's insert does nothing and it stays without the lease.
    insert = insert_for(session)
    # (RETURNING says whether it inserted: an INSERT's rowcount is not reported on every driver.)
    take_free = (insert(Lease).values(name=name, holder=holder, acquired_at=now, expires_at=expires_at)
                 .on_conflict_do_nothing(index_elements=["name"]).returning(Lease.name))
    return session.execute(take_free).first() is not None


def release(session: Session, name: str, holder: str) -> bool:
    """Give lease `name` up if `holder` still holds it, so another process takes it over at its next
    pass rather than once it expires. True if it was `holder`'s."""
    return _rows_changed(session, delete(Lease).where(Lease.name == name, Lease.holder == holder)) == 1


def _rows_changed(session: Session, statement) -> int:
    return cast(CursorResult, session.execute(statement)).rowcount


def current_holder(session: Session, name: str) -> str | None:
    """Who holds lease `name` now (None: nobody, or an expired holder)."""
    return session.scalar(select(Lease.holder).where(Lease.name == name, Lease.expires_at >= database_now(session)))


class LeaseHolder:
    """One process's claim on one lease: renew() at the start of each pass and every interval during it
    (LeasedLoop), release() when the process stops. Logs when this process takes the role over and when it loses it."""

    def __init__(self, database_url: str, name: str, ttl_s: float):
        self.database_url = database_url
        self.name = name
        self.ttl_s = ttl_s
        self.holder = holder_id()
        self.held = False

    def renew(self) -> bool:
        """Take or keep the lease, in a transaction of its own; True while this process holds it.
        A database error propagates, and counts as not holding it."""
        held = False
        try:
            with session_scope(self.database_url) as session:
                acquired = acquire_or_renew(session, self.name, self.holder, self.ttl_s)
            held = acquired  # only once committed: before that, no other process sees it
        finally:
            self._note(held)
        return held

    def release(self) -> None:
        if not self.held:
            return
        try:
            with session_scope(self.database_url) as session:
                release(session, self.name, self.holder)
            log.info("released the %r lease (holder %s): another process takes it over at its next pass",
                     self.name, self.holder)
        except Exception:  # stopping anyway: the lease expires on its own within its TTL
            log.warning("could not release the %r lease; another process takes it over when it expires, "
                        "within %ss", self.name, self.ttl_s, exc_info=True)
        self.held = False

    def _note(self, held: bool) -> None:
        if held and not self.held:
            log.info("took over the %r lease (holder %s): this process now plays that role", self.name, self.holder)
        elif self.held and not held:
            log.info("lost the %r lease (holder %s): another process plays that role now, or the database is "
                     "unreachable", self.name, self.holder)
        self.held = held


# A lease lasts this many of its loop's intervals: the holder renews it every interval, so it must miss
# two renewals in a row (dead, frozen, cut off from the database) before another process takes over.
LEASE_TTL_INTERVALS = 3
# How long stop() waits for a pass under way to end (and the lease to be released) before giving up:
# the lease then expires on its own.
STOP_WAIT_S = 5


class LeasedLoop(threading.Thread):
    """A background loop that every API process runs and only the holder of its lease works: one
    pass per interval for the whole deployment (the reaper, the scheduler). Subclasses say what a
    pass does (work); a failed pass is logged and the loop goes on."""

    def __init__(self, database_url: str, lease: str, interval_s: float):
        super().__init__(name=f"qlora-{lease}", daemon=True)
        self.interval_s = interval_s
        self.lease = LeaseHolder(database_url, lease, LEASE_TTL_INTERVALS * interval_s)
        self.stopped = threading.Event()

    def work(self) -> dict[str, int]:
        raise NotImplementedError

    def run(self) -> None:
        try:
            while True:
                try:
                    counts = self.pass_once()
                    if counts and any(counts.values()):
                        log.info("%s: %s", self.lease.name, counts)
                except Exception:  # a database or storage blip must not end the loop
                    log.exception("%s pass failed; trying again in %ss", self.lease.name, self.interval_s)
                if self.stopped.wait(self.interval_s):
                    return
        finally:
            self.lease.release()  # so a restart hands over at once, not once the lease expires

    def pass_once(self) -> dict[str, int] | None:
        """One pass if this process holds (or can take) the lease; None while another one does.

        The lease is renewed every interval while the pass runs, not only before it: a pass that waits on a
        row lock (a claim holding a team's row, a long transaction of an admin) or on slow storage can outlast
        the TTL, and renewed only once per pass the lease then went to another process, whose pass overlapped
        this one (both sent the same unsent jobs' messages, both planned preemptions from the same snapshot).
        A live process's long pass is work, not a sign of death; only a holder that cannot renew (dead,
        frozen, cut off from the database) hands over, and what its pass still does is fenced by compare-and-sets."""
        if not self.lease.renew():
            return None
        done = threading.Event()
        renewer = threading.Thread(target=self._renew_until, args=(done,), name=f"{self.name}-renew", daemon=True)
        renewer.start()
        try:
            return self.work()
        finally:
            done.set()
            renewer.join()

    def _renew_until(self, done: threading.Event) -> None:
        while not done.wait(self.interval_s):
            try:
                self.lease.renew()  # a loss is logged by the holder; the pass's own writes stay fenced
            except Exception:  # the database out of reach: the next interval tries again, until the TTL runs out
                log.warning("could not renew the %r lease during a pass; trying again in %ss",
                            self.lease.name, self.interval_s, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(STOP_WAIT_S)
