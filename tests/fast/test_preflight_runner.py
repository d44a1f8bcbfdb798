"""The preflight processes (app/jobs/preflight.py, PreflightRunner): a child that takes too long is
stopped, not left running for the next team to wait behind; one whose preflight fails is kept; closing
the runner leaves no process behind. Real spawned children; what they run is a stand-in whose time and
outcome the test chooses (the engine's own preflight in a child: tests/service/test_preflight.py)."""

from __future__ import annotations

import functools
import os
import shutil
import threading
import time

import pytest

from app.jobs import preflight
from app.jobs.preflight import NoReport, PreflightRunner


def stand_in(inputs: dict) -> dict:
    """Runs in the child: says it started (a file) when asked, writes a file where a child may write (as
    the tokenizer files are written) when asked, sleeps as long as asked, fails when asked, answers with its
    process id (and the file's path)."""
    if "started" in inputs:
        open(inputs["started"], "w").close()
    if inputs.get("write"):
        path = os.path.join(preflight._SCRATCH, "tokenizer.json")
        open(path, "w").close()
        return {"pid": os.getpid(), "wrote": path}
    time.sleep(inputs.get("sleep_s", 0))
    if inputs.get("fail"):
        raise ValueError("a bug of the preflight")
    return {"pid": os.getpid()}


class SlowToStart:
    """The stand-in, in a child whose start takes `start_s` (its unpickling in the child sleeps): a child
    starting on a loaded host, whose interpreter and imports took seconds, made so at will."""

    def __init__(self, start_s: float):
        self.start_s = start_s

    def __reduce__(self):
        return started_slowly, (self.start_s,)

    def __call__(self, inputs: dict) -> dict:
        return stand_in(inputs)


def started_slowly(start_s: float) -> SlowToStart:
    time.sleep(start_s)
    return SlowToStart(start_s)


def gone(pid: int, within_s: float = 10) -> bool:
    """Ended (a zombie not yet reaped counts: it runs no more)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def runner():
    runner = PreflightRunner(1, timeout_s=3, target=stand_in)
    yield runner
    runner.close()


def test_a_preflight_past_its_timeout_is_stopped_and_the_next_team_waits_for_nothing(runner):
    """Before, the child ran the slow one to its end, and with one child every team's next preflight
    waited behind it, for as long as a huge dataset took."""
    with runner.turn("team-a", wait_s=5) as ask:
        first = ask()["pid"]
    with runner.turn("team-a", wait_s=5) as ask, pytest.raises(NoReport, match="took longer than 3 s"):
        ask(sleep_s=600)
    assert gone(first), "the slow preflight's process still runs"
    # Answered at all, by a new process: behind the 600 s one, the turn (5 s) or the ask (3 s) would have given up.
    # (A time limit of 60 s here told nothing more, and only a loaded machine could trip it.)
    with runner.turn("team-b", wait_s=5) as ask:
        second = ask()["pid"]
    assert second != first


def test_a_childs_start_is_no_part_of_its_preflights_timeout():
    """A new child's start (an interpreter and the API's modules) counted in the timeout: on a loaded 2-core
    host it took longer than a short timeout by itself (4-7 s against 3 s), so the child was killed before
    it began, and the next new one as well. The start is waited for apart, within its own bound."""
    runner = PreflightRunner(1, timeout_s=3, target=SlowToStart(start_s=4))
    try:
        with runner.turn("team-a", wait_s=5) as ask:
            assert ask()["pid"]
    finally:
        runner.close()
    never = PreflightRunner(1, timeout_s=3, target=SlowToStart(start_s=600), start_timeout_s=1)
    try:
        with never.turn("team-a", wait_s=5) as ask, pytest.raises(NoReport, match="did not start within 1 s"):
            ask()
        assert not never._all  # stopped, not kept for the next preflight
    finally:
        never.close()


def test_a_failed_preflight_keeps_its_process_and_the_next_is_answered(runner):
    with runner.turn("team-a", wait_s=5) as ask:
        pid = ask()["pid"]
    with runner.turn("team-a", wait_s=5) as ask, pytest.raises(NoReport, match="it failed"):
        ask(fail=True)
    with runner.turn("team-a", wait_s=5) as ask:
        assert ask()["pid"] == pid


def test_a_process_killed_while_idle_is_replaced_for_the_very_next_preflight(runner):
    with runner.turn("team-a", wait_s=5) as ask:
        pid = ask()["pid"]
    os.kill(pid, 9)
    assert gone(pid)
    with runner.turn("team-a", wait_s=5) as ask:
        assert ask()["pid"] != pid


def test_closing_stops_every_process_a_busy_one_included(runner, tmp_path):
    with runner.turn("team-a", wait_s=5) as ask:
        pid = ask()["pid"]
    outcome: list[BaseException] = []
    started = tmp_path / "started"

    def busy() -> None:
        try:
            with runner.turn("team-a", wait_s=5) as ask:
                ask(sleep_s=600, started=str(started))
        except NoReport as exc:
            outcome.append(exc)
    thread = threading.Thread(target=busy)
    thread.start()
    deadline = time.monotonic() + 30
    while not started.exists():  # the child is in the middle of the preflight
        assert time.monotonic() < deadline, "the child never started the preflight"
        time.sleep(0.01)
    runner.close()
    thread.join(10)
    assert gone(pid)
    assert outcome and "died" in str(outcome[0])


def test_what_a_child_wrote_is_removed_when_it_is_stopped(runner):
    """A child is killed, never asked to end, so it cannot remove the tokenizer files it wrote: before, each
    child left a qlora-tokenizer-* directory in /tmp for good, at every timeout and every API stop."""
    with runner.turn("team-a", wait_s=5) as ask:
        first = ask(write=True)
    assert os.path.exists(first["wrote"])
    with runner.turn("team-a", wait_s=5) as ask, pytest.raises(NoReport, match="took longer"):
        ask(sleep_s=600)  # stopped at its timeout
    assert gone(first["pid"]) and not os.path.exists(os.path.dirname(first["wrote"]))
    with runner.turn("team-a", wait_s=5) as ask:
        kept = ask(write=True)
    assert os.path.exists(kept["wrote"])
    runner.close()  # the API stops
    assert not os.path.exists(os.path.dirname(kept["wrote"]))


def test_the_scratch_of_an_api_process_killed_outright_is_removed_at_the_next_start():
    """An API process killed with SIGKILL cannot stop its children: their directory stayed in /tmp. The next
    runner removes those of processes that are gone, and keeps those of API processes still running."""
    import subprocess
    import sys
    import tempfile

    from app.jobs.preflight import SCRATCH_PREFIX

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{int(ended.stdout)}-")
    alive = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    other = tempfile.mkdtemp(prefix="qlora-preflight-childish-")  # not a scratch directory's name
    os.makedirs(os.path.join(dead, "tokenizer-x"))
    try:
        PreflightRunner(processes=1).close()
        assert not os.path.exists(dead) and os.path.exists(alive) and os.path.exists(other)
    finally:
        for path in (dead, alive, other):
            shutil.rmtree(path, ignore_errors=True)


def test_a_new_process_loads_the_tokenizer_libraries_before_it_says_it_started():
    """A new child said it started at once and imported transformers and torch (the engine's preflight) on its
    first request: seconds of that preflight's TIMEOUT_S, more on a loaded host, where a first preflight could
    run out of time before it read a row. It now imports them first, within its start's own bound
    (START_TIMEOUT_S): once it says READY, torch's library is mapped in the child."""
    runner = PreflightRunner(1)  # the engine's own preflight
    try:
        child = runner._take()
        assert child._conn.poll(preflight.START_TIMEOUT_S), "the child did not start"
        assert child._conn.recv() == preflight.READY
        mapped = open(f"/proc/{child._process.pid}/maps").read()
        assert "libtorch" in mapped, "the child said READY before it imported torch"
    finally:
        runner.close()


def test_a_warm_up_is_part_of_the_start_not_of_the_first_preflights_timeout():
    """What a child does before it says READY (its warm-up) is waited for within the start's bound, apart from
    the preflight's own timeout: a warm-up longer than the timeout still lets the first preflight answer."""
    runner = PreflightRunner(1, timeout_s=3, target=stand_in, warm_up=functools.partial(time.sleep, 4))
    try:
        with runner.turn("team-a", wait_s=5) as ask:
            assert ask()["pid"]
    finally:
        runner.close()
