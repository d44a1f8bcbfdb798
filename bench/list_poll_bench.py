"""Polling the job list while jobs run: what a 304 of GET /jobs?limit=100 saves against a 200, and how many
polls get one when the running jobs only send heartbeats, for a baseline checkout's API and this one's, on
real Postgres.

    .venv/bin/python bench/list_poll_bench.py [--jobs 100] [--clients 8] [--seconds 5] [--polls 100] [--baseline main]

A fresh Postgres database holds a team's --jobs jobs in mixed states (bench/api_load.py's seed: about a tenth
running). Both APIs serve it (bench/scale_bench.py's sides: `qlora serve --no-worker`, no scheduler, no
reaper), each measured while the other is idle. For each side:

- cost: --clients clients ask back to back for --seconds each (bench/api_load.py's lean client), first
  GET /health (no database: the baseline), then GET /jobs?limit=100 without an ETag (a 200 with the page),
  then the same sending back the ETag it has while nothing changes (a 304). Each is reported as its
  per-client rate against /health's, and the bytes of its answer.
- heartbeats: --polls polls of GET /jobs?limit=100 one after another, each sending back the ETag it has,
  each after every running job's heartbeat moved (one UPDATE, as the workers write each supervise
  interval) and nothing else: the share answered 304, the bytes received and the poller's CPU per poll
  (httpx, the page parsed when one comes, as the CLI's client does). Then as many after a heartbeat and a step each (a
  change a person sees): the share answered 200 with a new ETag, which must be all of them.

It prints a table and writes the JSON (--out). The sides share the machine with the clients and Postgres:
take the ratios and shares, not the absolute figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import update  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "list_poll_bench.json"
LIST = "/jobs?limit=100"


def move_running_jobs(database_url: str, *, step: bool) -> None:
    """What the workers write each supervise interval: every running job's heartbeat, and with `step` its step."""
    from app.db import session_scope, utcnow
    from app.jobs import states
    from app.jobs.tables import Job

    values = {"heartbeat_at": utcnow(), **({"step": Job.step + 1} if step else {})}
    with session_scope(database_url) as session:
        session.execute(update(Job).where(Job.status == states.RUNNING).values(**values))


def across_moves(url: str, key: str, database_url: str, polls: int, *, step: bool) -> dict:
    """`polls` polls of the list, each after the running jobs moved, each sending back the ETag it has, as the CLI's
    client does (httpx, the page parsed when one comes): the share answered 304, and per poll the bytes received
    and the poller's own CPU (the request, and the parse of a page)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        etag = http.get(LIST).headers["etag"]
        not_modified = received = 0
        client_cpu_s = 0.0
        for _ in range(polls):
            move_running_jobs(database_url, step=step)
            before = time.process_time()
            answer = http.get(LIST, headers={"If-None-Match": etag})
            if answer.status_code == 200:
                answer.json()
            client_cpu_s += time.process_time() - before
            assert answer.status_code in (200, 304), answer.text[:300]
            not_modified += answer.status_code == 304
            received += len(answer.content)
            etag = answer.headers["etag"]
    return {"polls": polls, "not_modified": not_modified, "not_modified_share": not_modified / polls,
            "bytes_per_poll": received / polls, "client_cpu_ms_per_poll": client_cpu_s * 1000 / polls}


def cost(url: str, key: str, clients: int, seconds: float) -> dict:
    """Per-client rates of /health, a 200 and a 304 of the list (closed loops), and the list's bytes."""
    from bench.api_load import endpoint_stats, run_raw_clients

    auth = {"Authorization": f"Bearer {key}"}
    phases = {"health": ({}, "/health", False), "list_200": (auth, LIST, False), "list_304": (auth, LIST, True)}
    out = {}
    for phase, (headers, path, conditional) in phases.items():
        samples, wall_s = run_raw_clients(url, headers, clients, seconds, lambda rng, asked=(phase, path): asked,
                                          conditional=conditional)
        stats = endpoint_stats(samples[phase], wall_s)
        if stats["errors"]:
            raise RuntimeError(f"{phase}: {stats['errors']} errors, first: {stats['first_error']}")
        out[phase] = stats
    for stats in out.values():
        stats["ratio_to_health"] = stats["req_per_s_per_client"] / out["health"]["req_per_s_per_client"]
    out["list_bytes"] = len(httpx.get(url + LIST, headers=auth).content)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100, help="the team's jobs (default 100)")
    parser.add_argument("--clients", type=int, default=8, help="clients of the cost phases (default 8)")
    parser.add_argument("--seconds", type=float, default=5, help="length of each cost phase (default 5)")
    parser.add_argument("--polls", type=int, default=100, help="polls across heartbeats, and across steps (default 100)")
    parser.add_argument("--baseline", default="main", help="the git ref measured against (default: main)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from app.db import engine_for
    from bench.api_load import console, save_results, seed
    from bench.scale_bench import apis, baseline_sharing_a_database

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results: dict[str, dict] = {}
    with baseline_sharing_a_database(args.baseline) as (baseline, database_url):
        home = Path(tempfile.mkdtemp(prefix="qlora-list-poll-"))
        try:
            log(f"seeding {args.jobs} jobs")
            key, _ = seed(SimpleNamespace(database_url=database_url, home=home), args.jobs)
            engine_for(database_url).dispose()
            sides = {"before": (baseline, database_url), "after": (ROOT, database_url)}
            with apis(sides) as urls:
                for side, url in urls.items():
                    log(f"{side}: cost of a 200 and a 304, then polls across heartbeats and steps")
                    results[side] = {"cost": cost(url, key, args.clients, args.seconds),
                                     "heartbeats": across_moves(url, key, database_url, args.polls, step=False),
                                     "steps": across_moves(url, key, database_url, args.polls, step=True)}
        finally:
            engine_for(database_url).dispose()
            shutil.rmtree(home, ignore_errors=True)

    table = Table(title=f"GET {LIST} with {args.jobs} jobs (about a tenth running): {args.baseline} (before) against "
                        "this checkout (after)")
    for column in ("", "before", "after"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("bytes of a 200", *(f"{r['cost']['list_bytes']:,}" for r in results.values()))
    for phase, label in (("list_200", "a 200 (no ETag sent)"), ("list_304", "a 304 (its ETag sent)")):
        table.add_row(f"{label}: rate × /health", *(f"{r['cost'][phase]['ratio_to_health']:.2f}" for r in results.values()))
        table.add_row("  p50 ms", *(f"{r['cost'][phase]['p50_ms']:.1f}" for r in results.values()))
    table.add_row("a 304 against a 200: rate ×", *(
        f"{r['cost']['list_304']['req_per_s_per_client'] / r['cost']['list_200']['req_per_s_per_client']:.2f}"
        for r in results.values()))
    table.add_row("polls across a heartbeat answered 304", *(
        f"{r['heartbeats']['not_modified_share']:.0%}" for r in results.values()))
    table.add_row("  bytes received per poll", *(f"{r['heartbeats']['bytes_per_poll']:,.0f}" for r in results.values()))
    table.add_row("  poller's CPU per poll: ms", *(
        f"{r['heartbeats']['client_cpu_ms_per_poll']:.2f}" for r in results.values()))
    table.add_row("polls across a step answered 200", *(
        f"{1 - r['steps']['not_modified_share']:.0%}" for r in results.values()))
    console.print(table)
    ok = results["after"]["heartbeats"]["not_modified_share"] == 1 and all(
        r["steps"]["not_modified"] == 0 for r in results.values())
    return save_results({"ok": ok, "baseline": args.baseline, "jobs": args.jobs, "clients": args.clients,
                         "seconds": args.seconds, "sides": results}, args.out)


if __name__ == "__main__":
    sys.exit(main())
