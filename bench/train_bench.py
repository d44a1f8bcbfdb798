"""Side-by-side training benchmark: the standard QLoRA recipe against this engine.

    .venv/bin/python bench/train_bench.py --preset tiny                 # CPU, a minute
    .venv/bin/python bench/train_bench.py --preset 8b --device cuda     # one H100/H200

Both paths train the same randomly initialised Llama-architecture model (built here, nothing is
downloaded) on the same synthetic chat data with the same seed, LoRA rank and target modules:

(a) baseline: what every QLoRA tutorial runs — transformers + peft + bitsandbytes + trl with
    their defaults: padded batches, SDPA attention, gradient checkpointing, paged AdamW;
(b) engine: worker/training/recipe.py with the job spec's defaults (packing, kernels and the
    rest resolve to what this device supports), run twice: cold (it quantizes the base and saves
    it) and cached (it loads the pre-quantized base), for the cache's time-to-first-step.

Each path runs in a fresh process, so "time to first step" counts interpreter start, imports,
loading and quantizing the model. Reported per path, and as engine/baseline ratios: steady
tokens/s (non-pad tokens, warm-up steps excluded), model FLOPs utilisation (4·N + attention per
token against this device's measured matmul rate in the compute dtype both paths train in: bf16
on GPUs), peak allocated / reserved device memory
(process RSS on the CPU), time to the first optimizer step, and the final loss; the loss-parity
column compares the two loss curves at equal tokens seen.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {  # Llama-architecture shapes; 1b and 8b are Llama 3.2 1B and Llama 3 8B
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}
WARMUP_STEPS = 3  # compilation, allocator growth and cache warm-up stay out of the steady rate
LOSS_PARITY = 0.05  # the engine's loss curve within 5% of the baseline's at equal tokens seen


# ---------------------------------------------------------------- the model and data, built here


def build_model(out: Path, dims: dict, seed: int) -> None:
    """Random Llama weights and a word-level tokenizer whose vocabulary is w0..wN (any size, instantly)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from worker.training.tokenization import DEFAULT_CHAT_TEMPLATE

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(dims["vocab_size"] - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=specials[3:])
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(**dims, max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, dtype="bfloat16")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure_model(work: Path, dims: dict, seed: int) -> Path:
    """The model for these dimensions and seed under `work`, built on first use and kept: building
    and saving an 8B model takes minutes, and benchmarks of one size can share it."""
    name = "llama-" + "-".join(f"{dims[k]}" for k in sorted(dims)) + f"-seed{seed}"
    model = work / name / "model"
    if not (model / "config.json").is_file():
        build_model(model, dims, seed)
    return model


def write_data(path: Path, rows: int, seq: int, vocab: int, seed: int) -> None:
    """Chat rows of varied length (a long tail, like real instruction data): padding is where a
    padded batch wastes compute."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab - 8)]
    with open(path, "w") as f:
        for _ in range(rows):
            total = max(16, min(seq - 8, int(rng.lognormvariate(0, 0.6) * seq / 3)))
            prompt = " ".join(rng.choices(words, k=total * 2 // 3))
            answer = " ".join(rng.choices(words, k=total - total * 2 // 3))
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}) + "\n")


# ---------------------------------------------------------------- one path, in its own process


def child(path: str, model_dir: str, data: str, settings: dict, started: float, out: str) -> None:
    """Runs one path and writes its measurements to `out` (JSON)."""
    import torch
    from transformers import TrainerCallback

    device = settings["device"]
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            steps.append({"t": time.time(), "tokens": state.num_input_tokens_seen})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    if path.startswith("engine"):
        from worker.training.recipe import run
        from worker.training.spec import JobSpec

        rss_before_model = _rss_now()  # the interpreter and libraries, before any weights

        spec = JobSpec.parse({
            "base_model": model_dir, "lora": {"r": settings["r"]},
            "training": {"max_steps": settings["steps"], "per_device_batch_size": settings["batch"],
                         "packing": settings["packing"],
                         "gradient_accumulation_steps": 1, "max_seq_length": settings["seq"],
                         "gradient_checkpointing": settings.get("gradient_checkpointing", True),
                         "learning_rate": settings["lr"], "logging_steps": 1, "save_steps": 10**6,
                         "seed": settings["seed"], "warmup_ratio": 0.0},
            "output": {"merge": False},
        })
        # The first engine run quantizes the base and saves it; the second loads it (the cache).
        result = run(spec, data, Path(out).parent / f"{Path(out).stem}-run", extra_callbacks=(Clock(),),
                     quantized_cache=Path(out).parent / "quantized")
        from worker.training.estimate import estimate_peak_memory

        config = json.loads((Path(model_dir) / "config.json").read_text())
        detail = {"speedups": result.summary["speedups"], "compute_dtype": result.summary["compute_dtype"],
                  "quantized_base": result.summary["quantized_base"],
                  # What admission control predicts for this run (meaningful on a GPU, where the
                  # measured peak is device memory; on the CPU it is process RSS).
                  "predicted_peak_bytes": (estimate := estimate_peak_memory(spec, config)).total,
                  # Without a paged optimizer's state, which lives in CUDA unified memory: not in PyTorch's
                  # allocator statistics, which are what a CUDA run measures.
                  "predicted_resident_bytes": estimate.resident,
                  "rss_before_model_bytes": rss_before_model}
    else:
        detail = baseline(model_dir, data, settings, Clock())
    memory = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()} \
        if device == "cuda" else {"allocated": _rss_peak(), "reserved": _rss_peak()}
    Path(out).write_text(json.dumps({"steps": steps, "started": started, "memory": memory, **detail}))


def baseline(model_dir: str, data: str, settings: dict, clock) -> dict:
    """The standard recipe, as QLoRA tutorials write it: trl's SFTTrainer with a peft_config."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from worker.training.data import read_jsonl
    from worker.training.model import resolve_compute_dtype
    from worker.training.tokenization import encode_examples, prepare_tokenizer

    cuda = settings["device"] == "cuda"
    dtype = resolve_compute_dtype("auto", settings["device"])  # the same compute dtype as the engine
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tokenizer)
    # The same labels as the engine (assistant turns and EOS), so both learn exactly the same tokens.
    rows, _ = encode_examples(read_jsonl(data).examples, tokenizer, max_seq_length=settings["seq"],
                              train_on_inputs=False)
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="sdpa", device_map={"": 0 if cuda else "cpu"}, dtype=dtype,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), callbacks=[clock],
        peft_config=LoraConfig(r=settings["r"], lora_alpha=2 * settings["r"], lora_dropout=0.05,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        args=SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=settings["steps"],
                       per_device_train_batch_size=settings["batch"], gradient_accumulation_steps=1,
                       learning_rate=settings["lr"], optim="paged_adamw_32bit", gradient_checkpointing=True,
                       # The engine's schedule and clipping (QLoRA's), so the loss curves can be compared.
                       lr_scheduler_type="constant", max_grad_norm=0.3, warmup_steps=0,
                       max_length=settings["seq"], logging_steps=1, save_strategy="no", report_to="none",
                       bf16=dtype == torch.bfloat16, use_cpu=not cuda,
                       seed=settings["seed"], data_seed=settings["seed"],
                       include_num_input_tokens_seen="non_padding", disable_tqdm=True),
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout
    trainer.train()
    return {"speedups": {"packing": False, "attention": "sdpa", "liger": False}, "compute_dtype": str(dtype)}


def _rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(path: str, model: Path, data: Path, settings: dict, out: Path) -> dict:
    """Runs one path (`child`) in a fresh process on settings["device"] and returns what it measured."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0") if settings["device"] == "cuda" else ""
    subprocess.run([sys.executable, __file__, "--child", path, str(model), str(data), json.dumps(settings),
                    str(time.time()), str(out)], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": visible},
                   cwd=ROOT)
    return json.loads(out.read_text())


def save_report(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))


# ---------------------------------------------------------------- the comparison


def matmul_rate(device: str) -> tuple[float, str]:
    """This device's measured matmul FLOP/s in the compute dtype the runs use (the MFU denominator):
    bf16 on GPUs and on CPUs that compute it natively; float32 on other CPUs, where bf16 matmuls
    are emulated at a fraction of the speed and the training runs in float32 anyway."""
    import torch

    from worker.training.model import resolve_compute_dtype

    n = 8192 if device == "cuda" else 1024
    dtype = resolve_compute_dtype("auto", device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 20 if device == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start), str(dtype).removeprefix("torch.")


def flops_per_token(dims: dict, seq: int) -> float:
    """4·N (forward 2N, backward through frozen weights 2N) plus causal attention's score and value matmuls."""
    from worker.training.estimate import ModelShape

    shape = ModelShape.from_config(dims)
    # The output head's matmul counts; the embedding lookup does not.
    n = shape.linear_params + shape.vocab * shape.hidden
    attention = 4 * shape.layers * shape.heads * shape.head_dim * seq  # causal: half of 2·2·S·d, forward and backward
    return 4 * n + attention


def summarize(raw: dict, dims: dict, seq: int, rate: float) -> dict:
    steps = raw["steps"]
    steady = steps[WARMUP_STEPS:]
    tokens = steady[-1]["tokens"] - steady[0]["tokens"]
    seconds = steady[-1]["t"] - steady[0]["t"]
    tps = tokens / seconds if seconds > 0 else float("nan")
    losses = [(s["tokens"], s["loss"]) for s in steps if "loss" in s]
    return {
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token(dims, seq) / rate,
        "peak_allocated_bytes": raw["memory"]["allocated"],
        "peak_reserved_bytes": raw["memory"]["reserved"],
        "time_to_first_step_s": steps[0]["t"] - raw["started"],
        "final_loss": losses[-1][1],
        "loss_curve": losses,
        "speedups": raw["speedups"],
        "quantized_base": raw.get("quantized_base"),
        "predicted_peak_bytes": raw.get("predicted_peak_bytes"),
    }


def loss_parity(baseline: list, engine: list) -> float:
    """Largest relative gap between the engine's loss and the baseline's at the same tokens seen
    (over the second half of training, after the early, noisiest steps)."""
    import bisect

    tokens = [t for t, _ in baseline]
    gaps = []
    for t, loss in engine[len(engine) // 2:]:
        i = min(bisect.bisect_left(tokens, t), len(baseline) - 1)
        gaps.append(abs(loss - baseline[i][1]) / baseline[i][1])
    return max(gaps) if gaps else float("nan")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--hidden", type=int), p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int), p.add_argument("--heads", type=int), p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="the engine's training.packing (auto: the engine's default for this device)")
    p.add_argument("--work", help="where the model is built and kept for later runs (default: a new temporary folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_bench.json"))
    args = p.parse_args(argv)
    dims = dict(PRESETS[args.preset])
    for key, value in (("hidden_size", args.hidden), ("intermediate_size", args.intermediate),
                       ("num_hidden_layers", args.layers), ("num_attention_heads", args.heads),
                       ("num_key_value_heads", args.kv_heads), ("vocab_size", args.vocab)):
        if value:
            dims[key] = value
    settings = {"device": args.device, "steps": args.steps, "batch": args.batch, "seq": args.seq, "r": args.r,
                "lr": args.lr, "seed": args.seed,
                "packing": {"auto": "auto", "on": True, "off": False}[args.packing]}

    model = ensure_model(Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qlora-train-bench-")),
                         dims, args.seed)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=model.parent))  # this run's data, results and cache
    write_data(work / "train.jsonl", rows=args.steps * args.batch * 2, seq=args.seq, vocab=dims["vocab_size"],
               seed=args.seed)
    results = {path: run_child(path, model, work / "train.jsonl", settings, work / f"{path}.json")
               for path in ("baseline", "engine", "engine-cached")}
    rate, rate_dtype = matmul_rate(args.device)
    report = {"preset": args.preset, "dims": dims, "settings": settings, "matmul_flops_per_s": rate,
              "matmul_dtype": rate_dtype,
              "warmup_steps": WARMUP_STEPS}
    for path in results:
        report[path] = summarize(results[path], dims, args.seq, rate)
    b, e = report["baseline"], report["engine"]
    report["ratio"] = {k: e[k] / b[k] for k in ("tokens_per_s", "mfu", "peak_allocated_bytes", "peak_reserved_bytes",
                                                 "time_to_first_step_s", "final_loss")}
    if args.device == "cuda":
        report["estimator"] = {"predicted_bytes": e["predicted_peak_bytes"],
                               "measured_reserved_bytes": e["peak_reserved_bytes"],
                               "error": e["predicted_peak_bytes"] / e["peak_reserved_bytes"] - 1}
    cached = report["engine-cached"]
    report["cache"] = {"cold_time_to_first_step_s": e["time_to_first_step_s"],
                       "cached_time_to_first_step_s": cached["time_to_first_step_s"],
                       "ratio": cached["time_to_first_step_s"] / e["time_to_first_step_s"],
                       "same_loss_curve": cached["loss_curve"] == e["loss_curve"]}
    report["loss_parity"] = {"max_relative_gap": loss_parity(b["loss_curve"], e["loss_curve"]),
                             "tolerance": LOSS_PARITY}
    report["loss_parity"]["within"] = report["loss_parity"]["max_relative_gap"] <= LOSS_PARITY
    save_report(report, args.out)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"QLoRA training, {report['preset']} on {report['settings']['device']}: "
                        f"{report['settings']['steps']} steps x {report['settings']['batch']} x "
                        f"{report['settings']['seq']} tokens, r={report['settings']['r']}")
    table.add_column("")
    for col in ("baseline", "engine", "engine/baseline"):
        table.add_column(col, justify="right")
    rows = [("tokens/s (non-pad, steady)", "tokens_per_s", "{:,.0f}"), ("MFU", "mfu", "{:.1%}"),
            ("peak allocated", "peak_allocated_bytes", "bytes"), ("peak reserved", "peak_reserved_bytes", "bytes"),
            ("time to first step", "time_to_first_step_s", "{:.1f} s"), ("final loss", "final_loss", "{:.4f}")]
    for label, key, fmt in rows:
        def show(v, fmt=fmt):
            return f"{v / 2**20:,.0f} MiB" if fmt == "bytes" else fmt.format(v)
        table.add_row(label, show(report["baseline"][key]), show(report["engine"][key]), f"{report['ratio'][key]:.2f}")
    parity = report["loss_parity"]
    table.add_row("loss parity", "", "", f"{'ok' if parity['within'] else 'NO'}: "
                  f"{parity['max_relative_gap']:.1%} (<= {parity['tolerance']:.0%})")
    Console().print(table)
    cache = report["cache"]
    Console().print(f"pre-quantized base cache: time to first step {cache['cold_time_to_first_step_s']:.1f} s cold, "
                    f"{cache['cached_time_to_first_step_s']:.1f} s cached ({cache['ratio']:.2f}x); "
                    f"same loss curve: {cache['same_loss_curve']}")
    Console().print(f"engine speedups: {report['engine']['speedups']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, path, model_dir, data, settings, started, out = sys.argv
        child(path, model_dir, data, json.loads(settings), float(started), out)
    else:
        main()
