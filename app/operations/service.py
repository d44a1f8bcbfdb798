"""The operators' view of the whole service, in Prometheus' text format: aggregates over every
team, naming none (no team's names or ids), so it needs no key.

Anyone can scrape it, so a scrape costs the same with ten finished jobs or a hundred thousand: it
counts the jobs still active (few, and found through the index on status), reads the latest point of
each running job only, and keeps what it knows of finished jobs from one scrape to the next
(FinishedJobs), reading only the jobs that finished since.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import database_now
from app.jobs import repository, states
from app.operations import repository as operations_repository
from app.operations import workers
from app.operations.tables import Worker
from app.operations.workers import WORKER_ALIVE_S
from app.shares import SharesNow

# Job durations from minutes (the tiny model) to days (a large model's long run).
DURATION_BUCKETS_S = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)
# A job's finished_at comes from its worker's clock and is committed a moment after it is taken.
# Past this margin no job can still appear with an earlier finished_at (clocks an hour apart would
# already fail S3's request signing, which allows 15 minutes), so jobs older than it are tallied for good.
SETTLE_S = 3600


class Exposition:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class StatusTally:
    """The finished jobs of one status: how many, and the wall time of those a worker ran."""

    jobs: int = 0
    ran: int = 0  # claimed by a worker before they finished: the histogram's count
    seconds: float = 0.0
    within: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS_S))  # ran, per bucket bound

    def add(self, started: datetime | None, finished: datetime) -> None:
        self.jobs += 1
        if started is None:
            return  # cancelled while queued: it never ran
        duration = (finished - started).total_seconds()
        self.ran += 1
        self.seconds += duration
        for i, bound in enumerate(DURATION_BUCKETS_S):
            self.within[i] += duration <= bound

    def plus(self, other: StatusTally) -> StatusTally:
        return StatusTally(self.jobs + other.jobs, self.ran + other.ran, self.seconds + other.seconds,
                           [a + b for a, b in zip(self.within, other.within, strict=True)])


def tally(rows: Iterable[tuple[str, datetime | None, datetime]],
          into: dict[str, StatusTally] | None = None) -> dict[str, StatusTally]:
    into = into if into is not None else {}
    for status, started, finished in rows:
        into.setdefault(status, StatusTally()).add(started, finished)
    return into


class FinishedJobs:
    """What the scrapes of this process know of finished jobs, read once each.

    A finished job never changes again. Those that finished before a mark (SETTLE_S ago, as of the
    last scrape) are tallied once and kept; a scrape reads only the jobs that finished after the
    mark, through the index on finished_at, and moves the mark on. What a scrape reads follows how
    many jobs finish per hour, never how many ever did. A new process reads them all once, at its
    first scrape. Rows written behind the mark by hand (a restore) are seen after a restart.
    """

    def __init__(self):
        self._lock = threading.Lock()  # scrapes run in the threadpool: one moves the mark at a time
        self._settled: dict[str, StatusTally] = {}
        self._mark: datetime | None = None

    def by_status(self, session: Session, now: datetime) -> dict[str, StatusTally]:
        with self._lock:
            settle_until = now - timedelta(seconds=SETTLE_S)
            if self._mark is None or settle_until > self._mark:
                tally(repository.finished_between(session, self._mark, settle_until), into=self._settled)
                self._mark = settle_until
            recent = tally(repository.finished_between(session, self._mark, None))
            statuses = self._settled.keys() | recent.keys()
            return {s: self._settled.get(s, StatusTally()).plus(recent.get(s, StatusTally())) for s in statuses}


@dataclass(frozen=True)
class QueueHealth:
    """One queue (GPU class) as an operator watches it: who serves it, and what waits on it."""

    queue: str
    workers_alive: int  # workers of this queue heard from within WORKER_ALIVE_S, busy or idle
    queued: int
    oldest_wait_s: float  # how long the longest-waiting queued job has waited; 0 with none queued
    last_seen: Worker | None  # of this queue's workers that said they were up, the one heard from last
    last_seen_s: float | None = None  # ...how long ago, by the database's clock (which its seen_at is)

    @property
    def stranded(self) -> bool:
        """Jobs wait and no worker is alive to take them: they wait until one is started."""
        return self.queued > 0 and self.workers_alive == 0


def queue_health(session: Session, settings: Settings) -> list[QueueHealth]:
    """Every queue the deployment knows, by name: those of the GPU classes it serves (so a dashboard shows
    0, not "no data", for one that is empty), those a worker serves, and those a queued job waits on. Waits
    and silences are reckoned on the database's clock, which a job's queued_at and a worker's seen_at are."""
    waiting = repository.waiting_by_queue(session)
    by_queue: dict[str, list[Worker]] = {}
    for worker in operations_repository.workers(session):
        by_queue.setdefault(worker.queue, []).append(worker)
    queues = {settings.queue_for(gpu_class) for gpu_class in settings.served_gpu_classes} | by_queue.keys() | waiting.keys()
    alive_since = workers.alive_since(session)
    now = database_now(session)  # the same instant: now() is the transaction's start
    health = []
    for queue in sorted(queues):
        queued, oldest = waiting.get(queue, (0, now))
        seen = by_queue.get(queue, [])
        last_seen = max(seen, key=lambda worker: worker.seen_at, default=None)
        health.append(QueueHealth(
            queue=queue, workers_alive=sum(worker.seen_at >= alive_since for worker in seen), queued=queued,
            oldest_wait_s=max((now - oldest).total_seconds(), 0.0), last_seen=last_seen,
            last_seen_s=None if last_seen is None else max((now - last_seen.seen_at).total_seconds(), 0.0)))
    return health


def prometheus_text(session: Session, finished_jobs: FinishedJobs, settings: Settings, shares: SharesNow | None = None) -> str:
    """Jobs by status, each queue's depth, wait and live workers, durations of finished jobs, each
    training worker's device, and this API process's team shares (`shares`)."""
    # finished_at's clock: the mark of the jobs already tallied moves on it. On this host's, one an hour ahead
    # set the mark an hour past the jobs finishing, and every one of them was left out of the durations.
    finished = finished_jobs.by_status(session, database_now(session))
    out = Exposition()
    out.family("qlora_jobs", "gauge", "Jobs by status.")
    counts = repository.count_active_by_status(session)
    for status in states.ALL:
        count = finished[status].jobs if status in finished else counts.get(status, 0)
        out.sample("qlora_jobs", count, status=status)

    queues = queue_health(session, settings)
    out.family("qlora_queue_depth", "gauge", "Queued jobs waiting for a worker, by queue (GPU class).")
    for q in queues:
        out.sample("qlora_queue_depth", q.queued, queue=q.queue)
    out.family("qlora_queue_oldest_wait_seconds", "gauge",
               "How long the longest-waiting queued job of each queue has waited for a worker (0: none queued).")
    for q in queues:
        out.sample("qlora_queue_oldest_wait_seconds", round(q.oldest_wait_s, 3), queue=q.queue)
    out.family("qlora_workers_alive", "gauge",
               f"Workers of each queue that said they were up within the last {WORKER_ALIVE_S:g} s, busy or idle.")
    for q in queues:
        out.sample("qlora_workers_alive", q.workers_alive, queue=q.queue)

    out.family("qlora_job_duration_seconds", "histogram", "Wall time from claim to end of finished jobs.")
    for status, t in sorted(finished.items()):
        if not t.ran:
            continue
        for bound, within in zip(DURATION_BUCKETS_S, t.within, strict=True):
            out.sample("qlora_job_duration_seconds_bucket", within, status=status, le=str(bound))
        out.sample("qlora_job_duration_seconds_bucket", t.ran, status=status, le="+Inf")
        out.sample("qlora_job_duration_seconds_sum", round(t.seconds, 3), status=status)
        out.sample("qlora_job_duration_seconds_count", t.ran, status=status)

    devices = sorted(repository.running_devices(session), key=lambda row: row[0])
    out.family("qlora_worker_peak_memory_bytes", "gauge",
               "Peak device memory of the job each worker is training (GPU memory on CUDA, RSS on the CPU).")
    for worker, memory, _ in devices:
        out.sample("qlora_worker_peak_memory_bytes", memory, worker=worker)
    out.family("qlora_worker_gpu_utilization_ratio", "gauge",
               "GPU busy fraction of each training worker, where NVML reports it (absent on CPU workers).")
    for worker, _, utilization in devices:
        if utilization is not None:
            out.sample("qlora_worker_gpu_utilization_ratio", utilization, worker=worker)
    if shares is not None:
        team_shares(out, shares)
    return out.text()


def team_shares(out: Exposition, shares: SharesNow) -> None:
    """The team shares of the API process that answers this scrape (app/shares.py). Each process has its own
    (with `--workers N` a scrape reaches one of them), so each sample carries its `pid`: one process's counter
    never reads as another's going back, and a dashboard sums over pid. No team is named (the endpoint needs
    no key): totals, the teams waiting and the most one team has waiting say that teams are being queued."""
    pid = str(os.getpid())
    for name, value, help_text in (
            ("qlora_api_request_slots", shares.slots, "QLORA_REQUEST_SLOTS: the requests in progress this API process shares among teams."),
            ("qlora_api_team_share", shares.share, "What each busy team may have in progress in this API process now."),
            ("qlora_api_teams_busy", shares.teams_busy, "Teams with requests in progress or waiting for their share in this API process."),
            ("qlora_api_teams_waiting", shares.teams_waiting, "Teams with requests waiting for their share in this API process."),
            ("qlora_api_requests_in_progress", shares.in_progress,
             "Authenticated requests in progress in this API process, each counted in its team's share."),
            ("qlora_api_requests_waiting", shares.waiting, "Requests waiting for their team's share in this API process."),
            ("qlora_api_team_most_waiting", shares.most_waiting,
             "The most requests one team has waiting for its share in this API process.")):
        out.family(name, "gauge", help_text)
        out.sample(name, value, pid=pid)
    out.family("qlora_api_requests_refused_total", "counter",
               "Requests answered 429 busy by their team's share in this API process since it started: waited out (waited) or "
               "refused with the team's queue full (queue_full).")
    for reason, count in shares.refused.items():
        out.sample("qlora_api_requests_refused_total", count, pid=pid, reason=reason)
