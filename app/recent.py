"""What one API process read lately, kept for a few seconds: the reads every poll would otherwise
repeat (who an API key is, where the queued jobs of a class stand)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Values read in the last `ttl_s` seconds, by key; at most `max_entries` of them (the oldest read
    goes first), so keys a client makes up cost a read each but no memory. `ttl_s` 0 keeps nothing."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._lock = threading.Lock()
        self._entries: dict[K, tuple[float, V]] = {}  # key -> (read at, value), oldest first
        self._reading: dict[K, asyncio.Future[V]] = {}  # key -> its read in flight (event loop only)
        self._forgets = 0  # forget() calls so far: a read in flight across one may have read what was forgotten

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] >= self.ttl_s:
            return None
        return entry[1]

    async def get_or_read(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        """The kept value, else read() it: once, however many requests ask for this key meanwhile.
        When an entry expires under fifty pollers, one read refreshes it, not fifty. A read that
        fails keeps nothing and fails every request that waited on it."""
        value = self.get(key)
        if value is not None:
            return value
        return await self.read_again(key, read)

    async def read_again(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        """read() now, whatever is kept (joining a read already in flight), and keep it."""
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read_and_keep(key, read))
        return await asyncio.shield(reading)  # a request that gives up must not cancel the others' read

    async def _read_and_keep(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        forgets = self._forgets
        try:
            value = await read()
            self.put(key, value, unless_forgotten_since=forgets)
            return value
        finally:
            del self._reading[key]

    def forget(self, which: Callable[[V], bool]) -> None:
        """Drop the kept values `which` picks: what the process itself just changed must not be served from here."""
        with self._lock:
            self._forgets += 1
            for key in [key for key, (_, value) in self._entries.items() if which(value)]:
                del self._entries[key]

    def put(self, key: K, value: V, *, unless_forgotten_since: int | None = None) -> None:
        """Keep `value`; with `unless_forgotten_since` (the forget() count when its read began), only if
        nothing was forgotten since: the read may have seen what forget() was told is no longer so."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if unless_forgotten_since is not None and unless_forgotten_since != self._forgets:
                return
            self._entries.pop(key, None)  # re-inserted last: the dict stays ordered by read time
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]  # the oldest read
            self._entries[key] = (time.monotonic(), value)
