"""Conditional GETs for what clients poll: each answer carries an ETag, and a poll that sends it back
in If-None-Match while nothing changed gets 304 with no body.

The ETag is a hash of the body itself, so it changes exactly when the answer does, with no version
column to keep in step. A poll still costs its read; it saves the transfer and the client's parse,
which for a page of jobs or a long curve are most of a poller's cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from sqlalchemy.orm import Session

from app.db import read_only

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


def json_answer(request: Request, body: bytes) -> Response:
    """A JSON body with its ETag, or 304 with no body when the client already has it."""
    etag = etag_of(body)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


async def polled(request: Request, read: Callable[[Session], bytes]) -> Response:
    """read(session)'s JSON body, read on the async driver (app.db.read_only), with its ETag (or a 304):
    the reads every poller makes, native and OpenAI-compatible alike."""
    return json_answer(request, await read_only(request.app.state.settings.database_url, read))


# For a polled route's OpenAPI entry.
POLLED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: the body would equal the one whose ETag was sent in If-None-Match."}}
