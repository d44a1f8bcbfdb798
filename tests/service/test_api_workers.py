"""`qlora serve --workers N` on Postgres: several API processes share the port, the reaper works in
exactly one of them (the holder of the "reaper" lease), another takes over when the holder is killed,
and SIGTERM to the parent stops them all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

from app.db import session_scope
from app.jobs.reaper import LEASE
from app.operations.lease import LEASE_TTL_INTERVALS, current_holder
from app.scheduling.service import LEASE as SCHEDULER_LEASE
from tests import services
from tests.deployment import ROOT
from tests.fast.test_lease import race_for_lease

REAPER_INTERVAL_S = 1  # the lease lasts LEASE_TTL_INTERVALS of these: a dead holder is replaced in seconds
T = TypeVar("T")


def test_of_processes_racing_for_a_free_lease_exactly_one_wins_on_postgres(database_url):
    for round in range(5):
        won = race_for_lease(database_url, f"race-{round}", contenders=8)
        assert sum(won.values()) == 1, won


def wait_for(found: Callable[[], T], timeout_s: float, what: str, log: Path) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}")


def api_processes(parent: int) -> set[int]:
    """The live API processes uvicorn's parent process started (spawned interpreters, unlike its
    multiprocessing resource tracker)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.add(int(entry.name))
    return found


def lease_holder_pid(database_url: str, lease: str = LEASE) -> int | None:
    with session_scope(database_url) as session:
        holder = current_holder(session, lease)
    return int(holder.rsplit(":", 2)[1]) if holder else None  # host:pid:random


def messages(log: Path) -> list[str]:
    """What the processes logged (JSON lines; the CLI's own lines are plain text)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line)["message"])
    return out


def test_serve_with_two_workers_runs_the_reaper_and_the_scheduler_in_exactly_one(database_url, tmp_path):
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QLORA_")},
        "QLORA_HOME": str(tmp_path / "home"),
        "QLORA_DATABASE_URL": database_url,
        "QLORA_STORAGE_URL": f"file://{tmp_path / 'storage'}",
        # A server broker: no embedded bootstrap and no local worker. Nothing is dispatched here.
        "QLORA_BROKER_URL": "redis://127.0.0.1:6379/0",
        "QLORA_REAPER_INTERVAL_S": str(REAPER_INTERVAL_S),
        "QLORA_SCHEDULER_INTERVAL_S": str(REAPER_INTERVAL_S),
    }
    log = tmp_path / "api.log"
    with open(log, "ab") as out:
        # The port on the command line: each API process must see it as the parent does.
        parent = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--no-worker",
                                   "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        assert services.wait_until_up(url + "/health", parent, need_ok=True), log.read_text()
        wait_for(lambda: messages(log).count("Application startup complete.") == 2, 60, "two started API processes",
                 log)
        workers = api_processes(parent.pid)
        assert len(workers) == 2, workers
        # Each process set up the service's logging (JSON lines) before uvicorn said a word.
        for pid in workers:
            assert f"Started server process [{pid}]" in messages(log)

        # Both answer: with either one frozen, a new connection is accepted by the other.
        for frozen in workers:
            os.kill(frozen, signal.SIGSTOP)
            try:
                # A request the frozen process took would wait for ever (it is continued only after this
                # answer): a generous timeout tells the two apart, where 3 s failed on a busy machine.
                assert httpx.get(url + "/health", timeout=30).status_code == 200
            finally:
                os.kill(frozen, signal.SIGCONT)

        holder = wait_for(lambda: lease_holder_pid(database_url), 10 * REAPER_INTERVAL_S, "reaper lease holder", log)
        assert holder in workers
        scheduler = wait_for(lambda: lease_holder_pid(database_url, SCHEDULER_LEASE), 10 * REAPER_INTERVAL_S,
                             "scheduler lease holder", log)
        assert scheduler in workers
        took_over = [m for m in messages(log) if m.startswith(f"took over the {LEASE!r} lease")]
        assert len(took_over) == 1 and f":{holder}:" in took_over[0], took_over

        # The holder dies without a word: another process takes the lease over once it expires.
        os.kill(holder, signal.SIGKILL)
        successor = wait_for(lambda: (pid := lease_holder_pid(database_url)) not in (None, holder) and pid,
                             LEASE_TTL_INTERVALS * REAPER_INTERVAL_S + 15, "new reaper lease holder", log)
        assert successor in api_processes(parent.pid)  # the survivor, or the process uvicorn started in its place
        assert any(m.startswith(f"took over the {LEASE!r} lease") and f":{successor}:" in m for m in messages(log))
        # The scheduler too: when the process scheduling dies (the same one, or kill the other now), a live
        # one schedules within the lease's time.
        if scheduler != holder:
            os.kill(scheduler, signal.SIGKILL)
        scheduling = wait_for(
            lambda: (pid := lease_holder_pid(database_url, SCHEDULER_LEASE)) not in (None, holder, scheduler) and pid,
            LEASE_TTL_INTERVALS * REAPER_INTERVAL_S + 15, "a new scheduler lease holder", log)
        assert scheduling in api_processes(parent.pid)
        assert httpx.get(url + "/health", timeout=5).status_code == 200

        # SIGTERM to the parent stops every API process, and the holder releases the lease as it stops.
        serving = api_processes(parent.pid)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0, log.read_text()[-4000:]
        assert not [pid for pid in serving if Path(f"/proc/{pid}").exists()]
        assert lease_holder_pid(database_url) is None and lease_holder_pid(database_url, SCHEDULER_LEASE) is None
        assert f"released the {LEASE!r} lease" in " ".join(messages(log))
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
