"""Reading a tool-calling row of many parallel calls: the time grows with the calls, not with their square.

    .venv/bin/python bench/tool_rows_bench.py [--small 3000] [--large 30000] [--runs 3]

One chat row whose assistant message makes N parallel calls and whose next N tool messages answer them
(each names the call it answers by id), validated as a dataset upload validates it
(worker.training.data.validate_lines), for N = --small (the baseline, in the same run) and N = --large. The
figure is the ratio of the time per call at the large size to the time per call at the small one (medians of
--runs): about 1 when each tool message is checked once against the calls it answers; about large/small when each
scans them all (a 4 MB row of 30,000 calls took half a minute that way). Exit 1 if a row is not read whole, or if
the ratio is past LINEAR_LIMIT. (tests/training/test_data.py checks what such a row reads as; the time is here,
as a ratio, not a timed assertion there.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: worker/ imports from this checkout

from worker.training.data import validate_lines  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "tool_rows_bench.json"
# Per call, the large row may cost this many times the small one's: noise and allocation, far below the
# large/small (10 by default) that a scan per message costs.
LINEAR_LIMIT = 3.0

TOOLS = [{"type": "function", "function": {"name": "get_sound", "parameters": {"type": "object", "properties": {}}}}]
USER, ANSWER = {"role": "user", "content": "What does the cow say?"}, {"role": "assistant", "content": "The cow says moo."}


def row_of_calls(calls: int) -> bytes:
    made = [{"id": f"call_{n}", "type": "function", "function": {"name": "get_sound", "arguments": '{"animal": "cow"}'}}
            for n in range(calls)]
    answers = [{"role": "tool", "tool_call_id": f"call_{n}", "content": "moo"} for n in range(calls)]
    return json.dumps({"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": None, "tool_calls": made},
                                                     *answers, ANSWER]}).encode()


def timed(calls: int, runs: int) -> dict:
    line = row_of_calls(calls)
    seconds, read_whole = [], True
    for _ in range(runs):
        started = time.perf_counter()
        [example] = validate_lines([line]).examples
        seconds.append(time.perf_counter() - started)
        read_whole = read_whole and len(example.messages) == calls + 3  # the question, the calls, the results, the answer
    median = statistics.median(seconds)
    return {"calls": calls, "row_bytes": len(line), "median_s": median, "per_call_us": median / calls * 1e6,
            "read_whole": read_whole}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=3000, help="calls of the baseline row (default 3000)")
    parser.add_argument("--large", type=int, default=30_000, help="calls of the large row (default 30000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, the median taken (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    small, large = timed(args.small, args.runs), timed(args.large, args.runs)
    ratio = large["per_call_us"] / small["per_call_us"]
    results = {"small": small, "large": large, "per_call_ratio": ratio, "linear_limit": LINEAR_LIMIT,
               "ok": small["read_whole"] and large["read_whole"] and ratio <= LINEAR_LIMIT}
    print(f"{'calls':>8}{'row MB':>10}{'median s':>12}{'us/call':>10}")
    for size in (small, large):
        print(f"{size['calls']:>8}{size['row_bytes'] / 1e6:>10.1f}{size['median_s']:>12.3f}{size['per_call_us']:>10.1f}")
    print(f"time per call, large / small: {ratio:.2f} (linear: about 1; a scan per message: about "
          f"{args.large / args.small:.0f}; limit {LINEAR_LIMIT})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
