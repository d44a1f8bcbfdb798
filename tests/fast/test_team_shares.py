"""Each team's share of the requests one API process has in progress (app/shares.py): a team alone holds
three quarters of the slots, two busy teams half of that each, a team over its share waits in its own queue
(first come, first served) and is started as the others' requests end, and a wait in vain is a 429 that says
when to come back. The end-to-end check, with a real API whose route threads one team's slow requests hold,
is tests/service/test_bounded_resources.py."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from app.shares import ClientLeft, TeamBusy, TeamShares


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
            assert shares.now().refused == {"waited": 1, "queue_full": 0}  # /metrics counts it
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
            now = shares.now()  # what /metrics shows: one team, 3 in progress, 2 waiting, 1 refused
            assert (now.teams_busy, now.teams_waiting, now.in_progress, now.waiting, now.most_waiting) == (1, 1, 3, 2, 2)
            assert now.refused == {"waited": 0, "queue_full": 1}
            for request in queued:
                request.cancel()  # their clients left: they leave the queue
            await asyncio.gather(*queued, return_exceptions=True)
            assert shares.in_progress("a") == (3, 0)
    asyncio.run(scenario())


def test_a_waiting_request_whose_client_left_leaves_the_queue_and_the_team_is_forgotten():
    """The end-to-end check, with a real client that leaves: tests/service/test_bounded_resources.py."""
    async def scenario() -> None:
        shares = TeamShares(slots=4)  # alone: 3
        flood = AsyncExitStack()
        await hold(shares, "a", 3, flood)
        client_gone = asyncio.Event()

        async def left() -> None:
            await client_gone.wait()

        waiting = asyncio.ensure_future(shares.turn("a", left).__aenter__())
        await asyncio.sleep(0)
        assert shares.in_progress("a") == (3, 1)
        client_gone.set()
        with pytest.raises(ClientLeft):
            await waiting
        assert shares.in_progress("a") == (3, 0)
        await flood.aclose()
        assert not shares._teams
    asyncio.run(scenario())


def test_a_teams_creations_waiting_for_their_turn_hold_none_of_its_share(client, session):
    """A team's job creations and preflights go one at a time (app/jobs/turns.py). Waiting for that turn
    inside their share, more of them than the share held all of it, and the team's own polls (its dashboard)
    waited behind creations that were themselves only waiting. The turn is now awaited before the share."""
    import httpx
    from sqlalchemy import select

    from app.routing import JSON_REQUESTS_PER_KEY
    from app.teams.service import create_key
    from app.teams.tables import Team

    app = client.app
    team_id = session.scalar(select(Team.id).where(Team.name == "team-a"))
    creations = app.state.team_shares.share(teams=1) + 1
    keys = [client.headers["Authorization"]] + [f"Bearer {create_key(session, 'team-a')[1]}"  # a key's JSON requests are capped
                                                for _ in range(creations // JSON_REQUESTS_PER_KEY)]
    session.commit()

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                     headers=dict(client.headers)) as api:
            async with app.state.team_turns.turn(team_id):  # the team's creation in progress holds its turn
                waiting = [asyncio.ensure_future(api.post("/jobs/preflight", json={"dataset_id": "0" * 32, "base_model": "tiny"},
                                                          headers={"Authorization": keys[i % len(keys)]}))
                           for i in range(creations)]
                deadline = asyncio.get_running_loop().time() + 10
                while (app.state.team_turns._holders.get(team_id, 0) - 1 + sum(app.state.team_shares.in_progress(team_id))
                       < creations):  # every creation has arrived, waiting for the turn or for the share
                    assert asyncio.get_running_loop().time() < deadline, "the creations did not arrive"
                    await asyncio.sleep(0.01)
                assert app.state.team_shares.in_progress(team_id) == (0, 0)  # waiting for the turn, they hold none of it
                listing = await asyncio.wait_for(api.get("/datasets"), 10)
                assert listing.status_code == 200, listing.text
            answers = await asyncio.gather(*waiting)
            assert all(answer.status_code < 500 for answer in answers), [a.text for a in answers]
    asyncio.run(scenario())


def test_a_teams_creation_does_not_wait_for_its_share_held_by_its_polls(client, session):
    """A creation or preflight may take a minute (a preflight process to wait for, then the preflight), and its
    team's turn lets one in progress per team: counted in the share, it held all of it where 7 teams are busy
    (a share of 1), and its polls waited behind it. Here the team's polls hold its whole share: its preflight
    is still answered."""
    import httpx
    from sqlalchemy import select

    from app.teams.tables import Team

    app = client.app
    team_id = session.scalar(select(Team.id).where(Team.name == "team-a"))

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                     headers=dict(client.headers)) as api:
            async with AsyncExitStack() as polls:
                await hold(app.state.team_shares, team_id, app.state.team_shares.share(), polls)
                answer = await asyncio.wait_for(api.post("/jobs/preflight", json={
                    "dataset_id": "0" * 32, "base_model": "tiny"}), 10)
                assert answer.status_code == 422, answer.text  # its spec is incomplete: answered, not queued
                assert app.state.team_shares.in_progress(team_id) == (app.state.team_shares.share(), 0)
    asyncio.run(scenario())
