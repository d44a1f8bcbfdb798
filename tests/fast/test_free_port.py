"""tests.services.free_port(): the two xdist processes of `make test` are never handed the same port. Bound to port 0
and closed, the kernel's picks of two processes (and of one, asked again) could meet, and the second server to
bind the port failed to start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRAWN = 500  # per process: far more than a run of the suite asks for


def ports_of(worker: str) -> list[int]:
    """What free_port() hands out, DRAWN times, in a fresh process that xdist named `worker` (of two)."""
    env = {**os.environ, "PYTEST_XDIST_WORKER": worker, "PYTEST_XDIST_WORKER_COUNT": "2"}
    code = f"from tests.services import free_port; print(*(free_port() for _ in range({DRAWN})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(port) for port in done.stdout.split()]


def test_two_test_processes_are_never_handed_the_same_port():
    first, second = ports_of("gw0"), ports_of("gw1")
    assert len(first) == len(second) == DRAWN
    assert len(set(first)) == DRAWN and len(set(second)) == DRAWN  # nor one process the same port twice
    assert not set(first) & set(second)
