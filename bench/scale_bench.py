"""Every read a poller makes, and the worker's writes, on a database of a large deployment's size: this
checkout against a baseline checkout, on the same database in the same run.

    .venv/bin/python bench/scale_bench.py [--database-url URL] [--scale 1.0] [--baseline main] [--requests 5]

The database is bench/scale_seed.py's (200 teams, 100,000 jobs, ~20M points of loss curves with five
500,000-point ones, 2M events, 50,000 datasets at --scale 1): the one named by --database-url, seeded
first if it has no teams (seeding takes ~20 minutes on two cores; pass the same URL again to reuse it),
or else a fresh one seeded and dropped at the end.

The two sides run at once, each on its own copy of the database (CREATE DATABASE ... TEMPLATE, made by
the run and dropped after) and its own API process (`qlora serve --no-worker`, the scheduler and the
reaper off so that nothing changes the rows): the baseline (`git archive` of --baseline's app/, worker/
and migrations/, its copy downgraded to that tree's newest migration) and this checkout (upgraded to
head). Every route below is asked of both in turn, request for request, by the keys of the biggest team
(~7% of every table), a median team and an admin: twice to warm up, then --requests times (more while
under two seconds in all, up to 3x; a read over 5 s once). The worker's and the scheduler's writes (50
loss-curve points, a redone step, 20 events, losses_at, a claim over the queued jobs in fair-share order,
standings, a scheduler pass) run in each side's own code in a child process, each rolled back, the sides
taking turns twice.

It prints one table, the median milliseconds before and after and their ratio (before / after: above 1
is faster now), and writes the JSON (--out). The sides share the machine and Postgres: a ratio within
about 0.8-1.25 is noise, not a change.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The write-path child runs the baseline's app/ and worker/ (SCALE_BENCH_CODE) with this bench module.
CODE = Path(os.environ.get("SCALE_BENCH_CODE", ROOT))
for path in (ROOT, CODE):
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))

import httpx  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import text  # noqa: E402

from app.db import engine_for  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "scale_bench.json"
BIG_TEAM, MEDIAN_TEAM, ADMIN_TEAM = "team-0", "team-60", "team-199"
# A read slower than this (the whole of a 500,000-point curve: half a minute) is warmed once and measured once.
SLOW_S = 5.0


# ---------------------------------------------------------------- the routes, as pollers ask them


def routes(ctx: dict) -> list[tuple[str, str, str]]:
    """(label, key, path): what the dashboard, the CLI, the openai SDK and the operators poll."""
    big, running, queued, done = ctx["big_finished"], ctx["big_running"], ctx["queued"], ctx["finished"]
    return [
        ("GET /jobs?limit=50 (biggest team)", "big", "/jobs?limit=50"),
        ("GET /jobs?limit=50 (median team)", "median", "/jobs?limit=50"),
        ("GET /jobs?status=running", "big", "/jobs?limit=50&status=running"),
        ("GET /jobs?status=queued", "big", "/jobs?limit=50&status=queued"),
        ("GET /jobs?cursor= (page 20)", "big", f"/jobs?limit=50&cursor={ctx['deep_job_cursor']}"),
        ("GET /jobs/{queued}", "big", f"/jobs/{queued}"),
        ("GET /jobs/{running}", "big", f"/jobs/{running}"),
        ("GET /jobs/{id}/events", "big", f"/jobs/{done}/events"),
        ("GET /jobs/{500k}/events?after=", "big", f"/jobs/{running}/events?after={ctx['running_last_event']}"),
        ("GET /jobs/{id}/metrics", "big", f"/jobs/{done}/metrics"),
        ("GET /jobs/{500k}/metrics?after_step= (poll)", "big",
         f"/jobs/{running}/metrics?after_step={ctx['running_step'] - 10}&after_eval_step={ctx['running_step'] - 10}"),
        ("GET /jobs/{500k}/metrics (whole curve)", "big", f"/jobs/{big}/metrics"),
        ("GET /jobs/{id}/checkpoints", "big", f"/jobs/{done}/checkpoints"),
        ("GET /jobs/{id}/artifacts", "big", f"/jobs/{done}/artifacts"),
        ("GET /datasets?limit=50", "big", "/datasets?limit=50"),
        ("GET /datasets?cursor= (page 20)", "big", f"/datasets?limit=50&cursor={ctx['deep_dataset_cursor']}"),
        ("GET /datasets/{id}", "big", f"/datasets/{ctx['dataset']}"),
        ("GET /models", "big", "/models"),
        ("GET /v1/fine_tuning/jobs?limit=20", "big", "/v1/fine_tuning/jobs?limit=20"),
        ("GET /v1/fine_tuning/jobs?after= (page 20)", "big", f"/v1/fine_tuning/jobs?limit=20&after=ftjob-{ctx['deep_job']}"),
        ("GET /v1/fine_tuning/jobs?metadata[k]=v", "big", "/v1/fine_tuning/jobs?limit=20&metadata[stage]=nightly"),
        ("GET /v1/fine_tuning/jobs/{id}", "big", f"/v1/fine_tuning/jobs/ftjob-{running}"),
        ("GET /v1/fine_tuning/jobs/{id}/events", "big", f"/v1/fine_tuning/jobs/ftjob-{done}/events?limit=20"),
        ("GET /v1/fine_tuning/jobs/{500k}/events", "big", f"/v1/fine_tuning/jobs/ftjob-{running}/events?limit=20"),
        ("GET /v1/fine_tuning/jobs/{500k}/events?after=", "big",
         f"/v1/fine_tuning/jobs/ftjob-{running}/events?limit=20&after=ftevent-m{ctx['running_old_point']}"),
        ("GET /v1/fine_tuning/jobs/{id}/checkpoints", "big", f"/v1/fine_tuning/jobs/ftjob-{done}/checkpoints"),
        ("GET /v1/files?limit=100", "big", "/v1/files?limit=100"),
        ("GET /v1/models", "big", "/v1/models"),
        ("GET /usage (this month)", "big", "/usage"),
        ("GET /usage (median team)", "median", "/usage"),
        ("GET /usage?from= (a year)", "big", f"/usage?from={ctx['year_ago']}"),
        ("GET /quota", "big", "/quota"),
        ("GET /admin/teams", "admin", "/admin/teams"),
        ("GET /admin/teams/{team}/jobs", "admin", f"/admin/teams/{BIG_TEAM}/jobs?limit=50"),
        ("GET /admin/teams/{team}/quota", "admin", f"/admin/teams/{BIG_TEAM}/quota"),
        ("GET /usage?all_teams=true", "admin", "/usage?all_teams=true"),
        ("GET /metrics", "admin", "/metrics"),
    ]


def context(database_url: str) -> dict:
    """The ids and cursors the routes ask for, read from the seeded rows."""
    from app.pagination import encode_cursor
    from bench.scale_seed import big_job_numbers, job_id

    with engine_for(database_url).connect() as conn:
        def one(sql: str, **values):
            return conn.execute(text(sql), values).one()

        team = one("SELECT id FROM teams WHERE name = :n", n=BIG_TEAM).id
        jobs = conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
        numbers = big_job_numbers(jobs)
        running, big = job_id(numbers[-1]), job_id(numbers[0])
        step = one("SELECT step FROM jobs WHERE id = :j", j=running).step
        # page 20 of 50, or the middle of a smaller team's rows (--scale under 1)
        deep = one("SELECT id, created_at FROM jobs WHERE team_id = :t ORDER BY created_at DESC, id DESC "
                   "OFFSET LEAST(999, (SELECT count(*) / 2 FROM jobs WHERE team_id = :t)) LIMIT 1", t=team)
        deep_dataset = one("SELECT id, created_at FROM datasets WHERE team_id = :t ORDER BY created_at DESC, id DESC "
                           "OFFSET LEAST(999, (SELECT count(*) / 2 FROM datasets WHERE team_id = :t)) LIMIT 1", t=team)
        return {
            "big_running": running, "big_finished": big,
            "running_step": step,
            "running_last_event": one("SELECT max(id) - 5 AS id FROM job_events WHERE job_id = :j", j=running).id,
            # a point near the start of the curve (step 1,000 at scale 1): a page of the feed deep in it
            "running_old_point": one("SELECT id FROM job_metrics WHERE job_id = :j AND kind = 'train' AND step = :s",
                                     j=running, s=max(1, step // 450)).id,
            "queued": one("SELECT id FROM jobs WHERE team_id = :t AND status = 'queued' ORDER BY created_at LIMIT 1",
                          t=team).id,
            "finished": one("SELECT id FROM jobs WHERE team_id = :t AND status = 'succeeded' AND total_steps < 1000 "
                            "ORDER BY created_at DESC LIMIT 1", t=team).id,
            "deep_job": deep.id, "deep_job_cursor": encode_cursor(deep.created_at, deep.id),
            "deep_dataset_cursor": encode_cursor(deep_dataset.created_at, deep_dataset.id),
            "dataset": deep_dataset.id,
            "year_ago": time.strftime("%Y-%m-%d", time.gmtime(time.time() - 365 * 86400)),
        }


def make_keys(database_url: str) -> dict[str, str]:
    """A fresh API key for the biggest team, a median team and an admin (the bench's keys, revoked at the end)."""
    from app.db import session_scope
    from app.teams import service as teams_service

    with session_scope(database_url) as session:
        return {"big": teams_service.create_key(session, BIG_TEAM)[1],
                "median": teams_service.create_key(session, MEDIAN_TEAM)[1],
                "admin": teams_service.create_key(session, ADMIN_TEAM, admin=True)[1]}


def drop_keys(database_url: str) -> None:
    with engine_for(database_url).begin() as conn:
        conn.execute(text("DELETE FROM api_keys"))


# ---------------------------------------------------------------- the two sides


def time_routes(urls: dict[str, str], keys: dict[str, str], ctx: dict, requests: int, log) -> dict[str, dict]:
    """Each route asked of both APIs in turn, request for request (before, after, before, ...), so that
    whatever else the machine does weighs on both sides alike."""
    results: dict[str, dict] = {side: {} for side in urls}
    clients = {side: httpx.Client(base_url=url, timeout=300) for side, url in urls.items()}
    try:
        for label, key, path in routes(ctx):
            headers = {"Authorization": f"Bearer {keys[key]}"}
            timings: dict[str, list[float]] = {side: [] for side in urls}
            answers: dict[str, tuple[int, int]] = {}
            slow = False
            for i in range(2 + requests * 3):
                for side, client in clients.items():
                    started = time.perf_counter()
                    answer = client.get(path, headers=headers)
                    elapsed = time.perf_counter() - started
                    answers[side] = (answer.status_code, len(answer.content))
                    if i >= 2 or (i == 1 and slow):
                        timings[side].append(elapsed)
                    slow = slow or elapsed > SLOW_S
                if all(timings.values()) and (slow or (all(len(t) >= requests for t in timings.values())
                                                       and sum(map(sum, timings.values())) > 2.0)):
                    break
            for side in urls:
                status, size = answers[side]
                results[side][label] = {"ms": statistics.median(timings[side]) * 1000, "n": len(timings[side]),
                                        "status": status, "bytes": size}
            log(f"    {label}: " + ", ".join(f"{side} {results[side][label]['ms']:.1f} ms {answers[side]}" for side in urls))
    finally:
        for client in clients.values():
            client.close()
    return results


def write_path(database_url: str, rounds: int) -> dict[str, dict]:
    """The worker's and the scheduler's writes in this process's code, each in a transaction rolled back."""
    from sqlalchemy.orm import Session

    from app.config import Settings
    from app.jobs import repository as jobs
    from app.scheduling import service as scheduling
    from bench.scale_seed import big_job_numbers, job_id

    settings = Settings(database_url=database_url, broker_url="redis://127.0.0.1:6379/15", home=tempfile.gettempdir())
    engine = engine_for(database_url)
    with engine.connect() as conn:
        running = job_id(big_job_numbers(conn.execute(text("SELECT count(*) FROM jobs")).scalar_one())[-1])
        step = conn.execute(text("SELECT step FROM jobs WHERE id = :j"), {"j": running}).scalar_one()
        queued = conn.execute(text("SELECT id, queue FROM jobs WHERE status = 'queued' ORDER BY created_at LIMIT 1")).one()

    def timed(name: str, work) -> None:
        timings = []
        for i in range(rounds + 1):
            with Session(engine) as session:
                started = time.perf_counter()
                work(session, i)
                session.flush()
                elapsed = time.perf_counter() - started
                session.rollback()
            if i:
                timings.append(elapsed)
        out[name] = {"ms": statistics.median(timings) * 1000, "n": len(timings)}

    out: dict[str, dict] = {}
    point = {"kind": "train", "epoch": 0.9, "train_loss": 0.4, "learning_rate": 2e-4, "grad_norm": 1.0,
             "tokens_seen": 1, "tokens_per_second": 3000.0, "peak_memory_bytes": 8_000_000_000, "gpu_utilization": 0.9}
    timed("worker: 50 loss-curve points (upsert)", lambda s, i: [
        jobs.upsert_metric(s, running, {**point, "step": step + 1 + i * 50 + n}) for n in range(50)])
    timed("worker: redo a step's point (upsert)", lambda s, i: jobs.upsert_metric(s, running, {**point, "step": step - i}))
    timed("worker: 20 events", lambda s, i: [jobs.add_event(s, running, "progress", message=f"step {n}") for n in range(20)])
    timed("worker: losses_at (new checkpoint)", lambda s, i: jobs.losses_at(s, running, step - i))
    timed("worker: claim_next (fair share)", lambda s, i: scheduling.claim_next(s, settings, queued.id, "bench-worker"))
    timed("scheduler: standings of a queue", lambda s, i: scheduling.standings(s, settings, queued.queue))
    timed("scheduler: one pass", lambda s, i: scheduling.schedule(s, settings))
    engine.dispose()
    return out


def side_env(code: Path, database_url: str, home: Path, port: int) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("QLORA_")},
            "PYTHONPATH": f"{code}{os.pathsep}{ROOT}", "SCALE_BENCH_CODE": str(code),
            "QLORA_HOME": str(home), "QLORA_DATABASE_URL": database_url, "QLORA_STORAGE_URL": f"file://{home / 'storage'}",
            "QLORA_PORT": str(port), "QLORA_BROKER_URL": "redis://127.0.0.1:6379/15",
            # nothing may change the seeded rows while they are measured: no scheduler, no reaper
            "QLORA_SCHEDULER_INTERVAL_S": "0", "QLORA_REAPER_INTERVAL_S": "0"}


def measure_writes(sides: dict[str, tuple[Path, str]], rounds: int, log) -> dict[str, dict]:
    """The write path of each side in its own process, the sides taking turns twice."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for turn in range(2):
        for side, (code, database_url) in sides.items():
            log(f"  {side}: the worker's writes ({turn + 1}/2)")
            child = subprocess.run([sys.executable, "-m", "bench.scale_bench", "--write-path-only", database_url,
                                    "--rounds", str(rounds)], cwd=code, env=side_env(code, database_url, ROOT, 0),
                                   capture_output=True, text=True, check=False)
            if child.returncode:
                raise RuntimeError(f"write path ({side}) failed:\n{child.stderr[-3000:]}")
            runs[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
    return {side: {name: {"ms": statistics.median(run[name]["ms"] for run in found),
                          "n": sum(run[name]["n"] for run in found)} for name in found[0]}
            for side, found in runs.items()}


@contextmanager
def apis(sides: dict[str, tuple[Path, str]]) -> Iterator[dict[str, str]]:
    """Both sides' APIs up at once, each on its own code and database; their URLs."""
    from bench.api_load import _stop
    from tests import services

    started: list[tuple[subprocess.Popen, Path]] = []
    urls = {}
    try:
        for side, (code, database_url) in sides.items():
            home = Path(tempfile.mkdtemp(prefix=f"qlora-scale-{side}-"))
            port = services.free_port()
            with open(home / "api.log", "ab") as api_log:
                api = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker"], cwd=code,
                                       env=side_env(code, database_url, home, port), stdout=api_log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            started.append((api, home))
            urls[side] = f"http://127.0.0.1:{port}"
            if not services.wait_until_up(urls[side] + "/health", api, timeout_s=120, need_ok=True):
                raise RuntimeError(f"the {side} API did not start:\n{(home / 'api.log').read_text()[-3000:]}")
        yield urls
    finally:
        for api, home in started:
            _stop(api)
            shutil.rmtree(home, ignore_errors=True)


def baseline_tree(ref: str) -> Path:
    """app/, worker/, migrations/ and alembic.ini as they are at `ref`, in a temporary directory."""
    where = Path(tempfile.mkdtemp(prefix="qlora-scale-baseline-"))
    archive = subprocess.run(["git", "archive", ref, "app", "worker", "migrations", "alembic.ini"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    return where


@contextmanager
def baseline_sharing_a_database(ref: str) -> Iterator[tuple[Path, str]]:
    """`ref`'s code (baseline_tree) and a new Postgres database that both sides use, migrated to their schema,
    which must be one (SystemExit otherwise); both removed after. For a bench whose sides read the same rows."""
    from app.db import engine_for
    from app.migrate import upgrade
    from tests import services

    services.ensure_postgres()
    database_url = services.create_postgres_database()
    baseline = baseline_tree(ref)
    try:
        if head_of(baseline) != head_of(ROOT):
            raise SystemExit(f"{ref} has schema {head_of(baseline)}, this checkout {head_of(ROOT)}: "
                             "the sides share one database here")
        upgrade(database_url)
        yield baseline, database_url
    finally:
        shutil.rmtree(baseline, ignore_errors=True)
        engine_for(database_url).dispose()
        services.drop_postgres_database(database_url)


def head_of(tree: Path) -> str:
    from alembic.script import ScriptDirectory

    from app.migrate import alembic_config

    config = alembic_config("sqlite://")
    config.set_main_option("script_location", str(tree / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head() or ""


def set_schema(database_url: str, revision: str) -> None:
    """Migrate the database up or down to `revision`, and bring Postgres' statistics up to date (as autovacuum would)."""
    from alembic import command

    from app.migrate import alembic_config

    with engine_for(database_url).connect() as conn:
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    if current != revision:
        (command.upgrade if revision == head_of(ROOT) else command.downgrade)(alembic_config(database_url), revision)
    with engine_for(database_url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    engine_for(database_url).dispose()


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="a database to seed (if it has no teams) and keep; default: a fresh one, dropped")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--baseline", default="main", help="the git ref measured against (default: main)")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="repetitions of each write")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--write-path-only", metavar="URL", help=argparse.SUPPRESS)  # the phase's child
    args = parser.parse_args(argv)
    if args.write_path_only:
        print(json.dumps(write_path(args.write_path_only, args.rounds)))
        return 0

    from bench.api_load import console, save_results
    from bench.scale_seed import seed
    from tests import services

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    services.ensure_postgres()
    fresh = args.database_url is None
    database_url = args.database_url or services.create_postgres_database()
    baseline = baseline_tree(args.baseline)
    baseline_url = None
    try:
        from app.migrate import upgrade
        upgrade(database_url)
        with engine_for(database_url).connect() as conn:
            seeded = conn.execute(text("SELECT count(*) FROM teams")).scalar_one() > 0
        if not seeded:
            log(f"seeding at scale {args.scale}")
            seed(database_url, args.scale, log)
        ctx = context(database_url)
        keys = make_keys(database_url)
        engine_for(database_url).dispose()  # a template takes no connections while it is copied
        log("copying the database for the baseline")
        baseline_url = services.create_postgres_database(template=database_url)
        for url, tree in ((baseline_url, baseline), (database_url, ROOT)):
            log(f"schema {head_of(tree)} on {url.rsplit('/', 1)[1]}")
            set_schema(url, head_of(tree))
        sides = {"before": (baseline, baseline_url), "after": (ROOT, database_url)}
        phases = measure_writes(sides, args.rounds, log)
        with apis(sides) as urls:
            for side, found in time_routes(urls, keys, ctx, args.requests, log).items():
                phases[side].update(found)
    finally:
        shutil.rmtree(baseline, ignore_errors=True)
        if baseline_url is not None:
            engine_for(baseline_url).dispose()
            services.drop_postgres_database(baseline_url)
        if fresh:
            engine_for(database_url).dispose()
            services.drop_postgres_database(database_url)
        else:
            drop_keys(database_url)

    # Both sides must answer every route alike, and every route 200: a failed read would time an error page.
    failed = [label for label, before in phases["before"].items() if "status" in before
              and not before["status"] == phases["after"][label]["status"] == 200]
    table = Table(title=f"At scale: {args.baseline} (before) against this checkout (after), median ms")
    for column in ("route / write", "before ms", "after ms", "before / after", "answer"):
        table.add_column(column, justify="left" if column == "route / write" else "right")
    rows = []
    for label, before in phases["before"].items():
        after = phases["after"].get(label)
        if after is None:
            continue
        ratio = before["ms"] / after["ms"] if after["ms"] else float("inf")
        answer = f"{after.get('status', '')} {after.get('bytes', '')}".strip()
        if before.get("status") != after.get("status"):
            answer += f" (before {before.get('status')})"
        table.add_row(label, f"{before['ms']:.1f}", f"{after['ms']:.1f}", f"{ratio:.2f}", answer)
        rows.append({"label": label, "before": before, "after": after, "ratio": ratio})
    console.print(table)
    if failed:
        console.print(f"[red]not answered 200 by both sides: {', '.join(failed)}[/red]")
    return save_results({"ok": not failed, "failed": failed, "baseline": args.baseline, "scale": args.scale,
                         "rows": rows}, args.out)


if __name__ == "__main__":
    sys.exit(main())
