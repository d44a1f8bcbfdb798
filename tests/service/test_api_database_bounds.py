"""The control plane against a database that is slow, black-holed or failing over, in a real API process on real
Postgres: its connections give up on a database that does not answer (QLORA_API_DATABASE_TIMEOUT_S), a request's
statement is bounded (QLORA_API_STATEMENT_TIMEOUT_S), each answers 503 with what happened, and /ready says the
database is unreachable. The database is reached through a TCP link the test cuts or black-holes
(tests/faults/tcp_link.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.db import api_database_url, engine_for
from app.teams.service import hash_key
from tests import services
from tests.deployment import Deployment, wait_until
from tests.faults.tcp_link import CuttableLink

# Short, so the test is quick: libpq's least connect timeout.
DATABASE_TIMEOUT_S = 2
# A request that hangs on the database instead of giving up: what the client waits before it calls the API hung.
# Far past what a bounded request takes (DATABASE_TIMEOUT_S, a few times over on a loaded machine); the old code
# waited for the kernel (minutes) or without end.
HUNG_S = 60


@dataclass
class Api:
    proc: subprocess.Popen
    client: httpx.Client


@pytest.fixture
def link(deployment) -> Iterator[CuttableLink]:
    url = make_url(deployment.settings.database_url)
    cuttable = CuttableLink((url.host or "127.0.0.1", url.port or 5432))
    yield cuttable
    cuttable.close()


def start_api(deployment: Deployment, name: str, database_url: str, **env: str) -> Api:
    port = services.free_port()
    proc = deployment.spawn("serve", "--no-worker", log_name=name, extra_env={
        "QLORA_PORT": str(port), "QLORA_DATABASE_URL": database_url,
        "QLORA_API_DATABASE_TIMEOUT_S": str(DATABASE_TIMEOUT_S),
        # Its own background loops off: the requests are all that talk to the database through the link.
        "QLORA_REAPER_INTERVAL_S": "0", "QLORA_SCHEDULER_INTERVAL_S": "0", **env})
    url = f"http://127.0.0.1:{port}"
    if not services.wait_until_up(url + "/health", proc, timeout_s=60, need_ok=True):
        raise RuntimeError(f"the API did not start:\n{deployment.log(name)}")
    key = deployment.team_key("db-bounds")
    return Api(proc, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=HUNG_S))


@pytest.fixture
def api_through_link(deployment, link) -> Iterator[Api]:
    through = make_url(deployment.settings.database_url).set(host="127.0.0.1", port=link.port)
    api = start_api(deployment, "api-through-link", through.render_as_string(hide_password=False))
    yield api
    link.restore()
    deployment.stop(api.proc)


def get(api: Api, path: str) -> httpx.Response:
    try:
        return api.client.get(path)
    except httpx.ReadTimeout:
        raise AssertionError(f"GET {path} hung on the database for {HUNG_S} s instead of answering 503") from None


def test_a_black_holed_database_answers_503_and_the_api_recovers(api_through_link, link):
    """A failover that drops packets (the old server's connections reset, its address moved to one that answers
    nothing): a request's new connection waited for an answer that never came, without end, holding its route
    thread and, as more came, every one. Now the connection is given up after QLORA_API_DATABASE_TIMEOUT_S and
    the request answers 503 database_unavailable with Retry-After; once the database is back, requests are served."""
    api = api_through_link
    assert get(api, "/jobs").status_code == 200  # the pools hold connections made through the link
    link.black_hole(drop_open=True)

    answer = get(api, "/jobs")
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "database_unavailable" and answer.headers["Retry-After"]
    assert "send it again later" in answer.json()["error"]["message"].lower()
    ready = ready_when(api, 503)
    assert ready.json()["database"].startswith("unreachable"), ready.text
    assert link.swallowed >= 1  # the API did try a new connection, and gave it up

    link.restore()
    assert _served_again(api, "/jobs")
    assert ready_when(api, 200).json() == {"status": "ok", "database": "ok", "broker": "ok", "storage": "ok"}


def test_a_read_that_gets_no_turn_within_the_database_timeout_answers_503(deployment, link):
    """The async reads take the pool's connections in turn (app.db.read_only), and the wait for a turn had no
    bound: with every connection held by a read whose answer the black hole swallowed, each read after them
    waited without end (an API whose QLORA_REQUEST_SLOTS lets more reads be in progress than the pool has
    connections). Now a read that gets no turn within QLORA_API_DATABASE_TIMEOUT_S answers 503
    database_unavailable with Retry-After, as one that gets no pooled connection does."""
    from app.db import ASYNC_POOL_SIZE

    through = make_url(deployment.settings.database_url).set(host="127.0.0.1", port=link.port)
    # More slots than connections, so reads past the pool's wait for a turn; the key read once for the whole
    # test (the key's read would go through the black hole too, on the other pool).
    api = start_api(deployment, "api-turns", through.render_as_string(hide_password=False),
                    QLORA_REQUEST_SLOTS=str(4 * ASYNC_POOL_SIZE), QLORA_KEY_CACHE_S="60")
    holder = engine_for(deployment.settings.database_url).connect()  # not through the link
    held: list[threading.Thread] = []
    try:
        assert get(api, "/jobs").status_code == 200
        stuck = holder.begin()
        holder.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
        # As many reads as the pool has connections, each holding one, waiting on the lock.
        for _ in range(ASYNC_POOL_SIZE):
            held.append(threading.Thread(target=_ask_and_ignore, args=(api, "/jobs"), daemon=True))
            held[-1].start()
        wait_until(lambda: _waiting_on_locks(deployment.settings.database_url) >= ASYNC_POOL_SIZE, 60,
                   f"{ASYNC_POOL_SIZE} reads waiting on the lock")
        link.black_hole()  # their answers, once the lock is gone, are swallowed: they hold their turns for good
        stuck.rollback()

        answer = get(api, "/jobs")
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "database_unavailable" and answer.headers["Retry-After"]
        assert f"within {DATABASE_TIMEOUT_S} s" in answer.json()["error"]["message"]

        link.cut()  # the held reads' connections drop: they end, and give their turns back
        for thread in held:
            thread.join(HUNG_S)
        link.restore()
        assert _served_again(api, "/jobs")
    finally:
        link.restore()
        holder.close()
        deployment.stop(api.proc)


def test_a_page_behind_one_hung_on_the_database_answers_503(deployment, link):
    """Curve pages are read and built one at a time, in a worker thread (app.conditional.polled_off_loop): a page
    whose answer the black hole swallowed holds that turn for good, and a page after it must not wait for it
    without end. It answers 503 database_unavailable with Retry-After once it has waited as long as a read waits
    for a connection (QLORA_API_DATABASE_TIMEOUT_S). A regression guard of that turn: on main a page was a read
    on the async driver, whose turn is bounded by the test above."""
    through = make_url(deployment.settings.database_url).set(host="127.0.0.1", port=link.port)
    api = start_api(deployment, "api-pages", through.render_as_string(hide_password=False), QLORA_KEY_CACHE_S="60")
    holder = engine_for(deployment.settings.database_url).connect()  # not through the link
    page = f"/jobs/{'0' * 32}/metrics"  # no such job: its read is the job's, as every page's first is
    try:
        assert get(api, page).status_code == 404
        stuck = holder.begin()
        holder.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
        held = threading.Thread(target=_ask_and_ignore, args=(api, page), daemon=True)
        held.start()
        wait_until(lambda: _waiting_on_locks(deployment.settings.database_url) >= 1, 60, "a page waiting on the lock")
        link.black_hole()  # its answer, once the lock is gone, is swallowed: it holds the page's turn for good
        stuck.rollback()

        answer = get(api, page)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "database_unavailable" and answer.headers["Retry-After"]

        link.cut()  # the held page's connection drops: it ends, and gives its turn back
        held.join(HUNG_S)
        link.restore()
        assert wait_until(lambda: get(api, page).status_code == 404, 60, "pages served again")
    finally:
        link.restore()
        holder.close()
        deployment.stop(api.proc)


def _waiting_on_locks(database_url: str) -> int:
    """Backends of the database waiting on a lock now (a transaction of its own: Postgres keeps what a
    transaction read of pg_stat_activity for the rest of it)."""
    with engine_for(database_url).connect() as connection:
        return connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                       "AND wait_event_type = 'Lock' AND state = 'active'")).scalar_one()


def _ask_and_ignore(api: Api, path: str) -> None:
    """A request on a connection of its own, its answer (if any) ignored."""
    with httpx.Client(base_url=api.client.base_url, headers=api.client.headers, timeout=HUNG_S) as client, \
            contextlib.suppress(httpx.HTTPError):
        client.get(path)


def test_a_refused_database_is_503_and_ready_says_unreachable(api_through_link, link):
    """Postgres restarting (connections refused): every route that needs it answers 503 with a body that says
    so, never a 500; /ready, a readiness probe's target, answers 503 naming the database while /health (liveness:
    the process answers) stays 200."""
    api = api_through_link
    assert get(api, "/ready").json() == {"status": "ok", "database": "ok", "broker": "ok", "storage": "ok"}
    link.cut()
    for path in ("/jobs", "/datasets", "/usage", "/metrics"):
        answer = get(api, path)
        assert answer.status_code == 503, (path, answer.text)
        assert answer.json()["error"]["code"] == "database_unavailable", (path, answer.text)
    ready = ready_when(api, 503)
    assert ready.headers["Retry-After"], ready.text
    assert ready.json()["status"] == "unavailable" and "unreachable" in ready.json()["database"]
    assert get(api, "/health").status_code == 200
    link.restore()
    assert _served_again(api, "/ready")


def test_a_flood_of_readiness_probes_costs_the_database_one_check_at_a_time(api_through_link, link):
    """/ready takes no key: each probe took a connection attempt of its own, so a flood of them (a misconfigured
    probe, anyone) held the pool and its queue, every team's polls waiting behind it, and against a database
    that refused connections opened one attempt per probe. Now the probes that ask within a second of a check share
    its answer: a flood of PROBES costs a check or a few, and each probe still gets the 503."""
    api = api_through_link
    assert get(api, "/ready").status_code == 200
    link.cut()
    ready_when(api, 503)
    probes = 60
    before = link.refused
    with ThreadPoolExecutor(probes) as pool:
        answers = list(pool.map(lambda _: get(api, "/ready"), range(probes)))
    assert all(answer.status_code == 503 and answer.json()["status"] == "unavailable" for answer in answers), \
        {(answer.status_code, answer.text) for answer in answers}
    # A check a second while they come: a few on a loaded machine, where the old code made one per probe.
    assert link.refused - before < probes // 3, f"{link.refused - before} connection attempts for {probes} probes"
    link.restore()
    assert _served_again(api, "/ready")


def test_a_request_stuck_on_a_lock_is_cancelled_at_the_statement_timeout(deployment):
    """A transaction elsewhere holds a lock a request needs (a stuck admin session, a migration run by hand):
    the request waited for as long as the lock was held, holding a route thread and a connection. Now its
    statement is cancelled at QLORA_API_STATEMENT_TIMEOUT_S and it answers 503 database_busy, naming the bound;
    the lock's holder is untouched, and once it ends the same request is served. A key's read cancelled so is
    logged without the key's hash."""
    api = start_api(deployment, "api-statement-bound", deployment.settings.database_url,
                    QLORA_API_STATEMENT_TIMEOUT_S="1")
    holder = engine_for(deployment.settings.database_url).connect()
    try:
        assert get(api, "/jobs").status_code == 200
        stuck = holder.begin()
        holder.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
        answer = get(api, "/jobs")
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["code"] == "database_busy" and "QLORA_API_STATEMENT_TIMEOUT_S" in error["message"], error
        assert answer.headers["Retry-After"]
        assert holder.execute(text("SELECT 1")).scalar_one() == 1  # the holder's transaction goes on
        stuck.rollback()
        assert get(api, "/jobs").status_code == 200

        # The read of a key this process has not seen, cancelled so: its hash signs the key's download links
        # (teams.service.sign), and the log line of the failure held it as the query's parameter.
        key = deployment.team_key("db-bounds")
        stuck = holder.begin()
        holder.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
        assert api.client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 503
        stuck.rollback()
        log = deployment.log("api-statement-bound")
        assert "FROM api_keys" in log and "parameters hidden" in log  # the failure is logged, what it read is not
        assert hash_key(key) not in log
    finally:
        holder.close()
        deployment.stop(api.proc)


def ready_when(api: Api, status: int) -> httpx.Response:
    """/ready's first answer with `status`, for up to a minute: an answer may be a second old (probes within a
    second of a check share it), so one asked just after the database changed may still say what it was."""
    return wait_until(lambda: (lambda answer: answer if answer.status_code == status else None)(get(api, "/ready")),
                      60, f"/ready answering {status}")


def _served_again(api: Api, path: str) -> bool:
    """Until `path` answers 200 (the pools' next connections reach the database again), for up to a minute."""
    return bool(wait_until(lambda: get(api, path).status_code == 200, 60, f"{path} served again"))


def test_an_api_connection_says_when_it_is_dead(deployment):
    """What bounds a request whose connection goes silent after it was made (a black hole on a real network: sent
    data unacknowledged, an answer that never comes): TCP keepalives and tcp_user_timeout on every connection of
    an API process's pools, the statement bound on each, and the pools' checkout timeout. A loopback proxy cannot
    drop packets (its kernel acknowledges them), so the socket is read back, on the URL create_app gives its
    pools."""
    url = api_database_url(deployment.settings.database_url, 6, 30)
    engine = engine_for(url)
    with engine.connect() as connection:
        pgconn = connection.connection.dbapi_connection.pgconn  # type: ignore[union-attr]
        sock = socket.socket(fileno=os.dup(pgconn.socket))
        statement_timeout = connection.execute(text("SHOW statement_timeout")).scalar_one()
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 6000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
        assert statement_timeout == "30s"
        assert engine.pool.timeout() == 6  # type: ignore[attr-defined]
    finally:
        sock.close()
        engine.dispose()
