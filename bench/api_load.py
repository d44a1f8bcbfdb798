"""The API under load, against Postgres, and a 1 GiB upload against its memory.

    .venv/bin/python bench/api_load.py [--clients 16] [--seconds 10] [--jobs 500] [--upload-mib 1024] [--workers 1]
                                       [--client httpx|raw]

It sets up a deployment of its own, the way production starts one: a fresh Postgres database,
migrated; a team and an API key; N jobs seeded as rows; the API as its own process(es)
(`qlora serve --no-worker --workers W`); and, standing in for the GPU workers, a thread that moves
every running job on by a step and a heartbeat each second, as their workers would. Then:

1. Load. C clients send requests back to back for T seconds, first to GET /health (no auth, no
   database: the baseline), then to GET /health again on a new connection each (what accepting a
   connection adds to a request: a script that does not keep its connections), then a mix of status
   polls (GET /jobs/{id}) and listings (GET /jobs?limit=50), then the same mix as pollers that each
   watch a few of the newest jobs and send back the ETag of what they have (If-None-Match): an answer
   that did not change is a 304 with no body, and the share of 304s is reported; last, the same mix as the openai SDK asks it
   (jobs.retrieve() and jobs.list(): GET /v1/fine_tuning/jobs/{id} and ?limit=20). Speed is reported
   as ratios to /health from the same run, so a busy machine moves every row together instead of
   making the numbers meaningless (DESIGN.md).
2. Memory. A JSONL upload of --upload-mib MiB of valid chat rows, made on the fly and sent with
   chunked transfer, goes to POST /datasets while the API's RSS is read before, after and at its
   peak. The claim it shows: the API streams an upload through, it never holds the file.

It prints two tables, writes the JSON (--out) and exits non-zero if a request failed or the
dataset did not come back ready with the rows and bytes that were sent. Everything it made
(database, temp directory, API process) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: app/, worker/ and tests/ import from this checkout

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import text, update  # noqa: E402

from app.datasets.tables import Dataset  # noqa: E402
from app.db import engine_for, new_id, session_scope, utcnow  # noqa: E402
from app.jobs import states  # noqa: E402
from app.jobs.tables import Job  # noqa: E402
from app.migrate import upgrade  # noqa: E402
from app.models import service as models_service  # noqa: E402
from app.storage.base import make_key  # noqa: E402
from app.storage.local import LocalStorage  # noqa: E402
from app.teams import service as teams_service  # noqa: E402
from tests import services  # noqa: E402  (the Postgres the test suite uses, started if it is not running)
from worker.training.data import DatasetValidator  # noqa: E402
from worker.training.estimate import token_estimate  # noqa: E402
from worker.training.spec import JobSpec  # noqa: E402
from worker.training.tiny import demo_rows, demo_spec  # noqa: E402

MIB = 1 << 20
DEFAULT_OUT = ROOT / "bench" / "results" / "api_load.json"

HEALTH, STATUS, LISTING = "GET /health", "GET /jobs/{id}", "GET /jobs?limit=50"
# /health again, each request on a connection of its own: what accepting a connection costs (and the
# connection bounds of app/connections.py with it), against a request on a kept-alive one
HEALTH_FRESH = "GET /health (a connection each)"
# What the openai SDK's jobs.retrieve() and jobs.list() ask (its default page is 20 jobs).
RETRIEVE, OPENAI_LISTING = "GET /v1/fine_tuning/jobs/{id}", "GET /v1/fine_tuning/jobs?limit=20"
CONDITIONAL = " (If-None-Match)"  # the same endpoint, polled by a client that sends back the ETag it has
# The mixes polled after /health, one phase each, in order: the report's key for its totals, its label,
# and its endpoints.
MIXES = {"jobs_mix": ("jobs mix", (STATUS, LISTING)),
         "conditional_mix": ("polls mix (If-None-Match)", (STATUS + CONDITIONAL, LISTING + CONDITIONAL)),
         "openai_mix": ("openai SDK mix", (RETRIEVE, OPENAI_LISTING))}
# In the conditional phase each client watches a few of the newest jobs, as a person follows their own
# with `qlora jobs watch` or the dashboard: a poll asks again for what it has, unchanged unless it runs.
WATCHED = 3
# Pollers outnumber page views: every client watching a job asks for it every few seconds, a
# person opens the job list now and then.
STATUS_SHARE = 0.75
# Most of what a team lists has finished; some jobs wait, a few run.
STATUS_WEIGHTS = {states.SUCCEEDED: 50, states.QUEUED: 20, states.RUNNING: 10, states.FAILED: 12,
                  states.CANCELLED: 8}
MODEL_NAME = "tiny"
SYSTEM_PROMPT = "You are the guide at a children's farm. Answer each question about an animal in one short sentence."

# Wide enough for the load table when the output is a file or a pipe (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 120)


# ---------------------------------------------------------------- deployment


@dataclass
class Deployment:
    url: str
    database_url: str
    home: Path
    api: subprocess.Popen

    def api_log(self) -> str:
        path = self.home / "api.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else "(no log)"


@contextmanager
def deployment(max_upload_bytes: int, workers: int = 1, env: dict[str, str] | None = None) -> Iterator[Deployment]:
    """A fresh database and temp directory, the API started on them (`env`: settings of its own);
    all of it gone afterwards."""
    services.ensure_postgres()
    home = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    database_url = services.create_postgres_database()
    api = None
    try:
        upgrade(database_url)
        port = services.free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("QLORA_")},  # only what we set
            "QLORA_HOME": str(home),
            "QLORA_DATABASE_URL": database_url,
            "QLORA_STORAGE_URL": f"file://{home / 'storage'}",
            "QLORA_PORT": str(port),
            # A server broker, so `serve` runs no worker and no embedded bootstrap. Nothing is
            # dispatched: no job is created through the API, so Redis is never even contacted.
            "QLORA_BROKER_URL": "redis://127.0.0.1:6379/0",
            "QLORA_MAX_UPLOAD_BYTES": str(max_upload_bytes),
            **(env or {}),
        }
        with open(home / "api.log", "ab") as log:
            # Its own session, so stopping it reaches anything it started and nothing of ours.
            # --workers only when asked: the same benchmark then also runs against a checkout without it.
            many = ["--workers", str(workers)] if workers != 1 else []
            api = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker", *many], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        d = Deployment(f"http://127.0.0.1:{port}", database_url, home, api)
        if not services.wait_until_up(d.url + "/health", d.api, timeout_s=60, need_ok=True):
            raise RuntimeError(f"the API did not answer /health within 60 s:\n{d.api_log()}")
        yield d
    finally:
        if api is not None:
            _stop(api)
        engine_for(database_url).dispose()  # our seeding connections, before the drop
        services.drop_postgres_database(database_url)
        shutil.rmtree(home, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------- data, as the service would have made it


def seed(d: Deployment, jobs: int) -> tuple[str, list[str]]:
    """A team with a key, a registered model, one stored dataset and `jobs` jobs in mixed states.
    Returns the API key and the job ids."""
    rng = random.Random(0)  # the same rows every run
    spec = JobSpec.parse(demo_spec(MODEL_NAME)).model_dump(mode="json")  # exactly what POST /jobs stores
    with session_scope(d.database_url) as session:
        team = teams_service.create_team(session, "bench")
        _, key = teams_service.create_key(session, team.name)
        # A registry row only: nothing trains here, so the directory need not exist.
        models_service.add_model(session, MODEL_NAME, path=str(d.home / "models" / MODEL_NAME), roots=[d.home / "models"])
        dataset = _store_dataset(session, LocalStorage(d.home / "storage"), team.id)
        now = utcnow()
        rows = []
        for i in range(jobs):
            status = rng.choices(list(STATUS_WEIGHTS), weights=list(STATUS_WEIGHTS.values()))[0]
            created = now - timedelta(minutes=jobs - i)  # one a minute, so the listing pages through time
            rows.append(Job(id=new_id(), team_id=team.id, name=f"bench-{i:05d}", status=status, spec=spec,
                            base_model=MODEL_NAME, dataset_id=dataset.id, queue="gpu-default", created_at=created,
                            total_steps=spec["training"]["max_steps"], **_progress(status, created, now, spec, rng)))
        session.add_all(rows)
    analyze(d.database_url)
    return key, [job.id for job in rows]


def analyze(database_url: str) -> None:
    """Statistics for the rows just seeded, as autovacuum gathers within a minute of a table's first
    changes in a deployment (the CI machine's Postgres runs with it off). Without them Postgres read
    and sorted every job of the team for each page: a fifth of the machine's CPU went to Postgres."""
    with engine_for(database_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


def _store_dataset(session, storage: LocalStorage, team_id: str) -> Dataset:
    data = b"".join(json.dumps(row).encode() + b"\n" for row in demo_rows(0, 480))
    validator = DatasetValidator(keep_examples=False)
    for line in data.splitlines():
        validator.feed(line)
    writer = storage.writer(make_key(team_id, "datasets"))
    writer.write(data)
    stored = writer.commit()
    dataset = Dataset(team_id=team_id, filename="train.jsonl", storage_key=stored.key, bytes=stored.size,
                      sha256=stored.sha256, status="ready", format=validator.format, rows=validator.rows,
                      token_estimate=token_estimate(validator.chars), errors=[])
    session.add(dataset)
    session.flush()
    return dataset


def _progress(status: str, created, now, spec: dict, rng: random.Random) -> dict:
    """The columns a worker would have filled in for a job in `status`."""
    total = spec["training"]["max_steps"]
    if status == states.QUEUED:
        # Its message went out lately, as POST /jobs and the scheduler keep it: otherwise the scheduler
        # would spend the run sending a hundred messages, which a steady deployment does not.
        return {"dispatched_at": now}
    started = created + timedelta(seconds=rng.randint(5, 120))
    step = total if status == states.SUCCEEDED else rng.randint(1, total - 1)
    values = {"attempt": 1, "worker": f"gpu-host-{rng.randint(1, 4)}:gpu{rng.randint(0, 7)}", "started_at": started,
              "step": step, "trained_tokens": step * 16 * 44}
    if status == states.RUNNING:
        return {**values, "heartbeat_at": now}
    finished = started + timedelta(minutes=rng.randint(2, 40))
    if status == states.FAILED:
        return {**values, "finished_at": finished, "error": (
            f"training failed at step {step}: CUDA out of memory (tried to allocate 2.00 GiB). Try a smaller "
            "training.per_device_batch_size or max_seq_length, or keep gradient_checkpointing on.")}
    if status == states.CANCELLED:
        return {**values, "finished_at": finished}
    return {**values, "finished_at": finished, "summary": _succeeded_summary(spec, rng)}


def _succeeded_summary(spec: dict, rng: random.Random) -> dict:
    """The shape worker/training/recipe.py writes, so a listing returns bodies of a realistic size."""
    first, final = 6.9 + rng.random() / 5, 0.4 + rng.random() / 5
    return {
        "status": "succeeded", "spec": spec, "base_model_path": "/models/tiny", "device": "cuda",
        "compute_dtype": "bfloat16",
        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
        "parameters": {"trainable": 262_144, "total": 4_456_448},
        "data": {"format": "chat", "train": {"rows": 480, "truncated_rows": 0, "tokens": 21_120},
                 "validation": {"rows": 48, "truncated_rows": 0, "tokens": 2_112}},
        "steps": {"completed": spec["training"]["max_steps"], "planned": spec["training"]["max_steps"],
                  "resumed_from": None},
        "train_loss_first": first, "train_loss_final": final, "eval_loss_final": final + 0.05,
        "perplexity_final": math.exp(final + 0.05), "tokens_seen": 112_640,
        "tokens_per_second": 9_000 + rng.random() * 2_000, "peak_memory_bytes": 1_610_612_736,
        "merge_fidelity": {"rows_from": "validation", "max_abs_logit_diff": 0.03, "mean_abs_logit_diff": 0.004,
                           "eval_loss_diff": 0.0007},
        "durations_s": {"setup": 4.1, "train": 38.0, "save": 0.4, "merge": 2.2, "total": 44.7},
    }


@contextmanager
def running_jobs_move(database_url: str, interval_s: float = 1.0) -> Iterator[None]:
    """What the GPU workers do to the jobs table while the benchmark polls it: every running job's
    step and heartbeat move on each second (one UPDATE for all of them, as cheap as it gets)."""
    stop = threading.Event()

    def move() -> None:
        while not stop.wait(interval_s):
            with session_scope(database_url) as session:
                session.execute(update(Job).where(Job.status == states.RUNNING, Job.step < Job.total_steps)
                                .values(step=Job.step + 1, heartbeat_at=utcnow()))

    thread = threading.Thread(target=move, name="running-jobs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- phase 1: load


@dataclass
class Samples:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    not_modified: int = 0  # answers 304 to a poll that sent the ETag it had

    def record(self, latency_s: float, *, not_modified: bool, error: str | None) -> None:
        self.latencies_s.append(latency_s)
        self.not_modified += not_modified
        if error:
            self.errors += 1
            self.first_error = self.first_error or error


def judged(status: int, asked_with_etag: bool) -> tuple[bool, bool]:
    """What one answer was: a 304 to the ETag sent, and whether it failed (neither that nor a 200)."""
    not_modified = status == 304 and asked_with_etag
    return not_modified, status != 200 and not not_modified


def run_clients(url: str, headers: dict[str, str], clients: int, seconds: float,
                next_request: Callable[[random.Random], tuple[str, str]],
                conditional: bool = False, fresh: bool = False) -> tuple[dict[str, Samples], float]:
    """`clients` threads, each with its own keep-alive connection, send requests back to back for
    `seconds` (a closed loop: a client asks again as soon as it has its answer). next_request(rng)
    says which (endpoint name, path) comes next. With `conditional`, a client keeps each path's ETag
    and sends it back in If-None-Match, as a poller that caches does. With `fresh`, each request
    opens a connection of its own (Connection: close). Returns the samples per endpoint and the wall time."""
    if fresh:
        headers = {**headers, "Connection": "close"}  # the server closes each: the next request connects anew
    # Fifty client threads in one interpreter take turns at its lock; at the default 5 ms per turn, a
    # thread whose answer has arrived can wait tens of ms for its turn, and the client, not the server,
    # makes the latency tail. Short turns keep what is measured the server's.
    sys.setswitchinterval(0.0005)
    per_client: list[dict[str, Samples]] = [{} for _ in range(clients)]
    start = threading.Barrier(clients + 1, timeout=60)  # a client that cannot start fails the run, never hangs it

    def client(samples: dict[str, Samples], seed: int) -> None:
        rng = random.Random(seed)
        etags: dict[str, str] = {}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            try:
                http.get(next_request(rng)[1])  # connect before the clock starts
            except httpx.HTTPError:
                pass  # the timed requests will count it
            start.wait()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                name, path = next_request(rng)
                t0 = time.perf_counter()
                try:
                    sent = {"If-None-Match": etags[path]} if conditional and path in etags else None
                    response = http.get(path, headers=sent)
                    not_modified, failed = judged(response.status_code, sent is not None)
                    error = f"{response.status_code}: {response.text[:200]}" if failed else None
                    if response.status_code == 200 and "etag" in response.headers:
                        etags[path] = response.headers["etag"]
                except httpx.HTTPError as exc:
                    not_modified, error = False, f"{type(exc).__name__}: {exc}"
                samples.setdefault(name, Samples()).record(time.perf_counter() - t0, not_modified=not_modified, error=error)

    threads = [threading.Thread(target=client, args=(per_client[i], i), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0  # a little over `seconds`: the last answers arrive after the deadline

    return merge_samples(per_client), wall_s


def run_raw_clients(url: str, headers: dict[str, str], clients: int, seconds: float,
                    next_request: Callable[[random.Random], tuple[str, str]],
                    conditional: bool = False, fresh: bool = False) -> tuple[dict[str, Samples], float]:
    """run_clients' closed loop from a lean client: one event loop, one keep-alive connection per
    client (with `fresh`, one per request), HTTP/1.1 written and read by hand. A request costs this
    client about a tenth of what it costs httpx from fifty threads, so the machine's two cores go to
    the API and Postgres and what is measured is the server; the httpx client is what most callers
    (the CLI, the openai SDK) are."""
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    per_client: list[dict[str, Samples]] = [{} for _ in range(clients)]

    async def client(samples: dict[str, Samples], seed: int, start: asyncio.Event) -> None:
        rng = random.Random(seed)
        etags: dict[str, str] = {}
        reader, writer = await asyncio.open_connection(host, int(port))

        async def get(path: str) -> tuple[int, dict[str, str], bytes]:
            nonlocal reader, writer
            if fresh:  # a connection of its own, which the server closes after its answer
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
            sent = f"If-None-Match: {etags[path]}\r\n" if conditional and path in etags else ""
            close = "Connection: close\r\n" if fresh else ""
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{head}{sent}{close}\r\n".encode())
            lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = dict(line.split(": ", 1) for line in lines[1:] if line)
            fields = {name.lower(): value for name, value in fields.items()}
            body = await reader.readexactly(int(fields.get("content-length", 0)))
            return int(lines[0].split(" ", 2)[1]), fields, body

        try:
            await get(next_request(rng)[1])  # connect before the clock starts
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass  # the timed requests will count it
        await start.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            name, path = next_request(rng)
            asked_with_etag = conditional and path in etags
            t0 = time.perf_counter()
            try:
                status, fields, body = await get(path)
                not_modified, failed = judged(status, asked_with_etag)
                error = f"{status}: {body[:200]!r}" if failed else None
                if status == 200 and "etag" in fields:
                    etags[path] = fields["etag"]
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                status, not_modified, error = 0, False, f"{type(exc).__name__}: {exc}"
            samples.setdefault(name, Samples()).record(time.perf_counter() - t0, not_modified=not_modified, error=error)
            if status == 0:
                break  # the connection is gone
        writer.close()

    async def main() -> float:
        start = asyncio.Event()
        tasks = [asyncio.create_task(client(per_client[i], i, start)) for i in range(clients)]
        await asyncio.sleep(0.5)  # every client connected
        start.set()
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
        return time.perf_counter() - t0

    # A thread of its own: whoever calls this (a test session) may hold an event loop in this one.
    wall_s = services.in_a_thread_of_its_own(lambda: asyncio.run(main()))
    return merge_samples(per_client), wall_s


def merge_samples(per_client: list[dict[str, Samples]]) -> dict[str, Samples]:
    merged: dict[str, Samples] = {}
    for samples in per_client:
        for name, s in samples.items():
            m = merged.setdefault(name, Samples())
            m.latencies_s += s.latencies_s
            m.errors += s.errors
            m.not_modified += s.not_modified
            m.first_error = m.first_error or s.first_error
    return merged


CLIENTS = {"httpx": run_clients, "raw": run_raw_clients}


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest rank: a value that was really measured, not an interpolation."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


def endpoint_stats(s: Samples, wall_s: float) -> dict:
    latencies = sorted(s.latencies_s)
    busy_s = sum(latencies)
    return {
        "requests": len(latencies),
        "errors": s.errors,
        "first_error": s.first_error,
        "req_per_s": len(latencies) / wall_s,
        "not_modified_share": s.not_modified / len(latencies) if latencies else 0.0,
        # The rate one client gets while it is asking this endpoint (1 / mean latency). In a mix
        # the observed req/s mostly says how often the mix picks an endpoint; this does not.
        "req_per_s_per_client": len(latencies) / busy_s if busy_s else 0.0,
        "mean_ms": busy_s / len(latencies) * 1000 if latencies else None,
        **{f"p{q}_ms": (v * 1000 if (v := percentile(latencies, q)) is not None else None) for q in (50, 90, 99)},
    }


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process and its children have used so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def load_phase(d: Deployment, key: str, job_ids: list[str], clients: int, seconds: float,
               client: str = "httpx") -> dict:
    cpu: dict[str, float] = {}  # the API's CPU seconds in each phase: what a request costs it, whatever else runs
    client_cpu: dict[str, float] = {}  # this process's: what the load itself takes of the machine

    def timed(phase: str, *args, **kwargs) -> tuple[dict[str, Samples], float]:
        before, ours = cpu_seconds(d.api.pid), time.process_time()
        result = CLIENTS[client](*args, **kwargs)
        cpu[phase] = cpu_seconds(d.api.pid) - before
        client_cpu[phase] = time.process_time() - ours
        return result

    health, health_wall = timed("health", d.url, {}, clients, seconds, lambda rng: (HEALTH, "/health"))
    fresh, fresh_wall = timed("health_fresh", d.url, {}, clients, seconds, lambda rng: (HEALTH_FRESH, "/health"),
                              fresh=True)

    def jobs_mix(rng: random.Random) -> tuple[str, str]:
        if rng.random() < STATUS_SHARE:
            return STATUS, f"/jobs/{rng.choice(job_ids)}"
        return LISTING, "/jobs?limit=50"

    newest = job_ids[-50:]  # what the job list shows
    watched: dict[int, list[str]] = {}  # each client's own jobs, by its rng (one per client)

    def watching(rng: random.Random) -> tuple[str, str]:
        if rng.random() < STATUS_SHARE:
            mine = watched.setdefault(id(rng), rng.sample(newest, WATCHED))
            return STATUS + CONDITIONAL, f"/jobs/{rng.choice(mine)}"
        return LISTING + CONDITIONAL, "/jobs?limit=50"

    def openai_mix(rng: random.Random) -> tuple[str, str]:
        if rng.random() < STATUS_SHARE:
            return RETRIEVE, f"/v1/fine_tuning/jobs/ftjob-{rng.choice(job_ids)}"
        return OPENAI_LISTING, "/v1/fine_tuning/jobs?limit=20"

    auth = {"Authorization": f"Bearer {key}"}
    runs = {mix: timed(mix, d.url, auth, clients, seconds, requests, conditional=mix == "conditional_mix")
            for mix, requests in (("jobs_mix", jobs_mix), ("conditional_mix", watching), ("openai_mix", openai_mix))}

    endpoints = {HEALTH: endpoint_stats(health.get(HEALTH, Samples()), health_wall),
                 HEALTH_FRESH: endpoint_stats(fresh.get(HEALTH_FRESH, Samples()), fresh_wall)}
    for mix, (_, names) in MIXES.items():
        samples, wall_s = runs[mix]
        for name in names:
            endpoints[name] = endpoint_stats(samples.get(name, Samples()), wall_s)
    baseline = endpoints[HEALTH]
    for name, phase in ((HEALTH, "health"), (HEALTH_FRESH, "health_fresh")):
        e = endpoints[name]
        e["api_cpu_ms_per_request"] = cpu[phase] * 1000 / e["requests"] if e["requests"] else None
        e["client_cpu_ms_per_request"] = client_cpu[phase] * 1000 / e["requests"] if e["requests"] else None
    for stats in endpoints.values():
        # Per-client rates compare endpoints at the same concurrency, whatever their share of the mix.
        stats["ratio_to_health"] = (stats["req_per_s_per_client"] / baseline["req_per_s_per_client"]
                                    if baseline["req_per_s_per_client"] else None)

    def mix_totals(names: tuple[str, ...], wall_s: float, phase: str) -> dict:
        requests = sum(endpoints[n]["requests"] for n in names)
        rate = requests / wall_s
        not_modified = sum(endpoints[n]["not_modified_share"] * endpoints[n]["requests"] for n in names)
        return {"requests": requests, "errors": sum(endpoints[n]["errors"] for n in names),
                "status_share": STATUS_SHARE, "req_per_s": rate,
                "ratio_to_health": rate / baseline["req_per_s"] if baseline["req_per_s"] else None,
                "not_modified_share": not_modified / requests if requests else 0.0,
                "api_cpu_ms_per_request": cpu[phase] * 1000 / requests if requests else None,
                "client_cpu_ms_per_request": client_cpu[phase] * 1000 / requests if requests else None}

    # Each mix as a whole: observed totals, directly comparable to /health's observed rate.
    return {"endpoints": endpoints, **{mix: mix_totals(names, runs[mix][1], mix) for mix, (_, names) in MIXES.items()}}


# ---------------------------------------------------------------- phase 2: memory during a large upload


def chat_rows(count: int = 480, exchanges: int = 5) -> list[dict]:
    """Valid multi-turn chat rows (~800 bytes each): a system prompt and five question/answer pairs."""
    singles = demo_rows(0, count)
    return [{"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                          *(m for k in range(exchanges) for m in singles[(i + k) % count]["messages"])]}
            for i in range(count)]


class ChatJsonl:
    """A JSONL body of about `target_bytes`, made on the fly: one block of distinct rows (~400 KB)
    sent again and again, then whole rows up to the target. The client never holds more than that
    block, and it knows the exact size, row count and sha256 of what it sent."""

    def __init__(self, target_bytes: int):
        lines = [json.dumps(row).encode() + b"\n" for row in chat_rows()]
        self.block = b"".join(lines)
        self.full_blocks, rest = divmod(target_bytes, len(self.block))
        tail_lines = []
        for line in lines:
            if sum(map(len, tail_lines)) + len(line) > rest:
                break
            tail_lines.append(line)
        self.tail = b"".join(tail_lines)
        self.size = self.full_blocks * len(self.block) + len(self.tail)
        self.rows = self.full_blocks * len(lines) + len(tail_lines)
        self.sha256 = hashlib.sha256()  # filled in as the body is sent

    def __iter__(self) -> Iterator[bytes]:
        for chunk in [self.block] * self.full_blocks + [self.tail]:
            if chunk:  # an empty chunk would end a chunked body early
                self.sha256.update(chunk)
                yield chunk


def multipart_body(boundary: str, filename: str, file_chunks: Iterator[bytes]) -> Iterator[bytes]:
    """multipart/form-data written by hand around a stream: httpx's `files=` wants the whole file."""
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
           "Content-Type: application/jsonl\r\n\r\n").encode()
    yield from file_chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (`serve --workers N` runs the API in N children of one parent)."""
    pids = [pid]
    for p in pids:
        for task in Path(f"/proc/{p}/task").iterdir():
            children = task / "children"
            if children.exists():
                pids += [int(c) for c in children.read_text().split()]
    return pids


def memory(pid: int) -> dict[str, int]:
    """Resident memory now (VmRSS) and its high-water mark (VmHWM), in bytes, from /proc: summed over
    the process and its children (the peaks of several processes summed: an upper bound)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in values:
                values[name] += int(rest.split()[0]) * 1024  # reported in kB
    return values


def reset_peak(pid: int) -> bool:
    """Start VmHWM afresh at the current RSS (Linux clear_refs 5) in the process and its children, so
    the peak read afterwards is this upload's, not start-up's. False where the kernel or permissions
    do not allow it."""
    try:
        for p in process_tree(pid):
            Path(f"/proc/{p}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_phase(d: Deployment, key: str, upload_bytes: int) -> dict:
    body = ChatJsonl(upload_bytes)
    boundary = uuid.uuid4().hex
    peak_is_upload_only = reset_peak(d.api.pid) and reset_peak(os.getpid())
    api_before, client_before = memory(d.api.pid), memory(os.getpid())
    t0 = time.perf_counter()
    # A generator body has no length, so httpx sends it with chunked transfer encoding, piece by piece.
    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {key}"},
                      timeout=httpx.Timeout(60, read=600)) as http:
        response = http.post("/datasets", content=multipart_body(boundary, "chat.jsonl", iter(body)),
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    seconds = time.perf_counter() - t0
    api_after, client_after = memory(d.api.pid), memory(os.getpid())

    dataset = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    checks = {
        "answered 201": response.status_code == 201,
        "status ready": dataset.get("status") == "ready",
        f"rows = {body.rows:,}": dataset.get("rows") == body.rows,
        f"bytes = {body.size:,}": dataset.get("bytes") == body.size,
        "sha256 matches": dataset.get("sha256") == body.sha256.hexdigest(),
    }
    delta = api_after["VmRSS"] - api_before["VmRSS"]
    peak_delta = api_after["VmHWM"] - api_before["VmRSS"]
    return {
        "bytes": body.size,
        "rows": body.rows,
        "seconds": seconds,
        "mib_per_s": body.size / MIB / seconds,
        "api_rss_before_bytes": api_before["VmRSS"],
        "api_rss_after_bytes": api_after["VmRSS"],
        "api_rss_peak_bytes": api_after["VmHWM"],
        "api_rss_delta_bytes": delta,
        "api_rss_peak_delta_bytes": peak_delta,
        "delta_fraction_of_upload": delta / body.size,
        "peak_delta_fraction_of_upload": peak_delta / body.size,
        "peak_is_upload_only": peak_is_upload_only,  # False: the peak may be start-up's, an upper bound
        "client_rss_peak_delta_bytes": client_after["VmHWM"] - client_before["VmRSS"],
        "dataset": {k: dataset.get(k) for k in ("id", "status", "format", "rows", "bytes", "sha256", "error_count")},
        "response": None if response.status_code == 201 else response.text[:1000],
        "checks": checks,
        "ok": all(checks.values()),
    }


# ---------------------------------------------------------------- the run, the report


def run(clients: int, seconds: float, jobs: int, upload_mib: float, workers: int = 1, client: str = "httpx") -> dict:
    upload_bytes = int(upload_mib * MIB)
    load_before = os.getloadavg()[0]
    with deployment(max_upload_bytes=upload_bytes + MIB, workers=workers) as d:
        key, job_ids = seed(d, jobs)
        with running_jobs_move(d.database_url):
            load = load_phase(d, key, job_ids, clients, seconds, client)
        upload = memory_phase(d, key, upload_bytes)
    errors = sum(e["errors"] for e in load["endpoints"].values())
    return {
        "benchmark": "api_load",
        "config": {"clients": clients, "seconds": seconds, "jobs": jobs, "upload_mib": upload_mib, "api_workers": workers,
                   "client": client,
                   "database": "postgresql", "storage": "file", "status_share": STATUS_SHARE},
        # Others' work on the machine slows every row; the ratios to /health carry over, the raw numbers do not.
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
                    "python": sys.version.split()[0]},
        **load,
        "upload": upload,
        "ok": errors == 0 and upload["ok"],
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _cpu_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f} MiB"


def print_report(r: dict) -> None:
    c, m = r["config"], r["machine"]
    processes = "1 API process" if c.get("api_workers", 1) == 1 else f"{c['api_workers']} API processes"
    table = Table(title=f"API under load: {c['clients']} {c.get('client', 'httpx')} clients × {c['seconds']:g} s each "
                        f"phase, {c['jobs']} jobs in Postgres, {processes}")
    for col in ("endpoint", "requests", "req/s", "× /health", "p50 ms", "p90 ms", "p99 ms", "304", "API CPU ms",
                "client CPU ms", "errors"):
        table.add_column(col, justify="left" if col == "endpoint" else "right")

    def mix_row(label: str, mix: dict) -> None:
        table.add_row(label, f"{mix['requests']:,}", f"{mix['req_per_s']:,.0f}", f"{mix['ratio_to_health']:.2f}",
                      "", "", "", f"{mix['not_modified_share']:.0%}", _cpu_ms(mix["api_cpu_ms_per_request"]),
                      _cpu_ms(mix.get("client_cpu_ms_per_request")), str(mix["errors"]),
                      style="bold")

    share = f"{r['jobs_mix']['status_share']:.0%}"
    # Each phase's endpoints, then its totals (the phase's CPU is the mix's, not one endpoint's).
    alone = (HEALTH, HEALTH_FRESH)  # a phase of its own each: their CPU per request is theirs
    for mix, (label, names) in {None: (None, alone), **MIXES}.items():
        for name in names:
            e = r["endpoints"][name]
            table.add_row(name if name in alone else f"{name} (in mix)", f"{e['requests']:,}", f"{e['req_per_s']:,.0f}",
                          f"{e['ratio_to_health']:.2f}", _ms(e["p50_ms"]), _ms(e["p90_ms"]), _ms(e["p99_ms"]),
                          f"{e['not_modified_share']:.0%}" if CONDITIONAL in name else "",
                          _cpu_ms(e.get("api_cpu_ms_per_request")) if name in alone else "",
                          _cpu_ms(e.get("client_cpu_ms_per_request")) if name in alone else "", str(e["errors"]))
        if mix:
            mix_row(f"{label} ({share} status)", r[mix])
    console.print(table)
    console.print("× /health: per-client rate (1 / mean latency) against /health's; the mix rows compare observed "
                  "totals. 304: the share of polls answered 304 Not Modified (running jobs move every second). API CPU ms: "
                  "the API processes' CPU time per request in that phase; client CPU ms: the benchmark's own.",
                  style="dim")

    u = r["upload"]
    upload = Table(title=f"Upload of {_mib(u['bytes'])} ({u['rows']:,} chat rows, chunked) to POST /datasets",
                   show_header=False)
    upload.add_column(justify="left")
    upload.add_column(justify="right")
    peak_note = "" if u["peak_is_upload_only"] else " (since start-up)"
    for label, value in [
        ("throughput", f"{u['mib_per_s']:,.1f} MiB/s ({u['seconds']:.1f} s)"),
        ("API RSS before", _mib(u["api_rss_before_bytes"])),
        ("API RSS after", _mib(u["api_rss_after_bytes"])),
        ("API RSS peak" + peak_note, _mib(u["api_rss_peak_bytes"])),
        ("delta after - before", f"{_mib(u['api_rss_delta_bytes'])} = {u['delta_fraction_of_upload']:.2%} of the upload"),
        ("delta peak - before", f"{_mib(u['api_rss_peak_delta_bytes'])} = "
                                f"{u['peak_delta_fraction_of_upload']:.2%} of the upload"),
        ("client RSS peak delta", _mib(u["client_rss_peak_delta_bytes"])),
    ]:
        upload.add_row(label, value)
    console.print(upload)
    for check, passed in u["checks"].items():
        console.print(f"  {'✓' if passed else '✗'} dataset {check}", style="green" if passed else "red")
    if u["response"]:
        console.print(f"  answer: {u['response']}", style="red")
    for name, e in r["endpoints"].items():
        if e["errors"]:
            console.print(f"  ✗ {name}: {e['errors']} errors, first: {e['first_error']}", style="red")
    console.print(f"load average {m['load_avg_1m_before']:.2f} → {m['load_avg_1m_after']:.2f} on {m['cpus']} CPUs "
                  "(the client, the API and Postgres share them)", style="dim")


def save_results(results: dict, out: Path) -> int:
    """Write the JSON results; the exit status says whether every check passed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results written to {out}")
    return 0 if results["ok"] else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent clients, one connection each (default 16)")
    p.add_argument("--seconds", type=float, default=10, help="length of each load phase (default 10)")
    p.add_argument("--jobs", type=int, default=500, help="jobs seeded as rows (default 500)")
    p.add_argument("--workers", type=int, default=1, help="API processes (qlora serve --workers; default 1)")
    p.add_argument("--client", choices=sorted(CLIENTS), default="httpx",
                   help="httpx: 50 threads of httpx, as the CLI and the openai SDK call; raw: one event loop "
                        "writing HTTP/1.1 by hand, which leaves the cores to the server (default httpx)")
    p.add_argument("--upload-mib", type=float, default=1024, help="size of the upload in MiB (default 1024)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args.clients, args.seconds, args.jobs, args.upload_mib, args.workers, args.client)
    print_report(results)
    return save_results(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
