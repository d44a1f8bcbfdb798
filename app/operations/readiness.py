"""GET /ready's check: can this process reach the database? One check at a time per process, its answer shared
by every probe that asks while it runs and for FRESH_S after it. The route takes no key, and each check took a
connection of its own: a flood of probes (or of anyone) held the pool's connections and the queue for them
(app/db.py, read_only), and every team's polls waited behind it; against a database that refused them, each
probe opened one more connection attempt. Now a flood costs one `SELECT 1` a second.

The broker and object storage are looked at beside it, and named in the answer: it said "ok" while Redis or the store
was down, and uploads answered 503 and jobs waited unsent with nothing to tell an operator's monitoring why. Only the
database makes the answer a 503: every request needs it, while without the broker or storage the API still answers
polls, lists and most of its routes, and the other API processes have the same broker and storage, so a balancer
that drained this one for them would turn a partial outage into a whole one. Each look is bounded by the timeout,
and one still hanging is not started again beside itself (the store's client retries for minutes)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.db import read_only

log = logging.getLogger(__name__)

FRESH_S = 1.0  # a probe every few seconds still gets a fresh answer; a flood of them shares one


@dataclass(frozen=True)
class Answer:
    ok: bool  # the database answers: this process can serve
    database: str  # "ok", or what is wrong with it
    broker: str = "ok"  # the same for the broker (QLORA_BROKER_URL) and storage (QLORA_STORAGE_URL)
    storage: str = "ok"

    @property
    def status(self) -> str:
        if not self.ok:
            return "unavailable"
        return "ok" if self.broker == self.storage == "ok" else "degraded"

    def body(self) -> dict[str, str]:
        return {"status": self.status, "database": self.database, "broker": self.broker, "storage": self.storage}


class Look:
    """One blocking look (a call that raises when what it looks at is down) in a thread, bounded by `timeout_s`;
    while one is still running (hung past its timeout), the next answers so at once instead of starting another."""

    def __init__(self, name: str, setting: str, call: Callable[[], object], timeout_s: float):
        self.name, self.setting, self.call, self.timeout_s = name, setting, call, timeout_s
        self._running = threading.Event()

    async def answer(self) -> str:
        hung = f"unreachable: the {self.name} did not answer within QLORA_API_DATABASE_TIMEOUT_S ({self.timeout_s} s)"
        if self._running.is_set():
            return hung
        self._running.set()

        def look() -> None:
            try:
                self.call()
            finally:
                self._running.clear()
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.to_thread(look)), self.timeout_s)
            return "ok"
        except TimeoutError:
            log.error("readiness: %s", hung)
            return hung
        except Exception as exc:  # what the broker's or the store's client raises; only its kind is said
            log.error("readiness: the %s (%s) failed: %s", self.name, self.setting, exc)
            return f"unreachable: the {self.name} ({self.setting}) failed: {exc.__class__.__name__}"


class Readiness:
    def __init__(self, database_url: str, timeout_s: float, looks: list[Look] | None = None):
        self.database_url = database_url
        self.timeout_s = timeout_s
        self.looks = looks or []
        self._check: asyncio.Task[Answer] | None = None
        self._checked_at = 0.0

    async def answer(self) -> Answer:
        check = self._check
        if check is None or (check.done() and time.monotonic() - self._checked_at > FRESH_S):
            check = self._check = asyncio.ensure_future(self._run())
        # Shielded: a probe that leaves (its client gone) does not cancel the check the others wait on.
        return await asyncio.shield(check)

    async def _run(self) -> Answer:
        database, said = await asyncio.gather(self._database(), asyncio.gather(*(look.answer() for look in self.looks)))
        self._checked_at = time.monotonic()
        return Answer(database.ok, database.database, **dict(zip((look.name for look in self.looks), said, strict=True)))

    async def _database(self) -> Answer:
        try:
            await asyncio.wait_for(read_only(self.database_url, lambda s: s.execute(text("SELECT 1")).scalar_one()),
                                   self.timeout_s)
            answer = Answer(True, "ok")
        except (DBAPIError, PoolTimeout, TimeoutError) as exc:
            why = (f"did not answer within QLORA_API_DATABASE_TIMEOUT_S ({self.timeout_s} s)"
                   if isinstance(exc, TimeoutError) else f"failed: {exc.__class__.__name__}")
            log.error("readiness: the database %s: %s", why, exc)
            answer = Answer(False, f"unreachable: the database {why}")
        return answer
