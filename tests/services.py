"""The real services the tests talk to: start what is not running, never skip what is missing.

Plain functions; tests/conftest.py turns them into fixtures.
"""

from __future__ import annotations

import atexit
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import boto3
import psycopg
from botocore.config import Config
from psycopg import sql

T = TypeVar("T")

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
START_TIMEOUT_S = 60

POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)

S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# Ports handed to servers the tests start (an API, redis-server, the S3 server), which bind them a moment later.
# Bound to port 0 and closed, the kernel's pick was free only until then: the suite's other xdist process could be
# handed the same one (its own bind to 0), or an outgoing connection could take it as its source port (drawn from
# the same ephemeral range, 32768 and up by default), and the server then failed to start (EADDRINUSE). So each
# xdist process draws from a block of its own below the ephemeral range, walking it from a random place (other
# suites on the machine, a port of a previous run still closing) and never handing a port out twice.
PORT_RANGE = range(20000, 32000)
_port_lock = threading.Lock()
_ports: Iterator[int] | None = None


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # set by pytest-xdist in each of its processes
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    size = len(PORT_RANGE) // count
    return range(PORT_RANGE.start + index * size, PORT_RANGE.start + (index + 1) * size)


def free_port() -> int:
    """A loopback port nothing listens on, that no other call of this suite (in this process or the other xdist
    process) is handed: for a server a test starts, or for a URL that must answer nothing."""
    global _ports
    with _port_lock:
        if _ports is None:
            block = _port_block()
            start = random.randrange(len(block))
            _ports = iter([*block[start:], *block[:start]])
        for port in _ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:  # taken by something else on the machine: the next one
                    continue
            return port
    raise RuntimeError(f"every port of this test process's block {_port_block()} was handed out or taken")


def _postgres_ready() -> bool:
    # An open port is not enough: Postgres accepts connections while it is still starting up.
    try:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _redis_ready(port: int = REDIS_PORT) -> bool:
    try:
        with socket.create_connection((REDIS_HOST, port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _ensure(name: str, ready: Callable[[], bool], command: str, log_hint: str) -> None:
    if ready():
        return
    # Started even when another test process raced us to it: then this command fails, harmlessly,
    # and the wait below still sees the service come up.
    started = subprocess.run(command, shell=True, capture_output=True, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"{name} did not answer within {START_TIMEOUT_S} s. Started it with:\n  {command}\n"
        f"exit status {started.returncode}\nstdout: {started.stdout.strip()}\nstderr: {started.stderr.strip()}\n"
        f"Look at {log_hint}, or start {name} yourself; the tests need it and do not skip without it."
    )


def ensure_postgres() -> None:
    _ensure("PostgreSQL", _postgres_ready, POSTGRES_START, "/var/log/postgresql/")


def ensure_redis() -> None:
    _ensure("Redis", _redis_ready, REDIS_START, "/var/log/redis/ci.log")


class RedisServer:
    """A Redis of one test session's own on a free loopback port, keeping nothing on disk: a fault test
    stops it (an outage) and starts it again on the same port, without taking the broker away from the
    other test process of the suite (`make test` runs two) or any other suite on the machine."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.url = f"redis://{REDIS_HOST}:{self.port}/0"
        self._directory = directory
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self._directory / "redis.log", "ab")
        self._proc = subprocess.Popen(
            ["redis-server", "--bind", REDIS_HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self._directory)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _redis_ready(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n"
                                   + (self._directory / "redis.log").read_text(errors="replace")[-2000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def _admin_connection() -> psycopg.Connection:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True)


def create_postgres_database(template: str | None = None) -> str:
    """An empty database, or a copy of the database `template` (a URL), which nothing may be connected to."""
    name = f"qlora_test_{uuid.uuid4().hex[:16]}"
    with _admin_connection() as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(urlsplit(template).path.lstrip("/"))))
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


_migrated: list[str] = []  # the URL of this process's migrated template, once made


def create_migrated_postgres_database() -> str:
    """A database at the newest schema, as `qlora migrate` leaves it: a copy (CREATE DATABASE ... TEMPLATE, a
    file copy) of one the project's migrations built once in this process, instead of running them again
    for each database (~0.4 s of Alembic each). The tests of the migrations themselves run them."""
    if not _migrated:
        from app.migrate import upgrade

        url = create_postgres_database()
        upgrade(url)  # which keeps no connection open: a template takes none while it is copied
        _migrated.append(url)
        atexit.register(drop_postgres_database, url)
    return create_postgres_database(template=_migrated[0])


def drop_postgres_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with _admin_connection() as conn:
        # FORCE ends connections a test's pool left open, which would otherwise block the drop.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _http_answers(url: str, need_ok: bool) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return not need_ok  # any HTTP answer means the server is up; a health check must also pass
    except OSError:
        return False


def wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float = START_TIMEOUT_S, need_ok: bool = False) -> bool:
    """Poll `url` until the server answers (with a 2xx, if `need_ok`); False if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if _http_answers(url, need_ok):
            return True
        time.sleep(0.1)
    return False


def serve_s3(port: int) -> None:
    """moto's S3 server, saying when each multipart upload began. moto answers ListMultipartUploads
    with Initiated = 2010-11-10 for every upload, so an upload opened a moment ago looks years old and
    any API's reaper (QLORA_STALE_UPLOAD_S) aborts it mid-write; its next part then fails with a 500.
    Real S3 and MinIO give the time the upload began, and so does this server."""
    import re
    from datetime import UTC, datetime

    from moto.s3 import models, responses
    from moto.server import main

    began: dict[str, str] = {}
    init, list_uploads = models.FakeMultipart.__init__, responses.S3Response.list_multipart_uploads

    def init_noting_the_time(self, *args, **kwargs):
        init(self, *args, **kwargs)
        began[self.id] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def list_uploads_with_their_times(self):
        status, headers, body = list_uploads(self)

        def dated(upload: re.Match) -> str:
            upload_id = re.search(r"<UploadId>([^<]*)</UploadId>", upload[0])
            when = began.get(upload_id[1], "") if upload_id else ""
            return re.sub(r"<Initiated>[^<]*</Initiated>", f"<Initiated>{when}</Initiated>", upload[0]) if when \
                else upload[0]
        return status, headers, re.sub(r"<Upload>.*?</Upload>", dated, body, flags=re.S)

    models.FakeMultipart.__init__ = init_noting_the_time
    responses.S3Response.list_multipart_uploads = list_uploads_with_their_times
    main(["-H", "127.0.0.1", "-p", str(port)])


def start_s3_server() -> tuple[str, Callable[[], None]]:
    """A moto S3 server on a free loopback port (see serve_s3); returns its endpoint URL and a function
    that stops it."""
    log = tempfile.TemporaryFile()
    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from tests.services import serve_s3; serve_s3({port})"],
        cwd=Path(__file__).resolve().parents[1],  # where `tests` is importable
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    if wait_until_up(endpoint_url, proc):
        return endpoint_url, stop
    stop_reason = f"exited with status {proc.returncode}" if proc.poll() is not None else "did not answer"
    log.seek(0)
    output = log.read().decode(errors="replace")[-4000:]
    stop()
    raise RuntimeError(f"moto S3 server on {endpoint_url} {stop_reason} within {START_TIMEOUT_S} s:\n{output}")


def s3_env(endpoint_url: str) -> dict[str, str]:
    """Environment for a process (or a monkeypatched test) that talks to the test S3 server."""
    return {**S3_TEST_ENV, "QLORA_S3_ENDPOINT_URL": endpoint_url}


def create_bucket(endpoint_url: str, name: str) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket=name)


def in_a_thread_of_its_own(fn: Callable[[], T]) -> T:
    """fn() in a new thread, its result or its exception back here: for code that runs an event loop
    of its own (asyncio.run) from a test process whose main thread may hold one already (Playwright's
    sync API, in the dashboard tests, keeps its loop running there for the whole session)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="own-event-loop")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
