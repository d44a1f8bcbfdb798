"""Host memory and time of the merge on the CPU: built in memory whole against streamed tensor by tensor.

    .venv/bin/python bench/merge_bench.py [--hidden 1024] [--layers 24] [--shard 100MB] [--merge-dtype bfloat16] [--runs 1]

A random Llama of the given shape (the default: 349M parameters, vocabulary 32,000, MLP 11/4 of the hidden
size; the probe behind the 2.07x figure in docs/performance.md merged one of 335M) is written in float32 with its
4-bit copy (the quantized base a worker keeps for its attempt: both merges load it, so neither pays for
quantizing), and a random LoRA adapter of rank 16 on every linear layer. Each merge then runs in a fresh
process (worker.training.merge.write_merged, what the recipe calls), alternately in memory and streaming,
--runs of each. Reported per way: the peak resident memory above the process's own after its imports (VmHWM
less the RSS before the merge), as a multiple of the merged model's bytes; CPU seconds (user+sys) and wall
seconds; and the check that both wrote the same files, byte for byte. Exit 1 if they differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: worker/ imports from this checkout

DEFAULT_OUT = ROOT / "bench" / "results" / "merge_bench.json"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import psutil, torch
from transformers import AutoTokenizer
from worker.training.merge import write_merged
from worker.training.spec import QuantizationSpec
how, base, cache, adapter, out, dtype, shard = sys.argv[1:8]
tokenizer = AutoTokenizer.from_pretrained(adapter)
start_rss = psutil.Process().memory_info().rss
usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
write_merged(how, Path(out), base_path=Path(base), adapter_dir=Path(adapter), quant=QuantizationSpec(),
             compute_dtype=torch.float32, merge_dtype=getattr(torch, dtype), device="cpu", tokenizer=tokenizer,
             max_shard_size=shard, quantized_cache=Path(cache))
usage = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, the peak of this process's own memory: ru_maxrss carries over the parent's peak across fork and exec.
peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"peak_above_start": peak - start_rss, "wall_s": time.perf_counter() - wall0,
                  "cpu_s": usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime}))
"""


def build(work: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path, Path, int]:
    """The float32 base, its 4-bit copy (load_base_model's quantized cache) and a random adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.training.model import load_base_model, resolve_target_modules
    from worker.training.spec import QuantizationSpec
    from worker.training.tiny import build_tokenizer

    base, cache, adapter = work / "base", work / "quantized", work / "adapter"
    tokenizer = build_tokenizer(0)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                  num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                  num_key_value_heads=hidden // 128, max_position_embeddings=512,
                                  tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    del model
    quantized = load_base_model(base, QuantizationSpec(), torch.float32, "cpu", quantized_cache=cache)
    torch.manual_seed(1)
    peft = get_peft_model(quantized, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                                                target_modules=resolve_target_modules(quantized, "all-linear")))
    peft.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return base, cache, adapter, params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard", default="100MB", help="the merged model's largest file (the recipe's: 5GB)")
    parser.add_argument("--merge-dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import os

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        work = Path(tmp)
        base, cache, adapter, params = build(work, args.hidden, args.layers, args.vocab)
        dense = params * getattr(torch, args.merge_dtype).itemsize
        results: dict[str, list[dict]] = {"in_memory": [], "streaming": []}
        for run in range(args.runs):
            for how in results:
                out = work / f"{how}-{run}"
                done = subprocess.run([sys.executable, "-c", CHILD, how, str(base), str(cache), str(adapter), str(out),
                                       args.merge_dtype, args.shard], env=env, capture_output=True, text=True, check=True)
                results[how].append(json.loads(done.stdout.strip().splitlines()[-1]))
        same = all((work / "in_memory-0" / f.name).read_bytes() == f.read_bytes()
                   for f in (work / "streaming-0").iterdir())
        shards = len(list((work / "streaming-0").glob("*.safetensors")))
    best = {how: {key: min(r[key] for r in runs) for key in runs[0]} for how, runs in results.items()}
    print(f"merged model: {params / 1e6:.0f}M parameters, {dense / 2**30:.2f} GiB in {args.merge_dtype}, "
          f"{shards} file(s) of at most {args.shard}; best of {args.runs}")
    print(f"{'':>10} {'peak above start':>18} {'x merged model':>15} {'cpu s':>8} {'wall s':>8}")
    for how, r in best.items():
        print(f"{how:>10} {r['peak_above_start'] / 2**30:>14.2f} GiB {r['peak_above_start'] / dense:>15.2f} "
              f"{r['cpu_s']:>8.1f} {r['wall_s']:>8.1f}")
    ratio = {key: best["streaming"][key] / best["in_memory"][key] for key in best["streaming"]}
    print(f"streaming / in memory: peak {ratio['peak_above_start']:.2f}, cpu {ratio['cpu_s']:.2f}, "
          f"wall {ratio['wall_s']:.2f}; files byte for byte the same: {same}")
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "params": params, "dense_bytes": dense,
              "results": results, "best": best, "ratio": ratio, "identical": same}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else 1)
