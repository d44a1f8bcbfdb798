"""A disk that fills up, for tests that cannot mount one: the kernel's file-size limit (RLIMIT_FSIZE).

Past `limit` bytes, a write to any file this process (and what it starts meanwhile) writes is refused by
the kernel, as a full disk refuses it: write(2) fails (EFBIG rather than ENOSPC; Python ignores SIGXFSZ,
whose default would end the process), torch.save's writer comes up short, SQLite cannot commit. The code
under test meets the failure where it really writes, with no privilege needed and nothing mocked."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def fill_up(pid: int, limit: int) -> None:
    """The file-size limit, for a running process and every process it has started: its disk is full now
    (as it runs: some files a process makes as it starts, its pool's shared memory, need a page or more)."""
    _set_file_size_limit(pid, limit)


def lift_file_size_limit(pid: int) -> None:
    """Room again, for a running process and every process it has started: its disk was freed."""
    _set_file_size_limit(pid, resource.getrlimit(resource.RLIMIT_FSIZE)[1])


def _set_file_size_limit(pid: int, soft: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    for each in [pid, *_descendants(pid)]:
        try:
            resource.prlimit(each, resource.RLIMIT_FSIZE, (soft, hard))
        except ProcessLookupError:
            pass  # it ended meanwhile


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found
