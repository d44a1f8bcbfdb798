"""A stand-in for the API on loopback, for the CLI's tests that run `qlora` as a user does (a subprocess): a handler
class of the test's, served from a thread on a free port."""

from __future__ import annotations

import http.server
import json
import threading


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in's request handler: answers JSON, and logs nothing (the test's output is the CLI's)."""

    def send_json(self, body: object, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


class Loopback:
    """`handler` served on 127.0.0.1 at `url` until close()."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]):
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
