"""Start of a training process: its imports, and the time to its first optimizer step, on the tiny model.

    .venv/bin/python bench/startup_bench.py --rounds 3

Each round runs, each in a fresh process, alternating: "before" imports the stack as it came (bitsandbytes
wrapping its fallback kernels in torch.compile, the garbage collector on: `import bitsandbytes` first),
"after" as a training process does now (worker/training/stack.py: `stack.loading()`). Both then train the
same short run (`--steps`, a loss logged at every step) and report the wall and CPU time (user+sys, of the
process) from its start to the end of the imports and to the end of the first optimizer step, then from
there to the end of the last step (the steps after the first: the garbage collector's share), and the
losses, which must be the same to the bit. Prints each figure's after/before ratio over the rounds'
medians. CPU time is the figure to trust on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(mode: str, work: Path, steps: int, started: float) -> None:
    t0 = time.time()
    if mode == "after":
        from worker.training import stack

        with stack.loading():
            import worker.training.recipe  # noqa: F401
    else:
        import bitsandbytes  # noqa: F401  # as transformers imported it: its kernels wrapped in torch.compile

        import worker.training.recipe  # noqa: F401
    imported = {"wall_s": time.time() - started, "cpu_s": cpu_s()}
    from transformers import TrainerCallback

    from worker.training.recipe import run
    from worker.training.spec import JobSpec

    first: dict = {}
    last: dict = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not first:
                first.update(wall_s=time.time() - started, cpu_s=cpu_s())
            last.update(wall_s=time.time() - started - first["wall_s"], cpu_s=cpu_s() - first["cpu_s"])

    spec = json.loads((work / "demo" / "spec.json").read_text())
    spec["training"].update(max_steps=steps, logging_steps=1, eval_steps=steps, save_steps=steps)
    spec["output"] = {"merge": False}
    spec["eval"] = {"prompts": 0}
    out = work / f"run-{mode}-{t0}"
    run(JobSpec.parse(spec), work / "demo" / "train.jsonl", out, extra_callbacks=(FirstStep(),))
    # The curve without its clock: the step, losses and gradient norms of each point.
    losses = [{k: v for k, v in json.loads(line).items() if k in ("step", "train_loss", "grad_norm", "eval_loss")}
              for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"imports": imported, "first_step": first, "later_steps": last, "losses": losses}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", choices=["before", "after"])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--started", type=float)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.steps, args.started)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        work = Path(tmp)
        qlora = [sys.executable, "-m", "app.cli"]
        subprocess.run([*qlora, "tiny-model", str(work / "tiny")], check=True, env=env, capture_output=True)
        subprocess.run([*qlora, "demo-data", str(work / "demo"), "--base-model", str(work / "tiny")], check=True, env=env,
                       capture_output=True)
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for mode in ("before", "after"):
                proc = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), "--steps", str(args.steps),
                                       "--started", str(time.time())], env=env, capture_output=True, text=True, check=True)
                results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    same = all(r["losses"] == results["before"][0]["losses"] for rs in results.values() for r in rs)
    print(f"{args.rounds} rounds; losses of every run the same to the bit: {same} ({len(results['before'][0]['losses'])} steps)")
    print(f"{'median over rounds':<40}{'before':>10}{'after':>10}{'after/before':>14}")
    for phase in ("imports", "first_step", "later_steps"):
        for figure in ("wall_s", "cpu_s"):
            before = statistics.median(r[phase][figure] for r in results["before"])
            after = statistics.median(r[phase][figure] for r in results["after"])
            print(f"{phase + ' ' + figure:<40}{before:>10.2f}{after:>10.2f}{after / before:>14.2f}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
