"""Each team's share of the requests one API process has in progress (app/shares.py): a team alone holds
three quarters of the slots, two busy teams half of that each, a team over its share waits in its own queue
(first come, first served) and is started as the others' requests end, and a wait in vain is a 429 that says
when to come back. The end-to-end check, with a real API whose route threads one team's slow requests hold,
is tests/service/test_bounded_resources.py."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from app.shares import TeamBusy, TeamShares


def test_a_team_alone_holds_three_quarters_of_the_slots_and_busy_teams_split_them():
    shares = TeamShares(slots=24)
    assert [shares.share(teams) for teams in (1, 2, 3, 18, 40)] == [18, 9, 6, 1, 1]
    shares = TeamShares(slots=8)  # the default
    assert [shares.share(teams) for teams in (1, 2, 3, 6, 7)] == [6, 3, 2, 1, 1]


async def hold(shares: TeamShares, team: str, count: int, stack: AsyncExitStack) -> None:
    for _ in range(count):
        await stack.enter_async_context(shares.turn(team))


def test_a_team_over_its_share_waits_while_another_team_starts_at_once():
    async def scenario() -> None:
        shares = TeamShares(slots=8)  # alone: 6; two teams: 3 each
        later = AsyncExitStack()
        async with AsyncExitStack() as flood:
            await hold(shares, "a", 6, flood)
            waiting_a = asyncio.ensure_future(hold(shares, "a", 1, later))
            await asyncio.sleep(0)
            assert shares.in_progress("a") == (6, 1) and not waiting_a.done()
            async with shares.turn("b"):  # from the quarter kept: at once, though team a holds its whole share
                assert shares.in_progress("b") == (1, 0)
                assert shares.share() == 3
            # team b left: team a's share is 6 again, but it holds 6 already, so its waiting request still waits
            assert shares.in_progress("a") == (6, 1)
        await waiting_a  # team a's requests ended: the waiting one started
        assert shares.in_progress("a") == (1, 0)
        await later.aclose()
        assert shares.in_progress("a") == (0, 0) and not shares._teams  # nothing in progress: the team is forgotten
    asyncio.run(scenario())


def test_a_team_that_shrank_below_its_old_holding_starts_no_request_until_it_is_under_its_share():
    async def scenario() -> None:
        shares = TeamShares(slots=8)
        a_requests = [AsyncExitStack() for _ in range(6)]
        for stack in a_requests:
            await hold(shares, "a", 1, stack)
        async with shares.turn("b"):  # two teams: a's share is 3, it holds 6
            next_a = asyncio.ensure_future(hold(shares, "a", 1, AsyncExitStack()))
            await asyncio.sleep(0)
            for held in (5, 4, 3):  # not under its share of 3 yet: still waiting
                await a_requests[6 - held - 1].aclose()
                assert shares.in_progress("a") == (held, 1)
            await a_requests[3].aclose()  # 2 in progress: the waiting one starts
            assert shares.in_progress("a") == (3, 0)
            await next_a
    asyncio.run(scenario())


def test_a_request_that_waits_in_vain_is_answered_busy_with_a_retry_after_and_leaves_the_queue():
    async def scenario() -> None:
        shares = TeamShares(slots=4, wait_s=0.01)  # alone: 3
        async with AsyncExitStack() as flood:
            await hold(shares, "a", 3, flood)
            with pytest.raises(TeamBusy) as refused:
                await hold(shares, "a", 1, flood)
            assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "2"
            assert "waited 0.01 s" in refused.value.message
            assert shares.in_progress("a") == (3, 0)
    asyncio.run(scenario())


def test_a_teams_queue_is_bounded():
    async def scenario() -> None:
        shares = TeamShares(slots=4, queue_limit=2)
        async with AsyncExitStack() as flood:
            await hold(shares, "a", 3, flood)
            queued = [asyncio.ensure_future(hold(shares, "a", 1, flood)) for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(TeamBusy, match="2 requests waiting"):
                await hold(shares, "a", 1, flood)
            for request in queued:
                request.cancel()  # their clients left: they leave the queue
            await asyncio.gather(*queued, return_exceptions=True)
            assert shares.in_progress("a") == (3, 0)
    asyncio.run(scenario())
