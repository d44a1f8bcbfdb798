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
  any disconnect (an upload cut off leaves nothing behind).

`qlora serve` runs every API process with it (uvicorn's `http=` option).
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings

log = logging.getLogger(__name__)

# A request's line and headers, in bytes: nginx allows 32 KiB by default, Node 16 KiB. This API's
# clients send a bearer key and a few standard headers.
MAX_HEADER_BYTES = 64 * 1024

HEADERS, BODY = "headers", "body"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for a request's headers and body, and a bound on its headers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout = settings.header_timeout_s
        self.body_idle_timeout = settings.body_idle_timeout_s
        self.reading: str | None = None  # HEADERS or BODY of the request being received, None between requests
        self.header_bytes = 0  # bytes received while the current request's headers were incomplete
        self.header_started = self.last_read = 0.0
        self.deadline: asyncio.TimerHandle | None = None

    # uvicorn's protocol callbacks, each extended. A timer is armed only where bytes are still owed:
    # a request whose headers (and body) come in one read, as a poll's do, costs none.

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect_headers()
        self._arm(self.header_timeout, self._headers_late)  # a connection that never sends a byte is held no longer

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
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
                self._arm(self.header_started + self.header_timeout - self.last_read, self._headers_late)
        elif self.reading == BODY and self.deadline is None:
            self._arm(self.body_idle_timeout, self._body_idle)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.reading != HEADERS:  # the next request of a kept-alive connection: a deadline of its own
            self._expect_headers()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._disarm()
        # A protocol switch (a websocket) owns the connection from here.
        self.reading = None if self.parser.should_upgrade() else BODY

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading = None  # the request is in: how long the answer takes is the route's business
        self._disarm()

    # The deadlines

    def _expect_headers(self) -> None:
        self.reading = HEADERS
        self.header_bytes = 0
        self.header_started = self.loop.time()

    def _arm(self, seconds: float, handler) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _headers_late(self) -> None:
        self.deadline = None
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
        # Waiting on the server, not the client: its buffer is full and it stopped reading, or the client
        # asked to be told when to send (Expect: 100-continue) and the route has not started reading yet.
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            self.last_read = now
        idle = now - self.last_read
        if idle < self.body_idle_timeout:
            self._arm(self.body_idle_timeout - idle, self._body_idle)
            return
        log.info("closed a connection whose request body stopped arriving for %g s", self.body_idle_timeout,
                 extra={"client": _address(self.client)})
        self.transport.close()  # the route sees the client gone (http.disconnect)

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer in the API's error shape, then close: the request never reached the app."""
        self._disarm()
        self.reading = None
        log.info("refused a request before the app: %s", message, extra={"client": _address(self.client)})
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def _address(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None
