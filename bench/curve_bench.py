"""The first poll of `qlora jobs watch` on a long loss curve: a baseline checkout's API against this one's,
on the same database in the same run.

    .venv/bin/python bench/curve_bench.py [--points 510000] [--baseline main] [--repeats 2]

A fresh Postgres database holds one finished job of --points train points (one per step, an eval every
50 steps, the columns the worker fills; made in SQL on the server, as bench/scale_seed.py makes its
biggest curves). Both APIs serve it at once (bench/scale_bench.py's sides: `qlora serve --no-worker`, no
scheduler, no reaper; the baseline is `git archive` of --baseline's app/, worker/ and migrations/, which
must have this checkout's schema).

For each side, on its fresh API process first (its peak resident memory is the process's high-water mark,
read from /proc before and after), then --repeats more times taking turns:
- `GET /jobs/{id}/metrics`, no parameter: what a client that does not page asks first (the whole curve
  before; the first page after);
- PAGES_SAMPLED full pages from across the curve, read as bytes (no parse here): what a page costs the API to
  build and send, per point;
- `?points=2000`, the thinned view of the whole curve (this checkout only: main answers a page);
- the whole curve as this checkout's CLI reads it (ApiClient.job_curve: every page, following `next`;
  against the baseline, which answers everything at once, one request), and the slowest single
  request of it: how long one request holds an API process.

It prints a table (before / after: above 1 is cheaper now) and writes the JSON (--out). The sides share the
machine: take the ratios, not the absolute figures, and a ratio within 0.8-1.25 as noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402

from app.db import engine_for, new_id, session_scope  # noqa: E402
from app.jobs import states  # noqa: E402
from app.jobs.tables import Job  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "curve_bench.json"

_TRAIN = """
INSERT INTO job_metrics (job_id, kind, step, epoch, train_loss, learning_rate, grad_norm, tokens_seen,
                         tokens_per_second, peak_memory_bytes, gpu_utilization, created_at)
SELECT :job, 'train', s, s / CAST(:steps AS float), 2.0 * exp(-s / 300.0) + 0.3 + random() * 0.05, 2e-4, 1.0, s * 4096,
       3000.0, 8000000000, 0.9, now() + s * interval '2 seconds'
FROM generate_series(1, :steps) AS s
"""
_EVAL = """
INSERT INTO job_metrics (job_id, kind, step, eval_loss, created_at)
SELECT :job, 'eval', s, 2.0 * exp(-s / 300.0) + 0.4, now() + s * interval '2 seconds' + interval '1 second'
FROM generate_series(50, :steps, 50) AS s
"""


def seed(database_url: str, points: int) -> tuple[str, str]:
    """A team, its key and one succeeded job with a curve of `points` train points; (key, job id)."""
    from app.teams import service as teams_service
    from worker.training.spec import JobSpec
    from worker.training.tiny import demo_spec

    with session_scope(database_url) as session:
        team = teams_service.create_team(session, f"curve-{new_id()[:8]}")
        key = teams_service.create_key(session, team.name)[1]
        job_id = new_id()
        session.execute(insert(Job), [{
            "id": job_id, "team_id": team.id, "name": "long-curve", "status": states.SUCCEEDED,
            "spec": JobSpec.parse(demo_spec("tiny")).model_dump(mode="json"), "base_model": "tiny",
            "queue": "gpu-default", "total_steps": points, "step": points}])
        session.execute(text(_TRAIN), {"job": job_id, "steps": points})
        session.execute(text(_EVAL), {"job": job_id, "steps": points})
    with engine_for(database_url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE job_metrics"))
    return key, job_id


def peak_rss_bytes(url: str) -> int:
    """The high-water mark of resident memory of the API process listening at `url` (and its children)."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            process = psutil.Process(conn.pid)
            return max(_vm_hwm(p.pid) for p in [process, *process.children(recursive=True)])
    raise RuntimeError(f"no process listens on {url}")


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def first_page(url: str, key: str, job_id: str) -> dict:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        t0 = time.perf_counter()
        response = http.get(f"/jobs/{job_id}/metrics")
        seconds = time.perf_counter() - t0
    response.raise_for_status()
    body = response.json()
    return {"ms": seconds * 1000, "bytes": len(response.content), "points": len(body["train"]) + len(body["eval"])}


PAGES_SAMPLED = 10  # pages of 10,000 points, spread over the curve, each asked once a round


def pages(url: str, key: str, job_id: str, points: int) -> dict:
    """PAGES_SAMPLED full pages from across the curve, the bytes only (no parse on this side): what building
    and sending a page costs the API, median ms."""
    took: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        for n in range(PAGES_SAMPLED):
            after = n * (points - 10_000) // PAGES_SAMPLED
            t0 = time.perf_counter()
            response = http.get(f"/jobs/{job_id}/metrics", params={"after_step": after})
            took.append(time.perf_counter() - t0)
            response.raise_for_status()
    return {"ms": statistics.median(took) * 1000, "per_point_us": statistics.median(took) * 1e6 / 10_000}


def thinned_view(url: str, key: str, job_id: str, points: int = 2000) -> dict | None:
    """GET /jobs/{id}/metrics?points=N (None where the API has no thinned view: it answers a page)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        t0 = time.perf_counter()
        response = http.get(f"/jobs/{job_id}/metrics", params={"points": points})
        seconds = time.perf_counter() - t0
    response.raise_for_status()
    body = response.json()
    if "thinned" not in body:
        return None
    return {"ms": seconds * 1000, "bytes": len(response.content), "points": len(body["train"]) + len(body["eval"]),
            "bucket_steps": body["bucket_steps"]}


def whole_curve(url: str, key: str, job_id: str) -> dict:
    from app.cli.api_client import ApiClient

    with ApiClient(url, key) as api:
        took: list[float] = []
        one_page = api.job_metrics

        def timed_page(*args, **kwargs) -> dict:  # each request job_curve makes, timed
            start = time.perf_counter()
            try:
                return one_page(*args, **kwargs)
            finally:
                took.append(time.perf_counter() - start)

        api.job_metrics = timed_page  # type: ignore[method-assign]
        t0 = time.perf_counter()
        curve = api.job_curve(job_id)
        seconds = time.perf_counter() - t0
    return {"ms": seconds * 1000, "requests": len(took), "slowest_request_ms": max(took) * 1000,
            "points": len(curve["train"]) + len(curve["eval"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=510_000)
    parser.add_argument("--baseline", default="main", help="the git ref measured against (default: main)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from app.db import engine_for
    from bench.api_load import console, save_results
    from bench.scale_bench import apis, baseline_sharing_a_database

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with baseline_sharing_a_database(args.baseline) as (baseline, database_url):
        log(f"seeding a curve of {args.points:,} points")
        key, job_id = seed(database_url, args.points)
        engine_for(database_url).dispose()
        sides = {"before": (baseline, database_url), "after": (ROOT, database_url)}
        runs: dict[str, dict[str, list]] = {side: {"first": [], "whole": [], "pages": [], "thinned": []} for side in sides}
        memory: dict[str, dict] = {}
        with apis(sides) as urls:
            for side, url in urls.items():  # each fresh process's first poll, for its memory
                log(f"{side}: the first poll on a fresh API process")
                rss_before = peak_rss_bytes(url)
                runs[side]["first"].append(first_page(url, key, job_id))
                memory[side] = {"peak_rss_before": rss_before, "peak_rss_after_first_poll": peak_rss_bytes(url)}
            for turn in range(args.repeats):
                for side, url in urls.items():
                    log(f"{side}: round {turn + 1}/{args.repeats}")
                    runs[side]["first"].append(first_page(url, key, job_id))
                    runs[side]["pages"].append(pages(url, key, job_id, args.points))
                    runs[side]["thinned"].append(thinned_view(url, key, job_id))
                    runs[side]["whole"].append(whole_curve(url, key, job_id))
            for side, url in urls.items():
                memory[side]["peak_rss_at_end"] = peak_rss_bytes(url)

    def median(side: str, what: str, field: str) -> float | None:
        values = [run[field] for run in runs[side][what] if run is not None]
        return statistics.median(values) if values else None

    rows = [
        ("GET /jobs/{id}/metrics, no parameter: ms", median("before", "first", "ms"), median("after", "first", "ms")),
        ("  its bytes", median("before", "first", "bytes"), median("after", "first", "bytes")),
        ("  API peak RSS growth on a fresh process, MB", *((memory[s]["peak_rss_after_first_poll"]
                                                           - memory[s]["peak_rss_before"]) / 2**20 for s in sides)),
        ("the whole curve as the CLI reads it: ms", median("before", "whole", "ms"), median("after", "whole", "ms")),
        ("  requests", median("before", "whole", "requests"), median("after", "whole", "requests")),
        ("  slowest single request: ms", median("before", "whole", "slowest_request_ms"),
         median("after", "whole", "slowest_request_ms")),
        ("API peak RSS at the end, MB", *(memory[s]["peak_rss_at_end"] / 2**20 for s in sides)),
        (f"a full page of 10,000 points (median of {PAGES_SAMPLED} across the curve, unparsed): ms",
         median("before", "pages", "ms"), median("after", "pages", "ms")),
        ("  per point: us", median("before", "pages", "per_point_us"), median("after", "pages", "per_point_us")),
        ("GET /jobs/{id}/metrics?points=2000 (the whole curve's shape): ms", median("before", "thinned", "ms"),
         median("after", "thinned", "ms")),
        ("  its points", median("before", "thinned", "points"), median("after", "thinned", "points")),
        ("  its bytes", median("before", "thinned", "bytes"), median("after", "thinned", "bytes")),
    ]
    points = {side: [run["points"] for run in runs[side]["whole"]] for side in sides}
    ok = all(count == args.points + args.points // 50 for counts in points.values() for count in counts)
    table = Table(title=f"A curve of {args.points:,} train points: {args.baseline} (before) against this checkout (after)")
    for column in ("", "before", "after", "before / after"):
        table.add_column(column, justify="left" if not column else "right")
    for label, before, after in rows:  # None: that side has no such read (main has no thinned view)
        table.add_row(label, "-" if before is None else f"{before:,.1f}", "-" if after is None else f"{after:,.1f}",
                      f"{before / after:.2f}" if before is not None and after else "-")
    console.print(table)
    if not ok:
        console.print(f"[red]the whole curve read did not hold every point: {points}[/red]")
    return save_results({"ok": ok, "baseline": args.baseline, "points": args.points, "runs": runs, "memory": memory,
                         "rows": [{"label": label, "before": b, "after": a, "ratio": b / a if b is not None and a else None}
                                  for label, b, a in rows]}, args.out)


if __name__ == "__main__":
    sys.exit(main())
