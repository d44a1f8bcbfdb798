"""One job creation or preflight at a time per team, in each API process.

Each of them holds a route thread (of the 40 the API has) and, for seconds, waits for the one preflight
process; a creation also takes the team's row (the queue quota's lock). A team's burst of them, a script
that creates a hundred jobs at once, would otherwise hold every route thread: measured, another team's
`GET /datasets` waited 27 s beside 50 of one team's creations. With a turn per team, awaited before the
route takes a thread or a connection, the burst holds one thread and the others are served; the team's
own requests go one after the other, each answered as before. A request that waits TURN_WAIT_S without
its turn is answered 429 (`busy`), to be sent again.

The same turns, four per API key, bound the requests with a JSON body a key has in progress
(app/routing.py): each holds its body until it is answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager

from app.errors import AppError

TURN_WAIT_S = 60.0


class Busy(AppError):
    status = 429
    code = "busy"
    retry_after_s = 5  # the team's creation ahead of it takes seconds


class Turns:
    """Per holder (a team, an API key, a job's thinned view: app/conditional.py), turns of `size` (this process's
    event loop runs every caller: no lock). A request that waits `wait_s` without one is refused with
    `busy(wait_s)`, by default the team's creations' Busy below. Holders are forgotten once nobody holds or
    waits for their turns (len: the holders known)."""

    def __init__(self, wait_s: float = TURN_WAIT_S, size: int = 1, busy: Callable[[float], Exception] | None = None):
        self.wait_s = wait_s
        self.size = size
        self._busy = busy or _creations_busy
        self._gates: dict[Hashable, asyncio.Semaphore] = {}
        self._holders: dict[Hashable, int] = {}  # requests holding or waiting for each holder's turns

    def __len__(self) -> int:
        return len(self._gates)

    @asynccontextmanager
    async def turn(self, holder: Hashable, wait_s: float | None = None) -> AsyncIterator[None]:
        """A turn of `holder`'s, waited for up to `wait_s` (default: the turns' own)."""
        wait_s = self.wait_s if wait_s is None else wait_s
        gate = self._gates.setdefault(holder, asyncio.Semaphore(self.size))
        self._holders[holder] = self._holders.get(holder, 0) + 1
        try:
            try:
                await asyncio.wait_for(gate.acquire(), wait_s)
            except TimeoutError:
                raise self._busy(wait_s) from None
            try:
                yield
            finally:
                gate.release()
        finally:
            self._holders[holder] -= 1
            if not self._holders[holder]:  # nobody holds or waits: forget it
                del self._holders[holder], self._gates[holder]


def _creations_busy(waited_s: float) -> Busy:
    return Busy(f"this team's job creations and preflights go one at a time in each API process, and "
                f"this one waited {waited_s:g} s behind the team's others; send it again")
