"""GET /metrics with a short history and a long one: what a scrape costs as finished jobs pile up.

    .venv/bin/python bench/metrics_bench.py [--small 10] [--large 100000] [--points 10] [--scrapes 40]

Two deployments side by side, each started the way production starts one (api_load.deployment: a
fresh Postgres database, migrated; the API as its own process). Both hold the same active jobs
(queued, and running with a loss curve); one has --small finished jobs, the other --large, each
with --points points of its loss curve, finished over the past weeks. Postgres' statistics are
brought up to date after seeding, as autovacuum would.

Each API is scraped once first: a new process reads the finished jobs once (reported apart, as
"first scrape"). Then both are scraped --scrapes times, taking turns, so that both see the same
machine; /health is asked the same way as the baseline. The figure is the median scrape with the
long history over the median with the short one: 1.0 means the history costs a scrape nothing.
The run fails (exit 1) if a scrape fails or its counts differ from what was seeded.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: app/, worker/ and tests/ import from this checkout

import httpx  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from app.db import new_id, session_scope, utcnow  # noqa: E402
from app.jobs import states  # noqa: E402
from app.jobs.tables import Job, JobMetric  # noqa: E402
from app.teams import service as teams_service  # noqa: E402
from bench.api_load import analyze, console, deployment, percentile, save_results  # noqa: E402
from worker.training.spec import JobSpec  # noqa: E402
from worker.training.tiny import demo_spec  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "metrics_bench.json"
FINISHED_WEIGHTS = {states.SUCCEEDED: 70, states.FAILED: 18, states.CANCELLED: 12}
QUEUED, RUNNING = 20, 4  # the active jobs both deployments hold: the work a scrape has to do
BATCH = 5_000  # jobs per insert round: the seeding holds this many jobs' points in memory at most
MODEL_NAME = "tiny"


def seed_jobs(database_url: str, *, finished: int, points: int, queued: int = QUEUED, running: int = RUNNING,
              seed: int = 0) -> Counter[str]:
    """A team with `queued` queued jobs, `running` running ones (each with `points` points of its loss
    curve and its device readings) and `finished` finished ones (each with its curve too), as the
    service would have written them. Finished jobs ended over the past 30 days, at least two hours
    ago. Returns the jobs made per status, "ran:<status>" for the finished ones a worker ran, and
    "curve points"."""
    rng = random.Random(seed)
    spec = JobSpec.parse(demo_spec(MODEL_NAME)).model_dump(mode="json")  # what POST /jobs stores
    now = utcnow()
    made: Counter[str] = Counter()
    with session_scope(database_url) as session:
        team = teams_service.create_team(session, f"bench-{new_id()[:8]}")
        team_id = team.id
    plan = [states.QUEUED] * queued + [states.RUNNING] * running + rng.choices(
        list(FINISHED_WEIGHTS), weights=list(FINISHED_WEIGHTS.values()), k=finished)
    for start in range(0, len(plan), BATCH):
        jobs, curve = [], []
        for i, status in enumerate(plan[start:start + BATCH], start):
            job_id = new_id()
            row = {"id": job_id, "team_id": team_id, "name": f"bench-{i:06d}", "status": status, "spec": spec,
                   "base_model": MODEL_NAME, "queue": "gpu-default", "total_steps": points,
                   **_progress(status, now, points, rng)}
            jobs.append(row)
            made[status] += 1
            if row.get("started_at") is not None:  # a worker ran it: it has a loss curve
                if status in states.FINISHED:
                    made[f"ran:{status}"] += 1
                curve += [_point(job_id, step, rng) for step in range(1, row["step"] + 1)]
        made["curve points"] += len(curve)
        with session_scope(database_url) as session:
            session.execute(insert(Job), jobs)
            if curve:
                session.execute(insert(JobMetric), curve)
    analyze(database_url)
    return made


def _progress(status: str, now: datetime, points: int, rng: random.Random) -> dict:
    """The columns a worker would have filled in for a job in `status`."""
    if status == states.QUEUED:
        return {"created_at": now - timedelta(minutes=rng.randint(1, 60))}
    worker = f"gpu-host-{rng.randint(1, 99)}:gpu{rng.randint(0, 7)}"
    if status == states.RUNNING:
        started = now - timedelta(minutes=rng.randint(5, 600))
        return {"created_at": started, "attempt": 1, "worker": worker, "started_at": started, "heartbeat_at": now,
                "step": max(1, points // 2)}
    finished = now - timedelta(hours=2, seconds=rng.randint(0, 30 * 24 * 3600))
    if status == states.CANCELLED and rng.random() < 0.5:  # cancelled while it waited: it never ran
        return {"created_at": finished - timedelta(minutes=5), "finished_at": finished}
    started = finished - timedelta(seconds=rng.randint(60, 3 * 24 * 3600))
    return {"created_at": started, "attempt": 1, "worker": worker, "started_at": started, "finished_at": finished,
            "step": points}


def _point(job_id: str, step: int, rng: random.Random) -> dict:
    return {"job_id": job_id, "kind": "train", "step": step, "train_loss": 2.0 / step + rng.random() / 10,
            "learning_rate": 2e-4, "tokens_seen": step * 8192, "tokens_per_second": 9000.0,
            "peak_memory_bytes": 40 * 2**30 + rng.randint(0, 2**30), "gpu_utilization": 0.9}


def samples(text_body: str, name: str) -> dict[str, float]:
    """{labels: value} for one metric in Prometheus' text format."""
    out = {}
    for line in text_body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            out[labels[len(name):]] = float(value)
    return out


def checks(body: str, made: Counter[str]) -> dict[str, bool]:
    """The scrape says what was seeded: jobs per status, finished jobs that ran, running workers."""
    jobs = samples(body, "qlora_jobs")
    ran = samples(body, "qlora_job_duration_seconds_count")
    out = {f"qlora_jobs {status} = {made[status]:,}": jobs.get(f'{{status="{status}"}}') == made[status]
           for status in states.ALL}
    for status in states.FINISHED:
        if made[f"ran:{status}"]:
            out[f"durations {status} = {made[f'ran:{status}']:,}"] = \
                ran.get(f'{{status="{status}"}}') == made[f"ran:{status}"]
    out[f"{made[states.RUNNING]} workers' memory"] = len(samples(body, "qlora_worker_peak_memory_bytes")) == \
        made[states.RUNNING]
    return out


def timed_get(http: httpx.Client, path: str) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    response = http.get(path)
    return time.perf_counter() - t0, response


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "p50_ms": percentile(ordered, 50) * 1000,
            "p90_ms": percentile(ordered, 90) * 1000, "mean_ms": statistics.fmean(ordered) * 1000}


def run(small: int, large: int, points: int, scrapes: int) -> dict:
    load_before = os.getloadavg()[0]
    sizes = {"small": small, "large": large}
    results: dict[str, dict] = {}
    with deployment(max_upload_bytes=2**20) as d_small, deployment(max_upload_bytes=2**20) as d_large:
        deployments = {"small": d_small, "large": d_large}
        made, seed_s = {}, {}
        for name, d in deployments.items():
            t0 = time.perf_counter()
            made[name] = seed_jobs(d.database_url, finished=sizes[name], points=points)
            seed_s[name] = time.perf_counter() - t0
        clients = {name: httpx.Client(base_url=d.url, timeout=120) for name, d in deployments.items()}
        try:
            first = {name: timed_get(http, "/metrics") for name, http in clients.items()}
            scrape_s: dict[str, list[float]] = {name: [] for name in clients}
            health_s: dict[str, list[float]] = {name: [] for name in clients}
            last: dict[str, httpx.Response] = {}
            errors: Counter[str] = Counter()
            for _ in range(scrapes):
                for name, http in clients.items():  # taking turns: both sizes see the same machine
                    seconds, last[name] = timed_get(http, "/metrics")
                    scrape_s[name].append(seconds)
                    errors[name] += last[name].status_code != 200
                    seconds, response = timed_get(http, "/health")
                    health_s[name].append(seconds)
                    errors[name] += response.status_code != 200
        finally:
            for http in clients.values():
                http.close()
        for name in deployments:
            results[name] = {
                "finished_jobs": sizes[name], "metric_points": made[name]["curve points"],
                "seed_seconds": seed_s[name], "errors": errors[name],
                "first_scrape_ms": first[name][0] * 1000, "first_scrape_status": first[name][1].status_code,
                "metrics": summary(scrape_s[name]), "health": summary(health_s[name]),
                "checks": checks(last[name].text, made[name]) if name in last else {},
            }
    small_r, large_r = results["small"], results["large"]
    ok = all(r["errors"] == 0 and r["first_scrape_status"] == 200 and r["checks"] and all(r["checks"].values())
             for r in results.values())
    return {
        "benchmark": "metrics_bench",
        "config": {"small": small, "large": large, "points": points, "scrapes": scrapes, "queued": QUEUED,
                   "running": RUNNING, "database": "postgresql"},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
                    "python": sys.version.split()[0]},
        "sizes": results,
        # The figure: how much more a scrape costs with the long history. /health's ratio is the noise floor.
        "scrape_ratio_p50": large_r["metrics"]["p50_ms"] / small_r["metrics"]["p50_ms"],
        "health_ratio_p50": large_r["health"]["p50_ms"] / small_r["health"]["p50_ms"],
        "ok": ok,
    }


def print_report(r: dict) -> None:
    c = r["config"]
    table = Table(title=f"GET /metrics: {c['scrapes']} scrapes of each, taking turns; {c['queued']} queued and "
                        f"{c['running']} running jobs in both, {c['points']} loss-curve points per job")
    for col in ("finished jobs", "curve points", "first scrape ms", "p50 ms", "p90 ms", "/health p50 ms", "errors"):
        table.add_column(col, justify="right")
    for s in r["sizes"].values():
        table.add_row(f"{s['finished_jobs']:,}", f"{s['metric_points']:,}", f"{s['first_scrape_ms']:.1f}",
                      f"{s['metrics']['p50_ms']:.2f}", f"{s['metrics']['p90_ms']:.2f}", f"{s['health']['p50_ms']:.2f}",
                      str(s["errors"]))
    console.print(table)
    console.print(f"scrape p50, {c['large']:,} over {c['small']:,} finished jobs: {r['scrape_ratio_p50']:.2f}x "
                  f"(/health, the same two processes: {r['health_ratio_p50']:.2f}x)", style="bold")
    for s in r["sizes"].values():
        for check, passed in s["checks"].items():
            console.print(f"  {'✓' if passed else '✗'} {s['finished_jobs']:,} finished: {check}",
                          style="green" if passed else "red")
    m = r["machine"]
    console.print(f"load average {m['load_avg_1m_before']:.2f} → {m['load_avg_1m_after']:.2f} on {m['cpus']} CPUs",
                  style="dim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=10, help="finished jobs in the short history (default 10)")
    p.add_argument("--large", type=int, default=100_000, help="finished jobs in the long history (default 100,000)")
    p.add_argument("--points", type=int, default=10, help="loss-curve points per job (default 10)")
    p.add_argument("--scrapes", type=int, default=40, help="timed scrapes of each deployment (default 40)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args.small, args.large, args.points, args.scrapes)
    print_report(results)
    return save_results(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
