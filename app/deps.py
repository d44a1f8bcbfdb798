"""Dependencies every route shares, as short Annotated aliases."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Header, Request
from pydantic import AfterValidator
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.db import session_scope, sessionmaker_for
from app.errors import Forbidden, Unauthorized
from app.idempotency import service as idempotency
from app.openai.ids import FILE, JOB, native
from app.storage.base import Storage
from app.teams.service import Caller, CallerCache, authenticate, bearer_key_hash

# The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in the
# thread pool, a hop per dependency per request that polls pay for nothing.


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request: committed when the route returns, rolled back if it raises.

    Used with scope="function": the commit happens before the response is sent, so a client
    that gets 201 for a job can read it back at once (with the default scope FastAPI sends the
    response first and commits after: a read right after a create can answer 404).

    Making a session does no I/O (it takes a connection at its first query), so only the end, which
    talks to the database, goes to a thread. Not the thread pool the routes run in: between its route
    and its end a request holds a pooled connection, and if ending had to wait for a route thread
    while every route thread waited for a connection, a burst of requests would stall until the
    pool's timeout. Ends have threads of their own and never wait for a connection, so they always
    give theirs back.
    """
    session = sessionmaker_for(request.app.state.settings.database_url)()
    limiter = getattr(request.app.state, "session_ends", None)  # None: an app run without its lifespan
    try:
        yield session
    except BaseException:
        with anyio.CancelScope(shield=True):  # a request cancelled (its client left) still gives its connection back
            await anyio.to_thread.run_sync(functools.partial(_end, session, commit=False), limiter=limiter)
        raise
    await anyio.to_thread.run_sync(functools.partial(_end, session, commit=True), limiter=limiter)


def session_end_threads() -> anyio.CapacityLimiter:
    """The threads that end request sessions (get_session); made in the app's event loop, at start."""
    return anyio.CapacityLimiter(SESSION_END_THREADS)


SESSION_END_THREADS = 16


def _end(session: Session, commit: bool) -> None:
    try:
        if commit:
            try:
                session.commit()
            except BaseException:
                # A commit the database refused (its disk full, the connection lost) ends no transaction by
                # itself: the rollback runs the request's undo hooks (app.db.on_rollback), so an upload's
                # stored object goes with the row that will never exist, as session_scope does.
                session.rollback()
                raise
        else:
            session.rollback()
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """The caller of this key, from this process's CallerCache while it is fresh (or its refusal, for a key that
    works nowhere), else read in a short session of its own (the request's session may never need a connection at all). `authorization` is
    declared for /docs; the key is read from every Authorization header the request has."""
    key_hash = bearer_key_hash(request.headers.getlist("authorization"))
    cache: CallerCache = request.app.state.callers
    return await cache.caller(key_hash, _key_read(request, cache, key_hash))


def _key_read(request: Request, cache: CallerCache, key_hash: str) -> Callable[[], Awaitable[Caller]]:
    async def read() -> Caller:
        async with cache.reads:  # a few at once (KEY_READS): made-up keys, each a miss, must not take every thread
            return await run_in_threadpool(_read_caller, request.app.state.settings.database_url, key_hash)
    return read


def _read_caller(database_url: str, key_hash: str) -> Caller:
    with session_scope(database_url) as session:
        return authenticate(session, key_hash)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def team_turn() -> None:
    """Declares that a route takes its team's turn for a job creation or preflight in this process
    (app/jobs/turns.py). Its route class awaits it (app/routing.py, CheckedJSONRoute) before the route takes a
    thread or a connection; such a route is not counted in its team's share of the requests in progress
    (app/shares.py), which its turn already bounds to one, and which the team's polls meanwhile use."""


TeamTurnDep = Annotated[None, Depends(team_turn)]


async def one_idempotency_key(request: Request, idempotency_key: Annotated[str | None, Header(
    description="Makes the request safe to send again: the same key, from your team, to this endpoint, within "
                "24 hours, answers with what the first request made (Idempotent-Replayed: true). "
                "1-255 visible ASCII characters; a UUID does. Sent once.")] = None) -> str | None:
    """A creation's key (app/idempotency/): `idempotency_key` declares it so /docs and generated clients show
    it; every value the request sent is read, to refuse two."""
    return idempotency.one_key(request.headers.getlist(idempotency.HEADER))


IdempotencyKeyHeader = Annotated[str | None, Depends(one_idempotency_key)]


async def get_admin(request: Request, caller: CallerDep) -> Caller:
    """The caller, if its key may administer, read again rather than taken from the key cache: an admin key acts on
    every team (disables them, sets their quotas, reads their jobs), and one revoked (leaked, say) or whose team was
    disabled kept doing so for QLORA_KEY_CACHE_S (up to 60 s) in every API process that had read it. Admin requests
    are few; the read costs them a query."""
    if not caller.is_admin:
        raise Forbidden("this needs an admin key (qlora admin create-key TEAM --admin)")
    key_hash = bearer_key_hash(request.headers.getlist("authorization"))
    cache: CallerCache = request.app.state.callers
    try:
        return await cache.read_again(key_hash, _key_read(request, cache, key_hash))
    except Unauthorized:
        cache.forget(lambda kept: kept.key_id == caller.key_id)  # its other requests are refused from now on too
        raise


AdminDep = Annotated[Caller, Depends(get_admin)]


# A job or dataset id in a native route's path, also as /v1 and the openai SDK name it (`ftjob-…`, `file-…`): the same
# job or dataset, so an id copied from the SDK's output works with curl and the dashboard's URLs as with the `qlora` CLI.
# A plain 404 for it was no help; another team's id, prefixed or not, is still as missing as a wrong one.
JobId = Annotated[str, AfterValidator(lambda value: native(value, JOB))]
DatasetId = Annotated[str, AfterValidator(lambda value: native(value, FILE))]
