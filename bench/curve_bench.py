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

    .venv/bin/python bench/curve_bench.py --watchers 8 [--seconds 40] [--append-per-s 10] [--baseline main]

--watchers N: people watching one long running job instead. N clients poll the thinned view of the job
(`?points=4000` as the dashboard asks, `?points=2000` as `qlora jobs watch` starts, in turn), each once every
--interval-s (back to back when an answer takes longer), for --seconds, while the job appends --append-per-s
train points a second (an eval every 50 steps), as its worker would. The sides take turns, each alone with its
own fresh API process (the first poll included); what Postgres spent is read from its own counters for the
bench's database (pg_stat_database: active_time, the time its backends spent running statements, and rows
read), after each side's process has gone and with it its backends, whose exit flushes their counters. The
appender's inserts are in both sides' figures. At the end of each turn the appending stops and each side's
answer for both N is kept: the after side's (its buckets kept across the turn) must be the baseline's bytes.

    .venv/bin/python bench/curve_bench.py --streams 3 --points 50000 [--baseline main]

--streams N: a job page opened on the finished job, N times a side, the sides taking turns: the live stream
(`GET /jobs/{id}/stream`, no parameter, as the dashboard opens a job of up to 4,000 steps and as a script
following a job from its start does) read to its end, which for a finished job comes after its whole history.
Per stream: the wall time, the API process's CPU time (from /proc, which the machine's other work does not
move), and the metric messages; both sides' messages must hold the same points (the JSON values).

    .venv/bin/python bench/curve_bench.py --polls 6 --points 50000 [--baseline main] [--repeats 2]

--polls S: `qlora jobs watch`'s curve poll, the points past the last step it holds (`?after_step=` five steps
before the curve's end), asked back to back by 4 clients (bench/api_load.py's raw client) for S seconds a side, the
sides taking turns --repeats times: the API process's CPU per poll, from /proc.

    .venv/bin/python bench/curve_bench.py --buckets 20000,100000 [--repeats 2]

--buckets: the thinned view's bucket query alone (repository.metric_buckets, one series cut into 250 buckets)
against the join it replaced (joined_buckets), in the same process on the same fresh database, for each length:
first with the table never analyzed since its points were written (a running job's usual case), then after
ANALYZE. The answers must be equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import insert, select, text  # noqa: E402

from app.db import engine_for, new_id, session_scope  # noqa: E402
from app.jobs import states  # noqa: E402
from app.jobs.tables import Job  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "curve_bench.json"

_TRAIN = """
INSERT INTO job_metrics (job_id, kind, step, epoch, train_loss, learning_rate, grad_norm, tokens_seen,
                         tokens_per_second, peak_memory_bytes, gpu_utilization, created_at)
SELECT :job, 'train', s, s / CAST(:steps AS float), 2.0 * exp(-s / 300.0) + 0.3 + random() * 0.05, 2e-4, 1.0, s * 4096,
       3000.0, 8000000000, 0.9, now() + s * interval '2 seconds'
FROM generate_series(CAST(:start AS integer), CAST(:steps AS integer)) AS s
"""
_EVAL = """
INSERT INTO job_metrics (job_id, kind, step, eval_loss, created_at)
SELECT :job, 'eval', s, 2.0 * exp(-s / 300.0) + 0.4, now() + s * interval '2 seconds' + interval '1 second'
FROM generate_series(CAST(:start AS integer), CAST(:steps AS integer)) AS s WHERE s % 50 = 0
"""


def seed(database_url: str, points: int, analyze: bool = True) -> tuple[str, str]:
    """A team, its key and one succeeded job with a curve of `points` train points; (key, job id). `analyze`
    false: the table's statistics left as they were before the points (--buckets)."""
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
        session.execute(text(_TRAIN), {"job": job_id, "start": 1, "steps": points})
        session.execute(text(_EVAL), {"job": job_id, "start": 1, "steps": points})
    if analyze:
        with engine_for(database_url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE job_metrics"))
    return key, job_id


def peak_rss_bytes(url: str) -> int:
    """The high-water mark of resident memory of the API process listening at `url` (and its children)."""
    import psutil

    process = psutil.Process(api_pid(url))
    return max(_vm_hwm(p.pid) for p in [process, *process.children(recursive=True)])


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


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def seeded_sides(args: argparse.Namespace) -> Iterator[tuple[str, str, str, dict[str, tuple[Path, str]]]]:
    """A finished job's curve of args.points seeded in a database that args.baseline's checkout and this one share:
    (the team's key, the job, the database, each side's (checkout, database) as scale_bench.apis takes them)."""
    from bench.scale_bench import baseline_sharing_a_database

    with baseline_sharing_a_database(args.baseline) as (baseline, database_url):
        log(f"seeding a curve of {args.points:,} points")
        key, job_id = seed(database_url, args.points)
        engine_for(database_url).dispose()
        yield key, job_id, database_url, {"before": (baseline, database_url), "after": (ROOT, database_url)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=510_000)
    parser.add_argument("--baseline", default="main", help="the git ref measured against (default: main)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--watchers", type=int, default=0, help="N clients polling the thinned view of a running job")
    parser.add_argument("--seconds", type=float, default=40, help="--watchers: length of each side's turn")
    parser.add_argument("--interval-s", type=float, default=1.0, help="--watchers: each client's poll interval")
    parser.add_argument("--append-per-s", type=float, default=10, help="--watchers: train points the job logs a second")
    parser.add_argument("--streams", type=int, default=0, help="N job pages opened on the job a side: its stream read "
                                                            "whole, the API's CPU per stream")
    parser.add_argument("--polls", type=float, default=0, help="S seconds a side of a watch's curve poll, back to back: "
                                                             "the API's CPU per poll")
    parser.add_argument("--buckets", default="", help="curve lengths (20000,100000): the thinned view's bucket query, "
                                                      "this checkout's against the join it replaced, stale statistics")
    args = parser.parse_args(argv)
    if args.watchers:
        return watched(args)
    if args.buckets:
        return buckets(args)
    if args.streams or args.polls:
        return streamed(args)
    args.out = args.out or DEFAULT_OUT

    from bench.api_load import console, save_results
    from bench.scale_bench import apis

    with seeded_sides(args) as (key, job_id, database_url, sides):
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



# ---------------------------------------------------------------- --streams: a job page opened, its stream read whole

STREAMS_OUT = ROOT / "bench" / "results" / "curve_stream_bench.json"


def api_pid(url: str) -> int:
    """The process listening at `url` (the side's `qlora serve`)."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise RuntimeError(f"no process listens on {url}")


def whole_stream(url: str, key: str, job_id: str) -> dict:
    """The job's stream read to its end (a finished job's ends after its history and its state): wall ms, the API
    process's CPU ms meanwhile, and the metric messages' data (parsed: the sides may write them differently)."""
    from bench.api_load import cpu_seconds
    from tests.service.test_bounded_resources import sse_events

    pid = api_pid(url)
    points: list = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        with http.stream("GET", f"/jobs/{job_id}/stream") as response:
            response.raise_for_status()
            points = [json.loads(data) for name, data in sse_events(response) if name == "metric"]
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {"ms": seconds * 1000, "api_cpu_ms": cpu * 1000, "points": len(points),
            "api_cpu_us_per_point": cpu * 1e6 / max(len(points), 1), "digest": hash(json.dumps(points))}


def streamed(args: argparse.Namespace) -> int:
    from bench.api_load import console, save_results
    from bench.scale_bench import apis

    with seeded_sides(args) as (key, job_id, database_url, sides):
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        polls: dict[str, list[dict]] = {side: [] for side in sides}
        with apis(sides) as urls:
            for url in urls.values():  # warm each process (imports, the pool) on a few points
                with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
                    http.get(f"/jobs/{job_id}/metrics", params={"limit": 10}).raise_for_status()
            for turn in range(args.streams):
                for side, url in urls.items():
                    runs[side].append(whole_stream(url, key, job_id))
                    log(f"{side}: stream {turn + 1}/{args.streams}: {runs[side][-1]['ms']:,.0f} ms, "
                        f"API CPU {runs[side][-1]['api_cpu_ms']:,.0f} ms")
            for turn in range(args.repeats if args.polls else 0):
                for side, url in urls.items():
                    polls[side].append(watch_polls(url, key, job_id, args.points, args.polls))
                    log(f"{side}: polls {turn + 1}/{args.repeats}: API CPU {polls[side][-1]['api_cpu_ms']:.2f} ms a poll")

    def median(side: str, field: str, of: dict[str, list[dict]] = runs) -> float:
        return statistics.median(run[field] for run in of[side])

    rows = [("the whole stream read: ms", median("before", "ms"), median("after", "ms")),
            ("  the API's CPU: ms", median("before", "api_cpu_ms"), median("after", "api_cpu_ms")),
            ("  the API's CPU per point: us", median("before", "api_cpu_us_per_point"), median("after", "api_cpu_us_per_point")),
            ("  metric messages", median("before", "points"), median("after", "points"))] if args.streams else []
    if args.polls:
        rows += [("a watch's curve poll (?after_step=): the API's CPU per poll, ms", median("before", "api_cpu_ms", polls),
                  median("after", "api_cpu_ms", polls))]
    ok = len({run["digest"] for side in runs for run in runs[side]}) <= 1 and \
        all(run["points"] == args.points + args.points // 50 for side in runs for run in runs[side]) and \
        all(run["errors"] == 0 and run["polls"] > 0 for side in polls for run in polls[side])
    table = Table(title=f"A finished job of {args.points:,} train points: its stream read whole ({args.streams} a side), "
                        f"a watch's curve poll ({args.polls:g} s a side): {args.baseline} (before) against this checkout (after)")
    for column in ("", "before", "after", "before / after"):
        table.add_column(column, justify="left" if not column else "right")
    for label, before, after in rows:
        table.add_row(label, f"{before:,.1f}", f"{after:,.1f}", f"{before / after:.2f}")
    console.print(table)
    if not ok:
        console.print("[red]the sides' streams did not hold the same points, every one of the curve[/red]")
    return save_results({"ok": ok, "baseline": args.baseline, "points": args.points, "runs": runs, "polls": polls,
                         "rows": [{"label": label, "before": b, "after": a, "ratio": b / a} for label, b, a in rows]},
                        args.out or STREAMS_OUT)


def watch_polls(url: str, key: str, job_id: str, points: int, seconds: float) -> dict:
    """`qlora jobs watch`'s curve poll past the last step it holds (five before the curve's end: five points a
    poll, as a job logging every step polled each second), back to back from 4 raw clients for `seconds`: the API
    process's CPU per poll (from /proc) and the polls answered a second."""
    from bench.api_load import cpu_seconds, run_raw_clients

    path = f"/jobs/{job_id}/metrics?after_step={points - 5}&after_eval_step={points - points % 50}"
    pid = api_pid(url)
    cpu0 = cpu_seconds(pid)
    samples, wall_s = run_raw_clients(url, {"Authorization": f"Bearer {key}"}, 4, seconds, lambda _rng: ("poll", path))
    cpu = cpu_seconds(pid) - cpu0
    done = samples["poll"]
    answered = len(done.latencies_s)
    return {"polls": answered, "errors": done.errors, "per_s": answered / wall_s,
            "api_cpu_ms": cpu * 1000 / max(answered, 1)}


# ---------------------------------------------------------------- --watchers: one long running job, watched

WATCHED_OUT = ROOT / "bench" / "results" / "curve_watch_bench.json"
VIEWS = (4000, 2000)  # the dashboard's ?points=, then the terminal's (qlora jobs watch): the watchers take turns


def database_counters(database_url: str) -> dict[str, float]:
    """What Postgres has counted for this database so far: ms its backends spent running statements, rows read
    (by scans and index fetches), transactions. A backend adds its share when idle (at most once a second)
    and when it exits: read it once the backends measured have gone (no_backends_left)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT active_time, tup_returned + tup_fetched, xact_commit + xact_rollback "
                                    "FROM pg_stat_database WHERE datname = current_database()")).one()
    finally:
        engine.dispose()
    return {"active_ms": float(row[0]), "rows_read": float(row[1]), "transactions": float(row[2])}


def no_backends_left(database_url: str, timeout_s: float = 60) -> None:
    """Wait until no other backend is connected to the bench's database (an API process that stopped: its
    backends' exit flushed their counters)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(database_url, poolclass=NullPool)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with engine.connect() as conn:
                others = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND pid <> pg_backend_pid()")).scalar_one()
            if not others:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{others} backends still connected to the bench's database after {timeout_s} s")
            time.sleep(0.2)
    finally:
        engine.dispose()


class Appender:
    """The job's worker: --append-per-s train points a second (an eval every 50 steps), one commit a tick, on a
    connection of its own, from step `after` + 1."""

    TICK_S = 0.5

    def __init__(self, database_url: str, job_id: str, after: int, per_s: float):
        import threading

        self.database_url, self.job_id, self.step, self.per_s = database_url, job_id, after, per_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Appender:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        engine = create_engine(self.database_url, poolclass=NullPool)
        owed = 0.0
        try:
            with engine.connect() as conn:
                while not self._stop.wait(self.TICK_S):
                    owed += self.per_s * self.TICK_S
                    steps = range(self.step + 1, self.step + 1 + int(owed))
                    owed -= len(steps)
                    if not steps:
                        continue
                    for insert_points in (_TRAIN, _EVAL):
                        conn.execute(text(insert_points), {"job": self.job_id, "start": steps[0], "steps": steps[-1]})
                    conn.commit()
                    self.step = steps[-1]
        finally:
            engine.dispose()


def watch_turn(url: str, key: str, job_id: str, watchers: int, seconds: float, interval_s: float) -> dict:
    """`watchers` clients polling the thinned view for `seconds`; each request's ms, status and bucket width."""
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + seconds

    def watcher(n: int) -> list[dict]:
        points = VIEWS[n % len(VIEWS)]
        seen = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
            while (start := time.monotonic()) < deadline:
                response = http.get(f"/jobs/{job_id}/metrics", params={"points": points})
                took = time.monotonic() - start
                width = response.json().get("bucket_steps") if response.status_code == 200 else None
                seen.append({"ms": took * 1000, "status": response.status_code, "points": points, "width": width})
                if took < interval_s:
                    time.sleep(interval_s - took)  # a watcher's pace, not a wait for something
        return seen

    with ThreadPoolExecutor(watchers) as pool:
        return {"requests": [r for found in pool.map(watcher, range(watchers)) for r in found]}


def watched(args: argparse.Namespace) -> int:
    from bench.api_load import console, save_results
    from bench.scale_bench import apis

    turns: dict[str, list[dict]] = {"before": [], "after": []}
    with seeded_sides(args) as (key, job_id, database_url, sides):
        last = args.points
        for turn in range(args.repeats):
            for side in sides:
                log(f"{side}: {args.watchers} watchers for {args.seconds:g} s ({turn + 1}/{args.repeats})")
                no_backends_left(database_url)
                counted = database_counters(database_url)
                with apis({side: sides[side]}) as urls:
                    with Appender(database_url, job_id, last, args.append_per_s) as appender:
                        found = watch_turn(urls[side], key, job_id, args.watchers, args.seconds, args.interval_s)
                    last = appender.step
                    with httpx.Client(base_url=urls[side], headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
                        final = {points: http.get(f"/jobs/{job_id}/metrics", params={"points": points}).content
                                 for points in VIEWS}
                no_backends_left(database_url)
                spent = {name: value - counted[name] for name, value in database_counters(database_url).items()}
                turns[side].append({**found, "postgres": spent, "final": final, "appended_to": last})
            # Each side's answer at the end of its turn, against the other side's for the same curve: the curve
            # moved on between turns, so the side that went first is asked again now, on a fresh process.
            with apis({"before": sides["before"]}) as urls, \
                    httpx.Client(base_url=urls["before"], headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
                baseline_now = {points: http.get(f"/jobs/{job_id}/metrics", params={"points": points}).content
                                for points in VIEWS}
            turns["after"][-1]["same_bytes"] = baseline_now == turns["after"][-1]["final"]
            turns["after"][-1]["final_bytes"] = {points: len(body) for points, body in baseline_now.items()}

    def per_request(side: str, what: str) -> float:
        spent = sum(t["postgres"][what] for t in turns[side])
        return spent / max(1, sum(len(t["requests"]) for t in turns[side]))

    def latency(side: str, q: float) -> float:
        took = sorted(r["ms"] for t in turns[side] for r in t["requests"])
        return took[min(len(took) - 1, int(q * len(took)))] if took else 0.0

    def count(side: str) -> float:
        return float(sum(len(t["requests"]) for t in turns[side]))

    def widths(side: str) -> float:
        return float(len({(r["points"], r["width"]) for t in turns[side] for r in t["requests"]}))

    def failed(side: str) -> float:
        return float(sum(r["status"] != 200 for t in turns[side] for r in t["requests"]))

    rows = [
        ("polls answered (all turns)", count("before"), count("after")),
        ("  not 200", failed("before"), failed("after")),
        ("Postgres time per poll: ms (pg_stat_database active_time)", per_request("before", "active_ms"),
         per_request("after", "active_ms")),
        ("Postgres rows read per poll", per_request("before", "rows_read"), per_request("after", "rows_read")),
        ("Postgres time a second of the turn: ms", *(sum(t["postgres"]["active_ms"] for t in turns[s])
                                                     / (args.seconds * args.repeats) for s in ("before", "after"))),
        ("a poll's latency, median: ms", latency("before", 0.5), latency("after", 0.5)),
        ("  p95: ms", latency("before", 0.95), latency("after", 0.95)),
        ("(points, bucket width) pairs seen", widths("before"), widths("after")),
    ]
    for side in turns:
        for t in turns[side]:
            t.pop("final", None)
    ok = all(t.get("same_bytes") for t in turns["after"]) and not failed("after")
    table = Table(title=f"{args.watchers} watchers of a running job of {args.points:,} points (+{args.append_per_s:g} "
                        f"a second), {args.seconds:g} s a turn: {args.baseline} (before) against this checkout (after)")
    for column in ("", "before", "after", "before / after"):
        table.add_column(column, justify="left" if not column else "right")
    for label, before, after in rows:
        table.add_row(label, f"{before:,.1f}", f"{after:,.1f}", f"{before / after:.2f}" if after else "-")
    console.print(table)
    if not ok:
        console.print("[red]the after side's last answers were not the baseline's bytes, or a poll failed[/red]")
    return save_results({"ok": ok, "baseline": args.baseline, "points": args.points, "watchers": args.watchers,
                         "seconds": args.seconds, "interval_s": args.interval_s, "append_per_s": args.append_per_s,
                         "turns": turns, "rows": [{"label": label, "before": b, "after": a, "ratio": b / a if a else None}
                                                  for label, b, a in rows]}, args.out or WATCHED_OUT)


# ---------------------------------------------------------------- --buckets: the bucket query, stale statistics

BUCKETS_OUT = ROOT / "bench" / "results" / "curve_buckets_bench.json"


def joined_buckets(session, team_id: str, job_id: str, kind: str, loss_column: str, first: int, width: int,
                   through: int, from_step: int | None = None) -> list[tuple]:
    """repository.metric_buckets as it was, each point joined to its bucket's totals on `(step - first) / width =
    bucket`: the baseline of --buckets, and the reference its answers must equal (tests/service/test_curve_plans.py).
    With statistics older than the points, Postgres estimated one row and looped over every bucket for each point."""
    import sqlalchemy as sa
    from sqlalchemy import func

    from app.jobs.tables import JobMetric

    loss = getattr(JobMetric, loss_column)
    readable = JobMetric.job_id.in_(select(Job.id).where(Job.team_id == team_id, Job.id == job_id))
    in_series = [readable, JobMetric.kind == kind, JobMetric.step <= through]
    if from_step is not None:
        in_series.append(JobMetric.step >= from_step)
    bucket_of = (JobMetric.step - first) // width
    per_bucket = (select(bucket_of.label("bucket"), func.min(JobMetric.step).label("head"),
                         func.max(JobMetric.step).label("tail"), func.min(loss).label("low"),
                         func.max(loss).label("high"), func.count().label("points"))
                  .where(*in_series).group_by(bucket_of).subquery())
    query = (select(per_bucket.c.head, per_bucket.c.tail,
                    func.min(sa.case((loss == per_bucket.c.low, JobMetric.step))),
                    func.min(sa.case((loss == per_bucket.c.high, JobMetric.step))),
                    per_bucket.c.points, func.min(sa.case((JobMetric.step == per_bucket.c.tail, JobMetric.id))))
             .join_from(JobMetric, per_bucket, bucket_of == per_bucket.c.bucket).where(*in_series)
             .group_by(per_bucket.c.bucket, per_bucket.c.head, per_bucket.c.tail, per_bucket.c.points)
             .order_by(per_bucket.c.bucket))
    return [tuple(row) for row in session.execute(query)]


def buckets(args: argparse.Namespace) -> int:
    """For each length: a fresh database (autovacuum off for job_metrics, never analyzed: a running job's points
    past the last analyze), one job's curve, and the train series' 250 buckets (?points=2000 of the whole curve)
    read --repeats times by each side in turn; then the same after ANALYZE. ok: the answers are equal."""
    from app.db import engine_for
    from app.jobs import repository
    from app.migrate import upgrade
    from bench.api_load import console, save_results
    from tests import services

    services.ensure_postgres()
    results: dict[str, dict] = {}
    ok = True
    for points in (int(n) for n in args.buckets.split(",")):
        url = services.create_postgres_database()
        try:
            upgrade(url)
            with session_scope(url) as session:
                session.execute(text("ALTER TABLE job_metrics SET (autovacuum_enabled = false)"))
            _, job_id = seed(url, points, analyze=False)
            with session_scope(url) as session:
                team_id = session.scalar(select(Job.team_id).where(Job.id == job_id))
            width = (points - 1) // 250 + 1
            sides = {"before": joined_buckets, "after": repository.metric_buckets}
            for stats in ("stale", "analyzed"):
                if stats == "analyzed":
                    with engine_for(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                        conn.execute(text("ANALYZE job_metrics"))
                ms: dict[str, list[float]] = {side: [] for side in sides}
                answers = {}
                for _ in range(args.repeats):
                    for side, read in sides.items():
                        with session_scope(url) as session:
                            start = time.perf_counter()
                            answers[side] = read(session, team_id, job_id, "train", "train_loss", 1, width, points)
                            ms[side].append((time.perf_counter() - start) * 1000)
                ok = ok and answers["before"] == answers["after"] and len(answers["after"]) == (points - 1) // width + 1
                results[f"{points} {stats}"] = {side: statistics.median(values) for side, values in ms.items()}
                print(f"{points:,} points, {stats}: {results[f'{points} {stats}']}", file=sys.stderr, flush=True)
        finally:
            engine_for(url).dispose()
            services.drop_postgres_database(url)
    table = Table(title="The thinned view's buckets of one series (250 buckets): the join it replaced (before) "
                        "against this checkout (after), ms")
    for column in ("", "before", "after", "before / after"):
        table.add_column(column, justify="left" if not column else "right")
    for label, row in results.items():
        table.add_row(f"{label} statistics", f"{row['before']:,.1f}", f"{row['after']:,.1f}",
                      f"{row['before'] / row['after']:.2f}")
    console.print(table)
    return save_results({"ok": ok, "repeats": args.repeats, "results": results,
                         "rows": [{"label": label, **row, "ratio": row["before"] / row["after"]}
                                  for label, row in results.items()]}, args.out or BUCKETS_OUT)


if __name__ == "__main__":
    sys.exit(main())
