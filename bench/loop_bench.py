"""What big curve pages cost everyone else of an API process: a cheap request's latency while K clients pull
full 10,000-point pages of a long curve, against the same request with no page pullers, in the same run, for a
baseline checkout's API and this one's, on real Postgres.

    .venv/bin/python bench/loop_bench.py [--points 100000] [--pullers 4] [--probes 60] [--baseline main]

A fresh Postgres database holds one finished job of --points train points (bench/curve_bench.py's seed) and,
of another team, a job of a few points. Both APIs serve it (bench/scale_bench.py's sides: `qlora serve
--no-worker`, no scheduler, no reaper); each is measured while the other is idle, taking turns --repeats times.

For each side and round, two phases:
- quiet: --probes cheap requests one after another, each waiting PROBE_GAP_S after the last answer:
  GET /jobs/{id} of the other team's job (a poll: the async driver) and GET /health (no database),
  alternately;
- loaded: --pullers clients pull full pages (`GET /jobs/{id}/metrics?after_step=...`, 10,000 points, read
  as bytes) from across the long curve in a loop, from a process of their own (their work must not slow
  this process's probes); once each has had a page, the same probes.

The figure is each probe's latency loaded over quiet (median and p95), per side: how long a request of
someone else waits behind the pages. It prints a table and writes the JSON (--out). The sides share the
machine with the pullers and Postgres: take the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.table import Table  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "loop_bench.json"
PAGE = 10_000  # points of a full page: the API's default and most (app.jobs.service.MAX_POINTS)
PROBE_GAP_S = 0.02  # between one probe's answer and the next: a poller, not a flood
PROBES = {"job": "GET /jobs/{id} (another team's)", "health": "GET /health"}
START_TIMEOUT_S = 120  # for every puller to have had its first page


def pull_pages(url: str, key: str, job_id: str, points: int, index: int, stop, pages) -> None:
    """One puller, in the pullers' process: full pages from across the curve until `stop` is set."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        n = index
        while not stop.is_set():
            after = (n * 7919 * PAGE) % max(points - PAGE, 1)  # a walk over the curve, not one cached page
            response = http.get(f"/jobs/{job_id}/metrics", params={"after_step": after})
            response.raise_for_status()
            with pages.get_lock():
                pages.value += 1
            n += 1


def _pullers_process(url: str, key: str, job_id: str, points: int, pullers: int, stop, pages) -> None:
    import threading

    threads = [threading.Thread(target=pull_pages, args=(url, key, job_id, points, i, stop, pages), daemon=True)
               for i in range(pullers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def probe(url: str, paths: dict[str, str], keys: dict[str, str], count: int) -> dict[str, list[float]]:
    """`count` cheap requests, the kinds in turn, one at a time: each one's latency in ms."""
    took: dict[str, list[float]] = {kind: [] for kind in paths}
    with httpx.Client(base_url=url, timeout=600) as http:
        for n in range(count):
            kind = list(paths)[n % len(paths)]
            t0 = time.perf_counter()
            response = http.get(paths[kind], headers={"Authorization": f"Bearer {keys[kind]}"})
            took[kind].append((time.perf_counter() - t0) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"{paths[kind]} answered {response.status_code}: {response.text[:300]}")
            time.sleep(PROBE_GAP_S)
    return took


def loaded(url: str, curve: tuple[str, str], points: int, pullers: int, probes) -> tuple[dict[str, list[float]], dict]:
    """The probes while `pullers` clients pull full pages: their latencies, and the pages pulled meanwhile."""
    context = multiprocessing.get_context("spawn")
    stop, pages = context.Event(), context.Value("i", 0)
    process = context.Process(target=_pullers_process, args=(url, *curve, points, pullers, stop, pages), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while pages.value < pullers:  # every puller under way (a page each, roughly) before the probes start
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the pullers did not get under way ({pages.value} pages, alive: {process.is_alive()})")
            time.sleep(0.05)
        first, t0 = pages.value, time.perf_counter()
        took = probes()
        seconds, served = time.perf_counter() - t0, pages.value - first
        pulled = {"pages_before_probes": first, "pages": served, "pages_per_s": served / seconds}
    finally:
        stop.set()
        process.join(60)
        if process.is_alive():
            process.kill()
            process.join()
    if process.exitcode not in (0, None):
        raise RuntimeError(f"the pullers failed (exit {process.exitcode})")
    return took, pulled


def summary(took: list[float]) -> dict:
    ordered = sorted(took)
    return {"median_ms": statistics.median(ordered), "p95_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "max_ms": ordered[-1], "n": len(ordered)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100_000, help="train points of the long curve (default 100,000)")
    parser.add_argument("--pullers", type=int, default=4, help="clients pulling full pages at once (default 4)")
    parser.add_argument("--probes", type=int, default=60, help="cheap requests per phase, the kinds in turn (default 60)")
    parser.add_argument("--baseline", default="main", help="the git ref measured against (default: main)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from app.db import engine_for
    from bench.api_load import console, save_results
    from bench.curve_bench import seed
    from bench.scale_bench import apis, baseline_sharing_a_database

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    runs: dict[str, list[dict]] = {side: [] for side in ("before", "after")}
    with baseline_sharing_a_database(args.baseline) as (baseline, database_url):
        sides = {"before": (baseline, database_url), "after": (ROOT, database_url)}
        log(f"seeding a curve of {args.points:,} points")
        curve = seed(database_url, args.points)
        other = seed(database_url, 10)  # another team's small job: what its poller asks meanwhile
        engine_for(database_url).dispose()
        paths = {"job": f"/jobs/{other[1]}", "health": "/health"}
        keys = {"job": other[0], "health": other[0]}
        with apis(sides) as urls:
            for url in urls.values():  # warm each process (imports, pools) before anything is timed
                probe(url, paths, keys, 10)
            for turn in range(args.repeats):
                for side, url in urls.items():
                    log(f"{side}: round {turn + 1}/{args.repeats}: quiet, then {args.pullers} page pullers")
                    quiet = probe(url, paths, keys, args.probes)
                    busy, pulled = loaded(url, curve, args.points, args.pullers,
                                          lambda url=url: probe(url, paths, keys, args.probes))
                    runs[side].append({"quiet": quiet, "loaded": busy, **pulled})

    stats = {side: {kind: {phase: summary([ms for run in found for ms in run[phase][kind]])
                           for phase in ("quiet", "loaded")} for kind in PROBES}
             for side, found in runs.items()}
    for by_kind in stats.values():
        for phases in by_kind.values():
            phases["ratio_median"] = phases["loaded"]["median_ms"] / phases["quiet"]["median_ms"]
            phases["ratio_p95"] = phases["loaded"]["p95_ms"] / phases["quiet"]["p95_ms"]
    pages_per_s = {side: statistics.median(run["pages_per_s"] for run in found) for side, found in runs.items()}

    table = Table(title=f"A cheap request while {args.pullers} clients pull full {PAGE:,}-point pages: "
                        f"{args.baseline} (before) against this checkout (after)")
    for column in ("", "before", "after"):
        table.add_column(column, justify="left" if not column else "right")
    for kind, label in PROBES.items():
        for what, field in (("median", "median_ms"), ("p95", "p95_ms")):
            table.add_row(f"{label} {what}, quiet: ms", *(f"{stats[s][kind]['quiet'][field]:,.1f}" for s in sides))
            table.add_row("  with pullers: ms", *(f"{stats[s][kind]['loaded'][field]:,.1f}" for s in sides))
            table.add_row("  loaded / quiet", *(f"{stats[s][kind]['ratio_' + what]:,.1f}" for s in sides))
    table.add_row("full pages served meanwhile, per s", *(f"{pages_per_s[s]:,.1f}" for s in sides))
    console.print(table)
    return save_results({"ok": True, "baseline": args.baseline, "points": args.points, "pullers": args.pullers,
                         "probes": args.probes, "runs": runs, "stats": stats, "pages_per_s": pages_per_s}, args.out)


if __name__ == "__main__":
    sys.exit(main())
