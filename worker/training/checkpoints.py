"""Crash-safe checkpoints: a checkpoint either exists complete or does not exist at all.

The trainer writes into a staging directory; once every file is written and fsynced we add a
COMPLETE marker (last), then rename the directory to checkpoints/step-N. A rename is atomic on
one filesystem, so a crash at any moment leaves either no step-N or a complete one; whatever is
left in staging is deleted on the next start. Resume picks the newest step-N holding the marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from worker.training.protocol import fsync_dir

MARKER = "COMPLETE"
STAGING = ".staging"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def finalize(staged: Path, checkpoints_dir: Path, step: int) -> Path:
    """Mark a fully written staged checkpoint complete and move it into place."""
    _fsync_tree(staged)
    marker = staged / MARKER
    marker.write_text(json.dumps({"step": step, "completed_at": time.time()}))
    with open(marker, "rb") as f:
        os.fsync(f.fileno())
    final = checkpoints_dir / f"step-{step}"
    if final.exists():  # the same step saved again after a resume: the new one is as good
        shutil.rmtree(final)
    os.rename(staged, final)
    fsync_dir(checkpoints_dir)
    return final


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for p in checkpoints_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(checkpoints_dir: Path) -> Path | None:
    found = complete_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def prune(checkpoints_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; delete older ones and any incomplete step-N."""
    complete = complete_checkpoints(checkpoints_dir)
    newest_step = complete[-1][0] if complete else -1
    for _step, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for p in checkpoints_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        # An incomplete step-N older than the newest complete one can never be picked; clear it.
        if m and not (p / MARKER).is_file() and int(m.group(1)) < newest_step:
            shutil.rmtree(p, ignore_errors=True)


def clear_staging(checkpoints_dir: Path) -> Path:
    staging = checkpoints_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging
