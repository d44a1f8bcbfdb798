"""The host memory training processes of one host claimed and have not taken yet (worker/training/host_claims.py),
between real processes: a claim counts while its process lives, not after it crashed, and claims are read and
written one process at a time."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from worker.training.host_claims import SUFFIX, HostClaims

# A process that claims on command: "claim N", "withdraw", "lock" (hold the directory's lock), "unlock" (claim N
# first where N is given); each answered "ok" once done.
CLAIMER = """
import sys
from pathlib import Path
from worker.training.host_claims import HostClaims

claims = HostClaims(Path(sys.argv[1]), label="claimer")
held = None
for line in sys.stdin:
    verb, *arg = line.split()
    if verb == "claim":
        claims.claim(int(arg[0]))
    elif verb == "withdraw":
        claims.withdraw()
    elif verb == "lock":
        held = claims.locked()
        held.__enter__()
    elif verb == "unlock":
        if arg:
            claims.claim(int(arg[0]))
        held.__exit__(None, None, None)
    print("ok", flush=True)
"""


class Claimer:
    def __init__(self, directory: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", CLAIMER, str(directory)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def say(self, command: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_a_claim_counts_while_its_process_lives_and_not_after_it_crashed(tmp_path):
    """Two processes starting together each saw the memory the other had not taken yet. A live process's claim is
    counted by the others; a withdrawn one is not; one whose process was killed (no chance to withdraw it) is not
    either, and its file is removed: a crash never leaves a claim that holds the host's memory for good."""
    first, second = Claimer(tmp_path), Claimer(tmp_path)
    try:
        mine = HostClaims(tmp_path)
        first.say("claim 3000")
        second.say("claim 500")
        assert mine.others() == 3500
        mine.claim(7)  # its own claim is not among the others'
        assert mine.others() == 3500 and HostClaims(tmp_path).others() == 3507
        first.say("claim 1000")  # replaced, not added
        assert mine.others() == 1500
        second.say("withdraw")
        assert mine.others() == 1000
        [crashed] = [path for path in tmp_path.glob(f"*{SUFFIX}") if path != mine.path]
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        assert crashed.exists()  # left behind by the crash...
        assert mine.others() == 0  # ...counted for nothing...
        assert not crashed.exists() and mine.path.exists()  # ...and removed by the reader
        mine.withdraw()
        assert not list(tmp_path.glob(f"*{SUFFIX}"))
    finally:
        first.end()
        second.end()


def test_claims_are_read_and_written_one_process_at_a_time(tmp_path):
    """A run decides "auto", checks and claims under the directory's lock: one starting beside it reads the claims
    only once the other has claimed, and counts that claim."""
    other = Claimer(tmp_path)
    try:
        other.say("lock")
        seen: list[int] = []
        reader = threading.Thread(target=lambda: seen.append(HostClaims(tmp_path).others()))
        reader.start()
        reader.join(timeout=1)
        assert reader.is_alive() and not seen  # waits on the lock
        other.say("unlock 4096")  # claims, then lets go
        reader.join()
        assert seen == [4096]
    finally:
        other.end()
