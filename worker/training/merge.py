"""The merged model, and how faithful it is to what was trained.

The adapter was trained against the NF4 base as the 4-bit kernels dequantize it, so that is the
base we merge into: load the quantized base, dequantize it to a dense model, add the LoRA deltas,
save in merge_dtype. Merging into the original 16-bit checkpoint instead would give a different
function from the one trained (the quantization error is not in it); merging into 4-bit weights
would re-quantize the delta away. Fidelity is then measured, never assumed.

Where the host cannot hold the dense model (about twice over, as it is built and written), the same files are
written tensor by tensor from the 4-bit base instead (save_streaming_merge), and their fidelity is measured with
the layers that do not fit read from the files as they run (load_merged_for_fidelity); plan_merge decides which.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from worker.training.model import device_map, fit_embeddings, load_base_model
from worker.training.spec import QuantizationSpec
from worker.training.tokenization import trained_targets, turn_end_token_id

FIDELITY_ROWS = 8  # enough rows to catch a broken merge; few enough to keep logits for them in memory
FIDELITY_MAX_TOKENS = 256


def fidelity_rows(rows: Iterable[dict]) -> list[dict]:
    """The first FIDELITY_ROWS rows, each cut to its last FIDELITY_MAX_TOKENS tokens (`rows`: a list, or the recipe's
    Dataset). A row's end holds what it learns (its answer, its EOS): cut to its first tokens, a row whose prompt
    fills them (a long system prompt, a document to answer from) had no trained token left, its loss was NaN, and so
    was the eval-loss comparison of every run whose first rows were such rows."""
    return [{"input_ids": r["input_ids"][-FIDELITY_MAX_TOKENS:], "labels": r["labels"][-FIDELITY_MAX_TOKENS:]}
            for r in islice(rows, FIDELITY_ROWS)]


@torch.no_grad()
def forward_rows(model, rows: list[dict], autocast_dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> list[tuple[torch.Tensor, float]]:
    """(float32 logits on CPU, loss) for each row, one row at a time (no padding to get wrong). `device`: where
    the inputs go, for a model whose weights are not all there (offloaded to disk: on the meta device)."""
    model.eval()
    device = device or next(model.parameters()).device
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]], device=device)
        labels = torch.tensor([row["labels"]], device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            result = model(input_ids=ids, labels=labels)
        out.append((result.logits[0].float().cpu(), float(result.loss)))
    return out


# Of the GPU's free memory, what the dense model may take: dequantizing layer by layer and adding the
# deltas needs a little on top of the model itself.
MERGE_ON_GPU_SHARE = 0.9


# A merge on the CPU holds the dense model and, while it is built and written, about as much again (the 4-bit
# base it is dequantized from, float32 copies of a layer, a shard being serialized): its peak measured 2.07x the
# dense model's bytes (resident memory merging a 335M-parameter Llama into bfloat16). A host with less has the
# training process killed by the kernel after the whole training, and every attempt after it again.
MERGE_HOST_MEMORY_FACTOR = 2.0
# The merged model's safetensors files: transformers' default is 50 GB, and each is serialized in memory whole.
MERGED_SHARD_SIZE = "5GB"


# A streaming merge holds, on the host, the shard being written (serialized once more by safetensors as it
# is written) and the tensor being made: its 4-bit weight dequantized in the compute dtype (float32 at most),
# cast to merge_dtype, and its float32 LoRA delta. Where it runs on the CPU, the 4-bit base is there too.
STREAMING_SHARD_COPIES = 2
STREAMING_TENSOR_BYTES_PER_PARAM = 4 + 4  # the float32 dequantized weight and the float32 delta, beside merge_dtype's
# Of the memory available to the fidelity check, what the merged model's layers may take; the others are read
# from the files written, layer by layer, as each is used (accelerate's disk offload).
FIDELITY_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class MergePlan:
    """How the merged model is built: "in_memory" (the dense model built whole, then saved), "streaming" (written
    tensor by tensor from the 4-bit base: save_streaming_merge) or "skipped"; on which device; and why, in words
    for an event ("" where nothing needs saying: the dense model fits where training ran)."""

    how: str
    device: str
    why: str


def plan_merge(*, dense_bytes: int, merge_dtype: str, training_device: str, gpu_free: int, host_available: int,
               disk_free: int, base_bytes: int, largest_tensor_params: int, shard_bytes: int,
               streaming_unsupported: str | None) -> MergePlan:
    """Where and how the merge runs, from what the merged model takes against what the machine has.

    The in-memory merge where it fits (on the GPU that trained: within MERGE_ON_GPU_SHARE of its free memory; else
    on the CPU: about MERGE_HOST_MEMORY_FACTOR times the merged model of host memory); else the streaming merge,
    where training ran (the 4-bit base fits there, since training fit), which takes one shard and one tensor of
    host memory beside the 4-bit base where that is the CPU; else none, the job delivering the adapter alone. A
    disk without room for the merged model's files skips it too: it would fill the disk after the whole training."""
    gib = 2**30
    if disk_free < dense_bytes:
        return MergePlan("skipped", training_device, (
            f"the merged model was not built: its files take about {dense_bytes / gib:.1f} GiB ({merge_dtype}) and the "
            f"disk holding the job's outputs has {disk_free / gib:.1f} GiB free. The adapter is saved: merge it where "
            "there is room, or set output.merge false to skip the merge"))
    if training_device == "cuda" and dense_bytes <= MERGE_ON_GPU_SHARE * gpu_free:
        return MergePlan("in_memory", "cuda", "")
    in_memory_need = MERGE_HOST_MEMORY_FACTOR * dense_bytes
    not_on_gpu = (f"the merged model ({dense_bytes / gib:.1f} GiB in {merge_dtype}) needs more than the GPU's "
                  f"{gpu_free / gib:.1f} GiB free" if training_device == "cuda" else "")
    if in_memory_need <= host_available:
        return MergePlan("in_memory", "cpu", f"merging on the CPU: {not_on_gpu}" if not_on_gpu else "")
    in_memory = (f"building it in memory on the CPU takes about {in_memory_need / gib:.1f} GiB of host memory (the "
                 f"{dense_bytes / gib:.1f} GiB model in {merge_dtype}, about twice over while it is built and written) "
                 f"and this host has {host_available / gib:.1f} GiB available")
    if streaming_unsupported:
        return MergePlan("skipped", training_device, (
            f"the merged model was not built: {in_memory}, and {streaming_unsupported}. The adapter is saved: merge "
            "it on a host with that much memory, or set output.merge false to skip the merge"))
    streaming_need = streaming_merge_host_bytes(min(shard_bytes, dense_bytes), largest_tensor_params,
                                                base_bytes if training_device == "cpu" else 0)
    if streaming_need > host_available:
        return MergePlan("skipped", training_device, (
            f"the merged model was not built: {in_memory}; writing it layer by layer takes about "
            f"{streaming_need / gib:.1f} GiB (a {min(shard_bytes, dense_bytes) / gib:.1f} GiB file being written"
            + (f" and the {base_bytes / gib:.1f} GiB quantized base" if training_device == "cpu" else "")
            + "). The adapter is saved: merge it on a host with that much memory, or set output.merge false to "
            "skip the merge"))
    return MergePlan("streaming", training_device, (
        f"merging layer by layer on the {'GPU' if training_device == 'cuda' else 'CPU'}: {in_memory}; writing it "
        f"tensor by tensor from the quantized base takes about {streaming_need / gib:.1f} GiB. Its fidelity is "
        "measured from the files written, read layer by layer; the eval report answers with the adapter on the "
        "quantized base, as the merged model is not loaded whole"))


def streaming_merge_host_bytes(shard_bytes: int, largest_tensor_params: int, base_bytes_on_host: int) -> int:
    """Host memory a streaming merge takes at its peak (STREAMING_SHARD_COPIES, STREAMING_TENSOR_BYTES_PER_PARAM)."""
    return (STREAMING_SHARD_COPIES * shard_bytes + STREAMING_TENSOR_BYTES_PER_PARAM * largest_tensor_params
            + base_bytes_on_host)


def loaded_weights(model) -> tuple[int, int]:
    """(bytes, largest dense tensor's parameters) of a loaded model's weights: a 4-bit weight counts its packed
    data and its quantization state, and its dense shape for the largest."""
    total, largest = 0, 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        dense = param.numel()
        if state is not None:
            dense = math.prod(state.shape)
            total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
        largest = max(largest, dense)
    return total, largest


def _state_tensors(state) -> list[torch.Tensor]:
    tensors = [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
    if getattr(state, "state2", None) is not None:
        tensors += _state_tensors(state.state2)
    return tensors


def parse_size(size: str | int) -> int:
    """A shard size as save_pretrained reads it ("5GB", or bytes)."""
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(size)


def build_merged_model(
    base_path: Path, adapter_dir: Path, quant: QuantizationSpec, compute_dtype: torch.dtype,
    merge_dtype: torch.dtype, device: str, tokenizer, quantized_cache: Path | None = None,
):
    """Dense base (dequantized exactly as training saw it) + LoRA deltas, in merge_dtype."""
    from peft import PeftModel

    if quant.bits == "none":
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=merge_dtype, device_map=device_map(device),
            use_safetensors=True, trust_remote_code=False, local_files_only=True)
    else:
        base = load_base_model(base_path, quant, compute_dtype, device,
                               quantized_cache=quantized_cache).dequantize(dtype=merge_dtype)
        # A base loaded from pre-quantized weights remembers how its 4-bit tensors were unpacked, and
        # save_pretrained would try to pack the now-dense weights back that way (which has no
        # reverse). The merged model is a plain dense model: it saves as one.
        base._weight_conversions = None
    fit_embeddings(base, tokenizer, adapter_dir)  # as training did, a started adapter's grown rows included
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged.to(merge_dtype)


def streaming_merge_unsupported(quant: QuantizationSpec) -> str | None:
    """Why the streaming merge cannot build this run's merged model (the in-memory merge then does), or None.

    It reads each weight from the quantized base as bitsandbytes keeps it (4-bit or 8-bit). An unquantized base
    (quantization.bits "none") is loaded by the in-memory merge straight in merge_dtype, which a base loaded in
    the compute dtype would not reproduce bit for bit (a bfloat16 compute dtype merged into float32); training
    held that base whole in 16 bits anyway."""
    if quant.bits == "none":
        return "the streaming merge reads a quantized base and this run's is not quantized (quantization.bits \"none\")"
    return None


class MergedWeights(Mapping):
    """The merged model's tensors by name, each computed when asked for, from the adapter on the quantized base
    where it is loaded: a weight of a LoRA layer is its 4-bit (or 8-bit) weight dequantized as transformers'
    `dequantize` does it (bitsandbytes' dequantize_4bit, then the cast to merge_dtype), plus the LoRA delta as peft's merge
    adds it (`lora.Linear.get_delta_weight`, added in place in merge_dtype); any other 4-bit weight is dequantized
    alike; everything else (embeddings, norms, the head, a pad row the adapter carries) is cast to merge_dtype as
    `merge_and_unload().to(merge_dtype)` casts it. The same library calls in the same order as the in-memory
    merge, so the tensors are bit for bit the same, and the files too (tests/training/test_streaming_merge.py holds them to
    it), but for a family whose weights transformers renames as it saves (GPT-NeoX): it sorts the names before it
    shards an in-memory model, not an offloaded one, so the same tensors may sit in other shards, as the index says.
    Each tensor is made where the base is (the GPU that trained, or the CPU) and handed out on the CPU, one at a
    time, as save_pretrained fills the shard it writes."""

    def __init__(self, model, adapter: str, merge_dtype: torch.dtype, names: list[str]):
        self.model, self.adapter, self.merge_dtype, self.names = model, adapter, merge_dtype, names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        import bitsandbytes as bnb
        from peft.tuners.lora.layer import Linear as LoraLinear
        from transformers.integrations.bitsandbytes import dequantize_bnb_weight

        lora, module, attr = _owner(self.model, name)
        tensor = getattr(module, attr)
        with torch.no_grad():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and attr == "weight":
                state = module.state if isinstance(module, bnb.nn.Linear8bitLt) else None  # as dequantize_and_replace
                tensor = dequantize_bnb_weight(tensor, state).to(self.merge_dtype)  # transformers' dequantize_and_replace
            elif tensor.is_floating_point():
                tensor = tensor.to(self.merge_dtype)  # merge_and_unload().to(merge_dtype): itself where already so
                if tensor is getattr(module, attr) and lora is not None and attr == "weight":
                    tensor = tensor.clone()  # then the add below must not change the loaded base
            if lora is not None and attr == "weight":
                tensor += LoraLinear.get_delta_weight(lora, self.adapter)  # peft's lora.Linear.merge (not safe_merge)
        return tensor.cpu()


def save_streaming_merge(model, adapter: str, merge_dtype: torch.dtype, directory: Path, max_shard_size: str,
                         configure=None) -> None:
    """Write the merged model of `model` (a PeftModel on a quantized base, loaded as the in-memory merge loads it)
    into `directory` without building it: save_pretrained of a weightless copy (its tensors on the meta device,
    the dense merged model's config and shapes) whose weights transformers takes for offloaded to disk, and
    reads one at a time, shard by shard, from MergedWeights (accelerate's hook's weights_map, what
    transformers reads an offloaded weight back from when it saves). So save_pretrained itself decides the
    names, the tied weights left out, the shards, the index and the config files, as it does for the
    in-memory merge; host memory holds the shard being written and the tensor being made."""
    import copy

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):  # as transformers' dequantize removes it
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=merge_dtype)
    skeleton.generation_config = copy.deepcopy(base.generation_config)
    if configure is not None:
        configure(skeleton)
    names = list(skeleton.state_dict())
    missing = [name for name in names if not _has_tensor(base, name)]
    if missing:
        raise ValueError(f"the merged model's {', '.join(missing[:3])} are not in the loaded base")
    add_hook_to_module(skeleton, AlignDevicesHook(offload=True, weights_map=MergedWeights(base, adapter, merge_dtype, names)))
    skeleton.hf_device_map = {"": "disk"}  # save_pretrained reads each weight from the hook's weights_map
    with warnings.catch_warnings():  # "ensure that unallocated cpu memory exceeds the shard size": plan_merge did
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        skeleton.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)


def _owner(model, name: str):
    """(the LoRA layer or None, the module holding the tensor `name` of the dense model, the attribute's name):
    a LoRA layer's weight and bias are its base layer's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    lora = module if isinstance(module, BaseTunerLayer) else None
    return lora, module if lora is None else lora.get_base_layer(), attr


def _has_tensor(model, name: str) -> bool:
    try:
        _, module, attr = _owner(model, name)
    except AttributeError:
        return False
    return isinstance(getattr(module, attr, None), torch.Tensor)


def write_merged(how: str, directory: Path, *, base_path: Path, adapter_dir: Path, quant: QuantizationSpec,
                 compute_dtype: torch.dtype, merge_dtype: torch.dtype, device: str, tokenizer,
                 max_shard_size: str = MERGED_SHARD_SIZE, quantized_cache: Path | None = None, configure=None) -> None:
    """The merged model's weights, config and generation config into `directory`, built in memory whole (how
    "in_memory") or written tensor by tensor (how "streaming"): the same files either way. `configure(model)`
    sets what the run adds (its generation config's pad and stop tokens) on the model about to be saved."""
    if how == "in_memory":
        merged = build_merged_model(base_path, adapter_dir, quant, compute_dtype, merge_dtype, device, tokenizer,
                                    quantized_cache=quantized_cache)
        if configure is not None:
            configure(merged)
        merged.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
        return
    from peft import PeftModel

    # Loaded as build_merged_model loads it, short of the dequantization: what MergedWeights reads from.
    base = load_base_model(base_path, quant, compute_dtype, device, quantized_cache=quantized_cache)
    fit_embeddings(base, tokenizer, adapter_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    save_streaming_merge(model, "default", merge_dtype, directory, max_shard_size, configure=configure)


def load_merged_for_fidelity(directory: Path, merge_dtype: torch.dtype, device: str, memory: dict[int | str, int],
                             offload_dir: Path):
    """The merged model as written, for measure_fidelity, without holding it whole: the layers that fit `memory`
    (accelerate's max_memory: bytes per device) load there, the others stay in the safetensors files, each read
    when its layer runs (transformers' disk offload reads them from the files themselves; `offload_dir` takes
    only weights it had to convert). The logits are the same as the whole model's, computed in merge_dtype alike."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=merge_dtype, device_map="auto", max_memory=memory,
                                                offload_folder=str(offload_dir), local_files_only=True)


def stop_token_ids(base_eos: int | list[int] | None, tokenizer) -> int | list[int]:
    """The merged model's generation_config eos_token_id: the base's stop tokens, which a server (vLLM, transformers'
    generate) stops at, each of them (Llama 3.1 Instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>; Phi-3.5
    <|end|> and <|endoftext|>), with the tokenizer's EOS, which training ends every row with, and the template's
    end of turn where it is another token (turn_end_token_id: a base model lists its EOS alone, and its tuned
    model answered past the turn it learned to close). Writing the EOS alone dropped the others: the merged
    model ran on past a stop token the base model stopped at."""
    base = [base_eos] if isinstance(base_eos, int) else list(base_eos or [])
    turn_end = turn_end_token_id(tokenizer)
    ids = list(dict.fromkeys([*base, tokenizer.eos_token_id, *([] if turn_end is None else [turn_end])]))
    return ids[0] if len(ids) == 1 else ids


def measure_fidelity(reference: list[tuple[torch.Tensor, float]], merged_model, rows: list[dict],
                     device: torch.device | None = None) -> dict:
    """Max / mean |logit difference| and eval-loss difference between adapter-on-quantized-base and merged. The
    losses are per trained token, as the eval report's (report.mean_loss): a row without one (its loss NaN) adds
    nothing; None where no row has one."""
    merged = forward_rows(merged_model, rows, device=device)
    max_diff, total_diff, count = 0.0, 0.0, 0
    for (ref_logits, _), (new_logits, _) in zip(reference, merged, strict=False):
        diff = (ref_logits - new_logits).abs()
        max_diff = max(max_diff, float(diff.max()))
        total_diff += float(diff.sum())
        count += diff.numel()
    targets = [trained_targets(row) for row in rows]

    def per_token(losses: list[tuple[torch.Tensor, float]]) -> float | None:
        return (sum(loss * n for (_, loss), n in zip(losses, targets, strict=True) if n) / sum(targets)
                if sum(targets) else None)

    ref_loss, merged_loss = per_token(reference), per_token(merged)
    return {
        "rows": len(rows),
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": total_diff / max(count, 1),
        "eval_loss_adapter": ref_loss,
        "eval_loss_merged": merged_loss,
        "eval_loss_diff": None if ref_loss is None or merged_loss is None
        else abs(merged_loss - ref_loss) if math.isfinite(ref_loss + merged_loss) else float("inf"),
    }


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
