"""What a wrong API key sent again and again costs the API, beside a key it knows.

    .venv/bin/python bench/wrong_key_bench.py [--clients 16] [--seconds 10]

A deployment started as production starts one (api_load.deployment: a fresh Postgres database, the API as
its own process), a team with a key. Then --clients clients (one keep-alive connection each, a lean asyncio
client so the machine's cores go to the API and Postgres) send GET /jobs back to back for --seconds, in
three phases:

1. The team's key: the API process keeps what it read of it (QLORA_KEY_CACHE_S), no key read a request.
   The baseline.
2. One wrong key, the same one from every client: a script with a typo in its key, in a loop. Each answer
   is a 401; the process keeps the refusal for QLORA_KEY_CACHE_S too (CallerCache.refused), so it reads the
   key about once per QLORA_KEY_CACHE_S. Before that, every request read it, as in phase 3.
3. A new made-up key for each request: every request a miss and a read of the keys table (KEY_READS of
   them at once per process). What phase 2 cost before.

It reports each phase's answers, requests per second, median and p99, and phase 2 and 3 as ratios to phase
1 from the same run (a busy machine moves every row together). Exit 1 when an answer was not the phase's
(200, then 401) or a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: app/, worker/ and tests/ import from this checkout

from rich.table import Table  # noqa: E402

from app.db import session_scope  # noqa: E402
from app.teams import service as teams_service  # noqa: E402
from bench.api_load import console, deployment, percentile, save_results  # noqa: E402
from tests import services  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "wrong_key_bench.json"
KNOWN, REPEATED, FRESH = "the team's key", "one wrong key, again and again", "a new made-up key each request"
EXPECTED = {KNOWN: 200, REPEATED: 401, FRESH: 401}


def made_up_key() -> str:
    return teams_service.KEY_PREFIX + secrets.token_urlsafe(32)


def load(url: str, clients: int, seconds: float, key_for_request: Callable[[], str]) -> tuple[list[tuple[int, float]], float]:
    """`clients` connections asking GET /jobs back to back for `seconds`, each request with key_for_request()'s
    key: (status, seconds) per request, and the wall time. Status 0: the connection failed."""
    host, port = url.removeprefix("http://").split(":")
    answers: list[tuple[int, float]] = []

    async def client(start: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))

        async def get() -> int:
            writer.write(f"GET /jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key_for_request()}\r\n\r\n".encode())
            lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0)
            await reader.readexactly(length)
            return int(lines[0].split(" ", 2)[1])

        await get()  # connected before the clock starts
        await start.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                status = await get()
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status = 0
            answers.append((status, time.perf_counter() - t0))
            if status == 0:
                break  # the connection is gone
        writer.close()

    async def main() -> float:
        start = asyncio.Event()
        tasks = [asyncio.create_task(client(start)) for _ in range(clients)]
        await asyncio.sleep(0.5)  # every client connected
        start.set()
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
        return time.perf_counter() - t0

    wall_s = services.in_a_thread_of_its_own(lambda: asyncio.run(main()))
    return answers, wall_s


def stats(answers: list[tuple[int, float]], wall_s: float) -> dict:
    latencies = sorted(seconds for _, seconds in answers)
    return {"requests": len(answers), "statuses": {str(s): n for s, n in sorted(Counter(s for s, _ in answers).items())},
            "req_per_s": round(len(answers) / wall_s, 1),
            **{f"p{q}_ms": round(v * 1000, 2) if (v := percentile(latencies, q)) is not None else None for q in (50, 99)}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def run(clients: int, seconds: float) -> dict:
    load_before = os.getloadavg()
    with deployment(max_upload_bytes=1 << 20) as d:
        with session_scope(d.database_url) as session:
            teams_service.create_team(session, "bench")
            _, key = teams_service.create_key(session, "bench")
        wrong = made_up_key()
        phases = {}
        for name, key_for_request in ((KNOWN, lambda: key), (REPEATED, lambda: wrong), (FRESH, made_up_key)):
            phases[name] = stats(*load(d.url, clients, seconds, key_for_request))
    known = phases[KNOWN]
    for name in (REPEATED, FRESH):
        phases[name]["p50_ratio"] = _ratio(phases[name]["p50_ms"], known["p50_ms"])
        phases[name]["p99_ratio"] = _ratio(phases[name]["p99_ms"], known["p99_ms"])
        phases[name]["req_per_s_ratio"] = _ratio(phases[name]["req_per_s"], known["req_per_s"])
    ok = all(p["requests"] and set(p["statuses"]) == {str(EXPECTED[name])} for name, p in phases.items())
    return {"benchmark": "wrong_key_bench", "clients": clients, "seconds": seconds,
            "load_avg_before": [round(v, 2) for v in load_before],
            "load_avg_after": [round(v, 2) for v in os.getloadavg()], "phases": phases, "ok": ok}


def print_report(r: dict) -> None:
    table = Table(title=f"GET /jobs from {r['clients']} clients, {r['seconds']:g} s a phase: a known key, then wrong ones")
    for column in ("key", "answers", "req/s", "p50", "p99", "× req/s", "× p50", "× p99"):
        table.add_column(column, justify="left" if column == "key" else "right")
    for name, p in r["phases"].items():
        ratios = [f"{p[k]:.2f}" if p.get(k) is not None else "-" for k in ("req_per_s_ratio", "p50_ratio", "p99_ratio")]
        table.add_row(name, ", ".join(f"{n} × {s}" for s, n in p["statuses"].items()), f"{p['req_per_s']:g}",
                      f"{p['p50_ms']} ms", f"{p['p99_ms']} ms", *ratios)
    console.print(table)
    console.print(f"load average before {r['load_avg_before']}, after {r['load_avg_after']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent clients, one connection each (default 16)")
    p.add_argument("--seconds", type=float, default=10, help="length of each phase (default 10)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = p.parse_args(argv)
    results = run(args.clients, args.seconds)
    print_report(results)
    return save_results(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
