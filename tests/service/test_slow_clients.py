"""Slow, silent and endless clients at the HTTP level (app/connections.py): none holds a connection or
an API process's memory without bound, and a slow but steady upload still goes through."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.connections import MAX_HEADER_BYTES
from tests.deployment import start_deployment, stop_deployment
from tests.service.test_bad_input import stored_state

HEADER_TIMEOUT_S = 1.5
BODY_IDLE_TIMEOUT_S = 2.0
BOUNDARY = "qlora-slow"
ROW = json.dumps({"prompt": "What does a goat eat?", "completion": "Hay."}).encode() + b"\n"


@pytest.fixture(scope="module")
def slow(backing_services, tmp_path_factory, tiny_model_dir):
    d = start_deployment(tmp_path_factory.mktemp("slow"), backing_services, tiny_model_dir,
                         header_timeout_s=HEADER_TIMEOUT_S, body_idle_timeout_s=BODY_IDLE_TIMEOUT_S)
    yield d
    stop_deployment(d)


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a test's timeout if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def rss_bytes(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


def test_connections_that_never_finish_their_headers_are_answered_408_and_closed(slow):
    """Slowloris: silent connections and ones that stop mid-headers, more than a pool of anything holds;
    each is closed once its headers are late (a begun request with a 408; a silent one without an
    answer, which a client that opened it ahead of a request would take for its next one's), and the
    API answers others meanwhile."""
    silent = [connect(slow.url) for _ in range(40)]
    partial = [connect(slow.url) for _ in range(40)]
    for sock in partial:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Wait: ")
    with slow.client(None) as client:
        assert client.get("/health").status_code == 200
    started = time.monotonic()
    answers = [read_until_closed(sock) for sock in silent + partial]
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 10
    assert answers[:len(silent)] == [b""] * len(silent)
    for answer in answers[len(silent):]:
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(body)["error"]["code"] == "request_timeout"
    for sock in silent + partial:
        sock.close()


def test_headers_trickled_within_the_deadline_and_the_next_request_on_the_connection(slow):
    """A slow client is not a silent one: headers sent a few bytes at a time, in time, are served; the
    connection's next request gets a deadline of its own, and is answered 408 when it stalls."""
    with connect(slow.url) as sock:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        for i in range(0, len(request), 8):
            sock.sendall(request[i:i + 8])
            time.sleep(HEADER_TIMEOUT_S / 10)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # and no more
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_headers_without_end_are_refused_431_and_the_api_does_not_grow(slow):
    """One request that sends header lines without end: the server stops it past MAX_HEADER_BYTES,
    before the client has sent much more than the socket buffers hold."""
    api = slow.procs[0].pid
    before = rss_bytes(api)
    sent = 0
    with connect(slow.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        with pytest.raises(OSError):  # reset or broken pipe: the server closed it
            while sent < 256 * 2**20:
                sock.sendall(line * 64)
                sent += len(line) * 64
    assert sent < 32 * 2**20, f"the server read {sent >> 20} MiB of headers before it stopped"
    assert rss_bytes(api) - before < 32 * 2**20
    # Its answer, as a client that reads what it gets sees it.
    with connect(slow.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n")
        status, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 431 "), status
    assert json.loads(body)["error"]["code"] == "headers_too_large"


def upload_head(url: str, key: str, length: int) -> bytes:
    return (f"POST /datasets HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n").encode()


def upload_body(rows: int) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="farm.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n").encode() + ROW * rows + f"\r\n--{BOUNDARY}--\r\n".encode()


def test_an_upload_whose_body_stops_arriving_is_closed_and_leaves_nothing(slow):
    key = slow.team_key("stalls")
    before = stored_state(slow)
    body = upload_body(rows=200)
    with connect(slow.url) as sock:
        sock.sendall(upload_head(slow.url, key, len(body)) + body[:len(body) // 2])  # and then nothing
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # closed: the route saw its client gone
        assert BODY_IDLE_TIMEOUT_S - 0.5 < time.monotonic() - started < BODY_IDLE_TIMEOUT_S + 10
    assert stored_state(slow) == before


def test_a_slow_but_steady_upload_takes_longer_than_the_idle_timeout_and_succeeds(slow):
    key = slow.team_key("steady")
    body = upload_body(rows=200)
    pieces = 12
    size = len(body) // pieces + 1
    started = time.monotonic()
    with connect(slow.url) as sock:
        sock.sendall(upload_head(slow.url, key, len(body)))
        for i in range(0, len(body), size):
            sock.sendall(body[i:i + size])
            time.sleep(BODY_IDLE_TIMEOUT_S / 5)
        answer = sock.recv(65536)
    assert time.monotonic() - started > BODY_IDLE_TIMEOUT_S * 2
    assert answer.startswith(b"HTTP/1.1 201 "), answer
