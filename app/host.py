"""What a process can tell of the others on its host: whether one still runs.

Files named by a process's id (a preflight child's scratch directory, in the API process's own temporary
directory) outlive a process killed outright; the process that starts next removes those whose owner is gone.
Only for files no other PID namespace shares: the workers' shared work directory judges liveness by a lock
instead (worker/supervisor.py held_marker, worker/training/host_claims.py), since containers' ids repeat."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """Whether a process of this id runs on the host (another user's included). A process whose id was
    given to a new one since reads as running: what it left then waits for that one to end."""
    try:
        os.kill(pid, 0)  # signal 0: whether it exists, sending nothing
    except (ProcessLookupError, OverflowError):  # none has that id
        return False
    except PermissionError:  # another user's
        return True
    return True
