"""The embedded default's secrets are its owner's alone, from the moment they exist.

QLORA_HOME holds the database, the stored datasets and models, and credentials.json, whose admin
key unlocks all of it. A file written world-readable and chmod-ed afterwards is readable in
between, and stays so when the writer dies in between (a full disk, a kill).
"""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

from app.bootstrap import DEMO_TEAM, bootstrap_embedded
from app.config import Settings
from worker.training.protocol import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent

# Dies the way a process writing a file dies when the disk fills or it is killed mid-write: the
# file-size limit makes the kernel stop the writer (SIGXFSZ, whose default action is to end the
# process, which Python otherwise ignores) at the 17th byte, so nothing after the write runs.
WRITE_KEY_AND_DIE = """
import os, resource, signal, sys
from app.bootstrap import write_credentials
from app.config import Settings

settings = Settings(home=sys.argv[1])
os.umask(0o022)  # the common default: new files rw-r--r--, new folders rwxr-xr-x
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))
write_credentials(settings, "qk_" + "s" * 40)
"""


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_half_written_when_its_writer_died_is_readable_by_its_owner_only(tmp_path):
    home = tmp_path / "qlora-home"
    died = subprocess.run([sys.executable, "-c", WRITE_KEY_AND_DIE, str(home)], cwd=ROOT, capture_output=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    assert died.returncode == -signal.SIGXFSZ, died.stderr.decode()
    left = [p for p in home.rglob("*") if p.is_file()]
    assert left, "the writer died before it created the file: nothing was tested"
    for path in left:
        assert mode(path) & 0o077 == 0, f"{path.name} ({path.stat().st_size} bytes of the key) is {oct(mode(path))}"
    assert mode(home) == 0o700, f"QLORA_HOME created {oct(mode(home))}"


def test_bootstrap_keeps_qlora_home_and_the_key_private(tmp_path, tiny_model_dir):
    home = tmp_path / "qlora-home"
    home.mkdir()
    home.chmod(0o755)  # as an earlier version, or a umask of 022, left it
    settings = Settings(home=home)
    said: list[str] = []
    bootstrap_embedded(settings, announce=said.append, build_demo_model=lambda path: shutil.copytree(tiny_model_dir, path))
    assert any(f"created team {DEMO_TEAM!r}" in line for line in said)
    assert mode(home) == 0o700
    assert mode(settings.credentials_path) == 0o600
    assert json.loads(settings.credentials_path.read_text())["api_key"] in said[0]


def test_a_mode_is_exact_and_without_one_the_umask_decides_as_for_any_new_file(tmp_path):
    # A leftover of an earlier version's crash, readable by all, where it wrote its temporary file: the next
    # write must not inherit its mode (each write creates a file of its own, O_EXCL).
    leftover = tmp_path / ".secret.json.tmp"
    leftover.write_text("stale")
    leftover.chmod(0o644)
    write_json_atomic(tmp_path / "secret.json", {"k": 1}, mode=0o600)
    assert mode(tmp_path / "secret.json") == 0o600 and json.loads((tmp_path / "secret.json").read_text()) == {"k": 1}
    assert leftover.read_text() == "stale"  # not written through, nor renamed into place

    write_json_atomic(tmp_path / "shared.json", {"k": 2}, mode=0o644)
    assert mode(tmp_path / "shared.json") == 0o644

    (tmp_path / "reference").write_text("")  # what open() gives a new file under this process's umask
    write_json_atomic(tmp_path / "status.json", {"step": 3})
    assert mode(tmp_path / "status.json") == mode(tmp_path / "reference")
