"""The merged model, and how faithful it is to what was trained.

The adapter was trained against the NF4 base as the 4-bit kernels dequantize it, so that is the
base we merge into: load the quantized base, dequantize it to a dense model, add the LoRA deltas,
save in merge_dtype. Merging into the original 16-bit checkpoint instead would give a different
function from the one trained (the quantization error is not in it); merging into 4-bit weights
would re-quantize the delta away. Fidelity is then measured, never assumed.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch

from worker.training.model import device_map, fit_embeddings, load_base_model
from worker.training.spec import QuantizationSpec
from worker.training.tokenization import turn_end_token_id

FIDELITY_ROWS = 8  # enough rows to catch a broken merge; few enough to keep logits for them in memory
FIDELITY_MAX_TOKENS = 256


def fidelity_rows(rows: list[dict]) -> list[dict]:
    return [{"input_ids": r["input_ids"][:FIDELITY_MAX_TOKENS], "labels": r["labels"][:FIDELITY_MAX_TOKENS]}
            for r in rows[:FIDELITY_ROWS]]


@torch.no_grad()
def forward_rows(model, rows: list[dict],
                 autocast_dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, float]]:
    """(float32 logits on CPU, loss) for each row, one row at a time (no padding to get wrong)."""
    model.eval()
    device = next(model.parameters()).device
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


def merge_too_large_for_host(dense_bytes: int, available_bytes: int, merge_dtype: str) -> str | None:
    """Why a merge on the CPU of a model of `dense_bytes` would not fit the host's `available_bytes`, or None."""
    need = MERGE_HOST_MEMORY_FACTOR * dense_bytes
    if need <= available_bytes:
        return None
    return (f"the merged model was not built: merging on the CPU takes about {need / 2**30:.1f} GiB of host memory "
            f"(the {dense_bytes / 2**30:.1f} GiB model in {merge_dtype}, about twice over while it is built and "
            f"written) and this host has {available_bytes / 2**30:.1f} GiB available. The adapter is saved: merge it "
            "on a host with that much memory, or set output.merge false to skip the merge")


def merge_device(dense_bytes: int, free_bytes: int) -> str:
    """Where the merged model is built on a GPU worker: there, or on the CPU where the dense model would
    not fit its free memory (the merge would run out of memory after the whole training)."""
    return "cuda" if dense_bytes <= MERGE_ON_GPU_SHARE * free_bytes else "cpu"


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


def measure_fidelity(reference: list[tuple[torch.Tensor, float]], merged_model, rows: list[dict]) -> dict:
    """Max / mean |logit difference| and eval-loss difference between adapter-on-quantized-base and merged."""
    merged = forward_rows(merged_model, rows)
    max_diff, total_diff, count = 0.0, 0.0, 0
    for (ref_logits, _), (new_logits, _) in zip(reference, merged, strict=False):
        diff = (ref_logits - new_logits).abs()
        max_diff = max(max_diff, float(diff.max()))
        total_diff += float(diff.sum())
        count += diff.numel()
    ref_loss = sum(loss for _, loss in reference) / len(reference)
    merged_loss = sum(loss for _, loss in merged) / len(merged)
    return {
        "rows": len(rows),
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": total_diff / max(count, 1),
        "eval_loss_adapter": ref_loss,
        "eval_loss_merged": merged_loss,
        "eval_loss_diff": abs(merged_loss - ref_loss) if math.isfinite(ref_loss + merged_loss) else float("inf"),
    }


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
