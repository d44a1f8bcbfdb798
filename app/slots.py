"""What one API key may hold at once in one API process: live job streams (QLORA_MAX_STREAMS_PER_KEY),
uploads in flight (QLORA_MAX_UPLOADS_PER_KEY), downloads the API streams (QLORA_MAX_DOWNLOADS_PER_KEY).
Each holds something of the process's for as long as its client keeps it (a stream its socket and its
reads of the database; an upload its socket and up to a storage part in memory, 8 MiB on S3; a download
its socket, a file or a connection to the store, and a chunk), so a key's count is capped, and past the
cap the request is refused before any of it is served or read."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from app.errors import AppError


class KeySlot:
    """One held thing's place in its key's count; given back when the thing ends."""

    def __init__(self, slots: KeySlots, key_id: str):
        self._slots, self._key_id = slots, key_id

    def release(self) -> None:
        self._slots.release(self._key_id, self)


class KeySlots:
    """The slots each API key holds in this process, up to `per_key`. A slot is counted while it lives:
    a weak set, so one whose holder never ran its `finally` (a stream whose client left before the
    first byte) still frees its place once it is garbage-collected. `refusal(held)` is the error (a 429)
    for a key that holds `held` already."""

    def __init__(self, per_key: int, refusal: Callable[[int], AppError]):
        self.per_key = per_key
        self._refusal = refusal
        self._lock = threading.Lock()
        self._open: dict[str, weakref.WeakSet[KeySlot]] = {}

    def take(self, key_id: str) -> KeySlot:
        """A slot for one more of this key's, or the refusal when it holds the cap."""
        with self._lock:
            live = self._open.setdefault(key_id, weakref.WeakSet())
            if len(live) >= self.per_key:
                raise self._refusal(len(live))
            slot = KeySlot(self, key_id)
            live.add(slot)
            return slot

    def release(self, key_id: str, slot: KeySlot) -> None:
        with self._lock:
            live = self._open.get(key_id)
            if live is not None:
                live.discard(slot)
                if not live:
                    del self._open[key_id]
