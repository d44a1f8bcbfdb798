"""The eval report's cost on the CPU: a whole small job, with the report made the old way and the new, interleaved.

    .venv/bin/python bench/report_bench.py [--runs 3] [--prompts 8] [--max-new-tokens 64] [--merge on|off] [--threads 1]

The job is the embedded default's smallest: the tiny model (worker/training/tiny.py, as the tests build it),
the demo task's 480 train and 48 held-out rows, 2 optimizer steps, the spec's eval section at its defaults
(8 prompts, 64 new tokens) unless told otherwise. Each run is a fresh process (`run()` as `qlora train`
calls it), alternately "old" and "new", --runs of each:

- old: the report as it was, each 4-bit layer dequantizing its whole weight at every call (for every
  generated token) on bitsandbytes' CPU path;
- new: within worker.training.model.dequantized_on_cpu, each 4-bit layer dequantized once per report.

Reported: process CPU seconds (all threads; this is what the report costs a shared CPU) and wall seconds,
for the whole job and per phase (setup+train, merge, report, and inside the report: loading the base,
generation per model, the loss per model, gc), best of the runs for each way, and new/old ratios. The
check: old and new reports say the same (answers equal, losses within 1e-6). Exit 1 if they do not.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: worker/ imports from this checkout

DEFAULT_OUT = ROOT / "bench" / "results" / "report_bench.json"


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Phases:
    """CPU and wall seconds per named phase, summed over calls."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def wrap(self, owner, name: str, label=None):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            c, w = cpu_s(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = label(*args) if label else name
                self.cpu[key] = self.cpu.get(key, 0.0) + cpu_s() - c
                self.wall[key] = self.wall.get(key, 0.0) + time.perf_counter() - w

        setattr(owner, name, timed)


def _model_label(what: str):
    def label(model, *_):
        import bitsandbytes as bnb

        quantized = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        return f"{what}: {type(model).__name__}{' (4-bit)' if quantized else ''}"
    return label


def child(args) -> int:
    """One job in this process, the report made `args.way`; prints its timings and report as JSON."""
    import worker.training.recipe as recipe
    import worker.training.report as report
    from worker.training.spec import JobSpec

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.way == "old":
        @contextmanager
        def per_call_dequantization(model):  # the report before dequantized_on_cpu: bitsandbytes as it comes
            yield 0

        report.dequantized_on_cpu = per_call_dequantization
    phases = Phases()
    for name in ("setup", "train", "evaluate", "merge_and_measure_fidelity", "eval_report"):
        phases.wrap(recipe.QLoRARecipe, name, lambda *a, name=name: name)
    phases.wrap(report, "load_base_model", lambda *a: "report: load base")
    phases.wrap(report, "free_memory", lambda *a: "report: gc (free_memory)")
    phases.wrap(report, "generate", _model_label("report: generate"))
    phases.wrap(report, "mean_loss", _model_label("report: mean_loss"))
    work = Path(args.work)
    spec = {"base_model": str(work / "model"), "training": {"max_steps": 2},
            "eval": {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens},
            "output": {"merge": args.merge == "on"}}
    c, w = cpu_s(), time.perf_counter()
    result = recipe.run(JobSpec.parse(spec), work / "train.jsonl", Path(tempfile.mkdtemp(dir=work)),
                        validation_path=work / "validation.jsonl")
    total_cpu, total_wall = cpu_s() - c, time.perf_counter() - w
    print(json.dumps({"way": args.way, "status": result.status, "cpu": {"job": total_cpu, **phases.cpu},
                      "wall": {"job": total_wall, **phases.wall}, "report": result.report}))
    return 0


def same_report(old: dict, new: dict) -> list[str]:
    """Where two reports differ beyond float noise in the losses (empty: they say the same)."""
    problems = []
    for i, (a, b) in enumerate(zip(old["rows"], new["rows"], strict=True)):
        for side in ("base", "tuned"):
            if a[side] != b[side]:
                problems.append(f"row {i} {side}: {a[side]['answer']!r} != {b[side]['answer']!r}")
    for side in ("base", "tuned"):
        ma, mb = old["metrics"][side], new["metrics"][side]
        if (ma["loss"] is None) != (mb["loss"] is None) or (ma["loss"] is not None and abs(ma["loss"] - mb["loss"]) > 1e-6):
            problems.append(f"{side} loss {ma['loss']} != {mb['loss']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each way, interleaved (default 3)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--merge", choices=["on", "off"], default="on", help="off: the tuned column is the adapter on the 4-bit base")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each job (default: torch's choice); 1 keeps "
                   "a loaded machine's spinning threads out of the CPU seconds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--way", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    from worker.training.tiny import build_tiny_model, demo_rows, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="qlora-report-bench-"))
    build_tiny_model(work / "model", seed=0)
    write_jsonl(demo_rows(0, 480, distinct=True), work / "train.jsonl")
    write_jsonl(demo_rows(0, 48, split="heldout", distinct=True), work / "validation.jsonl")
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(args.runs):
        for way in (("old", "new") if i % 2 == 0 else ("new", "old")):  # neither way always goes first
            command = [sys.executable, __file__, "--child", "--way", way, "--work", str(work),
                       "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens), "--merge", args.merge,
                       *(["--threads", str(args.threads)] if args.threads else [])]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            runs[way].append(measured)
            print(f"run {i + 1} {way}: job {measured['cpu']['job']:.1f} CPU s, report {measured['cpu']['eval_report']:.1f} "
                  f"CPU s ({measured['wall']['eval_report']:.1f} s wall)", flush=True)

    problems = [p for old in runs["old"] for new in runs["new"] for p in same_report(old["report"], new["report"])]
    best = {way: {kind: {key: min(r[kind][key] for r in measured) for key in measured[0][kind]}
                  for kind in ("cpu", "wall")} for way, measured in runs.items()}
    keys = list(best["old"]["cpu"])
    print(f"\nbest of {args.runs}, CPU seconds (all threads) / wall seconds; new/old")
    for key in keys:
        old_c, new_c = best["old"]["cpu"][key], best["new"]["cpu"][key]
        print(f"  {key:45s} old {old_c:7.2f} / {best['old']['wall'][key]:7.2f}   new {new_c:7.2f} / "
              f"{best['new']['wall'][key]:7.2f}   {new_c / old_c if old_c else float('nan'):.2f}")
    print("reports identical (answers, losses within 1e-6)" if not problems else "REPORTS DIFFER:\n  " + "\n  ".join(problems[:10]))
    results = {"ok": not problems, "runs": args.runs, "threads": args.threads, "prompts": args.prompts,
               "max_new_tokens": args.max_new_tokens, "merge": args.merge, "best": best,
               "ratio_cpu": {k: best["new"]["cpu"][k] / best["old"]["cpu"][k] for k in keys if best["old"]["cpu"][k]},
               "differences": problems[:10]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
