"""HTTP connections from slow or hostile clients: deadlines, and a bound on a request's headers.

uvicorn (0.54, httptools) holds a connection for as long as its client keeps it open, with nothing
read: it times out only the idle time between two requests of a kept-alive connection. And it keeps
every header line a request sends, with no limit. So one client could hold connections (a file
descriptor and a little memory each) without end by opening them and sending a request's first bytes
and never the rest (slowloris), or grow an API process by gigabytes by sending headers without end.
This protocol is uvicorn's own with the bounds a server put in front of it (nginx, say) would add:

- a request's line and headers must arrive within `QLORA_HEADER_TIMEOUT_S` of the connection's
  opening (or, on a kept-alive connection, of the request's first byte), else 408 and closed (a
  connection that sent nothing at all is closed without an answer);
- they may take at most MAX_HEADER_BYTES, else 431 and closed (a real client sends a few hundred);
- a body that stops arriving for `QLORA_BODY_IDLE_TIMEOUT_S` closes the connection. That is idleness,
  not slowness: a multi-gigabyte upload over a slow link is fine as long as bytes keep coming, and
  time spent waiting on the server never counts (its buffer is full while the app stores what came,
  or the client waits for its 100 Continue). The route reading the body sees the client gone, as on
  any disconnect (an upload cut off leaves nothing behind);
- a body still arriving after its answer was sent (a GET, which reads none; a request refused before its
  body ended: 401, 413) is read and dropped, as the connection's next request comes after it, for at most
  `QLORA_BODY_IDLE_TIMEOUT_S` more (nginx's lingering_time), then the connection is closed. Before, an
  endless one (chunked, or a Content-Length of a terabyte) held its connection for as long as it went on,
  from a client without a key too, and the process read it at up to 2 GB/s;
- an answer the client stops reading for `QLORA_SEND_IDLE_TIMEOUT_S` closes the connection, and drops
  what was left of the answer to send (as nginx's send_timeout). A written answer waits in the process's
  memory for its client to read it, past what the kernel's socket buffer takes: 20 clients that asked for
  a job holding long eval prompts (a 30 MB answer) and read nothing held a GB of the API's memory for as
  long as they kept their connections, and connections in a request are not counted per client. A slow
  reader is fine: only a stall counts, a whole timeout while the answer waits on its client (its unsent bytes
  past the transport's high-water mark) in which less than SEND_PROGRESS_BYTES of it went (unsent_bytes: the
  transport's buffer and the kernel's). Waiting for the transport's low-water mark alone cut off steady readers: it needs the kernel
  to free a large share of its send buffer, about 1 MB read per timeout, so at 60 s one reading under ~20 KB/s
  (curl --limit-rate, a slow link) was closed;
- one client (an IPv4 address, or an IPv6 /64: client_of) may hold at most `QLORA_MAX_PENDING_CONNECTIONS_PER_CLIENT` connections that
  have waited PENDING_AFTER_S or more for their request's headers (silent, or mid-headers), as nginx's
  limit_conn bounds one address: past it a new connection from there is answered 503 and closed, so a
  client that opens them faster than the deadline closes them starves no one else. A connection
  whose request comes within PENDING_AFTER_S (every client's does) never counts, so a burst of
  connections from one address is fine, and so are connections in a request (a live stream, an upload)
  or idle between two: a team's many dashboards behind one address are fine;
- an API process holds at most half the file descriptors its limit leaves after RESERVED_FDS (each
  connection may hold a file too, a download from local storage); past that a new connection is
  answered 503 and closed. Descriptors run out otherwise, and then the process can open neither its
  database, nor an upload's file, nor even accept: the event loop drops every new connection unanswered.
  `qlora serve` raises the process's soft limit to its hard one first (`raise_open_file_limit`).

`qlora serve` runs every API process with it (uvicorn's `http=` option).
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import logging
import resource
import struct
import termios
from collections import Counter

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings

log = logging.getLogger(__name__)

# A request's line and headers, in bytes: nginx allows 32 KiB by default, Node 16 KiB. This API's
# clients send a bearer key and a few standard headers.
MAX_HEADER_BYTES = 64 * 1024

HEADERS, BODY = "headers", "body"

# What a client must read of an answer waiting on it in each QLORA_SEND_IDLE_TIMEOUT_S, or be closed: 16 KiB a minute
# at the default, a trickle no download or stream reads at, however slow its link.
SEND_PROGRESS_BYTES = 16 * 1024
# The request for a socket's unsent bytes (Linux's SIOCOUTQ); None where termios has none.
TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)

# How long a connection may wait for its request's headers before it counts against its address's
# QLORA_MAX_PENDING_CONNECTIONS_PER_CLIENT: a client sends them within a round trip of connecting, and
# an API process busy with a burst of connections reads them within this.
PENDING_AFTER_S = 2.0

# Descriptors an API process keeps for itself, beyond its connections: the database pools, the
# preflight children's pipes, logs, uploads being stored, its own sockets.
RESERVED_FDS = 256

# This process's connections (one event loop calls every protocol callback: no lock): how many are
# open, and per client address how many have not sent their request's headers yet.
_open_connections = 0
_pending_by_client: Counter[str] = Counter()
# Connections refused for their number, logged once per REFUSALS_LOGGED_EVERY_S: a flood of them is
# what the limits are for, and a log line each would be a flood of its own.
REFUSALS_LOGGED_EVERY_S = 10.0
_refusals = {"since_log": 0, "logged_at": float("-inf")}


def unsent_bytes(transport: asyncio.Transport) -> int:
    """What a connection's answer still has to send: the bytes in the transport's buffer, and on Linux those
    in the kernel's send queue not yet taken by the client's (its socket's TIOCOUTQ, 0 where there is none
    to ask: the transport's buffer then moves each time the kernel takes more)."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and TIOCOUTQ is not None:
        try:
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), TIOCOUTQ, b"\0" * 4))[0]
        except OSError:  # not a socket the kernel counts so (closed, or another system's)
            pass
    return unsent


def max_connections() -> int:
    """The connections this process accepts at once: half the descriptors its limit leaves after
    RESERVED_FDS. Read at each connection (a system call), so a limit changed at run time applies."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max((soft - RESERVED_FDS) // 2, 16)


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard one (which its children inherit): a
    system's default soft limit (1,024 under systemd) is far below what a server holding thousands of
    connections needs, and only the hard limit is an operator's choice. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit the kernel will not give (over fs.nr_open): keep the soft one
            pass
    return soft


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for a request's headers and body, and a bound on its headers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout = settings.header_timeout_s
        self.body_idle_timeout = settings.body_idle_timeout_s
        self.pending_per_client = settings.max_pending_connections_per_client
        self.counted = False  # in _open_connections
        self.host: str | None = None  # the client, as counted (client_of): None on a Unix socket
        self.pending = False  # counted in _pending_by_client under self.host
        self.reading: str | None = None  # HEADERS or BODY of the request being received, None between requests
        self.header_bytes = 0  # bytes received while the current request's headers were incomplete
        self.header_started = self.last_read = 0.0
        self.dropping_until: float | None = None  # while a body arrives after its answer: when it stops being read
        self.deadline: asyncio.TimerHandle | None = None
        self.send_idle_timeout = settings.send_idle_timeout_s
        self.send_deadline: asyncio.TimerHandle | None = None  # armed while the answer waits on its client
        self.unsent_when_armed = 0  # unsent_bytes() when send_deadline was armed

    # uvicorn's protocol callbacks, each extended. A timer is armed only where bytes are still owed:
    # a request whose headers (and body) come in one read, as a poll's do, costs none.

    def connection_made(self, transport) -> None:
        global _open_connections
        super().connection_made(transport)
        self.host = client_of(self.client[0]) if self.client else None
        if _open_connections >= max_connections():
            self._refuse_connection("this API process holds as many connections as its open-file limit allows; "
                                    "retry shortly")
            return
        if self._address_full():
            self._refuse_connection(self._too_many_pending())
            return
        _open_connections += 1
        self.counted = True
        self._expect_headers()
        self._arm_headers()  # a connection that never sends a byte is held no longer

    def connection_lost(self, exc: Exception | None) -> None:
        global _open_connections
        self._disarm()
        self._send_resumed()
        self._pending(False)
        if self.counted:
            _open_connections -= 1
            self.counted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.reading == HEADERS:  # still incomplete after this read
            # Counted once the parser has seen the read: one in which the headers end is not theirs
            # alone (a body may follow in it), and is at most one read of the socket.
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES:
                self._refuse(431, "headers_too_large", f"the request's line and headers are over "
                             f"{MAX_HEADER_BYTES // 1024} KiB")
            elif self.deadline is None:
                self._arm_headers()
        elif self.reading == BODY and self.deadline is None:
            self._arm(self.body_idle_timeout, self._body_idle)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_deadline is None:
            self._arm_send()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_resumed()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.reading != HEADERS:  # the next request of a kept-alive connection: a deadline of its own
            self._expect_headers()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._disarm()
        self._pending(False)
        # A protocol switch (a websocket) owns the connection from here.
        self.reading = None if self.parser.should_upgrade() else BODY

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading = None  # the request is in: how long the answer takes is the route's business
        self.dropping_until = None
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.reading == BODY and not self.transport.is_closing():
            # Answered before its body ended: what is left is read only to reach the next request, and no one
            # waits for it (uvicorn drops it as it comes), so it gets a deadline of its own, not an idle one.
            self.dropping_until = self.loop.time() + self.body_idle_timeout
            if self.deadline is None:
                self._arm(self.body_idle_timeout, self._body_idle)

    # The deadlines

    def _expect_headers(self) -> None:
        self.reading = HEADERS
        self.dropping_until = None
        self.header_bytes = 0
        self.header_started = self.loop.time()

    def _arm_headers(self) -> None:
        """The headers' next deadline: PENDING_AFTER_S (then the connection counts as pending), then
        QLORA_HEADER_TIMEOUT_S (then it is closed)."""
        late = self.header_started + self.header_timeout
        due = late if self.pending else min(self.header_started + PENDING_AFTER_S, late)
        self._arm(due - self.loop.time(), self._headers_due)

    def _headers_due(self) -> None:
        self.deadline = None
        if self.loop.time() >= self.header_started + self.header_timeout:
            self._headers_late()
            return
        if not self.pending and self.host is not None:
            if self._address_full():
                self._refuse_connection(self._too_many_pending())  # the newest of its connections goes
                return
            self._pending(True)
        self._arm_headers()

    def _address_full(self) -> bool:
        """Whether this connection's address holds its cap of pending connections already."""
        return (self.host is not None and self.pending_per_client > 0
                and _pending_by_client[self.host] >= self.pending_per_client)

    def _too_many_pending(self) -> str:
        return (f"{self.host} already holds {self.pending_per_client} connections that have sent no request for "
                f"{PENDING_AFTER_S:g} s (QLORA_MAX_PENDING_CONNECTIONS_PER_CLIENT); send requests on those or close them")

    def _pending(self, pending: bool) -> None:
        """Count this connection as one of its client's pending ones (waiting for its request), or not."""
        if self.host is None or pending == self.pending:
            return
        self.pending = pending
        _pending_by_client[self.host] += 1 if pending else -1
        if not _pending_by_client[self.host]:
            del _pending_by_client[self.host]  # the map holds only addresses with pending connections

    def _arm(self, seconds: float, handler) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _headers_late(self) -> None:
        if not self.header_bytes:
            # Nothing sent at all: closed without an answer, as nginx does. A browser or a balancer may
            # open a connection ahead of a request it never makes, and reads an answer there as the
            # answer to its next request.
            self.reading = None
            self.transport.close()
            return
        self._refuse(408, "request_timeout", f"the request's line and headers did not arrive within "
                     f"{self.header_timeout:g} s")

    def _body_idle(self) -> None:
        self.deadline = None
        now = self.loop.time()
        if self.dropping_until is not None and now >= self.dropping_until:
            log.info("closed a connection whose request body went on arriving %g s after its answer was sent",
                     self.body_idle_timeout, extra={"client": _address(self.client)})
            self.transport.close()
            return
        # Waiting on the server, not the client: its buffer is full and it stopped reading, or the client
        # asked to be told when to send (Expect: 100-continue) and the route has not started reading yet.
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            self.last_read = now
        idle = now - self.last_read
        if idle < self.body_idle_timeout:
            due = self.body_idle_timeout - idle
            self._arm(due if self.dropping_until is None else min(due, self.dropping_until - now), self._body_idle)
            return
        log.info("closed a connection whose request body stopped arriving for %g s", self.body_idle_timeout,
                 extra={"client": _address(self.client)})
        self.transport.close()  # the route sees the client gone (http.disconnect)

    def _send_resumed(self) -> None:
        if self.send_deadline is not None:
            self.send_deadline.cancel()
            self.send_deadline = None

    def _arm_send(self) -> None:
        self.unsent_when_armed = unsent_bytes(self.transport)
        self.send_deadline = self.loop.call_later(self.send_idle_timeout, self._send_stalled)

    def _send_stalled(self) -> None:
        self.send_deadline = None
        # Its client read at least SEND_PROGRESS_BYTES in the window: a window of its own (the route waits to write
        # while writing is paused, so nothing was added meanwhile). Any progress at all let a client reading a few
        # bytes a second (the kernel reopens its window after one packet) hold the connection and the answer
        # buffered for it without end.
        if self.unsent_when_armed - unsent_bytes(self.transport) >= SEND_PROGRESS_BYTES:
            self._arm_send()
            return
        log.info("closed a connection whose client read under %d KiB of its answer in %g s", SEND_PROGRESS_BYTES // 1024,
                 self.send_idle_timeout, extra={"client": _address(self.client)})
        # abort, not close: close would wait to send what is buffered, to a client that reads nothing. The route
        # still sending sees its client gone (uvicorn's connection_lost releases its wait to write).
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        """What httptools cannot parse (raw non-ASCII bytes in the URL, a control character in a header, a
        Transfer-Encoding it does not know), in the API's error shape, not uvicorn's text/plain line."""
        self._refuse(400, "malformed_request", "not an HTTP/1.1 request this server can read: a malformed request "
                     "line or header (percent-encode the URL; no control characters in header values; "
                     "Transfer-Encoding: chunked or none)")

    def _refuse_connection(self, message: str) -> None:
        """A connection past a limit: 503 and closed, logged with the others refused meanwhile."""
        _refusals["since_log"] += 1
        now = self.loop.time()
        if now - _refusals["logged_at"] >= REFUSALS_LOGGED_EVERY_S:
            log.warning("refused %d connections for their number since the last such line; the latest: %s",
                        _refusals["since_log"], message, extra={"client": _address(self.client)})
            _refusals.update(since_log=0, logged_at=now)
        self._refuse(503, "too_many_connections", message, logged=True)

    def _refuse(self, status: int, code: str, message: str, *, logged: bool = False) -> None:
        """Answer in the API's error shape, then close: the request never reached the app."""
        self._disarm()
        self._pending(False)
        self.reading = None
        if not logged:
            log.info("refused a request before the app: %s", message, extra={"client": _address(self.client)})
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
                  503: b"Service Unavailable"}[status]
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        if status == 503:
            head.append(b"retry-after: 1\r\n")
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def client_of(host: str) -> str:
    """Whose connection this is, for the per-client bound: an IPv4 address, or an IPv6 address's /64.
    A /64 is one subscriber's network (a host gets one, and picks new addresses in it at will), so a
    client counted by its IPv6 address could open each connection from a fresh one; rate limiters
    group IPv6 clients by /64 for the same reason. An IPv4 address mapped into IPv6 is that IPv4 address."""
    if ":" not in host:  # IPv4 (or a test transport's name): itself, with no parsing on each connection
        return host
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def _address(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None
