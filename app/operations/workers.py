"""Which training workers are up: each worker's main process says so every WORKER_BEAT_S, busy or idle.

A job's heartbeat tells that its worker lives only while it trains; an idle worker wrote nothing, so
nothing told "the GPUs of this class are all gone" from "they are all busy" while jobs waited. Celery can
be asked (`inspect ping`), but only by broadcasting to every worker and waiting for answers on each
scrape, and the embedded queue has no such channel: the database, which every process already reaches,
holds the answer instead. A worker that stops cleanly deletes its row; one killed, frozen or cut off
keeps it, and its seen_at falls behind: past WORKER_ALIVE_S it no longer counts as alive, and its row
still tells when it was last seen.

A worker's seen_at is the database's clock, and expiry is judged by it (alive_since), as jobs' heartbeats are
(app.db.database_now): by the worker host's own clock, a worker whose clock ran behind the readers' by more
than WORKER_ALIVE_S looked dead while it beat (idle, it was not counted by the scheduler's redispatch; `qlora
admin status` and /metrics called its queue stranded), and one whose clock ran ahead stayed alive after its death.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import database_now, insert_for, make_engine, utcnow
from app.operations.lease import LEASE_TTL_INTERVALS
from app.operations.tables import Worker
from app.text import GPU_CLASS_PATTERN, has_control_characters
from worker.training.spec import excerpt

log = logging.getLogger(__name__)

# A worker says it is up this often: one small write per worker, so a pool of hundreds costs the
# database a few writes a second.
WORKER_BEAT_S = 15.0
# Alive while its last word is this recent: it must miss two beats in a row (dead, frozen, cut off from
# the database), as a lease's holder must miss two renewals, before it stops counting.
WORKER_ALIVE_S = LEASE_TTL_INTERVALS * WORKER_BEAT_S
# A silent worker's row is kept this long, to tell when it was last heard from (a host down over a
# weekend), then forgotten: a worker retired, renamed or moved to another GPU class is not listed by
# `qlora admin status`, nor its old queue kept in /metrics, for ever.
WORKER_FORGOTTEN_AFTER_S = 7 * 24 * 3600.0

MAX_WORKER_NAME = 200  # the workers table's name and jobs.worker hold this many characters


def worker_problems(name: str, gpu_class: str, served: list[str]) -> list[str]:
    """What is wrong with a worker's --name and --gpu-class, each naming the option and what it may be; none
    for a worker that can start. Unchecked, a name past MAX_WORKER_NAME failed every beat (a warning in the log
    each WORKER_BEAT_S, and the worker never counted as alive) and its first claim; one with a line break or an
    escape sequence went into `qlora admin status` and the job records as typed. A class the settings serve
    (`served`) is the operator's own and taken as configured (admission places jobs on it whatever its name);
    any other must be named as a job's gpu_class is."""
    problems = []
    if not 1 <= len(name) <= MAX_WORKER_NAME or has_control_characters(name):
        problems.append(f"--name: 1 to {MAX_WORKER_NAME} characters without control characters (line breaks, tabs, "
                        f"escapes), got {excerpt(name)}")
    if gpu_class not in served and not re.fullmatch(GPU_CLASS_PATTERN, gpu_class):
        problems.append("--gpu-class: lowercase letters, digits, '-' and '_', at most 50 characters, as a job's "
                        f"gpu_class, got {excerpt(gpu_class)}")
    return problems


def alive_since(session: Session) -> datetime:
    """Workers seen since this are alive: WORKER_ALIVE_S ago by the database's clock, which seen_at is written with."""
    return database_now(session) - timedelta(seconds=WORKER_ALIVE_S)


@dataclass(frozen=True)
class Beat:
    seen_at: datetime  # what this beat wrote (the database's clock)
    other_seen_at: datetime | None  # when a worker of that name started at another time wrote the row last, if one did


def training_device() -> str:
    """What this machine's training processes will run on, "cuda" or "cpu", told without starting CUDA (a worker's
    main process never does, DESIGN.md rule 2): a GPU's device file (NVIDIA's, or ROCm's for AMD), unless
    CUDA_VISIBLE_DEVICES hides every GPU. The training process decides for itself (worker/training/model.pick_device);
    this is for a person reading why a job waits."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return "cpu"
    return "cuda" if any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists() else "cpu"


def beat(session: Session, name: str, queue: str, started_at: datetime, device: str | None = None) -> Beat:
    """Worker `name`, serving `queue`, is up now: its row made or brought up to date. The caller commits.
    Says when the row was last written by a worker of that name started at another time (a predecessor that
    was killed, or another worker given the same name)."""
    insert = insert_for(session)
    now = database_now(session)
    before = session.execute(select(Worker.started_at, Worker.seen_at).where(Worker.name == name)).first()
    statement = insert(Worker).values(name=name, queue=queue, started_at=started_at, seen_at=now, device=device)
    session.execute(statement.on_conflict_do_update(
        index_elements=["name"], set_={"queue": queue, "started_at": started_at, "seen_at": now, "device": device}))
    return Beat(now, before.seen_at if before is not None and before.started_at != started_at else None)


def forget(session: Session, name: str, started_at: datetime) -> None:
    """Worker `name`, started at `started_at`, stopped cleanly: it no longer counts anywhere. A row another
    worker of the same name wrote since stays: that one is still up. The caller commits."""
    session.execute(delete(Worker).where(Worker.name == name, Worker.started_at == started_at))


def forget_silent(session: Session, now: datetime) -> int:
    """Forget the workers silent for longer than WORKER_FORGOTTEN_AFTER_S; how many. The caller commits."""
    since = now - timedelta(seconds=WORKER_FORGOTTEN_AFTER_S)
    return cast(CursorResult, session.execute(delete(Worker).where(Worker.seen_at < since))).rowcount


class WorkerBeat(threading.Thread):
    """In a worker's main process, from when it is ready to take jobs until it stops: beat() at once and
    every WORKER_BEAT_S, forget() at stop(). A beat that fails (the database out of reach) is logged and
    tried again at the next: the worker goes on, and shows as not alive until its beats get through.

    Its engine keeps no connection between beats: Celery's pool processes are forked from this process
    while it runs, and a pooled connection's socket would be shared with them."""

    def __init__(self, database_url: str, name: str, queue: str, interval_s: float = WORKER_BEAT_S,
                 device: str | None = None):
        super().__init__(name="qlora-worker-beat", daemon=True)
        self.worker, self.queue, self.interval_s = name, queue, interval_s
        self.device = device or training_device()
        self.engine = make_engine(database_url, pooled=False)
        self.sessions = sessionmaker(bind=self.engine)
        self.started_at = utcnow()
        self.stopped = threading.Event()

    def run(self) -> None:
        last_beat = None
        while True:
            try:
                with self.sessions.begin() as session:
                    done = beat(session, self.worker, self.queue, self.started_at, self.device)
                # Another worker wrote the row since this one's last beat: a killed predecessor cannot have. Both
                # times are the database's: another host's clock, or this one's, would make or miss a twin.
                if done.other_seen_at is not None and last_beat is not None and done.other_seen_at > last_beat:
                    log.warning("another worker named %s is up: the two count as one in `qlora admin status` and "
                                "/metrics, and job records cannot tell them apart; give each its own name "
                                "(qlora worker --name)", self.worker)
                last_beat = done.seen_at
            except Exception:  # a database blip must not end the beats
                log.warning("could not tell the database that worker %s is up; trying again in %ss", self.worker,
                            self.interval_s, exc_info=True)
            if self.stopped.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop beating and remove this worker's row, so it stops counting at once rather than after
        WORKER_ALIVE_S. Should that fail, the row goes stale on its own."""
        self.stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5)
        try:
            with self.sessions.begin() as session:
                forget(session, self.worker, self.started_at)
        except Exception:
            log.warning("could not remove worker %s from the database; it stops counting as alive within %ss",
                        self.worker, WORKER_ALIVE_S, exc_info=True)
        self.engine.dispose()
