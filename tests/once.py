"""A session fixture's value made once for the whole suite, not once per test process.

`make test` runs the suite in several xdist processes (--dist loadfile), each with its own session
fixtures: an expensive one that two files in different processes use (the tiny model, the demo
task's full training run) was made twice. Here the first process to ask makes it under a file lock
in the directory the processes share (the recipe pytest-xdist documents, with fcntl for the lock) and leaves it pickled;
the others wait for it and read it back. Without xdist it is simply made.
"""

from __future__ import annotations

import fcntl
import pickle
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def once_per_suite(name: str, tmp_path_factory: pytest.TempPathFactory, worker_id: str, make: Callable[[], T]) -> T:
    """make()'s value, made by one process of the suite; it must pickle, and anything it names on disk
    (a directory made with tmp_path_factory) outlives the process that made it, until the suite ends."""
    if worker_id == "master":  # no xdist: one process
        return make()
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, the parent of every process's popen-gwX/
    made = shared / f"{name}.pickle"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if made.exists():
            return pickle.loads(made.read_bytes())
        value = make()
        made.write_bytes(pickle.dumps(value))
        return value
