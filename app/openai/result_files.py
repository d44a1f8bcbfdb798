"""Succeeded jobs' result files (step_metrics.csv) as this API process last built them. A succeeded job's curve
no longer changes, so its CSV is built once and kept: without it, an SDK script's `files.retrieve` (its `bytes`)
and `files.content` built the CSV of a 500,000-point curve twice, about 8 s of a thread and a database
connection each, and again on every poll of either."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from app.config import MIB

KEPT_BYTES = 64 * MIB  # all the CSVs kept, together: a 500,000-point curve's is ~30 MB


class ResultFiles:
    """The CSVs built lately, by job id, the least lately read going first past `kept_bytes` (a CSV larger than
    that is built at each read, and kept by none). Requests for one job that come while its CSV is being built
    wait for that build rather than make their own."""

    def __init__(self, kept_bytes: int = KEPT_BYTES):
        self.kept_bytes = kept_bytes
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._building: dict[str, threading.Lock] = {}

    def get(self, job_id: str, build: Callable[[], bytes]) -> bytes:
        """Job `job_id`'s CSV: the one kept, else build() (only for a succeeded job: its curve is final)."""
        with self._lock:
            kept = self._kept_now(job_id)
            if kept is not None:
                return kept
            building = self._building.setdefault(job_id, threading.Lock())
        with building:
            with self._lock:
                kept = self._kept_now(job_id)
            if kept is not None:
                return kept
            try:
                content = build()
            finally:
                with self._lock:
                    self._building.pop(job_id, None)
            with self._lock:
                self._keep(job_id, content)
            return content

    def _kept_now(self, job_id: str) -> bytes | None:
        content = self._kept.get(job_id)
        if content is not None:
            self._kept.move_to_end(job_id)
        return content

    def _keep(self, job_id: str, content: bytes) -> None:
        if len(content) > self.kept_bytes or job_id in self._kept:
            return
        self._kept[job_id] = content
        self._size += len(content)
        while self._size > self.kept_bytes:
            _, dropped = self._kept.popitem(last=False)
            self._size -= len(dropped)
