"""Conditional GETs for what clients poll: each answer carries an ETag, and a poll that sends it back
in If-None-Match while nothing changed gets 304 with no body.

The ETag is a hash of the body itself, so it changes exactly when the answer does, with no version
column to keep in step. A poll still costs its read; it saves the transfer and the client's parse,
which for a page of jobs or a long curve are most of a poller's cost.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Request, Response
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from app.db import connection_wait_s, held_within, read_only, session_scope
from app.jobs.turns import Turns

T = TypeVar("T")

# no-cache: a cache may keep the answer but must ask again each time (with the ETag); private: the
# answer is one team's, never for a shared cache.
CACHE_CONTROL = "private, no-cache"


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110's If-None-Match: a list of tags or "*", compared weakly (a W/ prefix is ignored)."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def json_answer(request: Request, body: bytes, etag: str | None = None) -> Response:
    """A JSON body with its ETag (`etag`: etag_of(body), where it was computed already), or 304 with no body
    when the client already has it."""
    etag = etag or etag_of(body)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


async def polled(request: Request, read: Callable[[Session], bytes]) -> Response:
    """read(session)'s JSON body, read on the async driver (app.db.read_only), with its ETag (or a 304):
    the reads every poller makes, native and OpenAI-compatible alike."""
    return json_answer(request, await read_only(request.app.state.settings.database_url, read))


async def polled_off_loop(request: Request, read: Callable[[Session], T], encode: Callable[[T], bytes], *,
                          read_in_thread: bool = True, one_read_per: Hashable | None = None) -> Response:
    """polled() for an answer that is costly to make (a curve page of 10,000 points: the rows decoded, a dict per
    point, 3 MB of JSON): read(session), encode(what it read) and the ETag, all in a worker thread, on the request
    pool's sync session. On the async driver all of it ran on the event loop, ~40 ms a page, and every other
    request of the process (another team's poll, /health, a stream's next event) waited behind each page in
    turn; with only the building and encoding moved to a thread, the rows' decoding (psycopg's and SQLAlchemy's,
    in the driver's fetch) still held the loop for a third of that, and the other team's poll beside four page
    pullers still took 9 times as long as alone, against 4 times now (bench/loop_bench.py, docs/performance.md).
    At most BUILDERS at once: a burst of pages cannot take the route threads and connections the `def` routes
    need, and more than one would only share the GIL with the loop. A page that cannot start within the
    database's wait (a page ahead of it hung on a database that does not answer) answers 503 as a read that
    gets no connection does (app.db.held_within).

    read_in_thread=False: for a read whose time is the database's and whose rows are few (the thinned view: at
    most 5,000 points, from an aggregation that takes Postgres a second at 510,000), read on the async driver
    (read_only) first, so that the wait holds no builder; only the building and encoding take one.
    `one_read_per` (with read_in_thread=False): reads with the same key run one at a time in the process, for a
    read that leaves behind what the next one starts from (the thinned view's completed buckets): a hundred
    polls of one long job arriving while its view is computed whole (a second) wait for that one, then each
    reads only what is past it, instead of a hundred whole computations at once. The wait is bounded as a
    connection's is (503 database_unavailable past it)."""
    url = request.app.state.settings.database_url
    if read_in_thread:
        make = functools.partial(_read_and_encode, url, read, encode)
    elif one_read_per is None:
        make = functools.partial(_encoded, encode, await read_only(url, read))
    else:
        async with _turns(url).turn(one_read_per):
            found = await read_only(url, read)
        make = functools.partial(_encoded, encode, found)
    async with held_within(_builders(), connection_wait_s(url), "turn at building a large answer"):
        body, etag = await anyio.to_thread.run_sync(make)
    return json_answer(request, body, etag)


def _read_and_encode(url: str, read: Callable[[Session], T], encode: Callable[[T], bytes]) -> tuple[bytes, str]:
    with session_scope(url) as session:
        return _encoded(encode, read(session))


def _encoded(encode: Callable[[T], bytes], found: T) -> tuple[bytes, str]:
    body = encode(found)
    return body, etag_of(body)


# Large answers made at once, per event loop (polled_off_loop): one, since the process's Python runs on one core
# (the GIL) that the event loop needs too.
BUILDERS = 1
_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()


def _builders() -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(BUILDERS)
    return limiter


def same_read_turns(wait_s: float) -> Turns:
    """One read at a time per key (polled_off_loop's one_read_per); one that waits `wait_s` without its turn gets
    the pool's TimeoutError, answered 503 database_unavailable, as a wait for a connection is (held_within)."""
    return Turns(wait_s, busy=lambda waited: PoolTimeout(f"no turn at the same read came free within {waited:g} s"))


_turns_of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = weakref.WeakKeyDictionary()


def _turns(url: str) -> Turns:
    loop = asyncio.get_running_loop()
    turns = _turns_of.get(loop)
    if turns is None:
        turns = _turns_of[loop] = same_read_turns(connection_wait_s(url))
    return turns


# For a polled route's OpenAPI entry.
POLLED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the body would equal the one whose ETag was sent in If-None-Match."}}
