"""Every API route parses a JSON body as the database reads JSON back (pydantic_core.from_json).

Python's json module takes a lone surrogate escape ("\\udc80") and makes a string no UTF-8 can hold;
stored in a JSON column (a job's metadata, its spec), the row could then never be read again: every
read of the job, the worker's claim among them, would fail. Parsed here, such a body is refused as
malformed JSON before any route sees it, and so is anything else the database's reader would refuse
(nesting past its limit), but a number too long for it to read, which is read as the float it denotes for the
field's own check to refuse (long_numbers_as_floats, which the CLI's spec files share). A key given twice in one object is refused too,
naming it: from_json keeps the last, so `{"learning_rate": 1e-4, ..., "learning_rate": 0.9}` trained
with a spec its caller never read.

A body is also bounded in how many values it holds (MAX_JSON_VALUES), not only in bytes: no request
of this API needs more than a few hundred, and 16 MiB of `{"f0": 1, "f1": 1, ...}` would have the
validator build and answer an error for each of a million unknown fields. That bound is checked on the
bytes before they are parsed (_more_values_than_in): parsed first, 14 MiB of `[{}, {}, ...]` became five
million dicts, 376 MiB of the API's memory and a second of its event loop for each such request, during
which no other team's request was answered.

And the caller is known before the body is read: FastAPI reads and parses a body before it solves a
route's dependencies, so a request with no key or a wrong one was read whole (up to
QLORA_MAX_JSON_BYTES, 16 MiB) and parsed before its 401; thirty such at once held 400 MB of the API's
memory. Now it is answered 401 before anything of its body is read (a client that sent
`Expect: 100-continue` is never asked for it)."""

from __future__ import annotations

import asyncio
import codecs
import json
import re
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any, get_args, get_origin

from fastapi import HTTPException, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic_core import from_json
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.deps import get_caller, get_session, team_turn
from app.errors import Invalid, field_errors
from app.jobs.turns import Busy, Turns
from app.shares import KEYLESS, ClientLeft
from worker.training.spec import DECODER_WITHOUT_REPEATS, RepeatedKey, excerpt, long_numbers_as_floats

MAX_JSON_VALUES = 10_000  # objects, arrays and scalars in one body; a job spec with full metadata holds ~200
# Requests with a JSON body one API key may have in progress at once in one API process; the next waits for one
# of them to end (JSON_TURN_WAIT_S at most, then 429 `busy`), before any of its body is read. Each holds its body
# (up to QLORA_MAX_JSON_BYTES, 16 MiB) from the moment it is read until it is answered, which for a job creation
# includes its wait for the team's turn: without a bound, one key sending forty 15 MiB bodies slowly grew the API
# by 600 MiB, as many as it liked. A script creating jobs in parallel gets its answers as before (its creations
# go one at a time anyway, app/jobs/turns.py).
JSON_REQUESTS_PER_KEY = 4
JSON_TURN_WAIT_S = 60.0

# Past this size a body is parsed on a thread of its own, not on the event loop: the checks below take several
# ms a MiB, and a 15 MiB body held the loop, and every other team's request, 75-115 ms (asyncio's slow-callback
# log, the API in uvicorn); 13-32 ms of it is left there now, FastAPI's validation and the answer.
# bench/burst_bench.py --body-mib measures it beside another team. Below it, the hop would cost more than the parse.
PARSE_ON_LOOP_BYTES = 256 * 1024
# Two such parses at once in each API process: each holds about three times its body, and a team that sends
# large bodies in a loop then waits for its own turn, while small bodies are parsed on the loop as they come.
_LARGE_BODY_PARSER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="json-body")


class CheckedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) <= PARSE_ON_LOOP_BYTES:
                self._json = checked_json(body)
            else:
                self._json = await asyncio.get_running_loop().run_in_executor(_LARGE_BODY_PARSER, checked_json, body)
        return self._json


def checked_json(body: bytes) -> Any:
    """The value of the JSON text `body`, as the database would read it back, or the error that refuses it:
    see the module's docstring."""
    # A UTF-8 byte order mark, which Windows editors save before a file's text (`curl -d @spec.json` sends it), is
    # read past, as RFC 8259 lets a parser do and as a dataset's reader does: it was "not valid JSON: expected value
    # at line 1 column 1", which named nothing the caller could see.
    body = body.removeprefix(codecs.BOM_UTF8)
    if _more_values_than_in(body, MAX_JSON_VALUES):  # before parsing: see the module's docstring
        raise _too_many_values()
    try:
        value = from_json(body)
    except ValueError as exc:
        body = long_numbers_as_floats(body) if str(exc).startswith(NUMBER_OUT_OF_RANGE) else body
        try:
            value = from_json(body)
        except ValueError as exc:  # FastAPI answers a JSONDecodeError as a 422 naming the body
            raise json.JSONDecodeError(str(exc), body.decode("utf-8", "replace"), 0) from None
    if more_values_than(value, MAX_JSON_VALUES):  # empty containers, which the bytes' count leaves out
        raise _too_many_values()
    repeated = _repeated_key(body)
    if repeated is not None:  # worded as a spec file's and a dataset row's refusal (RepeatedKey)
        raise json.JSONDecodeError(str(repeated), body.decode("utf-8", "replace"), 0)
    return value


# from_json refuses a number whose integer part has more digits than FROM_JSON_MAX_DIGITS ("number out of range", its
# whole body a 422 naming no field); such a number is read as the float it denotes (long_numbers_as_floats).
NUMBER_OUT_OF_RANGE = "number out of range"


def _repeated_key(body: bytes) -> RepeatedKey | None:
    """The refusal of the first key the body gives twice in one object ({"learning_rate": 1e-4, ..., "learning_rate": 1},
    as a script that joins JSON by hand makes), which from_json takes as the last: a job would train with
    another spec than the one its caller read. Read again by Python's parser, on a body already found
    valid and bounded: a few KiB for any request of this API."""
    try:
        DECODER_WITHOUT_REPEATS.decode(body.decode("utf-8"))
    except RepeatedKey as exc:
        return exc
    except (ValueError, RecursionError):  # what from_json reads and Python's parser does not (nesting past its depth)
        return None
    return None


def _too_many_values() -> HTTPException:
    return HTTPException(413, f"the JSON body holds more than {MAX_JSON_VALUES:,} values; no request of this API "
                              "needs as many")


# A string of the body once its escaped backslashes and quotes are gone (no quote is left inside one), or a
# separator outside any string.
_STRING_OR_SEPARATOR = re.compile(rb'"[^"]*"|[,:]')


def _more_values_than_in(body: bytes, limit: int) -> bool:
    """Whether the JSON text `body` holds more than `limit` values (keys counted, as more_values_than does),
    read from its bytes without parsing it, in tens of milliseconds for 16 MiB. A text holds at least one
    value more than its commas and colons outside strings, and at least one per string: past 2 x `limit` of
    those together it holds more than `limit`, so the scan stops there however many there are. A text that
    is not JSON is counted as far as it reads as JSON, which is as far as the parser that refuses it would
    build anything."""
    if body.count(b",") + body.count(b":") < limit:  # the common case, a few KiB: not even that many in all
        return False
    # JSON pairs backslashes from the left: with each escaped backslash and then each escaped quote gone,
    # every quote left opens or closes a string.
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = separators = 0
    for token in _STRING_OR_SEPARATOR.finditer(plain):
        if plain[token.start()] == ord('"'):
            strings += 1
        else:
            separators += 1
        if strings + separators > 2 * limit:
            return True
    return 1 + separators > limit


def more_values_than(value: Any, limit: int) -> bool:
    """Whether `value` holds more than `limit` values in all, counted until it passes the limit."""
    pending, seen = [value], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(item, dict):
            pending.extend(item.values())
            seen += len(item)  # each key counts too
        elif isinstance(item, list):
            pending.extend(item)
    return False


def json_body_turns() -> Turns:
    """Each key's turns at requests with a JSON body, in this process (JSON_REQUESTS_PER_KEY)."""
    return Turns(JSON_TURN_WAIT_S, size=JSON_REQUESTS_PER_KEY, busy=lambda waited: Busy(
        f"this API key has {JSON_REQUESTS_PER_KEY} requests with a JSON body in progress in this API process, the "
        f"most at once (each holds its body, up to QLORA_MAX_JSON_BYTES), and this one waited {waited:g} s for one "
        "of them to end; send it again"))


def outside_team_shares(endpoint: Callable) -> Callable:
    """Marks a route whose requests are not counted in their team's share (app/shares.py): an upload, which
    holds its place for as long as its client sends the body, however slowly, and has a cap per key of its
    own (QLORA_MAX_UPLOADS_PER_KEY). Counted, a team's uploads would leave its polls waiting."""
    endpoint.outside_team_shares = True  # type: ignore[attr-defined]
    return endpoint


class CheckedJSONRoute(APIRoute):
    """The route class of every router (app/*/routes.py). A route that authenticates its caller does so first
    (401 before anything is queued or read), then, with a JSON body, waits for the key's turn (json_body_turns),
    then a job creation or preflight for the team's turn (app/deps.py, team_turn), and any other route (but an
    upload's) for the team's share of the requests in progress (app/shares.py), before any of its dependencies
    takes a thread or a connection. A route that takes no key but a database session waits for the share of the
    requests without a key (app/shares.py, KEYLESS). A JSON body is parsed with CheckedJSONRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        once = single_query_parameters(self.dependant)
        if once:
            handler = _refusing_repeats(handler, once)
        json_body = self.body_field is not None
        if not _needs(self.dependant, get_caller):
            # No key, yet a thread and a connection (GET /metrics, a signed download link): in the share of the
            # requests without a key, one team's worth (app/shares.py, KEYLESS), or anyone held them all.
            keyless = _needs(self.dependant, get_session)
            if not json_body and not keyless:  # nothing added to its path
                return handler

            async def unkeyed(request: Request) -> Response:
                if json_body:
                    request = CheckedJSONRequest(request.scope, request.receive)
                if not keyless:
                    return await handler(request)
                return await _in_share(request, KEYLESS, handler)
            return unkeyed
        creation = _needs(self.dependant, team_turn)
        # A creation or preflight is not counted in its team's share either: its team's turn bounds it to one in
        # progress per team, and it may take a minute (waiting for a preflight process, then running it), which,
        # counted, held the whole share of a team among 7 busy ones and left its polls waiting for it, then 429.
        shared = not getattr(self.endpoint, "outside_team_shares", False) and not creation

        async def checked(request: Request) -> Response:
            # 401 before the body or a queue; the route's own dependency then finds the caller cached
            caller = await get_caller(request, request.headers.get("authorization"))
            async with AsyncExitStack() as turns:
                if json_body:
                    await turns.enter_async_context(request.app.state.json_bodies.turn(caller.key_id))
                    request = CheckedJSONRequest(request.scope, request.receive)
                if creation:  # held until its answer is built, after its commit
                    await _body_read(request)  # first: a client sending it slowly must not hold the team's turn
                    await turns.enter_async_context(request.app.state.team_turns.turn(caller.team_id))
                if shared:
                    return await _in_share(request, caller.team_id, handler)
                return await handler(request)

        return checked


async def _in_share(request: Request, team_id: str, handler: Callable[[Request], Coroutine[Any, Any, Response]]) -> Response:
    """The handler's answer, once the team has a turn of its share (app/shares.py). The request is watched while it
    waits where nothing of its body is left to read (a body read by the watch would be lost to the route); a
    client that left has its place given up."""
    left = None if declares_body(request.headers) else _client_left(request)
    async with AsyncExitStack() as turn:
        try:
            await turn.enter_async_context(request.app.state.team_shares.turn(team_id, left))
        except ClientLeft:
            return Response(status_code=499)  # sent to no one: uvicorn drops it
        return await handler(request)


def declares_body(headers: Headers) -> bool:
    """Whether a request says it sends a body: a chunked one, or a Content-Length but 0 (a cancel, a pause or a
    resume sends neither)."""
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


def _client_left(request: Request) -> Callable[[], Coroutine[Any, Any, None]]:
    """Returns when the request's client has gone (its connection closed): for a request whose body is read or
    that has none, whose messages left are its empty body's and the disconnect."""
    async def left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return left


async def _body_read(request: Request) -> None:
    """The request's body read (kept by the request for its route), failing as FastAPI's own reading of it
    fails: the body's bound's 413 as it is, anything else (the client gone mid-body) a 400."""
    try:
        await request.body()
    except StarletteHTTPException:  # FastAPI's own and the body bound's (app/main.py, RequestScope)
        raise
    except Exception as exc:
        raise HTTPException(400, "There was an error parsing the body") from exc


def single_query_parameters(dependant: Dependant) -> frozenset[str]:
    """The names of the query parameters a route and its dependencies declare that take one value (not a list)."""
    names: set[str] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        names.update(field.alias for field in current.query_params if not _takes_a_list(field.field_info.annotation))
        pending.extend(current.dependencies)
    return frozenset(names)


def _takes_a_list(annotation: Any) -> bool:
    """Whether a parameter's type is a list, set or tuple (?tag=a&tag=b), looked for through Optional and Annotated."""
    origin = get_origin(annotation)
    if origin in (list, set, frozenset, tuple) or annotation in (list, set, frozenset, tuple):
        return True
    return any(_takes_a_list(arg) for arg in get_args(annotation)) if origin is not None else False


def _refusing_repeats(handler: Callable[[Request], Coroutine[Any, Any, Response]],
                      once: frozenset[str]) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """`handler`, refusing a request that gives one of the parameters `once` more than once (`?limit=10&limit=20`):
    FastAPI took the last, so a script that appended a parameter to a URL that already had it got another page
    size, cursor or status filter than the one its own code read first, without a word. Invalid, naming the
    parameter and the values given, as any other bad parameter is (422; 400 on /v1)."""
    async def refusing(request: Request) -> Response:
        if request.scope.get("query_string"):
            given: dict[str, list[str]] = {}
            for name, value in request.query_params.multi_items():
                if name in once:
                    given.setdefault(name, []).append(value)
            for name, values in given.items():
                if len(values) > 1:
                    said = ", ".join(excerpt(value) for value in values[:3]) + (", ..." if len(values) > 3 else "")
                    raise Invalid(f"{name}: given {len(values)} times in the query string ({said}); give it once",
                                  details=field_errors([(name, f"given {len(values)} times; give it once")]))
        return await handler(request)
    return refusing


def _needs(dependant: Dependant, call: Callable) -> bool:
    """Whether `call` is among the dependencies of `dependant`, at any depth (AdminDep needs CallerDep)."""
    return any(d.call is call or _needs(d, call) for d in dependant.dependencies)
