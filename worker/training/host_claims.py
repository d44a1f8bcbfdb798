"""Host memory that the training processes of one host have claimed and not yet taken.

A training process checks its host's available memory (MemAvailable) before its base loads and decides "auto"
by it, but takes what it counted (its datasets as encoded, its offloaded activations, pinned at the first step) only
later: minutes later for a large base. Processes that started together on a multi-GPU host, or within those minutes
of each other, each saw the memory the others had not yet taken, each passed, and together they held more than the
host has. Each now claims what it will hold, in a directory the host's workers share (the work directory), and
counts the others' claims as taken; it withdraws its claim once its first step has run (what it holds is in
MemAvailable by then: torch keeps pinned blocks cached for the next step) or as it ends.

A claim is a file its process keeps locked (flock) while it lives: the kernel drops the lock however the process
ends, so a crash leaves a file that no one counts (the next reader removes it), never a claim that holds memory
forever. Liveness is the lock, not a process id: workers in containers share the directory and not their process
ids. Claims are read and written under one lock on the directory, so two processes deciding at once decide one
after the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

HOST_CLAIMS_DIR = ".host-claims"  # in a worker's work directory, which the workers of a host share
LOCK_NAME = ".lock"
SUFFIX = ".claim"


class HostClaims:
    """This process's claim on its host's memory, and the claims of the others that share `directory`."""

    def __init__(self, directory: Path, label: str = ""):
        self.directory = Path(directory)
        self.label = label  # who claims, for whoever looks at the files (a job and attempt)
        self.path = self.directory / f"{uuid.uuid4().hex}{SUFFIX}"
        self._claim_fd: int | None = None
        self._lock_fd: int | None = None
        self._depth = 0  # locked() nests: a second flock of the same file from this process would wait on itself

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The directory's lock, held by this process until the block ends (blocking while another holds it)."""
        if self._depth == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # closing drops the flock
                self._lock_fd = None

    def others(self) -> int:
        """The bytes the other live processes claim; the files of dead ones are removed on the way."""
        total = 0
        with self.locked():
            for path in self.directory.glob(f"*{SUFFIX}"):
                if path == self.path:
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # withdrawn as we looked
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:  # its process holds it: live
                        total += _claimed_bytes(fd)
                        continue
                    path.unlink(missing_ok=True)  # no one holds it: its process ended without withdrawing it
                finally:
                    os.close(fd)
        return total

    def claim(self, nbytes: int) -> None:
        """Claim `nbytes` (replacing this process's claim, if any) until withdraw() or the process ends."""
        with self.locked():
            if self._claim_fd is None:
                # Created and locked under the directory's lock: no reader sees it unlocked and takes it for a
                # dead process's.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._claim_fd = fd
            data = json.dumps({"bytes": int(nbytes), "by": self.label, "pid": os.getpid()}).encode()
            os.ftruncate(self._claim_fd, 0)
            os.pwrite(self._claim_fd, data, 0)

    def withdraw(self) -> None:
        """No claim from this process any more (what it claimed is taken, or it ends). Idempotent."""
        if self._claim_fd is None:
            return
        with self.locked():
            self.path.unlink(missing_ok=True)
            os.close(self._claim_fd)
            self._claim_fd = None


def _claimed_bytes(fd: int) -> int:
    try:
        return max(int(json.loads(os.pread(fd, 4096, 0))["bytes"]), 0)
    except (ValueError, KeyError, TypeError):
        return 0  # not a claim this module wrote: counts for nothing
