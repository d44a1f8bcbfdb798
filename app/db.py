"""Engine, sessions, and the declarative base shared by every domain's models.

A request gets one session: services flush, the request commits on success and rolls back on
error. Work that must only happen once a row is really stored (sending a queue message for a
new job) is registered with `after_commit` and runs right after the commit, never before.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TypeVar

import anyio.to_thread
from pydantic_core import from_json
from sqlalchemy import DateTime, MetaData, String, create_engine, event, func, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

T = TypeVar("T")

# Stable constraint names, so Alembic migrations can name what they alter on both Postgres and SQLite.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use app.db.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def insert_for(session: Session):
    """The session's dialect's INSERT, which has ON CONFLICT (both Postgres and SQLite do; the generic one not)."""
    return postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


# Fault injection for tests/faults: this process's clock runs this many seconds off (a host whose clock is
# wrong: NTP down, a VM resumed from suspend). Read once; 0 everywhere else.
FAULT_CLOCK_SKEW = "QLORA_FAULT_CLOCK_SKEW_S"
_SKEW = timedelta(seconds=float(os.environ.get(FAULT_CLOCK_SKEW) or 0))


def utcnow() -> datetime:
    """This host's clock, in UTC."""
    return datetime.now(UTC) + _SKEW


def database_now(session: Session) -> datetime:
    """The database's clock, in UTC (at the start of the session's transaction): what a job's heartbeats are
    written with and judged by (the reaper's deadline, the scheduler's). Each host's own clock did only while
    the hosts agreed: a worker whose clock ran behind the reaper's by more than QLORA_HEARTBEAT_DEADLINE_S wrote
    heartbeats that looked that old as they landed, and every job it claimed was requeued from under it, again
    and again, then paused ("stopped sending heartbeats"); one whose clock ran ahead, once dead, kept its job
    for as long as its clock was ahead. SQLite is one host's file (the embedded default): its clock is that host's."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow()
    return session.execute(select(func.now())).scalar_one().astimezone(UTC)


def database_clock(session: Session) -> datetime:
    """The database's clock at this very moment, not at the start of the transaction as database_now: for a
    change that must be dated after what the transaction saw committed (a claim takes a job another worker's
    attempt just left; its GPU time starts here, after that attempt's end). SQLite: this host's clock."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow()
    return session.execute(select(func.clock_timestamp())).scalar_one().astimezone(UTC)


def on_database_clock(session: Session, host_moment: datetime) -> datetime:
    """`host_moment`, taken from this host's clock (utcnow), moved onto the database's: as long before
    database_now as it is before this host's now. For a moment a process noted before it could reach the
    database (an attempt's end, written once an outage passed): compared with a job's claimed_at, which is the
    database's clock, the host's own reading was off by the hosts' skew (an hour ahead charged an hour)."""
    return database_now(session) - (utcnow() - host_moment)


def new_id() -> str:
    return uuid.uuid4().hex


class IdMixin:
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)


# JSON columns (a job's spec and summary, an event's data) are decoded by pydantic-core's parser: a
# page of jobs decodes fifty specs and summaries, and the standard library's decoder was a sixth of
# its time in the profile (docs/performance.md).

# Connections per process (API or worker) beyond SQLite: POOL_SIZE kept open, MAX_OVERFLOW more at a peak.
# A request holds one only while it talks to the database: an upload gives its own back while the
# body streams (release_connection), a live stream takes one per poll. A connection past POOL_SIZE is
# closed when it comes back, and opening one costs Postgres a process: under load, a pool smaller than
# the requests talking to the database at once spends its time connecting (the profile in
# docs/performance.md). 16 covers what two cores run at once with room; the overflow is for bursts.
POOL_SIZE, MAX_OVERFLOW = 16, 8


def dead_connection_params(timeout_s: int) -> dict[str, str]:
    """libpq's parameters that end a connection unanswered for about `timeout_s`: connecting; sent data
    unacknowledged (tcp_user_timeout); an idle wait for an answer, probed by keepalives (the first after a
    third of it, then every sixth, four unanswered: dead at about the whole). Without them, in a failover that
    drops packets instead of refusing them, a connection waited for the kernel's retransmission timeout (about
    15 minutes on Linux), or without end for an answer that never came. The worker's connections
    (worker/supervisor.session_url) and the API's (api_database_url) both carry them."""
    return {"connect_timeout": str(timeout_s), "tcp_user_timeout": str(timeout_s * 1000), "keepalives": "1",
            "keepalives_idle": str(max(1, timeout_s // 3)), "keepalives_interval": str(max(1, timeout_s // 6)),
            "keepalives_count": "4"}


def with_connection_params(url: str, params: dict[str, str], server_options: str = "") -> str:
    """`url` (Postgres) with libpq `params` it does not name already (an operator's own choice wins) and
    `server_options` (`-c name=value ...`) appended to its `options`."""
    parsed = make_url(url)
    options = f"{parsed.query.get('options', '')} {server_options}".strip()
    query = {name: value for name, value in params.items() if name not in parsed.query}
    return parsed.update_query_dict(query | ({"options": options} if options else {})).render_as_string(
        hide_password=False)


def api_database_url(url: str, timeout_s: int, statement_timeout_s: float) -> str:
    """The database URL of an API process's connections (its request pool, its bookkeeping pool, its async
    reads): on Postgres a connection unanswered for `timeout_s` is given up (dead_connection_params), so a
    database that drops packets answers requests 503 in seconds instead of holding every route thread for
    minutes; and a statement running past `statement_timeout_s` (0: no bound) is cancelled by the server, so one
    request stuck on a lock cannot hold a thread and a connection without end. The CLI, migrations and `qlora
    reaper` connect with the URL as set: an admin command or a migration may run long."""
    if make_url(url).get_backend_name() != "postgresql":
        return url
    bound = f"-c statement_timeout={int(statement_timeout_s * 1000)}" if statement_timeout_s else ""
    return with_connection_params(url, dead_connection_params(timeout_s), bound)


def statement_timeout_of(exc: BaseException) -> bool:
    """Whether a database error is Postgres cancelling a statement at its statement_timeout."""
    return type(getattr(exc, "orig", None)).__name__ == "QueryCanceled" and "statement timeout" in str(exc)


def allow_long_statements(session: Session, timeout_s: float) -> None:
    """Raise the statement bound for the rest of the session's transaction (SET LOCAL), for a request whose
    work is legitimately long (/metrics' first read of the job history). No-op off Postgres."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"))


def make_engine(url: str, pool_size: int = POOL_SIZE, max_overflow: int = MAX_OVERFLOW, *, pooled: bool = True) -> Engine:
    """pooled=False: a connection per session, closed at its end, for a thread of a process that forks
    (a Celery worker's main process): a child would inherit a pooled connection's socket and share it.

    A URL that bounds connecting (connect_timeout) bounds the wait for a pooled connection as long: with
    the database out of reach, a request queued behind others that are connecting gives up as they do,
    not after SQLAlchemy's 30 s."""
    unpooled: dict = {} if pooled else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               json_deserializer=from_json, **unpooled)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
            cur.execute("PRAGMA journal_mode=WAL")  # the API and the worker write at the same time
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if not pooled:
        return create_engine(url, json_deserializer=from_json, **unpooled)
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow,
                         pool_timeout=connection_wait_s(url), json_deserializer=from_json)


@lru_cache  # read_only asks it for every read
def connection_wait_s(url: str) -> float:
    """How long a request waits for a pooled connection of `url`'s database: as long as connecting may take."""
    connect_timeout = make_url(url).query.get("connect_timeout")
    return float(connect_timeout) if isinstance(connect_timeout, str) and connect_timeout.isdigit() else 30.0


@lru_cache
def _database(url: str) -> tuple[Engine, sessionmaker[Session]]:
    """A URL's engine and the sessionmaker bound to it, cached as one: two caches evicted apart (lru_cache keeps
    128 each) once a process had opened more databases than that (a test process does, one per test), and
    engine_for(url) then made a second pool of a database whose sessions still ran on the first: what it
    named (its dispose(), its event listeners) was no longer what sessionmaker_for(url) used."""
    engine = make_engine(url)
    return engine, sessionmaker(bind=engine, expire_on_commit=False)


def engine_for(url: str) -> Engine:
    return _database(url)[0]


def sessionmaker_for(url: str) -> sessionmaker[Session]:
    return _database(url)[1]


# What runs after a request's commit and writes (dispatch.send marking a job sent) runs where the request's
# session ends (app.deps.get_session), and an end must never wait for a connection of the request pool: the
# requests holding them all may be waiting on a lock that this very end is about to release (a team's
# burst of POST /jobs, each waiting for the team's row, deadlocked so until the pool's timeout: 500s). So
# that bookkeeping has a small pool of its own, which nothing else uses.
BOOKKEEPING_POOL_SIZE, BOOKKEEPING_MAX_OVERFLOW = 2, 2


@lru_cache
def bookkeeping_sessionmaker_for(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=make_engine(url, BOOKKEEPING_POOL_SIZE, BOOKKEEPING_MAX_OVERFLOW), expire_on_commit=False)


# The hot reads' own pool (read_only below): they hold a connection for one query, so fewer serve
# more requests than the thread pool's sessions need. No overflow: an overflow connection is closed when
# it comes back, and under fifty pollers the pool opened one (a Postgres process) every few polls.
ASYNC_POOL_SIZE, ASYNC_MAX_OVERFLOW = 12, 0


@lru_cache
def async_engine_for(url: str) -> AsyncEngine | None:
    """The same Postgres database through psycopg's async mode (same URL, same driver), for read_only;
    None for SQLite, whose driver has none.

    Autocommit and no ping before each use: a poll is one SELECT, and BEGIN, ROLLBACK and the ping would
    each cost it a round trip more (four instead of one). A connection that died meanwhile (Postgres
    restarted) fails its query instead; read_only then tries once more on a fresh one.
    """
    if url.startswith("sqlite"):
        return None
    return create_async_engine(url, isolation_level="AUTOCOMMIT", pool_size=ASYNC_POOL_SIZE,
                               max_overflow=ASYNC_MAX_OVERFLOW, pool_timeout=connection_wait_s(url),
                               json_deserializer=from_json)


async def read_only(url: str, read: Callable[[Session], T]) -> T:
    """read(session) for an `async def` route, for the reads every poll makes (a job, a page of jobs,
    a curve): the same repository functions the rest of the service calls.

    On Postgres the session runs on the async driver (SQLAlchemy's run_sync: the sync code drives
    async I/O from the event loop), so a poll costs no hop to the thread pool and holds no thread
    while it waits; each statement stands alone (autocommit), so `read` must not write. On SQLite it
    runs in the thread pool like any `def` route.
    """
    engine = async_engine_for(url)
    if engine is None:
        return await anyio.to_thread.run_sync(functools.partial(_read_in_session, url, read))
    # The wait for a turn is a wait for a pooled connection, bounded as the pool's own checkout is: with the
    # database black-holed, the reads holding every connection wait on it, and each read that came after
    # waited here without end; now it gives up as a checkout does (503 database_unavailable).
    async with held_within(_turn(engine), connection_wait_s(url), "turn at a database connection"):
        return await _read_async(engine, read)


@asynccontextmanager
async def held_within(gate: asyncio.Semaphore | anyio.CapacityLimiter, wait_s: float, what: str) -> AsyncIterator[None]:
    """`gate` held, once had within `wait_s`; else the pool's TimeoutError, which the API answers 503
    database_unavailable with Retry-After: for a wait in front of the database, which lasts only while the
    requests ahead wait on a database that does not answer."""
    try:
        async with asyncio.timeout(wait_s):
            await gate.acquire()
    except TimeoutError:
        raise PoolTimeout(f"no {what} came free within {wait_s:g} s") from None
    try:
        yield
    finally:
        gate.release()


async def _read_async(engine: AsyncEngine, read: Callable[[Session], T]) -> T:
    for tries_left in (1, 0):
        try:
            async with AsyncSession(engine, expire_on_commit=False) as session:
                return await session.run_sync(read)
        except DBAPIError as exc:
            # A pooled connection that Postgres closed (a restart, an idle timeout): SQLAlchemy has
            # dropped it and every connection older than it; the read is safe to repeat.
            if not (exc.connection_invalidated and tries_left):
                raise
    raise AssertionError("unreachable")


def _turn(engine: AsyncEngine) -> asyncio.Semaphore:
    """Reads take the pool's connections in the order they asked. The pool's own queue lets a read that
    just arrived take a connection given back while earlier ones wait to be woken, and a read passed
    over goes to the back: under fifty pollers the p99 was nine times the median (docs/performance.md)."""
    loop = asyncio.get_running_loop()
    gates = _turns.setdefault(loop, {})
    gate = gates.get(engine)
    if gate is None:
        gate = gates[engine] = asyncio.Semaphore(ASYNC_POOL_SIZE + ASYNC_MAX_OVERFLOW)
    return gate


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[AsyncEngine, asyncio.Semaphore]] = weakref.WeakKeyDictionary()


@contextmanager
def session_scope(url: str, *, bookkeeping: bool = False) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error. For the worker and the CLI; with
    `bookkeeping`, on the bookkeeping pool (above), for what runs after a request's commit."""
    session = (bookkeeping_sessionmaker_for if bookkeeping else sessionmaker_for)(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _read_in_session(url: str, read: Callable[[Session], T]) -> T:
    with session_scope(url) as session:
        return read(session)


def release_connection(session: Session) -> None:
    """End the session's transaction so its connection goes back to the pool before the request waits
    on something slow (an upload's body can take minutes); the session's next query takes one again.

    For a session that has only read so far (authenticated the caller): what it loaded stays usable
    (expire_on_commit is off), and there is nothing to commit half-way through the request.
    """
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("release_connection() would commit unflushed changes half-way through the request")
    session.commit()


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run callback once the session's current transaction has committed (dropped on rollback)."""
    session.info.setdefault("after_commit", []).append(callback)


def on_rollback(session: Session, callback: Callable[[], None]) -> None:
    """Run callback if the session's current transaction is rolled back: undo what lives outside
    the database (an object stored for a row that will now never exist)."""
    session.info.setdefault("on_rollback", []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    session.info.pop("on_rollback", None)
    for callback in session.info.pop("after_commit", []):
        callback()


@event.listens_for(Session, "after_soft_rollback")
def _run_on_rollback(session: Session, previous_transaction) -> None:
    if previous_transaction.parent is not None:
        return  # a savepoint: the outer transaction may still commit
    session.info.pop("after_commit", None)
    for callback in session.info.pop("on_rollback", []):
        callback()
