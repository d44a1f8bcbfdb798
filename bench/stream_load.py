"""Live job streams against Postgres: what 1 and N viewers of one running job cost the database.

    .venv/bin/python bench/stream_load.py [--clients 500] [--seconds 20] [--points-per-s 5] [--history 0]

It sets up a deployment of its own, the way production starts one (api_load.deployment: a fresh
Postgres database, migrated; the API as its own process, `qlora serve --no-worker`), seeds one job,
claims it as a worker would, and keeps a simulated worker reporting for it in a thread: every second
(the worker's supervise interval) a report of --points-per-s train points, and an event every
EVENT_EVERY points, through the functions the real worker calls (app/jobs/runs.py).

Three phases, each measured over a steady window of --seconds:

0. No stream: what the API does on its own (its reaper) while the worker reports.
1. One SSE client follows the job's stream (GET /jobs/{id}/stream).
2. N clients follow it at once (asyncio + httpx in this process; several API keys, since a key may
   hold only QLORA_MAX_STREAMS_PER_KEY streams). The window opens once every client is connected and
   has caught up with the job's history; that connect/catch-up phase is reported apart.

The database's work is read from Postgres itself (pg_stat_database for the bench's database:
transactions, rows returned and fetched), minus the transactions the simulated worker made. Postgres
publishes a backend's counts at most once a second and an idle one's up to PGSTAT_IDLE_S later, so
every window starts after a settle of that length: the start and the end then lag alike.

At the end the worker finishes the job, so each of the N streams ends on its own, and every client
must have seen every point and every event exactly once and in order, ending with the final state
(the single client of phase 1, a prefix of them). It prints a table, writes the JSON (--out) and
exits non-zero if a check failed or N streams cost the database more than TARGET_RATIO times one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: app/, worker/ and tests/ import from this checkout

import httpx  # noqa: E402
import psycopg  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

from app.config import Settings  # noqa: E402
from app.datasets.tables import Dataset  # noqa: E402
from app.db import new_id, session_scope  # noqa: E402
from app.jobs import repository, runs, states  # noqa: E402
from app.jobs.tables import Job  # noqa: E402
from app.teams import repository as teams_repository  # noqa: E402
from app.teams import service as teams_service  # noqa: E402
from bench.api_load import MODEL_NAME, Deployment, console, deployment, save_results, seed  # noqa: E402
from worker.training.protocol import Event, Progress, TrainPoint  # noqa: E402
from worker.training.spec import JobSpec  # noqa: E402
from worker.training.tiny import demo_spec  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "stream_load.json"
REPORT_INTERVAL_S = 1.0  # the worker relays the training process's records this often (QLORA_SUPERVISE_INTERVAL_S)
EVENT_EVERY = 25  # points between two events: now and then a checkpoint or a warning
PGSTAT_IDLE_S = 11.0  # Postgres flushes an idle backend's counts within 10 s (PGSTAT_IDLE_INTERVAL), plus a margin
TARGET_RATIO = 2.0  # the bar: N viewers may cost the database at most twice what one costs
STREAMS_PER_KEY = Settings.model_fields["max_streams_per_key"].default  # the API's cap, left at its default
HISTORY_BATCH = 500  # points per transaction when --history seeds the job's past
# Streams being opened at once. People arrive over seconds, not in the same millisecond; and a burst of a
# few hundred requests to a sync route in the same instant stalls the API on its own, before any stream
# runs: each holds a pooled connection while the step that would give it back waits for a thread.
CONNECTING_AT_ONCE = 8


# ---------------------------------------------------------------- the job and its worker


def seed_job(d: Deployment, keys_needed: int) -> tuple[list[str], str, str, int]:
    """api_load's team, key, model and dataset, more keys of the team, and one job claimed as a worker
    claims it. Returns the keys, the team id, the job id and the attempt."""
    first_key, _ = seed(d, jobs=0)
    spec = JobSpec.parse(demo_spec(MODEL_NAME)).model_dump(mode="json")  # exactly what POST /jobs stores
    with session_scope(d.database_url) as session:
        team = teams_repository.team_by_name(session, "bench")
        assert team is not None
        keys = [first_key] + [teams_service.create_key(session, team.name)[1] for _ in range(keys_needed - 1)]
        dataset_id = session.scalars(select(Dataset.id).where(Dataset.team_id == team.id)).one()
        job = Job(id=new_id(), team_id=team.id, name="watched", status=states.QUEUED, spec=spec, base_model=MODEL_NAME,
                  dataset_id=dataset_id, queue="gpu-default", total_steps=spec["training"]["max_steps"])
        session.add(job)
        team_id, job_id = team.id, job.id
    with session_scope(d.database_url) as session:
        claimed = runs.claim(session, job_id, "bench-host:gpu0")
        assert claimed is not None, "the seeded job could not be claimed"
    return keys, team_id, job_id, claimed.attempt


class SimulatedWorker(threading.Thread):
    """Reports for the job as the worker does (app/jobs/runs.py), a transaction per report, counted, so
    the bench can take its own work out of what Postgres counts. Its engine has one connection and no
    pre-ping (the app's engines ping on every checkout, in a transaction of its own): each report is
    then exactly one transaction."""

    def __init__(self, database_url: str, job_id: str, attempt: int, points_per_s: int):
        super().__init__(daemon=True, name="simulated worker")
        self.database_url, self.job_id, self.attempt, self.points_per_s = database_url, job_id, attempt, points_per_s
        self.engine = create_engine(database_url, pool_size=1, max_overflow=0)
        self.sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self.step = 0  # the last step reported
        self.transactions = 0
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # a report and a count are read together

    def report(self, points: int) -> None:
        records: list = []
        for step in range(self.step + 1, self.step + points + 1):
            records.append(TrainPoint(step=step, epoch=step / 10_000, train_loss=2.0 / math.sqrt(step), learning_rate=2e-4,
                                      tokens_seen=step * 8192, tokens_per_second=9000.0, peak_memory_bytes=40 * 2**30))
            if step % EVENT_EVERY == 0:
                records.append(Event(type="checkpoint", message=f"checkpoint at step {step}", step=step))
        with self._lock:
            with self.sessions.begin() as session:  # commits at the end, as session_scope does
                runs.report(session, self.job_id, self.attempt, records, Progress(self.step + points, None, (self.step + points) * 8192))
            self.step += points
            self.transactions += 1

    def counted(self) -> tuple[int, int]:
        """(transactions, last step) at one moment."""
        with self._lock:
            return self.transactions, self.step

    def run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self.stopped.is_set():
                self.report(self.points_per_s)
                next_at += REPORT_INTERVAL_S
                self.stopped.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # noqa: B036 (the run reports it and fails)
            self.error = exc

    def finish(self) -> None:
        self.stopped.set()
        self.join()
        with self.sessions.begin() as session:
            assert runs.finish(session, self.job_id, self.attempt, states.SUCCEEDED, summary={"status": "succeeded"})
        self.engine.dispose()  # before the database is dropped


# ---------------------------------------------------------------- Postgres' own counts


@dataclass
class DbCounts:
    transactions: int
    tup_returned: int
    tup_fetched: int
    worker_transactions: int
    at: float  # time.monotonic()

    def minus(self, before: DbCounts) -> dict:
        seconds = self.at - before.at
        total = self.transactions - before.transactions
        worker = self.worker_transactions - before.worker_transactions
        return {"seconds": seconds, "transactions": total, "worker_transactions": worker, "api_transactions": total - worker,
                "api_transactions_per_s": (total - worker) / seconds,
                "tup_returned_per_s": (self.tup_returned - before.tup_returned) / seconds,
                "tup_fetched_per_s": (self.tup_fetched - before.tup_fetched) / seconds}


class PgStats:
    """pg_stat_database for the bench's database, read over a connection to another database, so the
    reading is not counted in what it reads."""

    def __init__(self, database_url: str, worker: SimulatedWorker):
        url = urlsplit(database_url.replace("postgresql+psycopg", "postgresql"))
        self.name = url.path.lstrip("/")
        self.conn = psycopg.connect(url._replace(path="/postgres").geturl(), autocommit=True)
        self.worker = worker

    def read(self) -> DbCounts:
        worker_transactions, _ = self.worker.counted()
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")  # fresh numbers, not the ones cached at the last read
            cur.execute("SELECT xact_commit + xact_rollback, tup_returned, tup_fetched FROM pg_stat_database "
                        "WHERE datname = %s", (self.name,))
            row = cur.fetchone()
        assert row is not None
        return DbCounts(row[0], row[1], row[2], worker_transactions, time.monotonic())

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------- the viewers


@dataclass
class Viewer:
    """One SSE client: what it saw of the job, checked as it arrives."""

    key: str
    steps_seen: int = 0  # metric points, each the next step (checked as it comes)
    last_step: int = 0
    event_ids: list[int] = field(default_factory=list)
    jobs: int = 0
    last_job: dict | None = None
    keepalives: int = 0
    status: int | None = None
    problems: list[str] = field(default_factory=list)  # out of order, twice, an error event, a failure
    opened: asyncio.Event = field(default_factory=asyncio.Event)  # the first `job` came
    ended: bool = False  # the server ended the stream

    def take(self, name: str, data: str) -> None:
        if name == "metric":
            step = json.loads(data)["step"]
            if step != self.last_step + 1:
                self.problems.append(f"step {step} after {self.last_step}")
            self.last_step, self.steps_seen = step, self.steps_seen + 1
        elif name == "event":
            event_id = json.loads(data)["id"]
            if self.event_ids and event_id <= self.event_ids[-1]:
                self.problems.append(f"event {event_id} after {self.event_ids[-1]}")
            self.event_ids.append(event_id)
        elif name == "job":
            self.jobs += 1
            self.last_job = json.loads(data)
            self.opened.set()
        else:
            self.problems.append(f"{name}: {data[:200]}")

    async def follow(self, http: httpx.AsyncClient, job_id: str, connecting: asyncio.Semaphore) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with connecting:  # held until the answer's head: a few requests in the API's hands at once
                    response = await stack.enter_async_context(
                        http.stream("GET", f"/jobs/{job_id}/stream", headers={"Authorization": f"Bearer {self.key}"}))
                self.status = response.status_code
                if response.status_code != 200:
                    self.problems.append(f"answered {response.status_code}: {(await response.aread())[:200]!r}")
                    return
                name, data = "message", ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line.startswith(":"):
                        self.keepalives += 1
                    elif not line and data:
                        self.take(name, data)
                        name, data = "message", ""
                self.ended = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.opened.set()  # a failed client does not hold up the others' start


async def until(condition, timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; a deadline, not a sleep: it fails the run if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


async def watch_phase(d: Deployment, stats: PgStats, worker: SimulatedWorker, job_id: str, keys: list[str],
                      clients: int, seconds: float, http: httpx.AsyncClient,
                      settle_s: float = PGSTAT_IDLE_S) -> tuple[dict, list[Viewer], list[asyncio.Task]]:
    """Open `clients` streams, wait until all have caught up, let the counts settle, measure `seconds`.
    Returns the phase's numbers, the viewers and their (still running) tasks."""
    viewers = [Viewer(keys[i // STREAMS_PER_KEY]) for i in range(clients)]
    before = stats.read()
    t0 = time.monotonic()
    connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)
    tasks = [asyncio.create_task(v.follow(http, job_id, connecting)) for v in viewers]
    await until(lambda: all(v.opened.is_set() for v in viewers), 300, f"not all {clients} streams opened")
    connected_s = time.monotonic() - t0
    _, target = worker.counted()  # every point written before the last stream opened
    await until(lambda: all(v.last_step >= target or v.problems for v in viewers), 300,
                f"not all {clients} streams caught up with step {target}")
    caught_up_s = time.monotonic() - t0
    await asyncio.sleep(settle_s)  # the catch-up's counts reach pg_stat_database before the window opens
    start = stats.read()
    await asyncio.sleep(seconds)
    end = stats.read()
    steady = end.minus(start)
    connect = start.minus(before)
    # The connect counts include the settle, at the steady rate; what lies above it is the catch-up's own.
    connect["excess_api_transactions"] = connect["api_transactions"] - steady["api_transactions_per_s"] * connect["seconds"]
    return {"clients": clients, "connected_s": connected_s, "caught_up_s": caught_up_s, "caught_up_to_step": target,
            "connect": connect, "steady": steady}, viewers, tasks


def check_viewers(viewers: list[Viewer], final_step: int, event_ids: list[int], whole: bool) -> dict:
    """Every point once and in order, every event once and in order (checked as they came); `whole`: all
    of them and the final state last, else a prefix of them (a client that left early)."""
    problems: list[str] = []
    for i, v in enumerate(viewers):
        mine = list(v.problems)
        if v.steps_seen != v.last_step:
            mine.append(f"{v.steps_seen} points for steps 1..{v.last_step}")
        if v.event_ids != event_ids[:len(v.event_ids)]:
            mine.append("events differ from the job's")
        if whole:
            if v.last_step != final_step or len(v.event_ids) != len(event_ids):
                mine.append(f"saw steps 1..{v.last_step} and {len(v.event_ids)} events of 1..{final_step} and {len(event_ids)}")
            if not v.ended or not v.last_job or v.last_job["status"] != states.SUCCEEDED:
                mine.append("the stream did not end with the final state")
        problems += [f"client {i}: {p}" for p in mine[:3]]
    return {"clients": len(viewers), "clients_with_problems": len({p.split(":")[0] for p in problems}),
            "problems": problems[:20], "ok": not problems}


def all_event_ids(database_url: str, team_id: str, job_id: str) -> list[int]:
    ids: list[int] = []
    with session_scope(database_url) as session:
        while page := repository.events(session, team_id, job_id, ids[-1] if ids else None, 1000):
            ids += [e.id for e in page]
    return ids


async def run_phases(d: Deployment, keys: list[str], team_id: str, job_id: str, worker: SimulatedWorker,
                     clients: int, seconds: float, settle_s: float = PGSTAT_IDLE_S) -> dict:
    stats = PgStats(d.database_url, worker)
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    # No read timeout: an idle stream sends a keepalive every 15 s, a stuck one fails the checks instead.
    async with httpx.AsyncClient(base_url=d.url, limits=limits, timeout=httpx.Timeout(60, read=None)) as http:
        try:
            await asyncio.sleep(settle_s)  # the seeding's counts settle
            start = stats.read()
            await asyncio.sleep(seconds)
            idle = stats.read().minus(start)

            one, single, single_tasks = await watch_phase(d, stats, worker, job_id, keys, 1, seconds, http, settle_s)
            for task in single_tasks:  # the single viewer leaves: its feed stops with it
                task.cancel()
            await asyncio.gather(*single_tasks, return_exceptions=True)

            many, viewers, tasks = await watch_phase(d, stats, worker, job_id, keys, clients, seconds, http, settle_s)
            await asyncio.to_thread(worker.finish)  # the job succeeds: every stream ends on its own
            _, final_step = worker.counted()
            done, pending = await asyncio.wait(tasks, timeout=300)
            for task in pending:
                task.cancel()
            events = all_event_ids(d.database_url, team_id, job_id)
        finally:
            stats.close()
    return {"no_stream": {"steady": idle}, "one": one, "many": many, "final_step": final_step, "events": len(events),
            "checks": {"one client": check_viewers(single, final_step, events, whole=False),
                       f"{clients} clients": check_viewers(viewers, final_step, events, whole=True)},
            "streams_left_open": len(pending)}


# ---------------------------------------------------------------- the run, the report


def run(clients: int, seconds: float, points_per_s: int, history: int, settle_s: float = PGSTAT_IDLE_S) -> dict:
    load_before = os.getloadavg()[0]
    with deployment(max_upload_bytes=2**20) as d:
        keys, team_id, job_id, attempt = seed_job(d, keys_needed=math.ceil(clients / STREAMS_PER_KEY))
        worker = SimulatedWorker(d.database_url, job_id, attempt, points_per_s)
        for done in range(0, history, HISTORY_BATCH):  # the job's past, before anyone watches
            worker.report(min(HISTORY_BATCH, history - done))
        worker.start()
        try:
            phases = asyncio.run(run_phases(d, keys, team_id, job_id, worker, clients, seconds, settle_s))
        finally:
            worker.stopped.set()
        if worker.error:
            raise worker.error
    one = phases["one"]["steady"]["api_transactions_per_s"]
    many = phases["many"]["steady"]["api_transactions_per_s"]
    ratio = many / one if one else None
    checks_ok = all(c["ok"] for c in phases["checks"].values()) and phases["streams_left_open"] == 0
    return {
        "benchmark": "stream_load",
        "config": {"clients": clients, "seconds": seconds, "points_per_s": points_per_s, "history": history,
                   "report_interval_s": REPORT_INTERVAL_S, "event_every": EVENT_EVERY, "streams_per_key": STREAMS_PER_KEY,
                   "keys": len(keys), "settle_s": settle_s, "database": "postgresql"},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
                    "python": sys.version.split()[0]},
        **phases,
        "ratio_many_to_one": ratio,
        "target_ratio": TARGET_RATIO,
        "ok": checks_ok and ratio is not None and ratio <= TARGET_RATIO,
    }


def print_report(r: dict) -> None:
    c = r["config"]
    table = Table(title=f"One running job, {c['points_per_s']} points/s: the database's work per second of "
                        f"steady watching ({c['seconds']:g} s windows)")
    for col in ("phase", "API transactions/s", "rows returned/s", "rows fetched/s", "worker transactions/s", "× 1 client"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    one = r["one"]["steady"]["api_transactions_per_s"]
    rows = [("no stream (API alone)", r["no_stream"]["steady"]), ("1 client", r["one"]["steady"]),
            (f"{c['clients']} clients", r["many"]["steady"])]
    for label, s in rows:
        table.add_row(label, f"{s['api_transactions_per_s']:.2f}", f"{s['tup_returned_per_s']:,.0f}",
                      f"{s['tup_fetched_per_s']:,.0f}", f"{s['worker_transactions'] / s['seconds']:.2f}",
                      f"{s['api_transactions_per_s'] / one:.2f}" if one else "-")
    console.print(table)
    connect = Table(title="Connecting and catching up (reported apart, not in the windows above)")
    for col in ("clients", "all opened", "all caught up", "API transactions", "of which above the steady rate"):
        connect.add_column(col, justify="right")
    for phase in (r["one"], r["many"]):
        k = phase["connect"]
        connect.add_row(str(phase["clients"]), f"{phase['connected_s']:.1f} s", f"{phase['caught_up_s']:.1f} s",
                        f"{k['api_transactions']:,} in {k['seconds']:.0f} s", f"{k['excess_api_transactions']:,.0f}")
    console.print(connect)
    console.print("API transactions: the bench database's commits and rollbacks (pg_stat_database) minus the simulated "
                  f"worker's own; each window opens {c['settle_s']:g} s after the last client caught up.", style="dim")
    ratio = r["ratio_many_to_one"]
    verdict = ratio is not None and ratio <= r["target_ratio"]
    console.print(f"{c['clients']} clients cost the database {ratio:.2f}× what 1 costs (target ≤ {r['target_ratio']:g}×)"
                  if ratio is not None else "no reading for 1 client", style="green" if verdict else "red")
    for name, check in r["checks"].items():
        style = "green" if check["ok"] else "red"
        console.print(f"  {'✓' if check['ok'] else '✗'} {name}: every point and event once, in order"
                      + ("" if check["ok"] else f" — {check['clients_with_problems']} with problems: {check['problems'][:5]}"),
                      style=style)
    if r["streams_left_open"]:
        console.print(f"  ✗ {r['streams_left_open']} streams did not end after the job's final state", style="red")
    m = r["machine"]
    console.print(f"final step {r['final_step']:,}, {r['events']} events; load average {m['load_avg_1m_before']:.2f} → "
                  f"{m['load_avg_1m_after']:.2f} on {m['cpus']} CPUs (the clients, the API and Postgres share them)", style="dim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=500, help="concurrent SSE clients in phase 2 (default 500)")
    p.add_argument("--seconds", type=float, default=20, help="length of each steady window (default 20)")
    p.add_argument("--points-per-s", type=int, default=5, help="train points the simulated worker adds per second (default 5)")
    p.add_argument("--history", type=int, default=0,
                   help="points the job already has before anyone watches (default 0; above the feed's buffer, "
                        "every joining stream reads them itself)")
    p.add_argument("--settle-s", type=float, default=PGSTAT_IDLE_S,
                   help=f"wait before each window for Postgres' counts to settle (default {PGSTAT_IDLE_S:g}; shorter, an "
                        "idle backend's last counts may land in the next window: for a test of the run, not a figure)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.points_per_s < 1 or args.history < 0 or args.settle_s < 0:
        raise SystemExit("--clients and --points-per-s must be at least 1, --seconds above 0, --history and --settle-s "
                         "not below 0")
    results = run(args.clients, args.seconds, args.points_per_s, args.history, args.settle_s)
    print_report(results)
    return save_results(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
