"""The memory estimator against measured peaks, over several model sizes, micro-batches and lengths.

    .venv/bin/python bench/estimate_bench.py --device cuda     # 1b and 8b on one GPU: the 10 % target
    .venv/bin/python bench/estimate_bench.py                   # the CPU: tiny and small shapes

Each case trains the engine (worker/training/recipe.py, the job spec's defaults: gradient
checkpointing, kernels and packing as this device resolves them) for a few steps on rows that fill
max_seq_length, in a fresh process, and sets what `estimate_peak_memory` predicts for that run
beside what it used:
- on a GPU, the peak reserved device memory (what the CUDA caching allocator took from the card,
  which is what runs out) and the peak allocated;
- on the CPU, the growth of the process's resident memory from before the model loaded to its peak,
  against the estimate less its CUDA context. That is not the estimator's target (glibc's
  allocator keeps other slack, and the data and trainer live in the same memory), so CPU rows
  show that the sweep runs, not the estimate's 10 % accuracy.
The models are random Llama-architecture weights built here (bench/train_bench.py), nothing is
downloaded; cases of one preset share its pre-quantized base, so only the first quantizes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_bench import PRESETS, ensure_model, run_child, save_report  # noqa: E402
from worker.training.estimate import CONTEXT_BYTES  # noqa: E402

# (preset, micro-batch, sequence length, gradient checkpointing)
CASES = {
    # Under ten minutes on one H100 with the 8B model already built (bench/gpu.sh train builds it).
    "cuda": [("1b", 1, 2048, True), ("1b", 8, 2048, True), ("1b", 4, 1024, False),
             ("8b", 1, 2048, True), ("8b", 4, 2048, True)],
    "cpu": [("tiny", 2, 128, True), ("tiny", 8, 256, True), ("tiny", 8, 256, False)],
}
STEPS = 4  # the peak comes with the first optimizer step (its state) and repeats every step after
TARGET = 0.10


def write_full_rows(path: Path, rows: int, seq: int, vocab: int, seed: int) -> None:
    """Rows longer than max_seq_length (truncated to it), so every micro-batch is batch x seq tokens,
    the shape the estimate is for, whether the batch is padded or packed."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab - 8)]
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.choices(words, k=seq // 4))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=seq))}]}) + "\n")


def run_case(work: Path, preset: str, batch: int, seq: int, checkpointing: bool, device: str, seed: int) -> dict:
    model = ensure_model(work, PRESETS[preset], seed)
    runs = model.parent / "estimate"  # the cases of one model share its pre-quantized base, runs/quantized
    runs.mkdir(exist_ok=True)
    name = f"b{batch}-s{seq}-{'gc' if checkpointing else 'nogc'}"
    data = runs / f"{name}.jsonl"
    write_full_rows(data, rows=STEPS * batch, seq=seq, vocab=PRESETS[preset]["vocab_size"], seed=seed)
    settings = {"device": device, "steps": STEPS, "batch": batch, "seq": seq, "r": 16, "lr": 2e-4, "seed": seed,
                "packing": "auto", "gradient_checkpointing": checkpointing}
    raw = run_child("engine", model, data, settings, runs / f"{name}.json")
    predicted = raw["predicted_peak_bytes"]
    if device == "cuda":
        measured, allocated = raw["memory"]["reserved"], raw["memory"]["allocated"]
        # PyTorch's allocator does not see the paged optimizer's unified memory: compare what it does see.
        predicted = raw.get("predicted_resident_bytes", predicted)
    else:  # bitsandbytes' paged optimizers fall back to plain CPU memory there, inside the process RSS
        measured = allocated = raw["memory"]["reserved"] - raw["rss_before_model_bytes"]
        predicted -= CONTEXT_BYTES  # a CPU process has no CUDA context to allow for
    return {"preset": preset, "micro_batch": batch, "seq": seq, "gradient_checkpointing": checkpointing,
            "speedups": raw["speedups"], "predicted_bytes": predicted, "measured_bytes": measured,
            "allocated_bytes": allocated, "error": predicted / measured - 1}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--case", action="append", metavar="PRESET:BATCH:SEQ[:nogc]",
                   help="instead of the device's default cases, e.g. --case 8b:4:2048 --case 1b:4:1024:nogc")
    p.add_argument("--work", help="where models are built and kept between runs (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "estimate_bench.json"))
    args = p.parse_args(argv)
    cases = CASES[args.device]
    if args.case:
        cases = []
        for text in args.case:
            preset, batch, seq, *rest = text.split(":")
            cases.append((preset, int(batch), int(seq), rest != ["nogc"]))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qlora-estimate-bench-"))
    rows = [run_case(work, *case, device=args.device, seed=args.seed) for case in cases]
    report = {"device": args.device, "target": TARGET, "rows": rows,
              "within_target": all(abs(r["error"]) <= TARGET for r in rows) if args.device == "cuda" else None,
              "measured": "peak reserved device memory" if args.device == "cuda"
              else "growth of process RSS from before the model loaded (not the GPU target's measure)"}
    save_report(report, args.out)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"estimate_peak_memory against the measured peak on {report['device']} "
                        f"({report['measured']})")
    for col in ("model", "micro-batch x seq", "checkpointing", "kernels", "predicted", "measured", "error"):
        table.add_column(col, justify="left" if col in ("model", "kernels") else "right")
    for r in report["rows"]:
        kernels = ", ".join(k for k in ("packing", "liger") if r["speedups"].get(k)) or "none"
        table.add_row(r["preset"], f"{r['micro_batch']} x {r['seq']}", "on" if r["gradient_checkpointing"] else "off",
                      kernels, f"{r['predicted_bytes'] / 2**30:.2f} GiB", f"{r['measured_bytes'] / 2**30:.2f} GiB",
                      f"{r['error']:+.1%}")
    Console().print(table)


if __name__ == "__main__":
    main()
