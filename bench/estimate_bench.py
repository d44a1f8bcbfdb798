"""The memory estimator against measured peaks, over several model sizes, micro-batches and lengths.

    .venv/bin/python bench/estimate_bench.py --device cuda                  # every CUDA case (about 25 min on an H200)
    .venv/bin/python bench/estimate_bench.py --device cuda --cases paper    # one group (bench/gpu.sh runs them one a call)
    .venv/bin/python bench/estimate_bench.py                                # the CPU: tiny and small shapes
    .venv/bin/python bench/estimate_bench.py --fit a.json b.json            # the allowance fit over reports' rows

Each case trains the engine (worker/training/recipe.py, the job spec's defaults: gradient
checkpointing, kernels and packing as this device resolves them) for a few steps on rows that fill
max_seq_length, in a fresh process, and sets what `estimate_peak_memory` predicts for that run
beside what it used:
- on a GPU, the peak reserved device memory (what the CUDA caching allocator took from the card,
  which is what runs out) and the peak allocated, from the first step on; the peak while loading
  (where the base is quantized as it loads) is its own column, since the estimate is of a step; a case that runs out of memory is a row that
  says so (measured "OOM"), and the cases after it still run;
- on the CPU, the growth of the process's resident memory from before the model loaded to its peak,
  against the estimate less its CUDA context. That is not the estimator's target (glibc's
  allocator keeps other slack, and the data and trainer live in the same memory), so CPU rows
  show that the sweep runs, not the estimate's 10 % accuracy.
Rows also carry the steady tokens/s (the steps after the first), so the cost of each memory saver
(activation offload, tiled MLP) reads off the rows beside the same case without them.

The case groups (--cases; --case names cases one by one):
- estimate: Llama 3.2 1B and Llama 3 8B at 2048 tokens, several micro-batches (the 10 % target);
- paper: the QLoRA paper's recipe (LoRA r=64, alpha 16 on every linear layer, micro-batch 1, 512
  tokens, gradient checkpointing, paged AdamW) on its own bases' shapes, LLaMA 1 33B and 65B;
- memory: Llama 3.1 8B's shape at 16k tokens with neither, either and both of activation offload
  and tiled MLPs, and at 32k tokens with both and with neither; and the standard recipe (train_bench's
  baseline) at 16k, which each engine row's peak is set against ("x standard").

After a CUDA run the report fits the estimate's allowance to the rows: measured peak reserved
minus the estimate's resident parts other than its allowance, as a constant plus a fraction of
those parts (CONTEXT_BYTES and FRAGMENTATION in worker/training/estimate.py); see fit_allowance.

The models are random Llama-architecture weights built here (bench/train_bench.py), nothing is
downloaded. Cases of one preset share its pre-quantized base, so only the first quantizes; the
large presets (train_bench.PREQUANTIZED) are built straight as that 4-bit base, layer by layer,
since their 16-bit weights would not fit the host (65B: 130 GB).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import train_bench  # noqa: E402
from bench.train_bench import PRESETS, engine_spec, ensure_model, run_child, save_report  # noqa: E402
from worker.training import estimate as estimator  # noqa: E402

STEPS = 4  # the peak comes with the first optimizer step (its state) and repeats every step after
TARGET = 0.10
ALLOWANCE_PART = "allowance"  # the estimate's part whose name starts so: what fit_allowance recalibrates


@dataclass(frozen=True)
class Case:
    """One run: PRESET:BATCH:SEQ[:OPTION...] on the command line, options in any order:
    nogc (gradient checkpointing off), offload (training.activation_offload), tiled (training.tiled_mlp),
    rN (LoRA rank N; 16 otherwise), alphaN (LoRA alpha; the spec's default otherwise),
    paper (the QLoRA paper's adapter: r64 alpha16),
    standard (not the engine but the standard recipe, bench/train_bench.py's baseline: what the engine's
    memory savers are measured against; rN only)."""

    preset: str
    batch: int
    seq: int
    checkpointing: bool = True
    offload: bool = False
    tiled: bool = False
    r: int = 16
    alpha: float | None = None
    standard: bool = False

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            preset, batch, seq, *options = text.split(":")
            fields: dict = {"preset": preset, "batch": int(batch), "seq": int(seq)}
        except ValueError:
            raise ValueError(f"{text!r}: expected PRESET:BATCH:SEQ[:OPTION...], e.g. 8b-long:1:16384:offload:tiled") from None
        if preset not in PRESETS:
            raise ValueError(f"{text!r}: no preset {preset!r}; presets: {', '.join(PRESETS)}")
        for option in options:
            if option in ("nogc", "offload", "tiled", "standard"):
                fields[{"nogc": "checkpointing"}.get(option, option)] = option != "nogc"
            elif option == "paper":
                fields.update(PAPER)
            elif option.startswith("alpha") and _number(option[5:]):
                fields["alpha"] = float(option[5:])
            elif option.startswith("r") and option[1:].isdigit():
                fields["r"] = int(option[1:])
            else:
                raise ValueError(f"{text!r}: unknown option {option!r}; "
                                 "options: nogc, offload, tiled, rN, alphaN, paper, standard")
        case = cls(**fields)
        if case.offload and not case.checkpointing:
            raise ValueError(f"{text!r}: offload moves what gradient checkpointing keeps; it cannot go with nogc")
        if case.standard and (case.offload or case.tiled or not case.checkpointing or case.alpha is not None):
            raise ValueError(f"{text!r}: the standard recipe is fixed (checkpointing on, no memory savers, "
                             "alpha 2r); with standard, only rN")
        return case

    def options(self) -> list[str]:
        return [o for o in ("" if self.checkpointing else "nogc", "offload" if self.offload else "",
                            "tiled" if self.tiled else "", f"r{self.r}" if self.r != 16 else "",
                            f"alpha{self.alpha:g}" if self.alpha is not None else "",
                            "standard" if self.standard else "") if o]

    @property
    def name(self) -> str:
        """The case as --case writes it."""
        return ":".join([self.preset, str(self.batch), str(self.seq), *self.options()])

    @property
    def file_stem(self) -> str:
        """Its files' names under the model's estimate/ folder (b4-s2048-gc, b1-s16384-gc-offload-tiled)."""
        rest = [o for o in self.options() if o != "nogc"]
        return "-".join([f"b{self.batch}", f"s{self.seq}", "gc" if self.checkpointing else "nogc", *rest])


def _number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


PAPER = {"r": 64, "alpha": 16.0}  # QLoRA section 4: r 64, alpha 16 on every linear layer
# In the order of what they settle, so that a call cut off by a device's time limit keeps the rows that
# matter most (each row is saved as it is measured): the standard recipe at 16k (what the savers'
# 0.4x target is against), the engine without and with both savers at 16k, with both at 32k (the
# 24 GiB target); then each saver alone, and 32k without them (it may run out of memory on a 24-80
# GiB card: its row says so).
LONG = [Case("8b-long", 1, 16384, standard=True), Case("8b-long", 1, 16384),
        Case("8b-long", 1, 16384, offload=True, tiled=True), Case("8b-long", 1, 32768, offload=True, tiled=True),
        Case("8b-long", 1, 16384, offload=True), Case("8b-long", 1, 16384, tiled=True), Case("8b-long", 1, 32768)]
GROUPS = {
    # Under ten minutes on one H100 with the 8B model already built (bench/gpu.sh train builds it).
    "estimate": [Case("1b", 1, 2048), Case("1b", 8, 2048), Case("1b", 4, 1024, checkpointing=False),
                 Case("8b", 1, 2048), Case("8b", 4, 2048)],
    # Its 1B cases alone (about 3 min with the model to build): for a device lent with little time left.
    "estimate-1b": [Case("1b", 1, 2048), Case("1b", 8, 2048), Case("1b", 4, 1024, checkpointing=False)],
    # Each under ten minutes on one H200, its model built here (bench/gpu.sh paper, bench/gpu.sh memory).
    "paper": [Case("33b", 1, 512, **PAPER), Case("65b", 1, 512, **PAPER)],
    "memory": LONG,
}
CASES = {"cuda": [case for name, group in GROUPS.items() if name != "estimate-1b" for case in group],
         "cpu": [Case("tiny", 2, 128), Case("tiny", 8, 256), Case("tiny", 8, 256, checkpointing=False)]}


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


def steady_tokens_per_s(steps: list[dict]) -> float | None:
    """Tokens per second over the steps after the first (which carries the warm-up: allocator growth,
    the optimizer state's creation); None with fewer than two steps."""
    if len(steps) < 2 or steps[-1]["t"] <= steps[0]["t"]:
        return None
    return (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["t"] - steps[0]["t"])


def run_case(work: Path, case: Case, device: str, seed: int, keep_runs: bool = True) -> dict:
    quantized = case.preset in train_bench.PREQUANTIZED
    model = ensure_model(work, PRESETS[case.preset], seed, quantized=quantized)
    # The cases of one model share its pre-quantized base: runs/quantized, or the model itself where it
    # was built pre-quantized.
    runs = model.parent / "estimate"
    runs.mkdir(exist_ok=True)
    name = case.file_stem
    data = runs / f"{name}.jsonl"
    write_full_rows(data, rows=STEPS * case.batch, seq=case.seq, vocab=PRESETS[case.preset]["vocab_size"], seed=seed)
    settings = {"device": device, "steps": STEPS, "batch": case.batch, "seq": case.seq, "r": case.r, "alpha": case.alpha,
                "lr": 2e-4, "seed": seed, "packing": "auto", "gradient_checkpointing": case.checkpointing,
                "activation_offload": case.offload, "tiled_mlp": case.tiled}
    if quantized:
        settings["quantized_cache"] = str(model)  # built pre-quantized: the base is its own cache
    # What the child's engine run is predicted to use: the same spec, the same estimate.
    spec = engine_spec(str(model), settings)
    e = estimator.estimate_peak_memory(spec, json.loads((model / "config.json").read_text()))
    allowance = sum(size for part, size in e.parts.items() if part.startswith(ALLOWANCE_PART))
    row = {"case": case.name, "preset": case.preset, "micro_batch": case.batch, "seq": case.seq,
           "gradient_checkpointing": case.checkpointing,
           "activation_offload": case.offload, "tiled_mlp": case.tiled, "standard_recipe": case.standard,
           "lora_r": spec.lora.r, "lora_alpha": 2 * spec.lora.r if case.standard else spec.lora.alpha,
           "predicted_parts": dict(e.parts), "predicted_pageable": sorted(e.pageable),
           # The estimate's resident parts (through PyTorch's allocator on a GPU) less its allowance: what the fit reads.
           "predicted_allocated_bytes": e.resident - allowance, "predicted_allowance_bytes": allowance,
           "predicted_host_bytes": getattr(e, "host_bytes", 0)}
    path = "baseline" if case.standard else "engine"
    try:
        raw = run_child(path, model, data, settings, runs / f"{name}.json")
    except subprocess.CalledProcessError as exc:  # not an OOM (the child records those): a failure, shown above
        raw = {"failed": f"the {path}'s process exited with {exc.returncode}; its output is above"}
    finally:
        if not keep_runs:
            shutil.rmtree(runs / f"{name}-run", ignore_errors=True)  # the adapter: 3 GiB for 65B at r=64
    if case.standard:  # the estimate is the engine's: beside the standard recipe's peak it predicts nothing
        predicted = None
    elif device == "cuda":
        # PyTorch's allocator does not see the paged optimizer's unified memory: compare what it does see.
        predicted = e.resident
    else:  # bitsandbytes' paged optimizers fall back to plain CPU memory there, inside the process RSS
        predicted = e.total - estimator.CONTEXT_BYTES  # a CPU process has no CUDA context to allow for
    row.update(predicted_bytes=predicted, speedups=raw.get("speedups", {}),
               tokens_per_s=steady_tokens_per_s(raw.get("steps", [])), oom=raw.get("oom"), failed=raw.get("failed"))
    if raw.get("failed") or raw.get("oom"):
        row.update(measured_bytes="failed" if raw.get("failed") else "OOM", allocated_bytes=None, error=None)
        if raw.get("memory"):  # how far it got
            row["reserved_before_oom_bytes"] = raw["memory"]["reserved"] if device == "cuda" else None
    elif device == "cuda":
        peak = raw["memory"]["reserved"]
        row.update(measured_bytes=peak, allocated_bytes=raw["memory"]["allocated"],
                   loading_reserved_bytes=(raw["memory"].get("loading") or {}).get("reserved"))
    else:
        peak = raw["memory"]["reserved"] - raw["rss_before_model_bytes"]
        row.update(measured_bytes=peak, allocated_bytes=peak)
    if measured(row):
        row["error"] = predicted / row["measured_bytes"] - 1 if predicted is not None else None
    if device == "cuda":
        row.update(measured_pinned_bytes=raw.get("pinned_peak_bytes"), cuda_context_bytes=raw.get("cuda_context_bytes"),
                   outside_allocator_bytes=raw.get("outside_allocator_bytes"))
    return row


def measured(row: dict) -> bool:
    return isinstance(row.get("measured_bytes"), int)


def estimated(row: dict) -> bool:
    """A measured row of the engine, which the estimate is for (not the standard recipe's)."""
    return measured(row) and not row.get("standard_recipe")


def compare(rows: list[dict]) -> None:
    """Each row against others of its shape: its tokens/s against the engine's without offload and tiling
    (what the savers cost), its measured peak against the standard recipe's (what they save)."""
    def shape(r):
        return (r["preset"], r["micro_batch"], r["seq"], r["lora_r"])

    plain = {(*shape(r), r["gradient_checkpointing"], r["lora_alpha"]): r for r in rows
             if not (r["activation_offload"] or r["tiled_mlp"] or r.get("standard_recipe")) and r.get("tokens_per_s")}
    standard = {shape(r): r for r in rows if r.get("standard_recipe") and measured(r)}
    for r in rows:
        base = plain.get((*shape(r), r["gradient_checkpointing"], r["lora_alpha"]))
        r["tokens_per_s_vs_plain"] = r["tokens_per_s"] / base["tokens_per_s"] if base and r.get("tokens_per_s") else None
        reference = standard.get(shape(r))
        r["peak_vs_standard"] = (r["measured_bytes"] / reference["measured_bytes"]
                                 if reference and measured(r) and not r.get("standard_recipe") else None)


def fit_allowance(rows: list[dict]) -> dict:
    """The allowance the measurements call for, fitted like the estimate writes it: CONTEXT_BYTES plus
    FRAGMENTATION x the resident parts (A, every part but the pageable state and the allowance).

    Each measured row gives y = measured peak reserved - A. Least squares fits y = C + f.A over the
    rows (f held at 0 if the fit makes it negative, and at the current FRAGMENTATION with one row or
    one size of A). Least squares centres the estimate on the rows, so about half would be
    under-predicted; the covering constant raises C by the largest shortfall left, so that with it
    no measured row needs more than its estimate. Admission needs the covering one: a job admitted
    on an under-estimate runs out of memory. The reserved peak leaves out the CUDA context (and any
    other memory outside PyTorch's allocator): `outside_allocator_bytes` is the most the rows saw of
    that; the estimate's allowance is meant to cover it too, so CONTEXT_BYTES = covering C + that."""
    points = [(r["predicted_allocated_bytes"], r["measured_bytes"] - r["predicted_allocated_bytes"])
              for r in rows if estimated(r)]
    if not points:
        return {"skipped": "no measured rows"}
    n = len(points)
    mean_a = sum(a for a, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((a - mean_a) ** 2 for a, _ in points)
    if n >= 2 and spread > 0:
        f = sum((a - mean_a) * (y - mean_y) for a, y in points) / spread
        method = "least squares over the rows"
        if f < 0:
            f, method = 0.0, "least squares with the fraction held at 0 (the unconstrained fit made it negative)"
    else:
        f, method = estimator.FRAGMENTATION, "one point: the fraction held at the current FRAGMENTATION"
    c = mean_y - f * mean_a
    shortfall = max(y - (c + f * a) for a, y in points)
    outside = max((max(r.get("outside_allocator_bytes") or 0, r.get("cuda_context_bytes") or 0)
                   for r in rows if estimated(r)), default=0)
    covering = c + shortfall
    return {"method": method, "rows": n, "context_bytes": int(c), "fragmentation": f,
            "covering_context_bytes": int(covering), "outside_allocator_bytes": int(outside),
            "suggested": {"CONTEXT_BYTES": int(covering + outside), "FRAGMENTATION": round(f, 4)},
            "current": {"CONTEXT_BYTES": estimator.CONTEXT_BYTES, "FRAGMENTATION": estimator.FRAGMENTATION},
            "residuals_bytes": [int(y - (covering + f * a)) for a, y in points]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cases", choices=["all", *GROUPS], default="all",
                   help="on CUDA, one group of cases (default: all of them); the CPU has its own")
    p.add_argument("--case", action="append", metavar="PRESET:BATCH:SEQ[:nogc][:offload][:tiled][:rN][:alphaN][:paper]",
                   help="instead of the default cases, e.g. --case 8b:4:2048 --case 1b:4:1024:nogc "
                        "--case 8b-long:1:32768:offload:tiled --case 65b:1:512:paper")
    p.add_argument("--work", help="where models are built and kept between runs (default: a new temporary folder)")
    p.add_argument("--free-disk", action="store_true",
                   help="delete each run's outputs after it, and a preset's model after its last case (33B and 65B "
                        "take 16 and 32 GiB, where a lent device has 64 GiB of disk)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "estimate_bench.json"))
    p.add_argument("--fit", nargs="+", metavar="REPORT",
                   help="run nothing: fit the allowance over the rows of these reports (CUDA ones) and print it")
    args = p.parse_args(argv)
    if args.fit:
        reports = {path: json.loads(Path(path).read_text()) for path in args.fit}
        for path in [path for path, r in reports.items() if r["device"] != "cuda"]:
            print(f"{path}: measured on the {reports.pop(path)['device']}, not fitted")
        fit = fit_allowance([row for r in reports.values() for row in r["rows"]])
        print_fit(fit)
        return fit
    if args.case:
        try:
            cases = [Case.parse(text) for text in args.case]
        except ValueError as exc:
            p.error(str(exc))
    elif args.cases != "all":
        if args.device != "cuda":
            p.error(f"--cases {args.cases} is a group of CUDA cases; on the CPU, run its default cases or --case")
        cases = GROUPS[args.cases]
    else:
        cases = CASES[args.device]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qlora-estimate-bench-"))
    rows = []
    for i, case in enumerate(cases):
        rows.append(run_case(work, case, device=args.device, seed=args.seed, keep_runs=not args.free_disk))
        # Saved after every case: a run stopped by a device's time limit still leaves the rows it measured.
        save_report(build_report(args.device, rows), args.out)
        if args.free_disk and all(later.preset != case.preset for later in cases[i + 1:]):
            quantized = case.preset in train_bench.PREQUANTIZED
            shutil.rmtree(ensure_model_dir(work, case.preset, args.seed, quantized), ignore_errors=True)
    report = build_report(args.device, rows)
    save_report(report, args.out)
    print_table(report)
    return report


def build_report(device: str, rows: list[dict]) -> dict:
    compare(rows)
    return {"device": device, "target": TARGET, "steps": STEPS, "rows": rows,
          "within_target": all(abs(r["error"]) <= TARGET for r in rows if estimated(r)) if device == "cuda" else None,
          "out_of_memory": [r["case"] for r in rows if r["oom"]],
          "measured": "peak reserved device memory in training (loading apart)" if device == "cuda"
          else "growth of process RSS from before the model loaded (not the GPU target's measure)",
          "allowance_fit": fit_allowance(rows) if device == "cuda" else
          {"skipped": "on the CPU the measure is process RSS, not device memory: the allowance is fitted "
                      "from CUDA rows only"}}


def ensure_model_dir(work: Path, preset: str, seed: int, quantized: bool) -> Path:
    """The folder ensure_model builds a preset's model in (without building it)."""
    return work / train_bench.model_name(PRESETS[preset], seed, quantized) / "model"


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "-" if n is None else str(n)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"estimate_peak_memory against the measured peak on {report['device']} "
                        f"({report['measured']})")
    for col in ("model", "recipe", "micro-batch x seq", "LoRA r", "memory savers", "kernels", "predicted", "measured",
                "error", "x standard", "loading peak", "tokens/s (x plain)", "host: predicted / pinned"):
        table.add_column(col, justify="left" if col in ("model", "recipe", "memory savers", "kernels") else "right")
    for r in report["rows"]:
        kernels = ", ".join(k for k in ("packing", "liger") if r["speedups"].get(k)) or "none"
        savers = ", ".join(name for name, on in (("checkpointing", r["gradient_checkpointing"]),
                                                 ("offload", r["activation_offload"]), ("tiled MLP", r["tiled_mlp"])) if on)
        speed = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        if r.get("tokens_per_s_vs_plain") and (r["activation_offload"] or r["tiled_mlp"]):
            speed += f" ({r['tokens_per_s_vs_plain']:.2f}x)"
        host = gib(r["predicted_host_bytes"]) + (f" / {gib(r['measured_pinned_bytes'])}"
                                                   if r.get("measured_pinned_bytes") is not None else "")
        table.add_row(r["preset"], "standard" if r.get("standard_recipe") else "engine",
                      f"{r['micro_batch']} x {r['seq']}", str(r["lora_r"]), savers or "none", kernels,
                      gib(r["predicted_bytes"]), gib(r["measured_bytes"]),
                      f"{r['error']:+.1%}" if r["error"] is not None else "-",
                      f"{r['peak_vs_standard']:.2f}x" if r.get("peak_vs_standard") else "-",
                      gib(r["loading_reserved_bytes"]) if r.get("loading_reserved_bytes") else "-", speed, host)
    Console(width=200).print(table)  # whole rows in a log too, where the terminal's width is not known
    print_fit(report["allowance_fit"])


def print_fit(fit: dict) -> None:
    if "skipped" in fit:
        print(f"allowance fit skipped: {fit['skipped']}")
        return
    s, c = fit["suggested"], fit["current"]
    print(f"allowance fit ({fit['method']}, {fit['rows']} rows), measured peak reserved = parts + C + f x parts:\n"
          f"  least squares: C = {gib(fit['context_bytes'])}, f = {fit['fragmentation']:.4f}; covering every row: "
          f"C = {gib(fit['covering_context_bytes'])}\n"
          f"  outside PyTorch's allocator (CUDA context, kernels), at most: {gib(fit['outside_allocator_bytes'])}\n"
          f"  worker/training/estimate.py: CONTEXT_BYTES = {s['CONTEXT_BYTES']} ({gib(s['CONTEXT_BYTES'])}; now "
          f"{gib(c['CONTEXT_BYTES'])}), FRAGMENTATION = {s['FRAGMENTATION']} (now {c['FRAGMENTATION']})")


if __name__ == "__main__":
    main()
