"""A disk that fills up, for tests that cannot mount one: the kernel's file-size limit (RLIMIT_FSIZE).

Past `limit` bytes, a write to any file this process (and what it starts meanwhile) writes is refused by
the kernel, as a full disk refuses it: write(2) fails (EFBIG rather than ENOSPC; Python ignores SIGXFSZ,
whose default would end the process), torch.save's writer comes up short, SQLite cannot commit. The code
under test meets the failure where it really writes, with no privilege needed and nothing mocked."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
