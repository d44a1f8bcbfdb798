"""conditional.same_read_turns: reads with the same key one at a time (the thinned view's polls of one job and N: each
starts from the completed buckets the one before it kept), other keys not held behind them, the wait bounded."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.conditional import same_read_turns


def test_reads_with_one_key_take_turns_others_do_not_wait_and_nothing_is_left_behind():
    async def scenario() -> list[str]:
        turns, seen = same_read_turns(30), []
        first_in, release = asyncio.Event(), asyncio.Event()

        async def read(key: str, name: str, hold: asyncio.Event | None = None) -> None:
            async with turns.turn(key):
                seen.append(f"{name} in")
                if hold is not None:
                    first_in.set()
                    await hold.wait()
                seen.append(f"{name} out")

        first = asyncio.create_task(read("job-1", "first", release))
        await first_in.wait()
        second = asyncio.create_task(read("job-1", "second"))
        await asyncio.sleep(0)  # a yield (no time): the second runs up to its wait for the turn
        await read("job-2", "other")  # another job's view: not behind the first
        assert len(turns) == 1 and "second in" not in seen  # job-1: the first holds it, the second waits
        release.set()
        await asyncio.gather(first, second)
        assert len(turns) == 0  # no key kept once nobody holds or waits for it
        return seen

    assert asyncio.run(scenario()) == ["first in", "other in", "other out", "first out", "second in", "second out"]


def test_a_turn_not_had_within_the_wait_is_the_pools_timeout():
    async def scenario() -> None:
        turns, holding, release = same_read_turns(30), asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with turns.turn("job-1"):
                holding.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await holding.wait()
        with pytest.raises(PoolTimeout, match="turn at the same read"):
            async with turns.turn("job-1", wait_s=0.05):
                pass
        assert len(turns) == 1  # the one waiting gave up its place
        release.set()
        await holder
        assert len(turns) == 0

    asyncio.run(scenario())
