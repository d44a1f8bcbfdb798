"""Moving big files between a worker host and object storage: how far a long transfer has got (the
worker reports it as progress events), and a tar streamed straight into a storage writer, so packing
a 16 GB merged model needs no second copy of it on disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from app.text import byte_unit, format_bytes, in_unit


class Transfer:
    """A download or upload in progress. The thread moving the bytes counts them (`add`); the worker's
    heartbeat thread reads them to report progress, and `add` runs its check, which raises to stop the
    transfer (the job's lease is lost, or its time limit passed)."""

    def __init__(self, what: str, total: int | None, check: Callable[[], None] = lambda: None,
                 measure: Callable[[], int] | None = None):
        self.what = what  # what a person reads: "uploading merged model"
        self.total = total  # bytes, when known beforehand
        self.done = 0
        self.started = time.monotonic()
        self._check = check
        self._measure = measure  # for a transfer done by a library: how many bytes have landed so far

    def add(self, size: int) -> None:
        self.done += size
        self._check()

    def progress(self) -> int:
        return self._measure() if self._measure is not None else self.done

    def describe(self, verb: str | None = None) -> str:
        """"uploading merged model, 6.2 of 16 GiB"; with a verb for the finished transfer: "uploaded
        merged model, 16 GiB in 4 min 10 s"."""
        done = self.progress()
        if verb is not None:
            return f"{verb}, {format_bytes(done)} in {format_duration(time.monotonic() - self.started)}"
        if self.total:
            unit = byte_unit(self.total)
            return f"{self.what}, {in_unit(min(done, self.total), unit)} of {in_unit(self.total, unit)} {unit}"
        return f"{self.what}, {format_bytes(done)} so far"


class WriterStream:
    """The write-only file object tarfile's stream mode needs, over a storage writer; `on_write` hears
    the size of each chunk written."""

    def __init__(self, writer, on_write: Callable[[int], None] | None = None):
        self.writer = writer
        self.on_write = on_write

    def write(self, data: bytes) -> int:
        self.writer.write(bytes(data))
        if self.on_write is not None:
            self.on_write(len(data))
        return len(data)


def tree_bytes(path: Path) -> int:
    """The bytes of the files under a directory (or of one file): what a tar of it carries."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
