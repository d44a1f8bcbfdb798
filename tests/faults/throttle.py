"""A throttling HTTP proxy in front of the test S3 server: a slow link, for real.

A worker pointed at it (QLORA_S3_ENDPOINT_URL) talks S3 over HTTP as usual; the requests a test
names are stretched to last a given time: an upload's body is read from the worker slowly before it
goes on to the store, a download's body is fed to the worker slowly. Every other request passes
through as it is. Each stretched transfer is measured, so a test can show how long it really took.
And a storage outage: the next requests a test names are answered 503, as S3 answers when it is down
or overloaded, without reaching the store. And a tripwire: something a test does the moment a named request
has reached the store, before its answer goes back (a database outage just as an artifact is stored).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "expect",
              "content-length"}
PACE_S = 0.05  # a stretched body moves in slices this far apart


@dataclass(frozen=True)
class Rule:
    method: str
    path_contains: str
    seconds: float


@dataclass(frozen=True)
class Stretched:
    """A transfer the proxy slowed down: what it was, how many body bytes, how long it really took."""

    method: str
    path: str
    bytes: int
    seconds: float


class ThrottlingProxy:
    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.rules: list[Rule] = []
        self.stretched: list[Stretched] = []
        self.refusals: dict[tuple[str, str], int] = {}
        self.refused = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of each request the store took (2xx), in order
        self._tripwires: list[tuple[str, str, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()  # clients' connections open now (boto keeps them alive)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-throttle", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stretch(self, method: str, path_contains: str, seconds: float) -> None:
        """From now on, make each `method` request whose path contains `path_contains` last `seconds`."""
        with self._lock:
            self.rules.append(Rule(method, path_contains, seconds))

    def refuse(self, method: str, path_contains: str, times: int) -> None:
        """Answer the next `times` matching requests 503 (an outage), then let them through again."""
        with self._lock:
            self.refusals[(method, path_contains)] = times

    def trip(self, method: str, path_contains: str, action: Callable[[], None]) -> None:
        """Run `action` once, when the next matching request has been answered by the store and before the
        answer goes back to the client: the store has it, and the client does not know yet."""
        with self._lock:
            self._tripwires.append((method, path_contains, action))

    def _tripped(self, method: str, path: str) -> Callable[[], None] | None:
        with self._lock:
            self.requests.append((method, path))
            for wire in self._tripwires:
                if wire[0] == method and wire[1] in path:
                    self._tripwires.remove(wire)
                    return wire[2]
            return None

    def _refused(self, method: str, path: str) -> bool:
        with self._lock:
            for (m, part), left in self.refusals.items():
                if m == method and part in path and left > 0:
                    self.refusals[(m, part)] = left - 1
                    self.refused += 1
                    return True
            return False

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.refusals.clear()
            self._tripwires.clear()

    def stretched_matching(self, path_contains: str) -> list[Stretched]:
        with self._lock:
            return [s for s in self.stretched if path_contains in s.path]

    def close(self) -> None:
        """The store answers nothing from now on: no new connection, and none of those boto keeps alive (a
        request on one of them went through to the store after close, as if it were still up)."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            open_now = list(self._connections)
        for connection in open_now:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile
                pass

    def _rule_for(self, method: str, path: str) -> Rule | None:
        with self._lock:
            return next((r for r in self.rules if r.method == method and r.path_contains in path), None)

    def _record(self, stretched: Stretched) -> None:
        with self._lock:
            self.stretched.append(stretched)


def _paced(total: int, seconds: float):
    """Slices of a body of `total` bytes, each yielded when its share of `seconds` has passed."""
    started = time.monotonic()
    slices = max(1, int(seconds / PACE_S))
    step = max(1, -(-total // slices))
    sent = 0
    while sent < total:
        size = min(step, total - sent)
        sent += size
        time.sleep(max(0.0, started + seconds * sent / total - time.monotonic()))
        yield size


def _handler(proxy: ThrottlingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects; also answers Expect: 100-continue

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def setup(self) -> None:
            super().setup()
            with proxy._lock:
                proxy._connections.add(self.connection)

        def finish(self) -> None:
            with proxy._lock:
                proxy._connections.discard(self.connection)
            super().finish()

        def _forward(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise NotImplementedError("the throttling proxy needs a Content-Length (boto3 sends one)")
            rule = proxy._rule_for(self.command, self.path)
            started = time.monotonic()
            length = int(self.headers.get("Content-Length") or 0)
            if proxy._refused(self.command, self.path):
                self.rfile.read(length) if length else None
                body = b"<Error><Code>ServiceUnavailable</Code><Message>outage</Message></Error>"
                self.send_response(503, "Service Unavailable")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if rule is not None and length:
                body = b"".join(self.rfile.read(size) for size in _paced(length, rule.seconds))
            else:
                body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                if response.status < 300 and (action := proxy._tripped(self.command, self.path)) is not None:
                    action()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                # A HEAD answer names the object's size without a body.
                size = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", size or "0")
                self.end_headers()
                if self.command != "HEAD":
                    if rule is not None and data and not body:
                        offset = 0
                        for size in _paced(len(data), rule.seconds):
                            self.wfile.write(data[offset:offset + size])
                            self.wfile.flush()
                            offset += size
                    else:
                        self.wfile.write(data)
            finally:
                upstream.close()
            if rule is not None:
                proxy._record(Stretched(self.command, self.path, len(body) or len(data), time.monotonic() - started))

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler
