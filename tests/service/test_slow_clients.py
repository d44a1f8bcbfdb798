"""Slow, silent, endless and crowding clients at the HTTP level (app/connections.py): none holds a
connection, an API process's memory or its file descriptors without bound, a slow but steady upload
still goes through, and one address holding connections it sends nothing on starves no other."""

from __future__ import annotations

import json
import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from app.connections import MAX_HEADER_BYTES, RESERVED_FDS
from tests.deployment import ROOT, start_deployment, stop_deployment
from tests.service.test_bad_input import stored_state

HEADER_TIMEOUT_S = 1.5
BODY_IDLE_TIMEOUT_S = 2.0
SEND_IDLE_TIMEOUT_S = 2.0
BOUNDARY = "qlora-slow"
PENDING_PER_CLIENT = 40
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
ROW = json.dumps({"prompt": "What does a goat eat?", "completion": "Hay."}).encode() + b"\n"


@pytest.fixture(scope="module")
def slow(backing_services, tmp_path_factory, tiny_model_dir):
    d = start_deployment(tmp_path_factory.mktemp("slow"), backing_services, tiny_model_dir,
                         header_timeout_s=HEADER_TIMEOUT_S, body_idle_timeout_s=BODY_IDLE_TIMEOUT_S,
                         send_idle_timeout_s=SEND_IDLE_TIMEOUT_S, max_upload_bytes=str(64 * 1024 * 1024))
    yield d
    stop_deployment(d)


@pytest.fixture(scope="module")
def crowded(backing_services, tmp_path_factory, tiny_model_dir):
    """Headers' deadline as deployed (30 s): connections that send nothing stay for the whole test."""
    d = start_deployment(tmp_path_factory.mktemp("crowded"), backing_services, tiny_model_dir,
                         max_pending_connections_per_client=PENDING_PER_CLIENT)
    yield d
    stop_deployment(d)


def connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30, source_address=(source, 0))


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
    # Closed by the headers' deadline of this deployment (1.5 s), not the 30 s one deployed by default: the 408s
    # name it. (A time limit here, 11.5 s, told the two apart as well, and failed on a loaded machine.)
    answers = [read_until_closed(sock) for sock in silent + partial]
    assert answers[:len(silent)] == [b""] * len(silent)
    for answer in answers[len(silent):]:
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 "), answer
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and f"within {HEADER_TIMEOUT_S:g} s" in error["message"], error
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
        started = time.monotonic()  # before the send: the server's idle clock starts after it, however late we run
        sock.sendall(upload_head(slow.url, key, len(body)) + body[:len(body) // 2])  # and then nothing
        assert read_until_closed(sock) == b""  # closed: the route saw its client gone
        # Not before the idle timeout (a loaded machine only makes it later), and by it, as the API says: no upper
        # time limit, which failed on a loaded machine.
        assert time.monotonic() - started > BODY_IDLE_TIMEOUT_S - 0.5
    assert f"closed a connection whose request body stopped arriving for {BODY_IDLE_TIMEOUT_S:g} s" in (slow.home / "api.log").read_text()
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


STALLED = f"closed a connection whose client read under 16 KiB of its answer in {SEND_IDLE_TIMEOUT_S:g} s"


def download_asked(slow, team: str, mib: int) -> tuple[bytes, socket.socket]:
    """A dataset of `mib` MiB (more than loopback's socket buffers hold) uploaded, and its download asked for on a
    socket whose receive window is small, its answer not yet read: the API holds the rest of it."""
    key = slow.team_key(team)
    data = ROW * (mib * 1024 * 1024 // len(ROW))
    made = httpx.post(f"{slow.url}/datasets", headers={"Authorization": f"Bearer {key}"},
                      files={"file": ("farm.jsonl", data)}, timeout=120)
    assert made.status_code == 201, made.text
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connecting: the window it offers
    sock.settimeout(30)
    sock.connect((urlsplit(slow.url).hostname, urlsplit(slow.url).port))
    sock.sendall(f"GET /datasets/{made.json()['id']}/content HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 f"Authorization: Bearer {key}\r\n\r\n".encode())
    return data, sock


DROPPED = "closed a connection whose request body went on arriving"


@pytest.mark.parametrize(("request_line", "framing", "status"), [
    ("GET /health", "Transfer-Encoding: chunked", b"200"),  # a route that reads no body, asked without a key
    ("POST /jobs", f"Content-Length: {10**12}\r\nContent-Type: application/json", b"401"),  # refused before its body
])
def test_a_body_that_goes_on_after_its_answer_is_dropped_for_the_idle_timeout_then_the_connection_closed(
        slow, request_line, framing, status):
    """The rest of a body its route did not read is read (and dropped) to reach the connection's next request: an
    endless one held the connection for as long as its client went on sending, a client without a key too, with
    the API reading it at up to 2 GB/s. A short one is still read through, and the connection serves on."""
    logged_before = (slow.home / "api.log").read_text().count(DROPPED)
    chunked = "chunked" in framing
    piece = b"x" * 16384
    piece = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    with connect(slow.url) as sock:
        sock.sendall(f"{request_line} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode() + piece)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        # Go on sending, steadily (never idle), as long as the server reads: it closes the connection within
        # QLORA_BODY_IDLE_TIMEOUT_S of its answer, which 30 s leaves a loaded machine ample room for.
        deadline = time.monotonic() + 30
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(piece)
                readable, _, _ = select.select([sock], [], [], 0.01)
                closed = bool(readable) and sock.recv(65536) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the API read a body past its answer for 30 s without closing the connection"
    assert (slow.home / "api.log").read_text().count(DROPPED) > logged_before
    # A short body of a GET (a script sending {} with it) is read through, and the connection's next request answered.
    with connect(slow.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" + HEALTH)
        answers = b""
        while answers.count(b"HTTP/1.1 200 ") < 2:
            chunk = sock.recv(65536)
            assert chunk, answers
            answers += chunk


@pytest.mark.parametrize("request_bytes", [
    "GET /jobs/ü HTTP/1.1\r\nHost: x\r\n\r\n".encode(),  # raw UTF-8 in the URL, not percent-encoded
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",  # DEL in a header's value
    b"POST /jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, x\r\n\r\n",
])
def test_a_request_the_parser_cannot_read_is_a_400_in_the_error_shape(slow, request_bytes):
    with connect(slow.url) as sock:
        sock.sendall(request_bytes)
        answer = read_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), answer[:300]
    assert json.loads(body)["error"]["code"] == "malformed_request"
    with slow.client(None) as client:
        assert client.get("/health").status_code == 200


def test_a_client_that_reads_none_of_its_answer_is_closed_and_what_was_left_to_send_dropped(slow):
    """An answer the client never read stayed in the API's memory (past what the kernel's socket buffers take)
    for as long as the client kept its connection: 20 clients asking for a job with long eval prompts (30 MB)
    and reading nothing held a GB of the API, and a stalled download held one of its key's places for good."""
    logged_before = (slow.home / "api.log").read_text().count(STALLED)
    data, sock = download_asked(slow, "stalled-reader", 24)
    with sock:
        deadline = time.monotonic() + 60  # the API says when it closed it; read nothing until then
        while (slow.home / "api.log").read_text().count(STALLED) == logged_before:
            assert time.monotonic() < deadline, "the API never closed a connection whose client read nothing"
            time.sleep(0.2)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:  # aborted: what the kernel still held may be dropped with it
            pass
    assert len(received) < len(data)


def test_a_client_reading_its_answer_slowly_but_steadily_for_longer_than_the_send_timeout_gets_all_of_it(slow):
    """A slow reader is not a stalled one (curl --limit-rate, a slow link downloading an artifact): the send timeout
    counts a window in which less than 16 KiB of the answer went. It counted from when the answer's unsent bytes
    passed the transport's high-water mark until they fell below the low one, which takes about a megabyte read: a
    client reading 80 KB/s here (a 2 s timeout) was closed, and at 60 s one under ~20 KB/s, as having "read none"."""
    data, sock = download_asked(slow, "slow-reader", 8)
    received = b""
    with sock:
        # 4 KiB every 50 ms, at most 80 KB/s, for 2.5 timeouts (a loaded machine only reads slower, and a window
        # still sees tens of reads), then the rest at once: the API holds most of the answer all along
        slow_until = time.monotonic() + 2.5 * SEND_IDLE_TIMEOUT_S
        try:
            while time.monotonic() < slow_until and (chunk := sock.recv(4096)):
                received += chunk
                time.sleep(0.05)
            assert len(received) < len(data) // 2, "the answer went faster than the API's buffers would hold"
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:  # the API aborted the connection: the answer stops short below
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(body) == len(data) and body == data, f"{len(body)} of {len(data)} bytes came"


def test_a_client_reading_a_trickle_of_its_answer_is_closed_as_a_stalled_one(slow):
    """Any progress in a window kept the connection: a client reading a few bytes a second (the kernel takes more
    after each packet read) held it, and the answer buffered for it, without end. Under 16 KiB a window is a stall."""
    logged_before = (slow.home / "api.log").read_text().count(STALLED)
    data, sock = download_asked(slow, "trickle-reader", 8)
    received = b""
    with sock:
        deadline = time.monotonic() + 60
        try:
            while (slow.home / "api.log").read_text().count(STALLED) == logged_before:  # 1 KiB every 0.5 s meanwhile
                assert time.monotonic() < deadline, "the API never closed a connection whose client read a trickle"
                received += sock.recv(1024)
                time.sleep(0.5)
        except ConnectionResetError:  # aborted before the log was read
            pass
    assert len(received) < len(data) // 4


def refused_for_number(answer: bytes) -> bool:
    return answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer and b"retry-after: 1" in answer


def served(sock: socket.socket) -> bool:
    sock.sendall(HEALTH)
    return sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def eventually_served(url: str, source: str = "127.0.0.1") -> bool:
    """A new connection from `source` is served once the API has seen the closes before it (a few ms)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with connect(url, source) as sock:
            try:
                if served(sock):
                    return True
            except ConnectionError:  # refused and closed before the request was read
                pass
        time.sleep(0.05)
    return False


def test_one_address_holding_connections_it_sends_no_request_on_is_capped_and_others_are_served(crowded):
    """As nginx's limit_conn: one address's connections waiting for their request (silent, or mid-headers)
    past app.connections.PENDING_AFTER_S are bounded, so opening them faster than the headers' deadline closes them starves
    no one else. A burst of connections whose requests follow, and connections in a request or idle
    between two, are not counted."""
    burst = [connect(crowded.url) for _ in range(2 * PENDING_PER_CLIENT)]  # all open before any request
    assert all(served(sock) for sock in burst)
    for sock in burst:
        sock.close()
    held = [connect(crowded.url) for _ in range(PENDING_PER_CLIENT)]
    for sock in held[::2]:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # mid-headers counts as silent does
    try:
        with connect(crowded.url) as extra:
            # Refused as it opens if the others count already, else once it has waited app.connections.PENDING_AFTER_S itself. The
            # 503 says it was their number; nothing else here closes it before the headers' deadline (30 s), and
            # that would close it without an answer. (A time limit, PENDING_AFTER_S + 5 s, failed on a loaded machine.)
            assert refused_for_number(read_until_closed(extra))
        with connect(crowded.url, "127.0.0.2") as other:  # another address, meanwhile
            assert served(other)
        assert served(held[1])  # a request on one of them: answered, and that connection no longer counts
        with connect(crowded.url) as one_more:  # so the address may open one more
            assert served(one_more)
    finally:
        for sock in held:
            sock.close()
    assert eventually_served(crowded.url)  # closed, they free the address's room


def test_connections_past_what_the_open_file_limit_leaves_are_refused_and_the_api_keeps_working(crowded):
    """Descriptors run out otherwise: then an API process can open neither an upload's file nor its
    database, and drops new connections unanswered. Past max_connections() (half of what the limit
    leaves after RESERVED_FDS) a new connection is answered 503; the connections it holds keep working."""
    api = crowded.procs[0].pid
    soft, hard = resource.prlimit(api, resource.RLIMIT_NOFILE)
    room = 60
    limit = RESERVED_FDS + 2 * room
    key = crowded.team_key("crowded")
    with crowded.client(key) as client:
        assert client.get("/datasets").status_code == 200  # a kept-alive connection, opened before the crowd
        resource.prlimit(api, resource.RLIMIT_NOFILE, (limit, hard))  # as if the API had started under it
        # As many connections as the limit has descriptors, from addresses each under its own cap
        crowd = [connect(crowded.url, f"127.0.1.{1 + i // (PENDING_PER_CLIENT - 1)}") for i in range(limit)]
        try:
            answered: dict[socket.socket, bytes] = {}
            deadline = time.monotonic() + 30
            while len(answered) < limit - (room - 1) and time.monotonic() < deadline:
                readable, _, _ = select.select([s for s in crowd if s not in answered], [], [], 0.5)
                answered.update((sock, read_until_closed(sock)) for sock in readable)
            assert len(answered) == limit - (room - 1)  # the kept connection and room - 1 of the crowd are held
            assert all(refused_for_number(answer) for answer in answered.values())
            upload = client.post("/datasets", files={"file": ("d.jsonl", ROW * 20, "application/jsonl")})
            assert upload.status_code == 201, upload.text  # a file of its own, and the database: descriptors left
            assert client.get(f"/datasets/{upload.json()['id']}").status_code == 200
            with connect(crowded.url, "127.0.0.2") as late:
                assert refused_for_number(read_until_closed(late))
        finally:
            for sock in crowd:
                sock.close()
            resource.prlimit(api, resource.RLIMIT_NOFILE, (soft, hard))
    assert eventually_served(crowded.url, "127.0.0.2")


def test_serve_raises_the_soft_open_file_limit_to_the_hard_one():
    """A system's default soft limit (1,024 under systemd) would hold a few hundred connections; the hard
    limit is the operator's choice, and `qlora serve` takes it."""
    script = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)); "
              "from app.connections import raise_open_file_limit; "
              "print(raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE), hard)")
    raised, soft, hard, before = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                                                capture_output=True, text=True).stdout.split()
    assert raised == soft == hard == before and int(hard) > 512
