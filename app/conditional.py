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
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Request, Response
from sqlalchemy.orm import Session

from app.db import read_only

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


async def polled_off_loop(request: Request, read: Callable[[Session], T], encode: Callable[[T], bytes]) -> Response:
    """polled() for an answer that is costly to build (a curve page of 10,000 points: a dict per point, 3 MB of
    JSON): read(session) on the async driver as polled does, then encode(what it read) and the ETag in a worker
    thread. Built by the read on the event loop, such a page held the loop for its whole ~50-100 ms, and
    every other request of the process (another team's poll, /health, a stream's next event) waited behind
    each page in turn (bench/loop_bench.py). The threads are few (BUILDERS): a burst of pages cannot take the
    route threads the `def` routes need, and more than the cores would only share the GIL."""
    found = await read_only(request.app.state.settings.database_url, read)
    body, etag = await anyio.to_thread.run_sync(functools.partial(_encoded, encode, found), limiter=_builders())
    return json_answer(request, body, etag)


def _encoded(encode: Callable[[T], bytes], found: T) -> tuple[bytes, str]:
    body = encode(found)
    return body, etag_of(body)


# Threads that build costly answers at once, per event loop (polled_off_loop): the API's CPU is a core or two,
# and a page waiting for a builder waits off the loop.
BUILDERS = 1
_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()


def _builders() -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(BUILDERS)
    return limiter


# For a polled route's OpenAPI entry.
POLLED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the body would equal the one whose ETag was sent in If-None-Match."}}
