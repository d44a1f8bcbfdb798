"""GET /ready's check: can this process reach the database? One check at a time per process, its answer shared
by every probe that asks while it runs and for FRESH_S after it. The route takes no key, and each check took a
connection of its own: a flood of probes (or of anyone) held the pool's connections and the queue for them
(app/db.py, read_only), and every team's polls waited behind it; against a database that refused them, each
probe opened one more connection attempt. Now a flood costs one `SELECT 1` a second."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.db import read_only

log = logging.getLogger(__name__)

FRESH_S = 1.0  # a probe every few seconds still gets a fresh answer; a flood of them shares one


@dataclass(frozen=True)
class Answer:
    ok: bool
    database: str  # "ok", or what is wrong with it


class Readiness:
    def __init__(self, database_url: str, timeout_s: float):
        self.database_url = database_url
        self.timeout_s = timeout_s
        self._check: asyncio.Task[Answer] | None = None
        self._checked_at = 0.0

    async def answer(self) -> Answer:
        check = self._check
        if check is None or (check.done() and time.monotonic() - self._checked_at > FRESH_S):
            check = self._check = asyncio.ensure_future(self._run())
        # Shielded: a probe that leaves (its client gone) does not cancel the check the others wait on.
        return await asyncio.shield(check)

    async def _run(self) -> Answer:
        try:
            await asyncio.wait_for(read_only(self.database_url, lambda s: s.execute(text("SELECT 1")).scalar_one()),
                                   self.timeout_s)
            answer = Answer(True, "ok")
        except (DBAPIError, PoolTimeout, TimeoutError) as exc:
            why = (f"did not answer within QLORA_API_DATABASE_TIMEOUT_S ({self.timeout_s} s)"
                   if isinstance(exc, TimeoutError) else f"failed: {exc.__class__.__name__}")
            log.error("readiness: the database %s: %s", why, exc)
            answer = Answer(False, f"unreachable: the database {why}")
        self._checked_at = time.monotonic()
        return answer
