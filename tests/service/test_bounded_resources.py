"""Every resource a caller can hold is bounded (DESIGN.md, rule 9): a body read whole (JSON), the form
around an upload, the bytes of its body as read, the database connections while it streams, uploads in
flight and live job streams per key. (Slow and endless clients at the connection: test_slow_clients.py.)"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import text

from app.db import MAX_OVERFLOW, POOL_SIZE, session_scope
from app.routing import JSON_REQUESTS_PER_KEY
from app.shares import TeamShares
from app.teams import admin
from app.teams import service as teams_service
from app.uploads import MAX_FORM_FIELDS
from tests.deployment import lane, start_deployment, stop_deployment, upload, wait_until
from tests.service.test_bad_input import stored_state
from worker.training.tiny import demo_spec

STREAMS_PER_KEY = 2
UPLOADS_PER_KEY = 3
DOWNLOADS_PER_KEY = 2
MAX_JSON_BYTES = 64 * 1024
BOUNDARY = "qlora-bounded"
ROW = json.dumps({"prompt": "What does a goat eat?", "completion": "Hay."}).encode() + b"\n"


@pytest.fixture(scope="module")
def bounded(backing_services, tmp_path_factory, tiny_model_dir):
    """A deployment of its own, with no worker: its jobs stay queued, so their streams stay open."""
    d = start_deployment(tmp_path_factory.mktemp("bounded"), backing_services, tiny_model_dir,
                         max_streams_per_key=STREAMS_PER_KEY, max_uploads_per_key=UPLOADS_PER_KEY,
                         max_downloads_per_key=DOWNLOADS_PER_KEY,
                         max_json_bytes=MAX_JSON_BYTES)
    yield d
    stop_deployment(d)


@pytest.fixture
def unchanged(bounded):
    before = stored_state(bounded)
    yield
    assert stored_state(bounded) == before


def file_part(rows: int = 100) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="farm.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n").encode() + ROW * rows + b"\r\n"


def field_part(name: str, value: bytes) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"


def post_chunked(client: httpx.Client, pieces: Iterator[bytes]) -> httpx.Response:
    """A body from a generator: httpx sends it with chunked transfer encoding, no Content-Length."""
    return client.post("/datasets", content=pieces,
                       headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


# ------------------------------------------------------------------ a body read whole


def test_a_json_body_over_the_limit_is_refused_by_its_length_or_as_it_arrives(bounded, unchanged):
    """FastAPI reads a JSON body whole before the route runs (and parsing holds about three times it):
    past QLORA_MAX_JSON_BYTES it is a 413, up front by its Content-Length, else when the count passes it."""
    body = json.dumps({"base_model": "tiny", "name": "x" * MAX_JSON_BYTES}).encode()

    def chunked():
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    key = bounded.team_key("json")
    with bounded.client(key) as client:
        for content in (body, chunked()):
            response = client.post("/jobs", content=content, headers={"Content-Type": "application/json"})
            assert response.status_code == 413, response.text
            error = response.json()["error"]
            assert error["code"] == "payload_too_large" and "QLORA_MAX_JSON_BYTES" in error["message"], error
        # The OpenAI-compatible API refuses it too, in its own shape.
        response = client.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "QLORA_MAX_JSON_BYTES" in response.json()["error"]["message"]
        # A body under the limit is read and judged as ever.
        response = client.post("/jobs", json={"base_model": "tiny", "name": "x" * 100})
        assert response.status_code == 422, response.text
    # A client that asks before it sends (Expect: 100-continue, as curl does past 1 MB) is refused
    # without being asked for the body.
    parts = urlsplit(bounded.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall((f"POST /jobs HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        status = sock.makefile("rb").readline()
    assert status.startswith(b"HTTP/1.1 413 "), status


@pytest.mark.parametrize("path", ["/jobs", "/jobs/preflight", "/v1/fine_tuning/jobs", "/models"])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key"])
def test_a_body_under_the_limit_from_no_known_key_is_refused_before_it_is_read(bounded, path, authorization):
    """FastAPI reads and parses a body before the route's dependencies run: each such request held up
    to QLORA_MAX_JSON_BYTES before its 401 (30 at once grew the API by 400 MB). Asked first, the server
    answers 401 without asking for the body."""
    parts = urlsplit(bounded.url)
    header = f"Authorization: {authorization}\r\n" if authorization else ""
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{header}Content-Type: application/json\r\n"
                      f"Content-Length: {MAX_JSON_BYTES - 1}\r\nExpect: 100-continue\r\n\r\n").encode())
        answer = sock.makefile("rb")
        status = answer.readline()
        assert status.startswith(b"HTTP/1.1 401 "), status  # was 100 Continue, then the body read whole
        while answer.readline() not in (b"\r\n", b""):
            pass
        assert b"API key" in answer.read1(4096)


def test_uploads_stream_past_the_json_limit(bounded):
    """The upload routes read their bodies as streams, under QLORA_MAX_UPLOAD_BYTES: the JSON cap is not theirs."""
    data = ROW * (2 * MAX_JSON_BYTES // len(ROW))
    with bounded.client(bounded.team_key("json-uploads")) as client:
        response = upload(client, content=data)
        assert response.status_code == 201 and response.json()["status"] == "ready", response.text
        response = client.post("/v1/files", files={"file": ("farm.jsonl", data, "application/jsonl")},
                               data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text


# ------------------------------------------------------------------ the form around an upload


def test_a_form_with_thousands_of_fields_is_refused_and_nothing_kept(bounded, unchanged):
    def body():
        yield file_part()
        for i in range(2_000):  # each far under any one field's limit: the number is what is bounded
            yield field_part(f"f{i}", b"x" * 1024)
        yield f"--{BOUNDARY}--\r\n".encode()

    with bounded.client(bounded.team_key("forms")) as client:
        response = post_chunked(client, body())
    assert response.status_code == 413, response.text
    assert f"more than {MAX_FORM_FIELDS} fields" in response.json()["error"]["message"]


def test_fields_over_64_kib_in_all_are_refused(bounded, unchanged):
    def body():
        for name in ("purpose", "note", "more"):
            yield field_part(name, b"y" * 30_000)  # each under 64 KiB, together over it
        yield file_part()
        yield f"--{BOUNDARY}--\r\n".encode()

    with bounded.client(bounded.team_key("forms")) as client:
        response = post_chunked(client, body())
    assert response.status_code == 413, response.text
    assert "over 64.0 KiB in all" in response.json()["error"]["message"]


def test_bytes_after_the_form_count_against_the_limit(bounded, unchanged):
    """A chunked body declares no length, and the parser skips what follows the last boundary:
    counting the bytes read is what refuses them, with the file already streamed and then dropped."""
    limit = bounded.settings.max_upload_bytes

    def body():
        yield file_part() + f"--{BOUNDARY}--\r\n".encode()
        for _ in range(limit // 2**20 + 2):
            yield b"z" * 2**20

    with bounded.client(bounded.team_key("forms")) as client:
        response = post_chunked(client, body())
    assert response.status_code == 413, response.text
    assert "limit of 4.0 MiB" in response.json()["error"]["message"]


# ------------------------------------------------------------------ database connections


class SlowUpload:
    """An upload from a slow client over a plain socket: headers, then the body a piece at a time (or
    another request with a body: `path`, `content_type`)."""

    def __init__(self, url: str, key: str, path: str = "/datasets",
                 content_type: str = f"multipart/form-data; boundary={BOUNDARY}"):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        self.reader = self.sock.makefile("rb")
        # Expect: 100-continue makes the server say when the route starts reading the body.
        self.sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
                           f"Content-Type: {content_type}\r\n"
                           "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n").encode())

    def nothing_answered_yet(self) -> bool:
        """Whether the server has sent nothing on this connection so far (not even 100 Continue)."""
        self.sock.setblocking(False)
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        finally:
            self.sock.setblocking(True)

    def status(self) -> str:
        """The next response's status line (its headers are read and dropped)."""
        line = self.reader.readline().decode().strip()
        while self.reader.readline() not in (b"\r\n", b""):
            pass
        return line

    def response(self) -> tuple[str, str]:
        """The next response's status line and body (by its Content-Length)."""
        line, length = self.reader.readline().decode().strip(), 0
        while (header := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return line, self.reader.read(length).decode()

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def finish(self, data: bytes) -> str:
        self.send(data)
        self.sock.sendall(b"0\r\n\r\n")
        return self.status()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def test_slow_uploads_leave_the_database_to_other_requests(bounded):
    """More uploads in flight than the API's database pool holds (its size plus overflow): each has
    begun its body, which the server is reading, and a listing still answers."""
    keys = [bounded.team_key("slow-uploads") for _ in range(POOL_SIZE + MAX_OVERFLOW + 1)]  # one each: a key's are capped
    uploads: list[SlowUpload] = []
    try:
        for i, key in enumerate(keys):
            uploads.append(SlowUpload(bounded.url, key))
            status = uploads[-1].status()
            assert status == "HTTP/1.1 100 Continue", f"upload {i + 1} answered {status!r}"
            uploads[-1].send(file_part(rows=10)[:-2])  # the file has begun; the rest comes later
        with bounded.client(keys[0]) as client:
            response = client.get("/jobs")
        assert response.status_code == 200, response.text
        # And every slow upload, once its client finishes, is recorded.
        finished = [u.finish(b"\r\n" + f"--{BOUNDARY}--\r\n".encode()) for u in uploads]
        assert all(line.startswith("HTTP/1.1 201") for line in finished), finished
    finally:
        for u in uploads:
            u.close()


def test_a_keys_uploads_in_flight_are_capped(bounded):
    """An upload holds a socket and, until stored, up to a storage part (8 MiB on S3) in memory for as long as
    its client sends, however slowly: a key opening uploads without end grew the API until it ran out of
    memory. At the cap the next upload of the key is refused before its body is read; another key's is not."""
    key, other_key = bounded.team_key("uploads"), bounded.team_key("uploads")
    end = b"\r\n" + f"--{BOUNDARY}--\r\n".encode()
    uploads: list[SlowUpload] = []
    try:
        for _ in range(UPLOADS_PER_KEY):
            uploads.append(SlowUpload(bounded.url, key))
            assert uploads[-1].status() == "HTTP/1.1 100 Continue"
            uploads[-1].send(file_part(rows=10)[:-2])  # begun, not finished
        uploads.append(SlowUpload(bounded.url, key))
        status, body = uploads[-1].response()
        assert status.startswith("HTTP/1.1 429"), (status, body)
        assert json.loads(body)["error"]["code"] == "too_many_uploads"
        assert f"QLORA_MAX_UPLOADS_PER_KEY={UPLOADS_PER_KEY}" in json.loads(body)["error"]["message"]
        with bounded.client(other_key) as other:
            assert upload(other, content=ROW * 10).status_code == 201  # the cap is per key
        assert uploads[0].finish(end).startswith("HTTP/1.1 201")
        with bounded.client(key) as client:  # a finished upload gives its place back
            assert upload(client, content=ROW * 10).status_code == 201
        assert all(u.finish(end).startswith("HTTP/1.1 201") for u in uploads[1:UPLOADS_PER_KEY])
    finally:
        for u in uploads:
            u.close()


def test_a_keys_json_requests_in_progress_are_capped_and_the_next_waits_unread(bounded):
    """A JSON body is read whole (up to QLORA_MAX_JSON_BYTES) and held until its request is answered: one key
    sending forty 15 MiB bodies slowly grew the API by 600 MiB. A key's requests with a JSON body go
    JSON_REQUESTS_PER_KEY at a time; the next is not read (no 100 Continue) until one of them ends, and
    another key is not held back."""
    key, other_key = bounded.team_key("json-bodies"), bounded.team_key("json-bodies")
    path, json_type = "/jobs/preflight", "application/json"
    held: list[SlowUpload] = []
    try:
        for _ in range(JSON_REQUESTS_PER_KEY):
            held.append(SlowUpload(bounded.url, key, path, json_type))
            assert held[-1].status() == "HTTP/1.1 100 Continue"
            held[-1].send(b'{"base_model": "tiny", "name": "')  # begun, not finished
        waiting = SlowUpload(bounded.url, key, path, json_type)
        held.append(waiting)
        with bounded.client(other_key) as other:  # asked after `waiting`, answered while it waits
            assert other.post(path, json={"base_model": "tiny"}).status_code == 422  # answered (no dataset_id)
        assert waiting.nothing_answered_yet()  # its body not asked for: the key has its requests in progress
        assert held[0].finish(b'x"}').startswith("HTTP/1.1 422")  # one ends (no dataset_id)...
        assert waiting.status() == "HTTP/1.1 100 Continue"  # ...and the next is read
        assert waiting.finish(b'{"base_model": "tiny"}').startswith("HTTP/1.1 422")
    finally:
        for request in held:
            request.close()


# ------------------------------------------------------------------ each team's share of the API

ROUTE_THREADS = 40  # anyio's thread pool, in which the API's `def` routes run


def lock_waiters(database_url: str, table: str) -> int:
    """Sessions of the database waiting for a lock on `table`: the API's requests that a LOCK TABLE holds."""
    with session_scope(database_url) as session:
        return session.execute(text(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE NOT l.granted AND c.relname = :table AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"), {"table": table}).scalar_one()


def test_a_team_whose_requests_are_all_held_leaves_another_team_its_share(bounded):
    """One team's scripts held every route thread and database connection of the API process, and another
    team's requests waited behind them (cheap GETs from 30 threads raised the other team's p99 from 96 ms to
    1041 ms). Here the flooding team's GET /datasets are held for real: the datasets table is locked (as a
    migration or a long transaction would), so each of them, once it runs, holds its thread and connection
    until the lock goes. It sends as many as the API has route threads; only its share runs
    (app/shares.py), the rest wait in its queue, and the other team is answered while all of them are held."""
    from concurrent.futures import ThreadPoolExecutor

    flood_key, calm_key = bounded.team_key("flood-team"), bounded.team_key("calm-team")
    database_url = bounded.settings.database_url
    share_alone = TeamShares(bounded.settings.request_slots).share(teams=1)
    with bounded.client(flood_key) as flood, bounded.client(calm_key) as calm, ThreadPoolExecutor(ROUTE_THREADS) as pool:
        assert flood.get("/datasets").status_code == 200 and calm.get("/models").status_code == 200  # keys read
        with session_scope(database_url) as lock:
            lock.execute(text("LOCK TABLE datasets IN ACCESS EXCLUSIVE MODE"))  # until this session commits
            held = [pool.submit(flood.get, "/datasets") for _ in range(ROUTE_THREADS)]
            deadline = time.monotonic() + 30
            while lock_waiters(database_url, "datasets") < share_alone:  # the flood's requests are under way
                assert time.monotonic() < deadline, "the flood's requests did not reach the database"
                time.sleep(0.05)
            answered = calm.get("/models", timeout=15)  # a `def` route, reading no dataset
            assert answered.status_code == 200, answered.text
            assert not any(request.done() for request in held)  # the flood's requests are all still held...
            assert lock_waiters(database_url, "datasets") == share_alone  # ...and only its share of them run
        # The lock is gone: the flood's requests that ran and those that waited in its queue are all answered.
        assert [request.result().status_code for request in held] == [200] * ROUTE_THREADS


def test_reads_of_keys_the_api_does_not_know_take_a_few_threads_not_all(bounded):
    """A key is read before its team is known, so no team's share bounds its read: made-up keys, each a miss of the
    key cache and a 401, held all 40 route threads and once the whole connection pool (200 at once). Here the
    keys table is locked (as a migration would), so each read, once it runs, holds its thread and connection;
    only KEY_READS of them run, and a team whose key is cached is answered meanwhile."""
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    calm_key = bounded.team_key("calm-team")
    database_url = bounded.settings.database_url
    made_up = 3 * teams_service.KEY_READS

    def unknown_key() -> int:
        with httpx.Client(base_url=bounded.url, timeout=60,
                          headers={"Authorization": f"Bearer qlk_{secrets.token_urlsafe(32)}"}) as stranger:
            return stranger.get("/jobs").status_code

    with bounded.client(calm_key) as calm, ThreadPoolExecutor(made_up) as pool:
        assert calm.get("/models").status_code == 200  # its key read, and cached
        with session_scope(database_url) as lock:
            lock.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))  # until this session commits
            strangers = [pool.submit(unknown_key) for _ in range(made_up)]
            deadline = time.monotonic() + 30
            while lock_waiters(database_url, "api_keys") < teams_service.KEY_READS:
                assert time.monotonic() < deadline, "the made-up keys' reads did not reach the database"
                time.sleep(0.05)
            answered = calm.get("/models", timeout=15)
            assert answered.status_code == 200, answered.text
            assert not any(request.done() for request in strangers)
            assert lock_waiters(database_url, "api_keys") == teams_service.KEY_READS  # the others wait their turn
        assert [request.result() for request in strangers] == [401] * made_up


def queries_waiting(database_url: str, like: str) -> int:
    """The database's sessions waiting for a lock whose query is like `like` (SQL LIKE): those of one route, not
    the background loops' that may read the same table meanwhile."""
    with session_scope(database_url) as session:
        return session.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND query LIKE :like"), {"like": like}).scalar_one()


@pytest.mark.parametrize(("path", "table", "query"), [
    ("/metrics", "workers", "%FROM workers ORDER BY%"),
    (f"/jobs/{'0' * 32}/artifacts/adapter/signed?key_id=made-up&expires=1&signature=made-up", "api_keys",
     "%FROM api_keys%WHERE api_keys.id =%"),
])
def test_requests_without_a_key_that_use_the_database_take_one_share_not_every_thread(bounded, path, table, query):
    """GET /metrics and a browser's signed download link need no key, so no team's share bounded them: anyone who
    reached the API held all 40 route threads and the whole connection pool with them (80 scrapes of /metrics while
    a table they read was locked, as a migration locks it), and no team was answered until they ended. Now they
    share the requests in progress as one team of their own (app/shares.py, KEYLESS): as many as the API has route
    threads are sent while the table is locked, only a share of them run, and a team is answered meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    calm_key = bounded.team_key("calm-team")
    database_url = bounded.settings.database_url
    share_alone = TeamShares(bounded.settings.request_slots).share(teams=1)
    with (bounded.client(None) as anyone, bounded.client(calm_key) as calm, ThreadPoolExecutor(ROUTE_THREADS) as pool,
          session_scope(database_url) as lock):
        assert calm.get("/models").status_code == 200  # its key read, and cached
        lock.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))  # until this session commits
        held = [pool.submit(anyone.get, path) for _ in range(ROUTE_THREADS)]
        deadline = time.monotonic() + 30
        while queries_waiting(database_url, query) < share_alone:
            assert time.monotonic() < deadline, f"the requests to {path} did not reach the database"
            time.sleep(0.05)
        answered = calm.get("/models", timeout=15)
        assert answered.status_code == 200, answered.text
        assert not any(request.done() for request in held)
        assert queries_waiting(database_url, query) == share_alone  # only a share of them run
        lock.commit()  # the lock goes: those that ran and those that waited are all answered
        assert {request.result().status_code for request in held} == {200 if path == "/metrics" else 403}


@pytest.fixture(scope="module")
def long_key_cache(backing_services, tmp_path_factory, tiny_model_dir):
    """A deployment whose API process keeps what it read of a key for a minute (QLORA_KEY_CACHE_S): longer than
    any step of a test takes, so what the test saw kept is still kept when it asks again."""
    d = start_deployment(tmp_path_factory.mktemp("key-cache"), backing_services, tiny_model_dir, key_cache_s=60)
    yield d
    stop_deployment(d)


def test_a_wrong_key_sent_again_is_refused_without_reading_the_keys_again(long_key_cache):
    """A script sending a wrong or a revoked key in a loop cost a read of the keys table per request (KEY_READS of
    them at once, holding back every key the process had not read yet). Once refused, such a key is refused from
    the process's memory for QLORA_KEY_CACHE_S: here the keys table is locked after the first refusals, and the same
    keys are refused again while nothing waits on the lock; a key never sent before is still read (it waits)."""
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    d = long_key_cache
    database_url = d.settings.database_url
    revoked = d.team_key("revoking")
    with session_scope(database_url) as session:
        teams_service.revoke_key(session, revoked[:12])

    def asked(key: str, times: int = 1) -> list[int]:
        with httpx.Client(base_url=d.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
            return [client.get("/jobs").status_code for _ in range(times)]

    wrong = f"qlk_{secrets.token_urlsafe(32)}"
    assert asked(wrong) == asked(revoked) == [401]  # each read once, and refused
    with ThreadPoolExecutor(1) as pool:
        with session_scope(database_url) as lock:
            lock.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))  # until this session commits
            again = pool.submit(lambda: asked(wrong, 20) + asked(revoked, 20))
            while not again.done():
                assert lock_waiters(database_url, "api_keys") == 0, "a key refused before was read again"
                time.sleep(0.05)
            assert again.result() == [401] * 40
            stranger = pool.submit(asked, f"qlk_{secrets.token_urlsafe(32)}")  # never sent before: read
            deadline = time.monotonic() + 30
            while lock_waiters(database_url, "api_keys") < 1:
                assert time.monotonic() < deadline, "the new made-up key was not read"
                time.sleep(0.05)
            assert not stranger.done()
        assert stranger.result() == [401]


def test_a_request_whose_client_left_while_it_waited_for_its_team_gives_up_its_place(bounded):
    """uvicorn does not cancel a request whose client has gone: a request waiting for its team's share (app/shares.py)
    whose client gave up (its timeout, then a retry) stayed in the team's queue and ran later for no one, in the
    team's share. Here the team's share is held on the jobs table's lock, more of its requests wait and their
    clients leave; once the share is free, those requests would each wait on the datasets table's lock, and the
    team's next request behind them."""
    from concurrent.futures import ThreadPoolExecutor

    key = bounded.team_key("leaving-team")
    database_url = bounded.settings.database_url
    share = TeamShares(bounded.settings.request_slots).share(teams=1)

    def give_up() -> str:
        with httpx.Client(base_url=bounded.url, headers={"Authorization": f"Bearer {key}"}, timeout=1) as leaving:
            try:
                return str(leaving.get("/datasets").status_code)
            except httpx.TimeoutException:
                return "left"

    with bounded.client(key) as client, ThreadPoolExecutor(2 * share) as pool:
        assert client.get("/jobs").status_code == 200  # the key read
        with session_scope(database_url) as datasets_lock:
            datasets_lock.execute(text("LOCK TABLE datasets IN ACCESS EXCLUSIVE MODE"))
            with session_scope(database_url) as jobs_lock:
                jobs_lock.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
                held = [pool.submit(client.get, "/jobs") for _ in range(share)]
                deadline = time.monotonic() + 30
                while lock_waiters(database_url, "jobs") < share:  # the team's share is held
                    assert time.monotonic() < deadline, "the team's requests did not reach the database"
                    time.sleep(0.05)
                assert [request.result() for request in [pool.submit(give_up) for _ in range(share)]] == ["left"] * share
                assert httpx.get(bounded.url + "/health").status_code == 200  # answered after it saw them leave
            assert [request.result().status_code for request in held] == [200] * share  # the share is free again
            answered = client.get("/jobs", timeout=10)  # not behind the requests of the clients that left
            assert answered.status_code == 200, answered.text
            assert lock_waiters(database_url, "datasets") == 0  # none of theirs ran


# ------------------------------------------------------------------ live streams


@pytest.fixture(scope="module")
def queued_job(bounded, demo_data) -> str:
    """A job of team "streams" that stays queued (no worker serves this deployment)."""
    with bounded.client(bounded.team_key("streams")) as client:
        dataset_id = upload(client, demo_data["validation"]).json()["id"]
        job = client.post("/jobs", json={"dataset_id": dataset_id, **demo_spec("tiny")})
        assert job.status_code == 201, job.text
        return job.json()["id"]


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) from a Server-Sent Events body as they arrive, and (":", text) for a comment (a keepalive)."""
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith(":"):
            yield ":", line[1:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield event, "\n".join(data)
            event, data = "message", []


@contextlib.contextmanager
def open_stream(client: httpx.Client, job_id: str) -> Iterator[tuple[httpx.Response, Iterator[tuple[str, str]]]]:
    with client.stream("GET", f"/jobs/{job_id}/stream") as response:
        events = sse_events(response) if response.status_code == 200 else iter(())
        if response.status_code == 200:  # open and served once the job's state has come (after its events)
            assert any(event == "job" for event, _ in events)
        else:
            response.read()
        yield response, events


def test_live_streams_per_key_are_capped(bounded, queued_job):
    key, other_key = bounded.team_key("streams"), bounded.team_key("streams")
    with bounded.client(key) as client, bounded.client(other_key) as other, contextlib.ExitStack() as streams:
        first = streams.enter_context(open_stream(client, queued_job))[0]
        for _ in range(STREAMS_PER_KEY - 1):
            streams.enter_context(open_stream(client, queued_job))
        with open_stream(client, queued_job) as (refused, _):
            assert refused.status_code == 429, refused.status_code
            message = refused.json()["error"]["message"]
            assert f"QLORA_MAX_STREAMS_PER_KEY={STREAMS_PER_KEY}" in message
        with open_stream(other, queued_job) as (response, _):
            assert response.status_code == 200  # the cap is per key: the team's other key is not held back
        first.close()
        # The server frees the slot when it sees the connection close, which the client cannot wait on: ask again.
        deadline = time.monotonic() + 30
        while True:
            with open_stream(client, queued_job) as (again, _):
                if again.status_code == 200 or time.monotonic() > deadline:
                    break
            time.sleep(0.2)
        assert again.status_code == 200, again.text


@contextlib.contextmanager
def unread_download(deployment, key: str, path: str) -> Iterator[socket.socket]:
    """A download whose answer has started and whose client reads no more of it (a receive buffer of 4 KiB):
    the server's stream stays in flight until the connection closes."""
    address = urlsplit(deployment.url)
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.connect((address.hostname, address.port))
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += connection.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        yield connection


def test_a_keys_downloads_in_flight_are_capped_and_freed_when_their_clients_leave(bounded):
    """A download the API streams (a dataset's file, /v1's, an artifact on local storage) holds a socket, a file or
    a connection to the store and a chunk in memory for as long as its client reads: one key opening downloads
    and reading none held as many as it liked (600 took 450 of the API's file descriptors). A key has at most
    QLORA_MAX_DOWNLOADS_PER_KEY; a download whose client left frees its place at once (starlette left it to the
    garbage collector, minutes later in an idle process), and HEAD, a 304 or a refusal take none."""
    key, other_key = bounded.team_key("downloads"), bounded.team_key("downloads")
    rows = b"".join(json.dumps({"prompt": f"{i} " + "grass " * 150, "completion": "Hay."}).encode() + b"\n"
                    for i in range(4000))
    with bounded.client(key) as client, bounded.client(other_key) as other, contextlib.ExitStack() as held:
        dataset = upload(client, content=rows[:3_900_000]).json()
        path = f"/datasets/{dataset['id']}/content"
        first = held.enter_context(unread_download(bounded, key, path))
        for _ in range(DOWNLOADS_PER_KEY - 1):
            held.enter_context(unread_download(bounded, key, f"/v1/files/file-{dataset['id']}/content"))
        refused = client.get(path, headers={"Range": "bytes=0-9"})
        assert refused.status_code == 429 and refused.headers["retry-after"], refused.text
        assert f"QLORA_MAX_DOWNLOADS_PER_KEY={DOWNLOADS_PER_KEY}" in refused.json()["error"]["message"]
        assert client.head(path).status_code == 200  # no bytes, no place taken
        assert client.get(path, headers={"If-None-Match": f'"{dataset["sha256"]}"'}).status_code == 304
        assert other.get(path, headers={"Range": "bytes=0-9"}).status_code == 206  # the cap is per key
        first.close()
        # The server frees the place when it sees the connection close, which the client cannot wait on: ask again.
        deadline = time.monotonic() + 30
        while (again := client.get(path, headers={"Range": "bytes=0-9"})).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert again.status_code == 206, again.text


def test_a_stream_ends_when_its_key_is_revoked(bounded, queued_job):
    key = bounded.team_key("streams")
    with bounded.client(key) as client, open_stream(client, queued_job) as (response, events):
        with session_scope(bounded.settings.database_url) as session:
            teams_service.revoke_key(session, key[:12])
        # A stream that goes on sends a keepalive every 15 s: past the deadline, it did not end.
        deadline = time.monotonic() + 20
        last = None
        for event, data in events:
            assert time.monotonic() < deadline, "the stream went on after its key was revoked"
            if event != ":":
                last = event, data
        assert last is not None and last[0] == "error", last
        assert "revoked" in json.loads(last[1])["error"]["message"]


@pytest.mark.parametrize("how", ["revoke the key", "disable the team"])
def test_an_upload_whose_key_stopped_working_while_it_streamed_keeps_nothing(bounded, unchanged, how):
    """An upload is authenticated as it begins and may stream for minutes, or hours at a trickle. Its key revoked
    (a leaked one) or its team disabled meanwhile, it still stored its file among the team's datasets at the end."""
    team = f"uploading-{how.split()[-1]}"
    key = bounded.team_key(team)
    end = b"\r\n" + f"--{BOUNDARY}--\r\n".encode()
    slow = SlowUpload(bounded.url, key)
    try:
        assert slow.status() == "HTTP/1.1 100 Continue"  # authenticated: the route reads the body
        slow.send(file_part(rows=10)[:-2])
        with session_scope(bounded.settings.database_url) as session:
            if how == "revoke the key":
                teams_service.revoke_key(session, key[:12])
            else:
                admin.disable_team(session, team)
        slow.send(ROW * 10)
        slow.send(end)
        slow.sock.sendall(b"0\r\n\r\n")
        status, body = slow.response()
    finally:
        slow.close()
    assert status.startswith("HTTP/1.1 401"), (status, body)
    assert json.loads(body)["error"]["code"] == ("unauthorized" if how == "revoke the key" else "team_disabled")


def test_a_burst_of_job_creations_from_one_team_is_answered_without_a_5xx(bounded):
    """More POST /jobs at once than the API has route threads (40): each waits for the team's row (the
    queue quota's lock) holding a thread and a database connection. The creation holding the lock must
    answer without a second thread (app/jobs/routes.py, `encoded`), or the burst deadlocks until the
    database pool's timeout and answers 500s (24 of 60 did, on the same burst, before)."""
    from concurrent.futures import ThreadPoolExecutor

    key = bounded.team_key("burst")
    with bounded.client(key) as client:
        dataset = upload(client, content=ROW * 200).json()["id"]
    body = {**demo_spec("tiny"), "dataset_id": dataset, "gpu_class": lane("nobody-listens")}

    def create(_: int) -> int:
        with bounded.client(key) as client:
            return client.post("/jobs", json=body).status_code

    with ThreadPoolExecutor(60) as pool:
        statuses = list(pool.map(create, range(60)))
    assert statuses == [201] * 60, {status: statuses.count(status) for status in set(statuses)}


def test_a_teams_burst_of_creations_goes_one_at_a_time_and_another_team_is_served_meanwhile(bounded):
    """Each creation waits for the one preflight process holding a route thread; a team's burst would hold
    them all and another team wait behind it. With a turn per team (app/jobs/turns.py) the burst goes one
    at a time and the other team's requests are answered among its first answers, not after it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    rows = b"".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} " * 30},
                                             {"role": "assistant", "content": f"answer {i} " * 30}]}).encode() + b"\n"
                    for i in range(500))  # a preflight of a tenth of a second or so each
    burst_key, other_key = bounded.team_key("burst-a"), bounded.team_key("calm-b")
    with bounded.client(burst_key) as client:
        big = upload(client, content=rows).json()["id"]
    with bounded.client(other_key) as client:
        small = upload(client, content=ROW * 20).json()["id"]
    spec = demo_spec("tiny")
    spec = {**spec, "training": {**spec["training"], "max_seq_length": 512}, "gpu_class": lane("nobody-listens")}
    answered: list[str] = []  # who was answered, in order
    lock = threading.Lock()

    def create(key: str, dataset: str, who: str) -> int:
        with bounded.client(key) as client:
            status = client.post("/jobs", json={**spec, "dataset_id": dataset}).status_code
        with lock:
            answered.append(who)
        return status

    with ThreadPoolExecutor(46) as pool:
        burst = [pool.submit(create, burst_key, big, "a") for _ in range(45)]  # more than the API's 40 route threads
        # The burst is under way (a burst request that failed ends the wait too: its result() says why).
        wait_until(lambda: answered or any(f.done() for f in burst), 120, "a first answer to the burst")
        other = pool.submit(create, other_key, small, "b")
        assert other.result() == 201
        statuses = [f.result() for f in burst]
    assert set(statuses) <= {201, 429}, statuses  # 429: waited a minute for the team's turn
    assert answered.index("b") <= 10, answered  # among the first answers, not behind the burst


def test_another_teams_preflight_gets_the_preflight_process_next_beside_a_burst_of_creations(bounded):
    """One preflight process, a team creating jobs from three threads in a loop (each creation
    preflights seconds of rows), and another team sending preflights: each of those must get the process
    next, while one creation of the burst holds it at most, and answer with its report. (Before, a
    preflight waited 1 s for the process, which the burst held nearly all the time: 429 `preflight_busy`.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    rows = b"".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} " * 30},
                                             {"role": "assistant", "content": f"answer {i} " * 30}]}).encode() + b"\n"
                    for i in range(4000))  # 3.3 MB: its preflight, as train and validation set, is a second or more
    burst_key, other_key = bounded.team_key("burst-p"), bounded.team_key("calm-p")
    with bounded.client(burst_key) as client:
        response = upload(client, content=rows)
        assert response.status_code == 201, response.text
        big = response.json()["id"]
    with bounded.client(other_key) as client:
        small = upload(client, content=ROW * 20).json()["id"]
    spec = demo_spec("tiny")
    spec = {**spec, "training": {**spec["training"], "max_seq_length": 512}, "gpu_class": lane("nobody-listens")}
    burst_answers, stop = [], threading.Event()

    def create_until_stopped() -> set[int]:
        statuses = set()
        with bounded.client(burst_key) as client:
            while not stop.is_set():
                body = {**spec, "dataset_id": big, "validation_dataset_id": big}
                statuses.add(client.post("/jobs", json=body).status_code)
                burst_answers.append(time.monotonic())
        return statuses

    with ThreadPoolExecutor(3) as pool:
        burst = [pool.submit(create_until_stopped) for _ in range(3)]
        try:
            # The burst is under way, the process busy with it (a burst thread that failed ends the wait too).
            wait_until(lambda: burst_answers or any(f.done() for f in burst), 120, "a first answer to the burst")
            with bounded.client(other_key) as client:
                for _ in range(3):
                    answered_before = len(burst_answers)
                    response = client.post("/jobs/preflight", json={**spec, "dataset_id": small})
                    assert response.status_code == 200, response.text
                    assert response.json()["report"]["train"]["rows"] == 20
                    # The creation holding the process when it came, and none after it.
                    assert len(burst_answers) - answered_before <= 2, (answered_before, len(burst_answers))
        finally:
            stop.set()
        assert set().union(*(f.result() for f in burst)) == {201}
