"""A TCP link a test can cut: a worker's database traffic goes through it (its QLORA_DATABASE_URL names the link's
port), and cut() is a Postgres restart or failover as the worker sees it: every open connection drops, and each
new one is closed as soon as it is made, until restore(). The API and the reaper keep their own way to the
database, so the job's heartbeats, not the reaper's view, are what the outage takes away.

black_hole() is a failover that drops packets instead of refusing them (an address moved, a partition): every
connection, open or new, is held and answered nothing, until restore(); those made meanwhile stay so (a client
must give them up itself)."""

from __future__ import annotations

import socket
import threading
import time


class CuttableLink:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.refused = 0  # connections made while cut (and closed at once)
        self.swallowed = 0  # connections made while black-holed (held, answered nothing)
        self._cut = threading.Event()
        self._hole = threading.Event()
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closed = False
        self._cut_at: bytes | None = None  # cut_at_answer
        self._restore_after: int | None = None  # cut(restore_after=)
        threading.Thread(target=self._accept, name="db-link", daemon=True).start()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def cut(self, restore_after: int | None = None) -> None:
        """restore_after=N: the link comes back by itself once it has refused N connections, an outage as long as
        N tries of the client, however slowly a loaded machine runs them (a timer raced the client's tries)."""
        with self._lock:
            self._restore_after = None if restore_after is None else self.refused + restore_after
            self._cut.set()
            open_now, self._open = list(self._open), set()
        for sock in open_now:
            _drop(sock)

    def cut_at_answer(self, marker: bytes) -> None:
        """Cut the link as the next answer from the database that holds `marker` arrives, without passing it on
        (b"COMMIT\\x00", a COMMIT's CommandComplete): the statement took effect, and its client never hears so."""
        self._cut_at = marker

    def black_hole(self, drop_open: bool = False) -> None:
        """drop_open: the open connections are reset first (the old server is gone, its address moved to one that
        answers nothing), so what is tried next meets the hole as a new connection."""
        self._hole.set()
        if drop_open:
            with self._lock:
                open_now, self._open = list(self._open), set()
            for sock in open_now:
                _drop(sock)

    def restore_when(self, seen, timeout_s: float = 120) -> threading.Thread:
        """Restore the link once seen() is true (a worker's log says its write met the outage: the outage lasts
        until then, however slowly a loaded machine gets there; a timer raced the write), or after timeout_s,
        when the test's own assertions say what never came."""
        def watch() -> None:
            deadline = time.monotonic() + timeout_s
            while not seen() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.restore()

        watcher = threading.Thread(target=watch, name="db-link-restore", daemon=True)
        watcher.start()
        return watcher

    def restore(self) -> None:
        self._restore_after = None
        self._cut.clear()
        self._hole.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            _drop(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            if self._cut.is_set():
                self.refused += 1
                _drop(client)
                if self._restore_after is not None and self.refused >= self._restore_after:
                    self.restore()
                continue
            if self._hole.is_set():
                with self._lock:
                    self.swallowed += 1
                    self._held.append(client)
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _drop(client)
                continue
            with self._lock:
                self._open.update((client, server))
            for source, sink, answers in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, answers), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if self._hole.is_set():
                    continue  # dropped on the way
                if answers and self._cut_at is not None and self._cut_at in data:
                    self._cut_at = None
                    self.cut()
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._open.discard(sock)
                _drop(sock)


def _drop(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass
    sock.close()
