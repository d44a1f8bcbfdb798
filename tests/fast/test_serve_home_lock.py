"""Two `qlora serve`s started on one QLORA_HOME while a killed serve's local worker still holds its lock: both wait
for that worker, then one runs and the other is refused (exit 2) as any second serve is. Before, both blocked on
the lock; the one that did not get it waited on for as long as the other ran, then started unannounced."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

from tests.deployment import wait_until

ROOT = Path(__file__).resolve().parents[2]
SERVE = """
import sys
from pathlib import Path
import typer
from app.cli.processes import _hold_home
try:
    _hold_home(Path(sys.argv[1]))
except typer.Exit as refused:  # what `qlora serve` exits with
    sys.exit(refused.exit_code)
print("took", flush=True)
sys.stdin.read()
"""


def _a_dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_of_two_serves_waiting_for_a_killed_ones_worker_one_runs_and_the_other_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    worker_lock = open(home / "serve.lock", "a+")  # the killed serve's worker, which inherited its lock
    fcntl.flock(worker_lock, fcntl.LOCK_EX)
    worker_lock.write(f"pid {_a_dead_pid()}")
    worker_lock.flush()
    serves = [subprocess.Popen([sys.executable, "-c", SERVE, str(home)], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for serve in serves:
            assert serve.stderr is not None
            assert "was stopped outright" in serve.stderr.readline()
        worker_lock.close()  # the worker handed its job back and stopped
        wait_until(lambda: any(serve.poll() is not None for serve in serves), timeout=30,
                   what="one of the two serves to be refused")
        (refused,) = [serve for serve in serves if serve.poll() is not None]
        (runs,) = [serve for serve in serves if serve is not refused]
        assert refused.returncode == 2
        assert refused.stderr is not None and "another qlora serve" in refused.stderr.read()
        assert runs.stdout is not None and runs.stdout.readline() == "took\n"
    finally:
        for serve in serves:
            serve.kill()
            serve.wait()
