"""The streaming merge (worker/training/merge.py: write_merged "streaming") writes the very files the in-memory merge
writes, bit for bit, without building the dense model; and the fidelity check reads them back layer by layer.

Adapters are made here with peft on the tiny model's 4-bit base (random, non-zero B, so every delta counts), not
trained: what is under test is the merge's arithmetic and files, the same for any adapter's values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from worker.training.merge import (
    forward_rows,
    load_merged_for_fidelity,
    plan_merge,
    stop_token_ids,
    write_merged,
)
from worker.training.model import fit_embeddings, load_base_model, resolve_target_modules
from worker.training.spec import QuantizationSpec

NF4 = QuantizationSpec()
COMPUTE = torch.float32  # the CPU's compute dtype where it has no native bfloat16 (resolve_compute_dtype)


def make_adapter(base: Path, tokenizer, out: Path, dtype: torch.dtype, seed: int = 1, bias: str = "none",
                 quant: QuantizationSpec = NF4) -> Path:
    """A LoRA adapter on every linear layer of `base`'s 4-bit model, saved as the recipe saves one (with the
    embeddings and head where `tokenizer` grew them), its weights in `dtype` (lora.dtype); with `bias` (lora.bias)
    "all", the base's biases trained too (moved, so the merge must take the adapter's)."""
    model = load_base_model(base, quant, COMPUTE, "cpu")
    rows = model.get_input_embeddings().weight.shape[0]
    fit_embeddings(model, tokenizer)
    grown = model.get_input_embeddings().weight.shape[0] > rows
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=resolve_target_modules(model, "all-linear"),
                        init_lora_weights=False, task_type="CAUSAL_LM", bias=bias)
    peft = get_peft_model(model, config)
    for name, param in peft.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
        elif name.endswith(".bias") and param.requires_grad:
            param.data += 0.1 * torch.randn_like(param)
    peft.save_pretrained(out, save_embedding_layers=grown)
    tokenizer.save_pretrained(out)
    return out


def merge_both_ways(base: Path, adapter: Path, tokenizer, merge_dtype: torch.dtype, out: Path,
                    shard: str = "5GB", quant: QuantizationSpec = NF4) -> tuple[Path, Path]:
    def configure(model) -> None:  # what the recipe sets: the run's pad and stop tokens
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stop_token_ids(model.generation_config.eos_token_id, tokenizer)

    dirs = out / "in_memory", out / "streaming"
    for how, directory in zip(("in_memory", "streaming"), dirs, strict=True):
        write_merged(how, directory, base_path=base, adapter_dir=adapter, quant=quant, compute_dtype=COMPUTE,
                     merge_dtype=merge_dtype, device="cpu", tokenizer=tokenizer, max_shard_size=shard,
                     configure=configure)
    return dirs


def assert_same_files(expected: Path, actual: Path) -> int:
    """Every file of `expected` in `actual` and nothing else; safetensors tensor by tensor (name, dtype, shape,
    bits), then byte for byte (header order and metadata). Returns how many tensors there were."""
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in actual.iterdir()) == names
    tensors = 0
    for name in names:
        if name.endswith(".safetensors"):
            with safe_open(str(expected / name), "pt") as want, safe_open(str(actual / name), "pt") as got:
                assert list(got.keys()) == list(want.keys()), name
                for key in want.keys():
                    a, b = want.get_tensor(key), got.get_tensor(key)
                    assert (a.dtype, a.shape) == (b.dtype, b.shape), key
                    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{key} differs in {name}"
                    tensors += 1
        assert (expected / name).read_bytes() == (actual / name).read_bytes(), name
    return tensors


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2: biases on its attention projections, which lora.bias "all" trains."""
    from worker.training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("qwen2"), model_type="qwen2", num_layers=2)


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its output head tied to its embeddings (Qwen3's and Gemma's small models are)."""
    out = tmp_path_factory.mktemp("tied")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


CASES = {
    # name: (adapter dtype, merge dtype, shard size, base: "tiny" | "tied" | "qwen2" | "8-bit" (the tiny one), a pad row added)
    "float32 adapter into bfloat16": (torch.float32, torch.bfloat16, "5GB", "tiny", False),
    "bfloat16 adapter into bfloat16": (torch.bfloat16, torch.bfloat16, "5GB", "tiny", False),
    "float32 into float32 in several shards": (torch.float32, torch.float32, "1MB", "tiny", False),
    "into float16, shards of 300 kB": (torch.bfloat16, torch.float16, "300KB", "tiny", False),
    "tied embeddings": (torch.float32, torch.bfloat16, "5GB", "tied", False),
    "grown embeddings, several shards": (torch.float32, torch.bfloat16, "1MB", "tiny", True),
    "trained biases (lora.bias all)": (torch.float32, torch.bfloat16, "5GB", "qwen2", False),
    "an 8-bit base": (torch.float32, torch.bfloat16, "1MB", "8-bit", False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_streaming_merge_writes_the_in_memory_merges_files_bit_for_bit(case, tiny_model_dir, tied_model_dir,
                                                                          biased_model_dir, tmp_path):
    """A 65B model's merge (130 GB in bfloat16) cannot be built in a 128 GB host's memory; written tensor by tensor
    from the 4-bit base it can. What users download must not depend on which way it was made: the same names,
    dtypes, values, shards, index and config files, tied weights left out as save_pretrained leaves them out."""
    adapter_dtype, merge_dtype, shard, which, grow = CASES[case]
    base = {"tiny": tiny_model_dir, "tied": tied_model_dir, "qwen2": biased_model_dir, "8-bit": tiny_model_dir}[which]
    quant = QuantizationSpec(bits=8) if which == "8-bit" else NF4
    tokenizer = AutoTokenizer.from_pretrained(base)
    if grow:  # nothing to pad with: a pad token, and a row for it that the adapter carries
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    adapter = make_adapter(base, tokenizer, tmp_path / "adapter", adapter_dtype, bias="all" if which == "qwen2" else "none",
                           quant=quant)
    in_memory, streaming = merge_both_ways(base, adapter, tokenizer, merge_dtype, tmp_path, shard, quant)
    tensors = assert_same_files(in_memory, streaming)
    files = [p.name for p in streaming.iterdir() if p.suffix == ".safetensors"]
    assert (len(files) > 1) == (shard != "5GB") and ((streaming / "model.safetensors.index.json").is_file() == (len(files) > 1))
    with safe_open(str(streaming / files[0]), "pt") as weights:
        assert weights.get_tensor(next(iter(weights.keys()))).dtype == merge_dtype
    names = set()
    for name in files:
        with safe_open(str(streaming / name), "pt") as weights:
            names |= set(weights.keys())
    assert len(names) == tensors and ("lm_head.weight" in names) == (which != "tied")
    if grow:
        assert AutoConfig.from_pretrained(streaming).vocab_size == len(tokenizer)
    if which == "qwen2":  # the trained biases, not the base's
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as saved, \
                safe_open(str(streaming / "model.safetensors"), "pt") as merged:
            key = next(k for k in saved.keys() if k.endswith("q_proj.base_layer.bias"))
            name = key.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(merged.get_tensor(name), saved.get_tensor(key).to(merge_dtype))


def test_a_streaming_merge_that_skips_a_delta_is_caught(tiny_model_dir, tmp_path, monkeypatch):
    """The comparison above can fail: one LoRA layer's delta left out of the streamed files shows as that weight
    differing, and only that one."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapter = make_adapter(tiny_model_dir, tokenizer, tmp_path / "adapter", torch.float32)
    real = LoraLinear.get_delta_weight
    skipped: list[str] = []

    def without_first_delta(layer, adapter_name):
        delta = real(layer, adapter_name)
        if not skipped:
            skipped.append(layer)
            return torch.zeros_like(delta)
        return delta

    write_merged("in_memory", tmp_path / "in_memory", base_path=tiny_model_dir, adapter_dir=adapter, quant=NF4,
                 compute_dtype=COMPUTE, merge_dtype=torch.bfloat16, device="cpu", tokenizer=tokenizer)
    monkeypatch.setattr(LoraLinear, "get_delta_weight", without_first_delta)
    write_merged("streaming", tmp_path / "streaming", base_path=tiny_model_dir, adapter_dir=adapter, quant=NF4,
                 compute_dtype=COMPUTE, merge_dtype=torch.bfloat16, device="cpu", tokenizer=tokenizer)
    with pytest.raises(AssertionError, match="differs in model.safetensors"):
        assert_same_files(tmp_path / "in_memory", tmp_path / "streaming")


def test_fidelity_read_from_the_files_layer_by_layer_equals_the_whole_models(tiny_model_dir, tmp_path):
    """After a streaming merge the host cannot hold the merged model either: its fidelity is measured with the
    layers that do not fit left in the safetensors files, read as each runs. The logits are the whole reloaded
    model's, bit for bit (the same weights, the same ops in the same dtype on the same device)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapter = make_adapter(tiny_model_dir, tokenizer, tmp_path / "adapter", torch.float32)
    merged = tmp_path / "merged"
    write_merged("streaming", merged, base_path=tiny_model_dir, adapter_dir=adapter, quant=NF4, compute_dtype=COMPUTE,
                 merge_dtype=torch.bfloat16, device="cpu", tokenizer=tokenizer, max_shard_size="1MB")
    rows = [{"input_ids": ids, "labels": ids} for ids in (list(range(5, 69)), list(range(300, 340)))]
    whole = forward_rows(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16), rows)
    size = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    offloaded = load_merged_for_fidelity(merged, torch.bfloat16, "cpu", {"cpu": size // 3}, tmp_path / "offload")
    on_disk = [name for name, where in offloaded.hf_device_map.items() if where == "disk"]
    assert on_disk and sum(p.device.type == "meta" for p in offloaded.parameters()) > 0
    by_layer = forward_rows(offloaded, rows, device=torch.device("cpu"))
    for (want_logits, want_loss), (logits, loss) in zip(whole, by_layer, strict=True):
        assert torch.equal(logits, want_logits) and loss == want_loss
    assert not any((tmp_path / "offload").iterdir())  # read from the merged files themselves, never copied


GIB = 2**30


def test_the_merge_is_planned_from_what_the_machine_has():
    """The QLoRA paper's 65B recipe on a 48 GiB GPU with a 128 GB host: the merged model (130 GB in bf16) fits
    neither the GPU nor, built whole (about twice over), the host; streamed from the 4-bit base on the GPU it
    takes a 5 GB file (twice, as serialized) and a layer of host memory. Merged on the CPU, the 4-bit base is
    counted too; a disk without room for the files, or a host without room for the stream, skips the merge."""
    paper = dict(dense_bytes=130 * 10**9, merge_dtype="bfloat16", gpu_free=44 * GIB, host_available=120 * GIB,
                 disk_free=500 * GIB, base_bytes=36 * GIB, largest_tensor_params=32000 * 8192,  # the embeddings
                 shard_bytes=5 * 10**9, streaming_unsupported=None)
    on_gpu = plan_merge(training_device="cuda", **paper)
    assert (on_gpu.how, on_gpu.device) == ("streaming", "cuda") and "layer by layer on the GPU" in on_gpu.why
    assert "242.1 GiB of host memory" in on_gpu.why and "about 11.3 GiB" in on_gpu.why
    on_cpu = plan_merge(training_device="cpu", **paper)
    assert (on_cpu.how, on_cpu.device) == ("streaming", "cpu") and "about 47.3 GiB" in on_cpu.why
    small_host = plan_merge(training_device="cpu", **{**paper, "host_available": 40 * GIB})
    assert small_host.how == "skipped" and "36.0 GiB quantized base" in small_host.why
    full_disk = plan_merge(training_device="cuda", **{**paper, "disk_free": 100 * GIB})
    assert full_disk.how == "skipped" and "100.0 GiB free" in full_disk.why
    unquantized = plan_merge(training_device="cuda", **{**paper, "streaming_unsupported": "a reason"})
    assert unquantized.how == "skipped" and "a reason" in unquantized.why
    # Llama 3 8B (16 GB in bf16): in memory on an H100; on a 24 GiB GPU, in memory on the CPU where the host has 2x.
    eight_b = {**paper, "dense_bytes": 16 * 10**9}
    assert plan_merge(training_device="cuda", **{**eight_b, "gpu_free": 78 * GIB}).how == "in_memory"
    cpu_merge = plan_merge(training_device="cuda", **{**eight_b, "gpu_free": 10 * GIB})
    assert (cpu_merge.how, cpu_merge.device) == ("in_memory", "cpu") and "needs more than the GPU's" in cpu_merge.why
