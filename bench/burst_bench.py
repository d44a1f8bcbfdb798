"""One team's burst of job creations, and what another team's requests cost beside it.

    .venv/bin/python bench/burst_bench.py [--threads 50] [--seconds 60] [--rows 10000] [--body-mib 0]

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


def summary(answers: list[tuple[int, float]]) -> dict:
    seconds = [s for _, s in answers]
    return {"count": len(answers), "statuses": dict(Counter(str(status) for status, _ in answers)),
            "median_s": round(statistics.median(seconds), 3) if seconds else None,
            "max_s": round(max(seconds), 3) if seconds else None}


def run(threads: int, seconds: float, rows: int, body_mib: float = 0) -> dict:
    work = Path(tempfile.mkdtemp(prefix="qlora-burst-bench-"))
    try:
        return _run(work, threads, seconds, rows, body_mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the tiny model and both datasets


def _run(work: Path, threads: int, seconds: float, rows: int, body_mib: float) -> dict:
    model = build_tiny_model(work / "tiny")
    big, small = work / "big.jsonl", work / "small.jsonl"
    write_dataset(big, rows, turns=3)
    write_dataset(small, 50, turns=1, seed=1)
    gpu_class = f"bench-burst-{uuid.uuid4().hex[:8]}"
    env = {"QLORA_EXTRA_GPU_CLASSES": json.dumps([gpu_class]),
           "QLORA_DEFAULT_MAX_QUEUED": "1000000"}  # room for every job either team makes in the run
    with deployment(max_upload_bytes=1 << 30, env=env) as d:
        keys = {}
        with session_scope(d.database_url) as session:
            models_service.add_model(session, "tiny", path=str(model))
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
    return results


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
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    results = run(args.threads, args.seconds, args.rows, args.body_mib)
    print_report(results)
    return save_results(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
