"""Each team's share of the requests one API process has in progress at once (QLORA_REQUEST_SLOTS).

A request in progress holds something every team needs: a route thread (40 in all, anyio's pool) for a
`def` route, a database connection (16 pooled and 8 more at a peak) while it talks to Postgres, and its
turns of the event loop and its CPU. Without a share, one team's scripts sending cheap GETs back to back
from 30 threads raised another team's p99 from 96 ms to 1041 ms; a team whose requests were slow (waiting
on a lock, on S3) held every route thread and connection, and every other team waited for them.

So every authenticated request first waits for its team's turn here, on the event loop, before its route
takes a thread or a connection (app/routing.py); a team over its share waits in a queue of its own, which
holds a socket and a parked coroutine, nothing else. Unauthenticated requests (their 401), /health and the
dashboard's static files never wait here. The requests that need no key yet take a thread and a database
connection (GET /metrics, a browser's signed download link) wait here as one team of their own (KEYLESS):
uncounted, anyone who could reach the API held every route thread and connection with them (80 scrapes of
/metrics while a migration locked the jobs table), and no team was answered until they ended.

The share is dynamic, as a scheduler's fair share with borrowing is: the slots are split equally among
the teams that have requests in progress or waiting, after a quarter of them kept for teams that come
(`share`). A team alone, say with 200 polling scripts, may hold three quarters of them (6 of the 8 by
default), which the process's CPU serves as fast as 30 in progress; a second team that arrives starts its
first requests at once on the quarter kept, while the first team's share halves and the requests it has
beyond the new share end (a poll's few ms) before it starts another. A fixed share would leave a lone team's
requests waiting beside idle slots; no share, every team waiting behind the busiest. The slots are few
(QLORA_REQUEST_SLOTS says why): what another team's request waits for is mostly the event loop's and the
CPU's time for the requests in progress beside it, so the fewer of the busy team's, the sooner it is answered.
Job creations and preflights are not counted here: their team's turn lets one in progress per team (app/jobs/
turns.py), and one may take a minute. Streams (SSE) and uploads are not either: each has a cap per key of its
own (app/slots.py), an upload's route is not counted while its body arrives, and a stream's route is counted
only until its answer starts (its polls then run as the job's feed, one per watched job, app/jobs/stream.py).

A request that waits QUEUE_WAIT_S without its turn is answered 429 `busy` with a Retry-After; a team with
QUEUE_LIMIT requests waiting already has the next one refused at once, so a team's queue is bounded too.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from app.jobs.turns import Busy

# How long a request waits for its team's turn before its 429: a poll ahead of it takes a few ms, so a
# wait this long means the team asks for far more than the process serves; the client should slow down.
QUEUE_WAIT_S = 30.0
# Requests of one team that may wait at once in one API process; each holds a socket and a parked
# coroutine (a few KiB). Past it the team's next request is refused at once.
QUEUE_LIMIT = 1000
# The "team" of the requests that carry no API key but use the database (see the module's docstring). No team's id
# (a uuid's hex) looks like it.
KEYLESS = "(no API key)"
KEYLESS_WHO = "the requests sent without an API key (GET /metrics, download links)"  # in their refusals


class TeamBusy(Busy):
    retry_after_s = 2  # requests ahead of it end in ms; a client waiting this long lets them drain


class ClientLeft(Exception):
    """The client of a waiting request left before its turn: nothing is to be answered, its place is given up."""


@dataclass(frozen=True)
class SharesNow:
    """What /metrics shows of this process's shares: totals over the teams, naming none (the endpoint needs
    no key), enough for an operator to see that teams are being queued and how many requests each kind of
    refusal turned away."""

    slots: int
    share: int  # what each busy team may have in progress now
    teams_busy: int  # teams with requests in progress or waiting
    teams_waiting: int  # of those, teams with requests waiting for their share
    in_progress: int
    waiting: int
    most_waiting: int  # the most requests one team has waiting
    refused: dict[str, int]  # 429s since the process started, by reason: "waited" (QUEUE_WAIT_S), "queue_full"


@dataclass
class _Team:
    who: str  # whose requests these are, in a refusal's words
    held: int = 0  # requests of the team in progress
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)  # first come, first served


class TeamShares:
    """Per team, its requests in progress in this process, up to `share()`, the others waiting their turn.
    Used from this process's event loop only: no lock."""

    def __init__(self, slots: int, wait_s: float = QUEUE_WAIT_S, queue_limit: int = QUEUE_LIMIT):
        self.slots, self.wait_s, self.queue_limit = slots, wait_s, queue_limit
        self._teams: dict[str, _Team] = {}  # the teams with requests in progress or waiting
        self.refused: Counter[str] = Counter()  # 429s by reason, for /metrics

    def now(self) -> SharesNow:
        """A snapshot for /metrics; on the event loop, as every use of this object (app/operations/routes.py)."""
        teams = list(self._teams.values())
        return SharesNow(slots=self.slots, share=self.share(), teams_busy=len(teams),
                         teams_waiting=sum(bool(t.waiting) for t in teams), in_progress=sum(t.held for t in teams),
                         waiting=sum(len(t.waiting) for t in teams), most_waiting=max((len(t.waiting) for t in teams), default=0),
                         refused={reason: self.refused[reason] for reason in ("waited", "queue_full")})

    def share(self, teams: int | None = None) -> int:
        """What each of `teams` busy teams (by default those busy now) may have in progress: an equal part of
        the slots less a quarter kept for teams to come, at least one."""
        teams = teams or max(1, len(self._teams))
        return max(1, (self.slots - self.slots // 4) // teams)

    def in_progress(self, team_id: str) -> tuple[int, int]:
        """(requests in progress, requests waiting) of a team."""
        team = self._teams.get(team_id)
        return (team.held, len(team.waiting)) if team else (0, 0)

    @asynccontextmanager
    async def turn(self, team_id: str, left: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[None]:
        """The team's turn. `left`, where given, returns when the request's client has gone: awaited only while
        the request waits, which then ends (ClientLeft) rather than run later for no one (uvicorn does not
        cancel a request whose client left; its client's retry would have been queued beside it)."""
        team = self._teams.setdefault(team_id, _Team(KEYLESS_WHO if team_id == KEYLESS else "this team"))
        if team.waiting or team.held >= self.share():
            await self._wait(team, left)
        else:
            team.held += 1
        try:
            yield
        finally:
            team.held -= 1
            self._pass_on()

    async def _wait(self, team: _Team, left: Callable[[], Awaitable[None]] | None) -> None:
        if len(team.waiting) >= self.queue_limit:
            self.refused["queue_full"] += 1
            raise TeamBusy(f"{team.who}: {self.queue_limit} requests waiting for a share of this API process already, "
                           "the most that may wait; send fewer at once")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        team.waiting.append(turn)
        gone = asyncio.ensure_future(left()) if left is not None else None
        try:
            if gone is None:
                await asyncio.wait_for(asyncio.shield(turn), self.wait_s)
            else:
                await asyncio.wait((turn, gone), timeout=self.wait_s, return_when=asyncio.FIRST_COMPLETED)
                if not turn.done():
                    raise ClientLeft() if gone.done() else TimeoutError()
        except BaseException as exc:  # out of time, or its client left
            if turn.done():  # given its turn as it gave up: hand it on
                team.held -= 1
            else:
                turn.cancel()
                team.waiting.remove(turn)
            self._pass_on()
            if isinstance(exc, TimeoutError):
                self.refused["waited"] += 1
                raise TeamBusy(f"{team.who}: the requests in progress in this API process are at its share ({self.share()} "
                               f"while {len(self._teams)} teams are busy), and this one waited {self.wait_s:g} s for "
                               "one of them to end; send it again, and fewer at once") from None
            raise
        finally:
            if gone is not None:
                gone.cancel()

    def _pass_on(self) -> None:
        """Start the waiting requests that are now within their team's share: a request ended, or a team
        left (nothing in progress or waiting), and the others' shares grew."""
        for team_id in [team_id for team_id, team in self._teams.items() if not team.held and not team.waiting]:
            del self._teams[team_id]
        share = self.share()
        for team in self._teams.values():
            while team.waiting and team.held < share:
                team.waiting.popleft().set_result(None)
                team.held += 1
