"""One job creation or preflight at a time per team, in each API process.

Each of them holds a route thread (of the 40 the API has) and, for seconds, waits for the one preflight
process; a creation also takes the team's row (the queue quota's lock). A team's burst of them, a script
that creates a hundred jobs at once, would otherwise hold every route thread: measured, another team's
`GET /datasets` waited 27 s beside 50 of one team's creations. With a turn per team, awaited before the
route takes a thread or a connection, the burst holds one thread and the others are served; the team's
own requests go one after the other, each answered as before. A request that waits TURN_WAIT_S without
its turn is answered 429 (`busy`), to be sent again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from app.errors import AppError

TURN_WAIT_S = 60.0


class Busy(AppError):
    status = 429
    code = "busy"
    retry_after_s = 5  # the team's creation ahead of it takes seconds


class TeamTurns:
    """Per team, a turn of one (this process's event loop runs every caller: no lock)."""

    def __init__(self, wait_s: float = TURN_WAIT_S):
        self.wait_s = wait_s
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._holders: dict[str, int] = {}  # requests holding or waiting for each team's turn

    @asynccontextmanager
    async def turn(self, team_id: str) -> AsyncIterator[None]:
        gate = self._gates.setdefault(team_id, asyncio.Semaphore(1))
        self._holders[team_id] = self._holders.get(team_id, 0) + 1
        try:
            try:
                await asyncio.wait_for(gate.acquire(), self.wait_s)
            except TimeoutError:
                raise Busy(f"this team's job creations and preflights go one at a time in each API process, and "
                           f"this one waited {self.wait_s:g} s behind the team's others; send it again") from None
            try:
                yield
            finally:
                gate.release()
        finally:
            self._holders[team_id] -= 1
            if not self._holders[team_id]:  # nobody holds or waits: forget the team
                del self._holders[team_id], self._gates[team_id]
