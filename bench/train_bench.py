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
import hashlib
import json
import os
import random
import shutil
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
    # Llama 3.1 8B: the 8B shape with its 128k context (llama3 RoPE scaling), for the long-context cases.
    "8b-long": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}),
    # The QLoRA paper's own bases, LLaMA 1 33B and 65B (tests/model_configs.py): no grouped-query attention.
    "33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                num_key_value_heads=52, vocab_size=32000, max_position_embeddings=2048),
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=64, vocab_size=32000, max_position_embeddings=2048),
}
# Built straight as the 4-bit checkpoint the engine's quantized cache holds (build_quantized_model), one
# layer at a time: 65B in bf16 is 130 GB, more than a GPU host's memory and disk. Their runs load that
# checkpoint as a cache hit, so train_bench's cold/cached comparison does not apply to them.
PREQUANTIZED = {"8b-long", "33b", "65b"}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
              "vocab_size")
WARMUP_STEPS = 3  # compilation, allocator growth and cache warm-up stay out of the steady rate
LOSS_PARITY = 0.05  # the engine's loss curve within 5% of the baseline's at equal tokens seen


# ---------------------------------------------------------------- the model and data, built here


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer whose vocabulary is w0..wN (any size, instantly), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from worker.training.tokenization import DEFAULT_CHAT_TEMPLATE

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(vocab_size - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=specials[3:])
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def llama_config(dims: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**{"max_position_embeddings": 8192, **dims}, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, dtype="bfloat16")


def build_model(out: Path, dims: dict, seed: int) -> None:
    """Random Llama weights in bf16 and the word-level tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(llama_config(dims)).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(dims["vocab_size"]).save_pretrained(out)


def build_quantized_model(out: Path, dims: dict, seed: int) -> None:
    """Random Llama weights saved as the engine's quantized cache holds a base (NF4 linear layers with
    double quantization, the engine's `quantization_config`; embeddings, head and norms in the compute
    dtype the engine loads a base in on this device: bf16, or float32 on a CPU without native bf16), plus
    the tokenizer: a directory that is both the base model and its own pre-quantized cache
    (`load_base_model(out, ..., quantized_cache=out)` loads it as a cache hit).

    Built one layer at a time so that no memory ever holds the model in 16 bits (65B: 130 GB): the
    skeleton is made on the meta device and transformers' bitsandbytes quantizer swaps its linear
    layers for Linear4bit, as its loader does; then each linear layer gets random weights on the
    device (the GPU, else the CPU), quantized there at once the way the loader quantizes (Params4bit),
    so only one layer's 16-bit matrix exists at a time, and transformers writes the checkpoint in
    shards of 4 GB, which is what host memory holds while it writes. The weights are drawn as Llama's
    initialisation draws them: normal(0, initializer_range), norms 1.
    """
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    from worker.training.model import pick_device, quantization_config, resolve_compute_dtype
    from worker.training.spec import QuantizationSpec

    device = pick_device()
    config = llama_config(dims)
    dtype = resolve_compute_dtype("auto", device)  # what the engine's own cache of this base would hold
    bnb_config = quantization_config(QuantizationSpec(), dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    quantizer.preprocess_model(model, dtype=dtype, device_map={"": device})
    generator = torch.Generator(device).manual_seed(seed)

    def normal(shape):
        return torch.empty(shape, dtype=dtype, device=device).normal_(
            0, config.initializer_range, generator=generator)

    for module in model.modules():  # embeddings, then layer by layer, then the final norm and the head
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
                # What transformers' loader does with a 16-bit weight (its Bnb4bitQuantize): quantize on the device.
                value = bnb.nn.Params4bit(normal(param.shape), requires_grad=False, **param.__dict__).to(device)
            elif "norm" in type(module).__name__.lower():
                value = torch.nn.Parameter(torch.ones(param.shape, dtype=dtype, device=device),
                                           requires_grad=False)
            else:
                value = torch.nn.Parameter(normal(param.shape), requires_grad=False)
            setattr(module, name, value)
    with torch.device(device):  # the rotary embedding's buffers, off the meta device
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"left on the meta device: {left[:5]}"
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)  # config.quantization_config, as a loaded 4-bit model has it
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    build_tokenizer(dims["vocab_size"]).save_pretrained(out)


def model_name(dims: dict, seed: int, quantized: bool = False) -> str:
    """The folder of a built model: its shape (the same names as ever for shape-only presets), a hash of
    any other config it sets (context length, RoPE), and whether it was built pre-quantized."""
    shape = "-".join(f"{dims[k]}" for k in sorted(dims) if k in SHAPE_KEYS)
    extra = {k: v for k, v in dims.items() if k not in SHAPE_KEYS}
    tag = "-" + hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8] if extra else ""
    return f"llama-{'nf4-' if quantized else ''}{shape}{tag}-seed{seed}"


def ensure_model(work: Path, dims: dict, seed: int, quantized: bool = False) -> Path:
    """The model for these dimensions and seed under `work`, built on first use and kept: building
    and saving an 8B model takes minutes, and benchmarks of one size can share it. `quantized`:
    built as a pre-quantized 4-bit checkpoint (build_quantized_model).

    The build runs in its own process, so this one never holds device memory (nor a CUDA context)
    while the runs it starts measure theirs, and lands in place only when complete: a build cut off
    (a device's time limit) leaves nothing that looks like a model."""
    model = work / model_name(dims, seed, quantized) / "model"
    if not (model / "config.json").is_file():
        partial = model.with_name("model.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--build", str(partial), json.dumps(dims), str(seed),
                        "nf4" if quantized else "bf16"], check=True, cwd=ROOT)
        shutil.rmtree(model, ignore_errors=True)
        os.rename(partial, model)
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


def engine_spec(model_dir: str, settings: dict):
    """The job spec an engine run trains with these settings (torch-free: estimate_bench predicts from it).
    No merge, no eval report: a bench measures training. Optional settings, each the spec's own default
    where absent: "alpha" and "dropout" (lora), and
    "activation_offload" and "tiled_mlp", which default to false here, not to the spec's "auto", so a
    bench measures what it names."""
    from worker.training.spec import JobSpec

    lora = {"r": settings["r"], **{k: settings[k] for k in ("alpha", "dropout") if settings.get(k) is not None}}
    return JobSpec.parse({
        "base_model": model_dir, "lora": lora,
        "training": {"max_steps": settings["steps"], "per_device_batch_size": settings["batch"],
                     "packing": settings["packing"],
                     "gradient_accumulation_steps": 1, "max_seq_length": settings["seq"],
                     "gradient_checkpointing": settings.get("gradient_checkpointing", True),
                     "activation_offload": settings.get("activation_offload", False),
                     "tiled_mlp": settings.get("tiled_mlp", False),
                     "learning_rate": settings["lr"], "logging_steps": 1, "save_steps": 10**6,
                     "seed": settings["seed"], "warmup_ratio": 0.0},
        "output": {"merge": False},
        # No eval report: it would reload the base and generate after training, minutes a run, and its
        # full-logits forward would count in the peak read after the run.
        "eval": {"prompts": 0},
    })


def is_out_of_memory(exc: BaseException) -> bool:
    """The engine's TrainingError for an OOM (in a step, or in what comes after), or an OOM anywhere else."""
    from worker.training.memory import is_out_of_memory as failed_allocation

    return str(exc).startswith("out of memory") or failed_allocation(exc)


def child(path: str, model_dir: str, data: str, settings: dict, started: float, out: str) -> None:
    """Runs one path and writes its measurements to `out` (JSON). A run that runs out of memory
    writes what it measured up to then, with "oom" saying so, and exits normally."""
    import torch
    from transformers import TrainerCallback

    device = settings["device"]
    steps: list[dict] = []
    outside: list[int] = []  # CUDA: device memory outside PyTorch's allocator at each step's end
    loading: dict = {}  # CUDA: the peaks up to the first step (loading, quantizing, caching the base)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if device != "cuda":
                return
            # The peaks from here on are training's: loading can peak higher (a base quantized as it
            # loads), and the estimate is of a step, so the two are measured apart.
            loading.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
            if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
                torch.cuda.reset_peak_host_memory_stats()  # pinned memory from here on: training's, not loading's

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            steps.append({"t": time.time(), "tokens": state.num_input_tokens_seen})
            if device == "cuda":
                outside.append(_outside_allocator())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    context = None
    if device == "cuda":  # the CUDA context alone, before any weights: device memory outside the allocator
        torch.zeros(1, device="cuda")
        context = _outside_allocator()
    rss_before_model = _rss_now()  # the interpreter and libraries, before any weights
    if path.startswith("engine"):
        from worker.training.estimate import estimate_peak_memory
        from worker.training.recipe import run

        spec = engine_spec(model_dir, settings)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        estimate = estimate_peak_memory(spec, config)
        # The first engine run quantizes the base and saves it; the second loads it (the cache). A base
        # built pre-quantized is its own cache (settings["quantized_cache"]).
        cache = Path(settings["quantized_cache"]) if settings.get("quantized_cache") else Path(out).parent / "quantized"
        result, oom = None, None
        try:
            result = run(spec, data, Path(out).parent / f"{Path(out).stem}-run", extra_callbacks=(Clock(),),
                         quantized_cache=cache)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            oom = str(exc)[:1000]
        summary = result.summary if result else {}
        detail = {"speedups": summary.get("speedups", {}), "compute_dtype": summary.get("compute_dtype"),
                  "quantized_base": summary.get("quantized_base"), "oom": oom,
                  "lora": {"r": spec.lora.r, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout},
                  # What admission control predicts for this run (meaningful on a GPU, where the
                  # measured peak is device memory; on the CPU it is process RSS).
                  "predicted_peak_bytes": estimate.total,
                  # Without a paged optimizer's state, which lives in CUDA unified memory: not in PyTorch's
                  # allocator statistics, which are what a CUDA run measures.
                  "predicted_resident_bytes": estimate.resident,
                  "predicted_host_bytes": getattr(estimate, "host_bytes", 0)}
    else:
        try:
            detail = baseline(model_dir, data, settings, Clock())
        except Exception as exc:  # the standard recipe at a length it cannot hold: a row that says so
            if not is_out_of_memory(exc):
                raise
            detail = {"speedups": {"packing": False, "attention": "sdpa", "liger": False}, "oom": str(exc)[:1000]}
    detail.update(rss_before_model_bytes=rss_before_model, cuda_context_bytes=context,
                  # Largest at a step's end: context, kernels loaded since, other libraries' device memory.
                  outside_allocator_bytes=max(outside) if outside else None,
                  # Pinned CPU memory through PyTorch's host allocator during training (offloaded activations).
                  pinned_peak_bytes=_pinned_peak() if device == "cuda" else None)
    memory = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
              "loading": loading or None} if device == "cuda" else {"allocated": _rss_peak(), "reserved": _rss_peak()}
    memory["rss_peak"] = _rss_peak()
    Path(out).write_text(json.dumps({"steps": steps, "started": started, "memory": memory, **detail}))


def _outside_allocator() -> int:
    """Device memory in use that PyTorch's caching allocator did not reserve (the CUDA context, loaded
    kernels, other libraries' allocations), less a paged optimizer's state: bitsandbytes keeps that in
    unified memory, which the estimate counts as its own (pageable) part. The device is this process's
    alone when the benchmark runs."""
    import torch

    free, total = torch.cuda.mem_get_info()
    paged = 0
    try:
        from bitsandbytes.functional import GlobalPageManager

        paged = sum(t.nbytes for t in GlobalPageManager.get_instance().paged_tensors)
    except (ImportError, AttributeError):
        pass
    return max(total - free - torch.cuda.memory_reserved() - paged, 0)


def _pinned_peak() -> int | None:
    import torch

    try:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0))
    except (AttributeError, RuntimeError):
        return None


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
        "loading_peak_reserved_bytes": (raw["memory"].get("loading") or {}).get("reserved"),
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
    p.add_argument("--preset", choices=sorted(set(PRESETS) - PREQUANTIZED), default="tiny",
                   help=f"(the pre-quantized presets, {', '.join(sorted(PREQUANTIZED))}, are bench/estimate_bench.py's)")
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

    if args.work:  # kept: the built model is reused by the next run given the same --work
        return measure(args, dims, settings, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="qlora-train-bench-") as made:  # 19 MB a run otherwise left in /tmp
        return measure(args, dims, settings, Path(made))


def measure(args: argparse.Namespace, dims: dict, settings: dict, root: Path) -> dict:
    """The three paths' runs on the model built (or found) under `root`, their report saved and printed."""
    model = ensure_model(root, dims, args.seed)
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
    elif len(sys.argv) > 1 and sys.argv[1] == "--build":  # ensure_model's build, in its own process
        _, _, out, dims, seed, kind = sys.argv
        (build_quantized_model if kind == "nf4" else build_model)(Path(out), json.loads(dims), int(seed))
    else:
        main()
