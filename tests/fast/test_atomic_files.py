"""write_json_atomic with several writers of one file at once: two workers on a host update its weight-digest
memo (worker/quantized_bases.py), and any reader must see a whole file from one of them."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from worker.training.protocol import write_json_atomic

WRITES = 400


def write_many(path: str, writer: int, start, failures) -> None:
    start.wait()
    for i in range(WRITES):
        try:
            write_json_atomic(Path(path), {"writer": writer, "i": i, "pad": "x" * 20_000})
        except OSError as exc:
            failures.put(f"writer {writer}, write {i}: {exc!r}")
            return


def test_two_processes_writing_one_file_each_put_a_whole_file_in_place(tmp_path):
    path = tmp_path / ".weight-digests.json"
    write_json_atomic(path, {"writer": -1, "i": 0, "pad": ""})
    context = multiprocessing.get_context("fork")
    start, failures = context.Event(), context.Queue()
    writers = [context.Process(target=write_many, args=(str(path), w, start, failures)) for w in (0, 1)]
    for process in writers:
        process.start()
    start.set()
    torn = []
    while any(process.is_alive() for process in writers):
        try:
            json.loads(path.read_text())
        except ValueError:
            torn.append(path.stat().st_size)
    for process in writers:
        process.join()
    said = []
    while not failures.empty():
        said.append(failures.get())
    assert said == [] and torn == [], (said[:3], torn[:3])
    assert all(process.exitcode == 0 for process in writers)
    assert json.loads(path.read_text())["i"] == WRITES - 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
