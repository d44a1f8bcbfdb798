"""One team's burst of job creations, and what another team's requests cost beside it.

    .venv/bin/python bench/burst_bench.py [--threads 50] [--seconds 60] [--rows 10000] [--body-mib 0]
    .venv/bin/python bench/burst_bench.py --flood [--threads 30] [--seconds 30] [--every-ms 50] [--request-slots N]

A deployment started as production starts one (api_load.deployment: a fresh Postgres database, the
API as its own process with its one preflight process), the tiny model registered with its tokenizer
files. Team "burst" uploads a chat dataset of --rows rows; team "calm" a small one. Then two phases of
--seconds each:

1. Alone: team calm sends, one after another, `GET /datasets`, `POST /jobs` and `POST /jobs/preflight`
   (its own small dataset), round and round. This is the baseline.
2. Beside the burst: the same, while team burst sends `POST /jobs` (its big dataset, so each
   creation preflights seconds of rows) from --threads threads in a loop, as a careless script does.

With --body-mib M, team burst's creations are instead bodies of M MiB (the job with a metadata value
of that size, refused 422 once parsed): what parsing large JSON bodies costs the other team.

With --flood, team burst instead sends cheap GETs (GET /jobs?limit=50, GET /jobs/{id}, GET /datasets) back to
back from --threads threads, as 200 polling scripts of one team do, and team calm sends the same GETs as a
steady trickle, one every --every-ms: what one team's polling costs another's latency, reported as team calm's
p50 and p99 beside the flood over those alone (app/shares.py; QLORA_REQUEST_SLOTS, which --request-slots sets:
a number far above the route threads, 100000, leaves every team's share unbounded, the service as it was).
The phases: team calm alone, team burst alone (its answers a second: what a team alone gets), then both.
The flood runs in a process of its own, so team calm's client never waits for the flood's GIL.

It reports, per request of team calm, the answers and the median and longest time in each phase, and
the burst's answers; the figure is each median beside the burst as a ratio to the one alone. Exit 1
on any 5xx, or when team calm got an answer other than 200/201 (a 429 included: the service is meant
to keep serving the team that is not bursting).

The jobs are sent to a queue of their own (gpu class `bench-burst-<run>`), which no worker reads and
which is deleted from Redis at the end, with the database and the temp directory.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: app/, worker/ and tests/ import from this checkout

import httpx  # noqa: E402
import redis  # noqa: E402
from rich.table import Table  # noqa: E402

from app.db import session_scope  # noqa: E402
from app.models import service as models_service  # noqa: E402
from app.teams import service as teams_service  # noqa: E402
from bench.api_load import console, deployment, save_results  # noqa: E402
from bench.preflight_bench import write_dataset  # noqa: E402
from worker.training.tiny import build_tiny_model, demo_spec  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "burst_bench.json"
FLOOD_OUT = ROOT / "bench" / "results" / "burst_bench_flood.json"
CALLS = ("GET /datasets", "POST /jobs", "POST /jobs/preflight")


def calm_requests(client: httpx.Client, body: dict, until: float) -> dict[str, list[tuple[int, float]]]:
    """Team calm's requests, round and round until `until`: (status, seconds) per call."""
    answers: dict[str, list[tuple[int, float]]] = {call: [] for call in CALLS}
    while time.monotonic() < until:
        for call in CALLS:
            started = time.perf_counter()
            if call == "GET /datasets":
                status = client.get("/datasets").status_code
            elif call == "POST /jobs":
                status = client.post("/jobs", json=body).status_code
            else:
                status = client.post("/jobs/preflight", json={**body, "examples": 0}).status_code
            answers[call].append((status, time.perf_counter() - started))
    return answers


def burst_requests(url: str, key: str, body: dict, stop: threading.Event, statuses: list) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        while not stop.is_set():
            try:
                statuses.append(client.post("/jobs", json=body).status_code)
            except httpx.TimeoutException:
                statuses.append("timeout")


FLOOD_CALLS = ("GET /jobs?limit=50", "GET /jobs/{id}", "GET /datasets")


def flood_get(client: httpx.Client, call: str, job_id: str) -> int:
    path = {"GET /jobs?limit=50": "/jobs?limit=50", "GET /jobs/{id}": f"/jobs/{job_id}", "GET /datasets": "/datasets"}[call]
    return client.get(path).status_code


def trickle(client: httpx.Client, job_id: str, every_s: float, until: float) -> dict[str, list[tuple[int, float]]]:
    """Team calm's GETs, one every `every_s` on a steady clock (a slow answer does not shift the next one's
    start, as a dashboard's timer does not), round and round until `until`: (status, seconds) per call."""
    answers: dict[str, list[tuple[int, float]]] = {call: [] for call in FLOOD_CALLS}
    next_at = time.monotonic()
    while next_at < until:
        for call in FLOOD_CALLS:
            time.sleep(max(0.0, next_at - time.monotonic()))
            started = time.perf_counter()
            answers[call].append((flood_get(client, call, job_id), time.perf_counter() - started))
            next_at = max(next_at + every_s, time.monotonic() - every_s)  # a late answer skips a beat, never bunches
    return answers


def flood_requests(url: str, key: str, job_id: str, stop: threading.Event, statuses: list, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        while not stop.is_set():
            try:
                statuses.append((time.monotonic(), flood_get(client, rng.choice(FLOOD_CALLS), job_id)))
            except httpx.TimeoutException:
                statuses.append((time.monotonic(), "timeout"))


def flood_process(url: str, key: str, job_id: str, threads: int, started, stop, answers) -> None:
    """Team burst's threads, in a process of their own: in the bench's, they held its GIL, and team calm's
    client waited for it as much as for the API. Sets `started` once they run (the process's imports take
    seconds on a loaded machine), and puts the flood's (answered at, status) in `answers` once `stop` is set
    (time.monotonic is the system's clock, the same in every process)."""
    stopping, statuses = threading.Event(), []  # list.append: one step, whichever thread
    flooding = [threading.Thread(target=flood_requests, args=(url, key, job_id, stopping, statuses, i)) for i in range(threads)]
    for thread in flooding:
        thread.start()
    started.set()
    stop.wait()
    stopping.set()
    for thread in flooding:
        thread.join()
    answers.put(statuses)


def latency(answers: list[tuple[int, float]]) -> dict:
    """Count, statuses, p50 and p99 (nearest rank) of a phase's answers."""
    seconds = sorted(s for _, s in answers)
    rank = (lambda q: seconds[min(len(seconds) - 1, math.ceil(q * len(seconds)) - 1)]) if seconds else (lambda q: None)
    return {"count": len(answers), "statuses": dict(Counter(str(status) for status, _ in answers)),
            "p50_s": _rounded(rank(0.5)), "p99_s": _rounded(rank(0.99))}


def _rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _ratio(beside: float | None, alone: float | None) -> float | None:
    return round(beside / alone, 2) if beside is not None and alone else None


def summary(answers: list[tuple[int, float]]) -> dict:
    seconds = [s for _, s in answers]
    return {"count": len(answers), "statuses": dict(Counter(str(status) for status, _ in answers)),
            "median_s": round(statistics.median(seconds), 3) if seconds else None,
            "max_s": round(max(seconds), 3) if seconds else None}


def run(threads: int, seconds: float, rows: int, body_mib: float = 0, flood: bool = False, every_s: float = 0.05,
        request_slots: int | None = None, then_flood: float = 0) -> dict:
    """`then_flood`: after the burst's phases, the flood's, each this many seconds, on the same deployment."""
    work = Path(tempfile.mkdtemp(prefix="qlora-burst-bench-"))
    try:
        return _run(work, threads, seconds, rows, body_mib, flood, every_s, request_slots, then_flood)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the tiny model and both datasets


def _run(work: Path, threads: int, seconds: float, rows: int, body_mib: float, flood: bool, every_s: float,
         request_slots: int | None, then_flood: float) -> dict:
    model = build_tiny_model(work / "tiny")
    big, small = work / "big.jsonl", work / "small.jsonl"
    write_dataset(big, rows, turns=3)
    write_dataset(small, 50, turns=1, seed=1)
    gpu_class = f"bench-burst-{uuid.uuid4().hex[:8]}"
    env = {"QLORA_EXTRA_GPU_CLASSES": json.dumps([gpu_class]),
           "QLORA_DEFAULT_MAX_QUEUED": "1000000"}  # room for every job either team makes in the run
    if request_slots is not None:
        env["QLORA_REQUEST_SLOTS"] = str(request_slots)
    with deployment(max_upload_bytes=1 << 30, env=env) as d:
        keys = {}
        with session_scope(d.database_url) as session:
            models_service.add_model(session, "tiny", path=str(model), roots=[model.parent])
            for team in ("burst", "calm"):
                teams_service.create_team(session, team)
                keys[team] = teams_service.create_key(session, team)[1]
        clients = {team: httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
                   for team, key in keys.items()}
        spec = demo_spec("tiny")
        spec = {**spec, "training": {**spec["training"], "max_seq_length": 512}, "gpu_class": gpu_class}
        bodies = {}
        for team, path in (("burst", big), ("calm", small)):
            with open(path, "rb") as f:
                uploaded = clients[team].post("/datasets", files={"file": ("data.jsonl", f, "application/jsonl")})
            uploaded.raise_for_status()
            bodies[team] = {**spec, "dataset_id": uploaded.json()["id"]}
        if body_mib:  # one string as large as asked, so the body is as large as the parse is long
            bodies["burst"] = {**bodies["burst"], "metadata": {"pad": "x" * int(body_mib * 2**20)}}
        first = clients["calm"].post("/jobs/preflight", json=bodies["calm"])  # starts the preflight child
        if first.status_code != 200:
            raise RuntimeError(f"the first preflight failed: {first.text}")
        if flood:
            try:
                return _flood(d.url, keys, clients, bodies, threads, seconds, every_s, request_slots)
            finally:
                for client in clients.values():
                    client.close()
                redis.Redis.from_url("redis://127.0.0.1:6379/0").delete(f"gpu-{gpu_class}")

        alone = calm_requests(clients["calm"], bodies["calm"], time.monotonic() + seconds)
        stop, burst_statuses = threading.Event(), []  # list.append: one step, whichever thread
        burst = [threading.Thread(target=burst_requests, args=(d.url, keys["burst"], bodies["burst"], stop, burst_statuses))
                 for _ in range(threads)]
        for thread in burst:
            thread.start()
        try:
            beside = calm_requests(clients["calm"], bodies["calm"], time.monotonic() + seconds)
        finally:
            stop.set()
            for thread in burst:
                thread.join()
        try:  # --then-flood: the flood's phases too, on this deployment (no second one started)
            flooded = _flood(d.url, keys, clients, bodies, threads, then_flood, every_s, request_slots) if then_flood else None
        finally:
            for client in clients.values():
                client.close()
    redis.Redis.from_url("redis://127.0.0.1:6379/0").delete(f"gpu-{gpu_class}")

    results: dict = {"threads": threads, "seconds": seconds, "rows": rows, "body_mib": body_mib,
                     "burst": {str(k): v for k, v in Counter(burst_statuses).items()}, "calm": {}}
    for call in CALLS:
        a, b = summary(alone[call]), summary(beside[call])
        ratio = round(b["median_s"] / a["median_s"], 2) if a["median_s"] and b["median_s"] is not None else None
        results["calm"][call] = {"alone": a, "beside_burst": b, "median_ratio": ratio}
    calm_ok = all(set(phase["statuses"]) <= {"200", "201"} for r in results["calm"].values()
                  for phase in (r["alone"], r["beside_burst"]))
    no_5xx = not any(str(status).startswith("5") for status in burst_statuses)
    results["ok"] = calm_ok and no_5xx and all(r["beside_burst"]["count"] for r in results["calm"].values())
    if flooded is not None:
        results["flood"] = flooded
        results["ok"] = results["ok"] and flooded["ok"]
    return results


def _flood(url: str, keys: dict[str, str], clients: dict[str, httpx.Client], bodies: dict[str, dict], threads: int,
           seconds: float, every_s: float, request_slots: int | None) -> dict:
    """--flood: team calm's trickle of GETs alone; then team burst's threads of GETs alone, then both."""
    job_ids = {}
    for team in ("burst", "calm"):  # a job each, for GET /jobs/{id}
        created = clients[team].post("/jobs", json=bodies[team])
        if created.status_code != 201:
            raise RuntimeError(f"team {team}'s job was not created: {created.text}")
        job_ids[team] = created.json()["id"]
    load_before = os.getloadavg()
    alone = trickle(clients["calm"], job_ids["calm"], every_s, time.monotonic() + seconds)
    spawn = multiprocessing.get_context("spawn")
    started, stop, answers = spawn.Event(), spawn.Event(), spawn.Queue()
    flooding = spawn.Process(target=flood_process, args=(url, keys["burst"], job_ids["burst"], threads, started, stop, answers))
    flooding.start()
    try:
        if not started.wait(300):
            raise RuntimeError("the flood's process did not start its threads in 300 s")
        # The flood alone first, for what team burst gets when no other team asks anything (its first
        # second left out: its connections starting).
        alone_from = time.monotonic() + 1
        time.sleep(1 + seconds)
        beside_from = time.monotonic()
        beside = trickle(clients["calm"], job_ids["calm"], every_s, beside_from + seconds)
        beside_until = time.monotonic()
    finally:
        stop.set()
        flood_answers = answers.get(timeout=600)
        flooding.join()
    flood_statuses = [status for _, status in flood_answers]
    flood_alone = sum(alone_from <= at < beside_from for at, _ in flood_answers) / (beside_from - alone_from)
    flood_beside = sum(beside_from <= at < beside_until for at, _ in flood_answers) / (beside_until - beside_from)
    results: dict = {"mode": "flood", "threads": threads, "seconds": seconds, "every_ms": round(every_s * 1000),
                     "request_slots": request_slots, "load_avg_before": [round(v, 2) for v in load_before],
                     "load_avg_after": [round(v, 2) for v in os.getloadavg()],
                     "burst": {str(k): v for k, v in Counter(flood_statuses).items()},
                     "burst_per_s": {"alone": round(flood_alone, 1), "beside_calm": round(flood_beside, 1)}, "calm": {}}
    for call, a, b in [(call, alone[call], beside[call]) for call in FLOOD_CALLS] + [
            ("all", [x for c in FLOOD_CALLS for x in alone[c]], [x for c in FLOOD_CALLS for x in beside[c]])]:
        la, lb = latency(a), latency(b)
        results["calm"][call] = {"alone": la, "beside_flood": lb, "p50_ratio": _ratio(lb["p50_s"], la["p50_s"]),
                                 "p99_ratio": _ratio(lb["p99_s"], la["p99_s"])}
    calm_ok = all(set(phase["statuses"]) <= {"200"} for r in results["calm"].values()
                  for phase in (r["alone"], r["beside_flood"]))
    no_5xx = not any(str(status).startswith("5") for status in flood_statuses)
    results["ok"] = calm_ok and no_5xx and all(r["beside_flood"]["count"] for r in results["calm"].values())
    return results


def print_flood_report(r: dict) -> None:
    slots = "unbounded shares" if (r["request_slots"] or 0) >= 100_000 else f"QLORA_REQUEST_SLOTS={r['request_slots'] or 'default'}"
    table = Table(title=f"team calm's GETs, one every {r['every_ms']} ms: alone, then beside team burst's {r['threads']} "
                        f"threads of GETs ({r['seconds']:g} s each, {slots})")
    for column in ("request", "alone: answers", "p50", "p99", "beside: answers", "p50", "p99", "× p50", "× p99"):
        table.add_column(column, justify="left" if column == "request" else "right")
    for call, x in r["calm"].items():
        a, b = x["alone"], x["beside_flood"]
        table.add_row(call, _answers(a), _ms(a["p50_s"]), _ms(a["p99_s"]), _answers(b), _ms(b["p50_s"]), _ms(b["p99_s"]),
                      f"{x['p50_ratio']:.2f}" if x["p50_ratio"] is not None else "-",
                      f"{x['p99_ratio']:.2f}" if x["p99_ratio"] is not None else "-")
    console.print(table)
    console.print(f"team burst's answers: {', '.join(f'{n} × {s}' for s, n in sorted(r['burst'].items()))} "
                  f"({r['burst_per_s']['alone']:g}/s alone, {r['burst_per_s']['beside_calm']:g}/s beside team calm's GETs)")
    console.print(f"load average before {r['load_avg_before']}, after {r['load_avg_after']}")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def print_report(r: dict) -> None:
    what = f"{r['body_mib']:g} MiB bodies" if r.get("body_mib") else f"{r['rows']:,}-row dataset"
    table = Table(title=f"team calm's requests: alone, then beside team burst's {r['threads']} threads of POST /jobs "
                        f"({what}), {r['seconds']:g} s each")
    for column in ("request", "alone: answers", "median", "max", "beside: answers", "median", "max", "× median"):
        table.add_column(column, justify="left" if column == "request" else "right")
    for call, x in r["calm"].items():
        a, b = x["alone"], x["beside_burst"]
        table.add_row(call, _answers(a), f"{a['median_s']:.2f} s", f"{a['max_s']:.2f} s",
                      _answers(b), f"{b['median_s']:.2f} s" if b["count"] else "-", f"{b['max_s']:.2f} s" if b["count"] else "-",
                      f"{x['median_ratio']:.2f}" if x["median_ratio"] is not None else "-")
    console.print(table)
    console.print(f"team burst's answers: {', '.join(f'{n} × {s}' for s, n in sorted(r['burst'].items()))}")


def _answers(phase: dict) -> str:
    return ", ".join(f"{n} × {s}" for s, n in sorted(phase["statuses"].items())) or "none"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=50, help="team burst's threads sending POST /jobs (default 50)")
    p.add_argument("--seconds", type=float, default=60, help="length of each phase (default 60)")
    p.add_argument("--rows", type=int, default=10_000, help="rows of team burst's dataset (default 10,000)")
    p.add_argument("--body-mib", type=float, default=0,
                   help="team burst sends bodies of this many MiB instead, each refused once parsed (default 0: off)")
    p.add_argument("--flood", action="store_true",
                   help="team burst sends cheap GETs instead, and team calm a steady trickle of them (see above)")
    p.add_argument("--then-flood", type=float, default=0, metavar="SECONDS",
                   help="after the burst's phases, --flood's on the same deployment too, each this long (results under \"flood\")")
    p.add_argument("--every-ms", type=float, default=50, help="--flood: team calm's GETs, one every this many ms (default 50)")
    p.add_argument("--request-slots", type=int, default=None,
                   help="QLORA_REQUEST_SLOTS for the API (default: the service's; 100000: no team's share bounded)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)}, or {FLOOD_OUT.relative_to(ROOT)} with --flood)")
    args = p.parse_args(argv)
    results = run(args.threads, args.seconds, args.rows, args.body_mib, args.flood, args.every_ms / 1000, args.request_slots,
                  then_flood=0 if args.flood else args.then_flood)
    (print_flood_report if args.flood else print_report)(results)
    if "flood" in results:
        print_flood_report(results["flood"])
    args.out = args.out or (FLOOD_OUT if args.flood else DEFAULT_OUT)
    return save_results(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
