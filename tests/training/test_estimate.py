"""The memory estimator, part by part: against hand-computed values, and against what the real QLoRA
stack allocates on the CPU for models the coefficients were not fitted on."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from tests.model_configs import (
    GEMMA3_12B,
    LLAMA3_8B,
    LLAMA_33B,
    LLAMA_65B,
    MIXTRAL_8X7B,
    PHI3_MINI,
    QWEN3_1_7B,
    QWEN3_30B_A3B,
)
from worker.training import estimate
from worker.training.estimate import (
    FAMILY_LINEARS,
    GIB,
    LLAMA_FAMILIES,
    ModelShape,
    estimate_peak_memory,
    fit_to_gpu,
    largest_micro_batch,
    quantized_weight_bytes,
)
from worker.training.memory import ActivationOffload, tile_mlps
from worker.training.model import load_base_model, lora_config, prepare_for_training, resolve_target_modules
from worker.training.spec import JobSpec


def spec(**training) -> JobSpec:
    return JobSpec.parse({"base_model": "m", "training": {"max_steps": 1, **training}})


def test_parts_match_hand_computed_values_for_llama3_8b():
    shape = ModelShape.from_config(LLAMA3_8B)
    # Per block: q 4096x4096, k and v 4096x1024, o 4096x4096, gate/up/down 4096x14336.
    per_block = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert shape.linear_params == 32 * per_block == 6_979_321_856
    assert shape.linear_params + shape.other_params == 8_030_261_248  # Llama 3 8B's published parameter count
    # NF4: half a byte per weight; double quantization: one byte per 64 weights plus 4 per 64*256.
    blocks = 6_979_321_856 // 64
    assert quantized_weight_bytes(spec(), shape) == 6_979_321_856 // 2 + blocks + 4 * (blocks // 256)

    e = estimate_peak_memory(spec(per_device_batch_size=1, max_seq_length=2048), LLAMA3_8B)
    adapter = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # r=16 on all 7 linears
    assert adapter == 41_943_040  # the familiar "41.9M trainable parameters" of an r=16 Llama 3 8B
    assert e.parts["LoRA adapter"] == e.parts["LoRA gradients"] == 4 * adapter
    assert e.parts["optimizer state"] == 8 * adapter  # two float32 moments
    assert e.parts["base weights (embeddings, head, norms)"] == 2 * (2 * 128256 * 4096 + 65 * 4096)  # bf16
    # Checkpointing keeps each layer's bf16 input (and the final norm's, 4 bytes per hidden unit).
    assert e.parts["activations (kept for backward)"] == 2048 * 4096 * (32 * 2 + 4)
    # trl's chunked loss head: the bf16 hidden states of 2048 tokens (kept), their float32 gradient,
    # its bf16 cast and the bf16 scatter back, one bf16 tile of 2048 tokens x 32768 vocabulary
    # entries, and 8 float32 statistics per token (the head is bf16: its rows need no cast). Full
    # logits (bf16, a float32 copy and its gradient) would be 4.9 GiB.
    head = 2048 * 4096 * (2 + 4 + 2 + 2) + 2048 * 32768 * 2 + 2048 * 8 * 4
    assert estimate.loss_head_bytes(shape, 2048, compute=2, frozen=2) == head
    # One layer recomputed, at its larger phase: its recomputation reaching down_proj, whose input is in flight three
    # ways (bf16, its float32 cast for the adapter, the LoRA dropout's float32 output: 10 bytes per intermediate unit),
    # over its backward with float32 gradients of the hidden state and of the MLP's gate and up (8).
    one_layer = 2048 * (49.5 * 4096 + 12.5 * 14336 + 4.25 * 1024) + 2048 * (10 * 14336 + 4 * 4096)
    assert one_layer > 2048 * (49.5 * 4096 + 12.5 * 14336 + 4.25 * 1024) + 2048 * 4 * (4096 + 2 * 14336)
    assert one_layer > head
    assert e.parts["backward peak (loss head, or one layer)"] == int(one_layer)
    assert 8 * GIB < e.total < 12 * GIB  # QLoRA of an 8B at 2048 tokens: a 12 GB card, not an 8 GB one


def test_float16_keeps_frozen_weights_in_float32(tmp_path):
    """Half precision norms overflow, so float16 compute keeps QLoRA's upcast; bfloat16 does not need it."""
    LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **UNSEEN[1])).save_pretrained(tmp_path)
    s = spec()
    assert s.quantization.float32_frozen_weights("float16") and not s.quantization.float32_frozen_weights("bfloat16")
    for dtype, frozen in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        model = prepare_for_training(load_base_model(tmp_path, s.quantization, dtype, "cpu"), s.quantization, dtype,
                                     checkpointing=True)
        assert model.get_input_embeddings().weight.dtype == model.get_output_embeddings().weight.dtype == frozen
        assert not any(p.requires_grad for p in model.parameters())
    half = JobSpec.parse({"base_model": "m", "quantization": {"compute_dtype": "float16"}, "training": {"max_steps": 1}})
    bf16 = estimate_peak_memory(spec(), LLAMA3_8B)
    f16 = estimate_peak_memory(half, LLAMA3_8B)
    assert f16.parts["base weights (embeddings, head, norms)"] == 2 * bf16.parts["base weights (embeddings, head, norms)"]
    assert f16.parts["activations (kept for backward)"] > bf16.parts["activations (kept for backward)"]


def test_the_loss_head_tiles_are_trls():
    """The estimate mirrors trl's chunked LM head; a trl that tiles differently must fail here."""
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    from worker.training import estimate

    assert estimate.LOSS_TOKEN_TILE == chunked_logprob.TOKEN_CHUNK_SIZE
    assert estimate.LOSS_VOCAB_TILE == utils._CHUNKED_LOGPROB_CHUNK_SIZE


def test_more_tokens_and_no_checkpointing_cost_more():
    base = estimate_peak_memory(spec(per_device_batch_size=1, max_seq_length=2048), LLAMA3_8B)
    bigger = estimate_peak_memory(spec(per_device_batch_size=4, max_seq_length=2048), LLAMA3_8B)
    # Four times the tokens, and a batch of four rows may be padded: SDPA's boolean mask over each row's 2048 x 2048.
    padding_mask = 4 * 2048 * 2048
    assert bigger.parts["activations (kept for backward)"] == 4 * base.parts["activations (kept for backward)"] + padding_mask
    assert bigger.parts["base weights (quantized)"] == base.parts["base weights (quantized)"]
    off = estimate_peak_memory(spec(per_device_batch_size=1, max_seq_length=2048, gradient_checkpointing=False),
                               LLAMA3_8B)
    assert off.parts["activations (kept for backward)"] > 10 * base.parts["activations (kept for backward)"]
    eight_bit = estimate_peak_memory(spec(per_device_batch_size=1, optimizer="paged_adamw_8bit"), LLAMA3_8B)
    assert eight_bit.parts["optimizer state"] == base.parts["optimizer state"] // 4


def test_largest_micro_batch_fits_the_budget():
    s = spec(max_seq_length=2048)
    budget = 24 * GIB
    best = largest_micro_batch(s, LLAMA3_8B, budget)
    assert best and estimate_peak_memory(s, LLAMA3_8B, micro_batch=best).total <= budget
    assert estimate_peak_memory(s, LLAMA3_8B, micro_batch=best * 2).total > budget
    assert largest_micro_batch(s, LLAMA3_8B, 4 * GIB) is None


# Shapes the activation coefficients were not fitted on (the fit used hidden 256/512, vocab 1000/4000).
UNSEEN = [
    dict(num_hidden_layers=3, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
         num_key_value_heads=2, vocab_size=2000),
    dict(num_hidden_layers=2, hidden_size=320, intermediate_size=896, num_attention_heads=5,
         num_key_value_heads=5, vocab_size=3000),
]


def build(tmp_path, dims: dict, checkpointing: bool, offload: ActivationOffload | None = None,
          targets: str | list[str] = "all-linear"):
    """`dims` of a Llama model, or of another family's with its config.json's model_type."""
    dims = {"model_type": "llama", **dims}
    config = AutoConfig.for_model(dims["model_type"], tie_word_embeddings=False,
                                  **{k: v for k, v in dims.items() if k != "model_type"})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    s = spec(gradient_checkpointing=checkpointing)
    model = load_base_model(tmp_path, s.quantization, torch.bfloat16, "cpu")
    model = prepare_for_training(model, s.quantization, torch.bfloat16, checkpointing, offload=offload)
    model = get_peft_model(model, lora_config(s.lora, resolve_target_modules(model, targets)))
    # The loss head trl's SFTTrainer puts on every model it trains (the baseline's and the engine's):
    # called with fused_lm_head=True, it scores tokens through tiles of logits, never all of them.
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    for p in model.parameters():  # the recipe trains the adapter in float32
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    return s, model


def saved_for_backward(model, batch: int, seq: int, vocab: int) -> int:
    """Bytes the forward pass keeps for backward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, vocab, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids, fused_lm_head=True)
    return sum(seen.values())


@pytest.mark.parametrize("dims", UNSEEN)
def test_parts_match_what_the_stack_allocates(tmp_path, dims):
    s, model = build(tmp_path, dims, checkpointing=False)
    config = {**dims, "tie_word_embeddings": False}
    e = estimate_peak_memory(s, config, micro_batch=4, seq_len=64)

    assert e.parts["base weights (quantized)"] == pytest.approx(quantized_bytes(model), rel=0.05)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if not p.requires_grad and p.dtype == torch.bfloat16)  # 4-bit weights are packed in uint8
    assert e.parts["base weights (embeddings, head, norms)"] == other
    trainable, _ = model.get_nb_trainable_parameters()
    assert e.parts["LoRA adapter"] == 4 * trainable

    measured = saved_for_backward(model, 4, 64, dims["vocab_size"])
    tokens = 4 * 64
    # The loss head keeps the bf16 hidden states of the tokens it scores, never logits.
    predicted = e.parts["activations (kept for backward)"] + tokens * dims["hidden_size"] * 2
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


def quantized_bytes(model) -> int:
    """The 4-bit weights of a loaded model and their quantization constants."""
    import bitsandbytes as bnb

    return sum(m.weight.untyped_storage().nbytes()
               + sum(t.numel() * t.element_size() for t in _quant_state_tensors(m.weight.quant_state))
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


# Families whose blocks fuse or name their layers otherwise (FAMILY_LINEARS), with a target list of their names.
OWN_LAYERS = [
    (dict(model_type="phi3", num_hidden_layers=2, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
          num_key_value_heads=2, vocab_size=2000, pad_token_id=0), ["qkv_proj", "o_proj"]),
    (dict(model_type="gpt_neox", num_hidden_layers=2, hidden_size=384, intermediate_size=1536, num_attention_heads=6,
          vocab_size=2000), "all-linear"),
    (dict(model_type="starcoder2", num_hidden_layers=2, hidden_size=384, intermediate_size=1536,
          num_attention_heads=6, num_key_value_heads=2, vocab_size=2000), ["q_proj", "v_proj", "c_fc"]),
]


@pytest.mark.parametrize(("dims", "targets"), OWN_LAYERS, ids=lambda v: v["model_type"] if isinstance(v, dict) else "")
def test_a_familys_own_layers_are_counted_as_loaded_and_adapted(tmp_path, dims, targets):
    """The 4-bit weights and the adapter of families whose layers are not Llama's seven: counted by the
    family's own layers (a fused qkv_proj takes one LoRA pair, a two-matrix MLP has no gate)."""
    _, model = build(tmp_path, dims, checkpointing=True, targets=targets)
    s = JobSpec.parse({"base_model": "m", "lora": {"target_modules": targets}, "training": {"max_steps": 1}})
    e = estimate_peak_memory(s, {**dims, "tie_word_embeddings": False}, micro_batch=4, seq_len=64)
    assert e.parts["base weights (quantized)"] == pytest.approx(quantized_bytes(model), rel=0.05)
    trainable, _ = model.get_nb_trainable_parameters()
    assert e.parts["LoRA adapter"] == 4 * trainable


@pytest.mark.parametrize("dims", UNSEEN)
def test_checkpointed_activations_match(tmp_path, dims):
    s, model = build(tmp_path, dims, checkpointing=True)
    e = estimate_peak_memory(s, {**dims, "tie_word_embeddings": False}, micro_batch=4, seq_len=64)
    measured = saved_for_backward(model, 4, 64, dims["vocab_size"])
    tokens = 4 * 64
    # Saved by the forward: each layer's bf16 input, the final norm's, and the loss head's hidden
    # states; the recomputed layer comes during backward.
    predicted = e.parts["activations (kept for backward)"] + tokens * dims["hidden_size"] * 2
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


# Matrix products that a CPU without native bf16 (AVX512-BF16 or AMX) emulates in bf16, 6x slower than
# in float32 for a plain product and ~80x for the transposed ones of a 4-bit layer's backward: 16 of
# this module's minutes on such a CPU. LiveTensorBytes computes them in float32 and rounds the result:
# the same shapes, dtypes and so bytes, values within bf16 rounding. Widened whole, by their first input,
# as the mode sees nothing inside them: a 4-bit layer's forward product (bitsandbytes' gemm_4bit:
# dequantize to the input's dtype, then the product; another 7 minutes) and SDPA's backward on the CPU
# (three quarters of a packed step's time).
NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}
WIDENED_WHOLE = {"bitsandbytes::gemm_4bit",  # by name: registered once bitsandbytes is imported
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def _in_float32(func, args, kwargs):
    """`func` on bf16 tensors, computed in float32 and rounded back; None where it does not apply."""
    if NATIVE_BF16 or (func not in MATMULS and func.name() not in WIDENED_WHOLE):
        return None
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    # A matmul's operands are all bf16; the others' first input is (not their 4-bit weights, their constants or
    # SDPA's float32 logsumexp).
    widened_ones = tensors if func in MATMULS else tensors[:1]
    if not tensors or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in widened_ones):
        return None

    def widen(a):
        return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a

    # Autocast off: it would narrow them back to bf16 on the way down. Every output of these is the bf16 one.
    with torch.autocast("cpu", enabled=False):
        out = func(*map(widen, args), **{k: widen(v) for k, v in kwargs.items()})
    return pytree.tree_map(lambda t: t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t, out)


class LiveTensorBytes(TorchDispatchMode):
    """The peak of live tensor bytes while it is active: every storage an op returns counts until it
    is freed (parameters excluded). Leaves out the (tokens, vocabulary) temporaries of trl's loss
    head on the CPU: without Triton it folds each logits tile with torch ops; on a GPU one kernel
    does it in place. What an op makes inside the mode (a float32 matmul's copies) is not seen."""

    def __init__(self, model, vocab: int, widths: tuple[int, ...] = ()):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.vocab, self.live, self.peak, self.sizes = vocab, 0, 0, {}
        self.widths = (vocab, *widths)  # last dimensions whose tensors are not counted
        self.paused = False  # while set, what ops make is not device memory (the offload's host copies)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _in_float32(func, args, kwargs or {})
        if out is None:
            out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not (t.dim() and t.shape[-1] in self.widths):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.params and ptr not in self.sizes:
                    self.sizes[ptr] = storage.nbytes()
                    self.live += self.sizes[ptr]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, ptr)
        return out

    def _freed(self, ptr):
        self.live -= self.sizes.pop(ptr, 0)


# Wide enough that, as in real models, a layer's backward outweighs the loss head's logits tile
# (32768 vocabulary entries wide whatever the vocabulary), which dominates in the tiny shapes above.
WIDE = [
    dict(num_hidden_layers=2, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
         num_key_value_heads=2, vocab_size=1000),
    dict(num_hidden_layers=2, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
         num_key_value_heads=4, vocab_size=1500),
]
# Hidden 768, intermediate 3,072, grouped-query attention, head_dim said (GLM's default differs from hidden / heads).
SMALL_BLOCK = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                   vocab_size=1500)
# Families whose counts come from others' measurements, each with its config.json's activation (the estimate reads it
# from there): GLM's and GLM 4's fused gate_up_proj (one reader fewer than Llama's five, as Phi-3's), Arcee's relu2
# MLP (Nemotron's count, RMSNorms), Apertus' xielu MLP (no gate, counted as gated whole: mlp_counted_as_its_own).
UNMEASURED_BLOCKS = (("glm", dict(SMALL_BLOCK, pad_token_id=0)), ("glm4", dict(SMALL_BLOCK, pad_token_id=0)),
                     ("arcee", dict(SMALL_BLOCK, hidden_act="relu2", pad_token_id=0)),
                     ("apertus", dict(SMALL_BLOCK, hidden_act="xielu", pad_token_id=0)))
# Families whose layers are not Llama's, at their own proportions: Qwen 3's attention twice as wide as its
# hidden size, with its queries and keys normalized; Gemma 3's 256-wide heads, query and key norms, and
# four norms per layer; GPT-NeoX's and StarCoder 2's two-matrix MLPs (no gate), which the estimate counted
# as gated, 30 % over GPT-NeoX's step (GPT-NeoX also runs attention and MLP side by side, fused q/k/v); StableLM's
# gated MLP after float32 LayerNorms (counted as Llama's, 0.87 of its step), Phi-3's fused qkv_proj and
# gate_up_proj (1.15), Nemotron's relu2 MLP and norms in bf16 (1.35), Jais 2's relu2 MLP after LayerNorms (0.98),
# Phi-2's gelu_new MLP after them (0.86).
FAMILIES = [
    dict(model_type="qwen3", num_hidden_layers=2, hidden_size=768, intermediate_size=2304, num_attention_heads=12,
         num_key_value_heads=4, head_dim=128, vocab_size=1500),
    dict(model_type="gemma3_text", num_hidden_layers=2, hidden_size=768, intermediate_size=3072,
         num_attention_heads=4, num_key_value_heads=2, head_dim=256, vocab_size=1500),
    dict(model_type="gpt_neox", num_hidden_layers=2, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
         vocab_size=1500),
    dict(model_type="starcoder2", num_hidden_layers=2, hidden_size=768, intermediate_size=3072,
         num_attention_heads=12, num_key_value_heads=4, vocab_size=1500),
    *(dict(model_type=family, num_hidden_layers=2, **dims) for family, dims in (
        ("stablelm", dict(SMALL_BLOCK)), ("phi3", dict(SMALL_BLOCK, pad_token_id=0)),
        ("nemotron", dict(SMALL_BLOCK, hidden_act="relu2")), ("jais2", dict(SMALL_BLOCK, pad_token_id=0)),
        ("phi", dict(SMALL_BLOCK, hidden_act="gelu_new", pad_token_id=0)),
        *UNMEASURED_BLOCKS)),
]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dims", WIDE + FAMILIES, ids=lambda dims: dims.get("model_type", "llama"))
def test_the_step_peak_matches_what_is_live_at_once(tmp_path, dims, checkpointing, request):
    """Beyond what is saved: forward and backward of one step, every tensor alive at the worst
    moment (gradients in flight, a recomputed layer, the adapter's gradients) against the parts of
    the estimate that a step allocates. LayerNorms run as on CUDA, as the estimate counts them."""
    if dims.get("model_type") in estimate.LAYER_NORM_FAMILIES:
        request.getfixturevalue("layer_norm_as_on_cuda")
    s, model = build(tmp_path, dims, checkpointing=checkpointing)
    e = estimate_peak_memory(s, {**dims, "tie_word_embeddings": False}, micro_batch=4, seq_len=64)
    peak = live_peak(model, dims["vocab_size"], batch=4, seq=64)
    assert layers_side(e) == pytest.approx(peak, rel=0.10), (layers_side(e), peak)


def live_peak(model, vocab: int, *, batch: int, seq: int) -> int:
    """The peak of live tensor bytes over one forward and backward of random tokens (bf16 autocast)."""
    ids = torch.randint(0, vocab, (batch, seq))
    with LiveTensorBytes(model, vocab) as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        loss.backward()
    return live.peak


@pytest.mark.parametrize(("optimizer", "lora_dtype"), [("paged_adamw_32bit", "float32"), ("paged_adamw_32bit", "bfloat16"),
                                                     ("adamw_torch", "float32"), ("adamw_torch", "bfloat16")])
def test_optimizer_state_matches_after_a_step(tmp_path, optimizer, lora_dtype):
    """The optimizers as the Trainer makes them (optim=...). torch's AdamW keeps its moments in the dtype of the
    weights, bfloat16 for a bfloat16 adapter: counted at float32's 8 bytes a weight, the estimate said twice what
    they take (bitsandbytes' 32-bit moments are float32 whatever the weights)."""
    s, model = build(tmp_path, UNSEEN[1], checkpointing=False)
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # what the recipe does for lora.dtype (TrainerGuards)
        p.data = p.data.to(getattr(torch, lora_dtype))
    make = bnb.optim.PagedAdamW32bit if optimizer == "paged_adamw_32bit" else torch.optim.AdamW
    step = make(params, lr=1e-4)
    ids = torch.randint(0, UNSEEN[1]["vocab_size"], (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    step.step()
    state = sum(t.numel() * t.element_size() for p in params for t in step.state[p].values()
                if torch.is_tensor(t) and t.numel() > 1)
    s = s.model_copy(update={"lora": s.lora.model_copy(update={"dtype": lora_dtype}),
                             "training": s.training.model_copy(update={"optimizer": optimizer})})
    e = estimate_peak_memory(s, {**UNSEEN[1], "tie_word_embeddings": False})
    assert e.parts["optimizer state"] == state


# The paper's recipe (QLoRA, section 4 and appendix): LoRA r=64 on every linear layer, micro-batch 1,
# 512 tokens, gradient checkpointing, the paged 32-bit AdamW.
PAPER_RECIPE = {"lora": {"r": 64, "alpha": 16}, "training": {
    "max_steps": 10, "per_device_batch_size": 1, "max_seq_length": 512, "gradient_checkpointing": True}}


@pytest.mark.parametrize(("config", "gpu_gib"), [(LLAMA_65B, 48), (LLAMA_33B, 24)], ids=["65B on 48 GiB", "33B on 24 GiB"])
def test_the_papers_recipe_fits_where_the_paper_says_with_its_optimizer_paging(config, gpu_gib):
    e = estimate_peak_memory(JobSpec.parse({"base_model": "x", **PAPER_RECIPE}), config)
    budget = gpu_gib * GIB
    assert e.pageable == {"optimizer state"} and e.pageable_bytes == e.parts["optimizer state"]
    assert e.total > budget  # all of it would not fit: the optimizer pages, as the paper's paged optimizer does
    assert e.resident <= budget and e.fits(budget)
    assert 0 < e.paged_bytes(budget) <= e.pageable_bytes
    assert not e.fits(budget, max_paged_fraction=0)  # an operator who forbids paging refuses it


def test_only_a_paged_optimizers_state_is_pageable_and_the_allowance_covers_the_resident_parts():
    paged = estimate_peak_memory(spec(per_device_batch_size=1, max_seq_length=2048), LLAMA3_8B)
    plain = estimate_peak_memory(spec(per_device_batch_size=1, max_seq_length=2048, optimizer="adamw_torch"), LLAMA3_8B)
    assert plain.pageable == frozenset() and plain.resident == plain.total
    assert paged.parts["optimizer state"] == plain.parts["optimizer state"]
    # Unified memory is outside PyTorch's caching allocator: no fragmentation counted on it.
    allowance = "allowance (context, fragmentation)"
    saved = plain.parts[allowance] - paged.parts[allowance]
    assert saved == pytest.approx(estimate.FRAGMENTATION * paged.parts["optimizer state"], abs=1)
    assert paged.resident == paged.total - paged.parts["optimizer state"]


def test_qlora_estimate_states_the_paging_of_the_papers_65b_recipe(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_65B))
    (tmp_path / "spec.json").write_text(json.dumps({"base_model": str(tmp_path), **PAPER_RECIPE}))
    done = subprocess.run([sys.executable, "-m", "app.cli", "estimate", str(tmp_path / "spec.json"), "--gpu-memory", "48",
                           "--table"], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "optimizer state (pageable)" in done.stdout and "resident (pageable state paged out)" in done.stdout
    assert "fits, with 1.09 GiB of the 5.96 GiB of paged optimizer state paged to CPU memory" in done.stdout, done.stdout
    # Where the operator allows less paging than that (1.09 of 5.96 GiB is 18 %), admission turns on activation
    # offload ("auto") to page less, or refuses where nothing pages little enough; the estimate, which says what
    # admission would do, said "fits" as it was (paging 18 %) and exited 0 whatever the operator allowed.
    def strict(fraction: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", "estimate", str(tmp_path / "spec.json"), "--gpu-memory",
                               "48", "--json"], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "QLORA_MAX_PAGED_FRACTION": fraction})
    tenth = strict("0.1")
    answer = json.loads(tenth.stdout)
    admitted = fit_to_gpu(JobSpec.parse({"base_model": "x", **PAPER_RECIPE}), LLAMA_65B, 48 * GIB, 0.1)
    assert admitted is not None and admitted.training.activation_offload is True
    assert tenth.returncode == 0 and answer["fits"] and answer["activation_offload"] is True
    assert answer["paged_bytes"] <= 0.1 * answer["pageable_bytes"]
    assert strict("0").returncode == 1  # nothing may page: it does not fit, as admission refuses it


def test_a_bfloat16_adapter_halves_its_weights_and_gradients_as_counted_live(tmp_path):
    dims = UNSEEN[0]
    _, model = build(tmp_path, dims, checkpointing=False)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # what the recipe does for lora.dtype bfloat16
        p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(0, dims["vocab_size"], (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    config = {**dims, "tie_word_embeddings": False}
    bf16 = estimate_peak_memory(JobSpec.parse({"base_model": "m", "lora": {"dtype": "bfloat16"},
                                               "training": {"max_steps": 1}}), config)
    assert bf16.parts["LoRA adapter"] == sum(p.numel() * p.element_size() for p in params)
    assert bf16.parts["LoRA gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in params)
    f32 = estimate_peak_memory(spec(), config)
    assert f32.parts["LoRA adapter"] == 2 * bf16.parts["LoRA adapter"]
    assert f32.parts["optimizer state"] == bf16.parts["optimizer state"]  # the moments stay float32


def _quant_state_tensors(state):
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
    return tensors


def test_qlora_estimate_prints_the_breakdown_and_what_fits(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    (tmp_path / "spec.json").write_text(json.dumps(
        {"base_model": str(tmp_path), "training": {"epochs": 1, "per_device_batch_size": 16, "max_seq_length": 2048,
                                                   "activation_offload": False, "tiled_mlp": False}}))
    command = [sys.executable, "-m", "app.cli", "estimate", str(tmp_path / "spec.json"), "--gpu-memory", "24"]
    done = subprocess.run([*command, "--table"], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stderr  # it does not fit: exit 1, as `qlora jobs preflight` where a job is refused
    assert "backward peak (loss head, or one layer)" in done.stdout and "total" in done.stdout
    assert "does not fit in 24.00 GiB; the largest micro-batch that fits: 8" in done.stdout
    assert "try per_device_batch_size 8 with gradient_accumulation_steps 8" in done.stdout

    # On a pipe, the same in bytes for a script.
    piped = subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert piped.returncode == 1, piped.stderr
    answer = json.loads(piped.stdout)
    assert answer["fits"] is False and answer["largest_micro_batch"] == 8 and answer["gpu_memory"] == 24 * 2**30
    assert answer["total"] == sum(answer["parts"].values()) > answer["gpu_memory"]
    assert (answer["micro_batch"], answer["seq_len"]) == (16, 2048)
    assert answer["suggestions"][0].startswith("per_device_batch_size 8 with gradient_accumulation_steps 8")
    roomy = subprocess.run([*command[:-1], "80"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert roomy.returncode == 0 and json.loads(roomy.stdout)["fits"] is True


def test_qlora_estimate_names_target_modules_the_model_lacks(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(PHI3_MINI))
    (tmp_path / "spec.json").write_text(json.dumps(
        {"base_model": str(tmp_path), "lora": {"target_modules": ["q_proj", "[bold]"]}, "training": {"epochs": 1}}))
    done = subprocess.run([sys.executable, "-m", "app.cli", "estimate", str(tmp_path / "spec.json")],
                          capture_output=True, text=True, env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stdout
    assert ("error: lora.target_modules: no linear layer named 'q_proj', '[bold]' in a phi3 model's blocks; "
            "they have: qkv_proj, o_proj, gate_up_proj, down_proj") in done.stderr


def test_qlora_estimate_counts_the_reference_copy_of_a_dpo_jobs_starting_adapter_when_told(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    (tmp_path / "spec.json").write_text(json.dumps({"base_model": str(tmp_path), "method": {"type": "dpo"},
                                                    "training": {"max_steps": 10}}))

    def estimate_cli(*flags: str) -> str:
        done = subprocess.run([sys.executable, "-m", "app.cli", "estimate", str(tmp_path / "spec.json"), *flags, "--table"],
                              capture_output=True, text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "DPO reference adapter" not in estimate_cli()  # from the base: the reference is the base itself
    continued = estimate_cli("--from-adapter")
    assert "DPO reference adapter (frozen copy)" in continued, continued


LOGITS_TILE = estimate.LOSS_VOCAB_TILE  # as trl tiles them, whatever a test sets the estimate's constant to


def step_peak(model, dims: dict, batch: int, seq: int, *, offload: ActivationOffload | None = None) -> int:
    """The live-tensor peak of one step, without the loss head's logits tiles (the estimate is asked
    for the layers' side of the backward: see the tests below)."""
    return step_memory(model, dims, batch, seq, offload=offload)[1]


def step_memory(model, dims: dict, batch: int, seq: int, *, offload: ActivationOffload | None = None) -> tuple[int, int]:
    """What is live when the forward pass ends (what it keeps for backward), and the step's peak; the
    offload's copies are host memory, not counted."""
    live = LiveTensorBytes(model, dims["vocab_size"], widths=(LOGITS_TILE,))
    if offload is not None:
        pack = offload._pack

        def pack_on_host(tensor):
            live.paused = True
            try:
                return pack(tensor)
            finally:
                live.paused = False

        offload._pack = pack_on_host
    ids = torch.randint(0, dims["vocab_size"], (batch, seq))
    with live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        after_forward = live.live
        loss.backward()
    return after_forward, live.peak


def layers_side(e) -> int:
    return sum(e.parts[k] for k in ("activations (kept for backward)", "backward peak (loss head, or one layer)",
                                    "LoRA gradients"))


# 512 tokens a step, and MLP chunks of 64: long enough that a layer's backward, not the loss head's
# hidden states, is the step's peak, as at long context; short enough for the CPU (attention there
# materialises its scores, which flash attention on a GPU never does).
LONG_STEP = dict(batch=8, seq=64)
TILE = 64


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("dims", WIDE)
def test_a_tiled_mlp_step_peak_matches_what_is_live_at_once(tmp_path, dims, checkpointing, monkeypatch):
    """training.tiled_mlp: each MLP saves only its input, and its backward holds one chunk's
    intermediates and gradients; the estimate's parts against every tensor live at the worst moment,
    tiled and not, at the same tokens and chunk."""
    monkeypatch.setattr(estimate, "mlp_tile_tokens", lambda hidden: TILE)  # the tiny shapes' hidden is 1,024: all of it
    monkeypatch.setattr(estimate, "LOSS_VOCAB_TILE", 0)  # the logits tiles are left out of both sides
    config = {**dims, "tie_word_embeddings": False}
    peaks = {}
    for tiled in (False, True):
        s, model = build(tmp_path / str(tiled), dims, checkpointing=checkpointing)
        if tiled:
            assert tile_mlps(model, TILE) == dims["num_hidden_layers"]
        measured = step_peak(model, dims, **LONG_STEP)
        e = estimate_peak_memory(JobSpec.parse({"base_model": "m", "training": {
            "max_steps": 1, "gradient_checkpointing": checkpointing, "tiled_mlp": tiled}}), config,
            micro_batch=LONG_STEP["batch"], seq_len=LONG_STEP["seq"])
        assert e.tiled is tiled
        assert layers_side(e) == pytest.approx(measured, rel=0.10), (tiled, layers_side(e), measured)
        peaks[tiled] = measured
    assert peaks[True] < 0.75 * peaks[False]


@pytest.mark.parametrize("dims", [dict(num_hidden_layers=2, hidden_size=512, intermediate_size=1408, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=1000)], ids=["hidden512"])
def test_a_long_tiled_step_is_not_under_counted(tmp_path, dims, monkeypatch):
    """At 2,048 tokens a tiled, checkpointed layer's backward peaks after its MLP's, in its post-attention norm's
    (float32 temporaries beside the attention's saved tensors): the estimate counted only the MLP's phase and was
    11-12 % under what is live at 2,048 tokens, 13 % at 4,096 (an under-count is an OOM hours into a job). Now the
    larger of the two phases: never under, at most 10 % over."""
    monkeypatch.setattr(estimate, "mlp_tile_tokens", lambda hidden: TILE)
    monkeypatch.setattr(estimate, "LOSS_VOCAB_TILE", 0)  # the logits tiles are left out of both sides
    step = dict(batch=8, seq=256)
    s, model = build(tmp_path, dims, checkpointing=True)
    assert tile_mlps(model, TILE) == dims["num_hidden_layers"]
    measured = step_peak(model, dims, **step)
    e = estimate_peak_memory(JobSpec.parse({"base_model": "m", "training": {"max_steps": 1, "tiled_mlp": True}}),
                             {**dims, "tie_word_embeddings": False}, micro_batch=step["batch"], seq_len=step["seq"])
    assert 0.98 * measured <= layers_side(e) <= 1.10 * measured, (layers_side(e), measured)


def test_offloaded_activations_leave_the_device_as_the_estimate_counts(tmp_path, monkeypatch):
    """training.activation_offload: every layer's checkpointed input is held by the offload (host
    memory: the estimate's host_bytes, exactly), and the device's step peak is the estimate's parts
    with only the inputs in transit kept."""
    monkeypatch.setattr(estimate, "LOSS_VOCAB_TILE", 0)
    dims = {**WIDE[0], "num_hidden_layers": 8}  # enough layers, and tokens, for their inputs to weigh
    step = dict(batch=16, seq=64)
    config = {**dims, "tie_word_embeddings": False}
    offload = ActivationOffload(cuda=False)
    s, model = build(tmp_path / "offload", dims, checkpointing=True, offload=offload)
    kept_offloaded, measured = step_memory(model, dims, **step, offload=offload)
    e = estimate_peak_memory(JobSpec.parse({"base_model": "m", "training": {
        "max_steps": 1, "activation_offload": True}}), config, micro_batch=step["batch"], seq_len=step["seq"])
    tokens = step["batch"] * step["seq"]
    assert e.offload and e.host_bytes == offload.peak_held_bytes == dims["num_hidden_layers"] * tokens * dims["hidden_size"] * 2
    assert offload.held_bytes == 0  # all brought back by the end of backward
    assert layers_side(e) == pytest.approx(measured, rel=0.10), (layers_side(e), measured)
    # Against the same model keeping them: what the forward leaves on the device is less by every
    # layer's input, and so is the step's peak, though by less: in these small shapes the adapter's
    # gradients, which grow as backward goes, weigh like the inputs, so the peak comes late in
    # backward, when the later layers' inputs are gone anyway (at 8B and 32k tokens they are 0.16 GiB
    # against 8 GiB of inputs).
    _, kept_model = build(tmp_path / "kept", dims, checkpointing=True)
    kept, kept_peak = step_memory(kept_model, dims, **step)
    assert kept - kept_offloaded == pytest.approx(e.host_bytes, rel=0.15)
    assert measured < kept_peak


def test_llama3_8b_at_32k_tokens_fits_24_gib_with_offload_and_tiling():
    from tests.model_configs import LLAMA3_8B_128K

    def at_32k(**savers):
        return estimate_peak_memory(spec(per_device_batch_size=1, max_seq_length=32768, **savers), LLAMA3_8B_128K)

    standard = at_32k(activation_offload=False, tiled_mlp=False)
    both = at_32k(activation_offload=True, tiled_mlp=True)
    assert not standard.fits(24 * GIB) and both.fits(24 * GIB)
    # Offload moves 31 of the 32 layer inputs (the rest are in transit); tiling shrinks the recompute.
    assert both.parts["activations (kept for backward)"] < standard.parts["activations (kept for backward)"] / 8
    assert both.parts["backward peak (loss head, or one layer)"] < standard.parts["backward peak (loss head, or one layer)"] / 2
    assert both.host_bytes == 32 * 32768 * 4096 * 2


def test_qlora_estimate_turns_on_tiling_where_32k_tokens_would_not_fit(tmp_path):
    import json
    import subprocess
    import sys

    from tests.model_configs import LLAMA3_8B_128K

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_128K))
    training = {"max_steps": 10, "per_device_batch_size": 1, "max_seq_length": 32768}
    (tmp_path / "auto.json").write_text(json.dumps({"base_model": str(tmp_path), "training": training}))
    (tmp_path / "both.json").write_text(json.dumps({"base_model": str(tmp_path), "training": {
        **training, "activation_offload": True, "tiled_mlp": True}}))

    def estimate_cli(name, *options, returncode=0):
        done = subprocess.run([sys.executable, "-m", "app.cli", "estimate", str(tmp_path / name), "--gpu-memory", "24",
                               *options, "--table"], capture_output=True, text=True,
                              env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})
        assert done.returncode == returncode, done.stderr
        return " ".join(done.stdout.split())  # the table's title wraps at the table's width

    auto = estimate_cli("auto.json")  # "auto": the cheapest saver that fits, tiling alone here
    # By a thin margin since a tiled layer's norm phase is counted (23.94 GiB resident): it pages most of the
    # optimizer state at each optimizer step.
    assert "gradient checkpointing on, tiled MLPs" in auto
    assert "fits, with 0.25 GiB of the 0.31 GiB of paged optimizer state paged to CPU memory" in auto
    both = estimate_cli("both.json")
    assert "activations offloaded to 8.00 GiB of pinned CPU memory and tiled MLPs" in both
    assert "host memory: offloaded activations (pinned) (CPU, not GPU) │ 8.00" in both and "fits in 24.00 GiB" in both
    # The paged optimizer's overflow is host memory too, beside the offloaded activations' (none here: it fits).
    assert "host memory: optimizer state paged out (CPU, not GPU) │ 0.25" in auto
    # With the host memory a job may hold (the service's QLORA_HOST_MEMORY), the verdict is admission's.
    small_hosts = estimate_cli("both.json", "--host-memory", "6", returncode=1)
    assert "does not fit in 24.00 GiB of GPU memory and 6.00 GiB of host memory (it holds 8.00 GiB there)" in small_hosts
    assert "try max_seq_length 16384" in small_hosts
    assert "fits in 24.00 GiB of GPU memory and 16.00 GiB of host memory" in estimate_cli("both.json", "--host-memory", "16")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_eager_attention_keeps_every_layers_scores_as_counted(tmp_path, checkpointing):
    """Gemma 2 has no SDPA path, so without flash-attn its attention is eager: each layer keeps its (heads
    x tokens x tokens) scores. At 1,024 tokens that is most of a step, which the estimate left out."""
    dims = dict(model_type="gemma2", num_hidden_layers=2, hidden_size=768, intermediate_size=2048,
                num_attention_heads=4, num_key_value_heads=2, head_dim=256, vocab_size=1500)
    s, model = build(tmp_path, dims, checkpointing=checkpointing)
    assert model.config._attn_implementation == "eager"
    e = estimate_peak_memory(s, {**dims, "tie_word_embeddings": False}, micro_batch=2, seq_len=1024)
    peak = live_peak(model, dims["vocab_size"], batch=2, seq=1024)
    assert layers_side(e) == pytest.approx(peak, rel=0.10), (layers_side(e), peak)


@pytest.mark.parametrize("config, experts, in_16_bits", [(MIXTRAL_8X7B, 8, "84.00 GiB"), (QWEN3_30B_A3B, 128, "54.00 GiB")])
def test_a_mixture_of_experts_is_refused_saying_its_experts_would_stay_in_16_bits(config, experts, in_16_bits):
    with pytest.raises(ValueError) as refused:
        ModelShape.from_config(config)
    assert f"mixture-of-experts model ({experts} experts per layer)" in str(refused.value)
    assert f"would load in 16 bits (about {in_16_bits}), not 4" in str(refused.value)
    assert ModelShape.from_config({**config, "num_local_experts": 1, "num_experts": 1})  # one expert is a dense MLP
    # as transformers writes a Mixtral config.json: an unset head_dim is null, not absent
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelShape.from_config({**config, "head_dim": None})


@pytest.mark.parametrize("key, value", [("hidden_size", "4096"), ("hidden_size", True), ("num_hidden_layers", 0),
                                        ("vocab_size", 10**12), ("head_dim", 12.5), ("intermediate_size", None)])
def test_a_broken_dimension_is_refused_naming_it(key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        ModelShape.from_config({**LLAMA3_8B, key: value})


@pytest.mark.parametrize("config, query, qk_norm, sandwich", [(LLAMA3_8B, 4096, False, False),
                                                              (QWEN3_1_7B, 2048, True, False),
                                                              (GEMMA3_12B, 4096, True, True)])
def test_what_each_family_adds_to_a_layer_is_read_from_its_config(config, query, qk_norm, sandwich):
    shape = ModelShape.from_config(config)
    assert (shape.heads * shape.head_dim, shape.qk_norm, shape.sandwich_norms) == (query, qk_norm, sandwich)
    assert ModelShape.from_config({**LLAMA3_8B, "use_qk_norm": True}).qk_norm  # said by the config itself


@pytest.mark.parametrize("family", sorted(FAMILY_LINEARS.keys() | LLAMA_FAMILIES))
def test_each_familys_linear_layers_are_the_ones_transformers_builds(family):
    """The estimate's tables of each family's linear layers (names and shapes) and norms, against the
    block the pinned transformers builds (on the meta device: no memory) at shapes where every width differs."""
    defaults = AutoConfig.for_model(family)
    # Grouped-query heads 32 wide (queries 128 wide on a hidden size of 64), where the family's config has
    # those fields; Helium's o_proj assumes that the queries are as wide as the hidden size, as they are in its models.
    heads = {key: value for key, value in (("num_key_value_heads", 2), ("head_dim", 16 if family == "helium" else 32))
             if hasattr(defaults, key)}
    config = AutoConfig.for_model(family, num_hidden_layers=1, hidden_size=64, intermediate_size=96,
                                  num_attention_heads=4, vocab_size=128, pad_token_id=0, **heads)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    built = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    shape = ModelShape.from_config(config.to_dict())
    assert shape.linear_shapes() == built
    # And the norms the estimate adds terms for: on the queries and keys, and four a layer.
    layer = model.base_model.layers[0]
    attention = next(module for name, module in layer.named_children() if "attn" in name or "attention" in name)
    assert shape.qk_norm == (sum("Norm" in type(m).__name__ for m in attention.modules()) >= 2)
    assert shape.sandwich_norms == (sum("Norm" in type(m).__name__ for m in layer.children()) == 4)


def test_fused_layers_are_counted_as_the_family_has_them():
    """Phi-3 3.8B: its published 3,821,079,552 parameters, and LoRA on the fused layers a list names."""
    shape = ModelShape.from_config(PHI3_MINI)
    assert shape.linear_params + shape.other_params == 3_821_079_552
    fused = JobSpec.parse({"base_model": "m", "lora": {"target_modules": ["qkv_proj", "o_proj"]},
                           "training": {"max_steps": 1}})
    e = estimate_peak_memory(fused, PHI3_MINI)
    assert e.parts["LoRA adapter"] == 4 * 32 * 16 * ((3072 + 3 * 3072) + (3072 + 3072))
    with pytest.raises(ValueError, match="no linear layer named 'q_proj' in a phi3 model's blocks; they have: "
                                         "qkv_proj, o_proj, gate_up_proj, down_proj"):
        estimate_peak_memory(JobSpec.parse({"base_model": "m", "lora": {"target_modules": ["q_proj"]},
                                            "training": {"max_steps": 1}}), PHI3_MINI)


def test_a_packed_micro_batch_keeps_its_block_diagonal_attention_mask_as_counted(tmp_path, monkeypatch):
    """training.packing true without flash-attn (the default worker image has none): trl flattens the micro-batch
    into one row of micro-batch x seq tokens and transformers keeps its examples apart with a (row x row) boolean
    mask, which SDPA turns into an additive mask of the compute dtype in every attention call. Quadratic in the
    micro-batch: at 8 x 512 tokens the estimate, which counted no mask, was 14 % under what the step holds (at
    hidden 1,024; 17 % at the 512 here, whose layers cost a third of the time: the mask is the same size)."""
    monkeypatch.setattr(estimate, "LOSS_VOCAB_TILE", 0)  # the logits tiles are left out of both sides
    dims, batch, seq = dict(WIDE[0], hidden_size=512, intermediate_size=1408, num_attention_heads=4), 8, 512
    _, model = build(tmp_path, dims, checkpointing=True)
    ids = torch.randint(0, dims["vocab_size"], (1, batch * seq))
    examples = torch.arange(64).repeat(batch * seq // 64).unsqueeze(0)  # many short rows, packed: positions restart
    with LiveTensorBytes(model, dims["vocab_size"], widths=(LOGITS_TILE,)) as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, position_ids=examples, fused_lm_head=True).loss
        loss.backward()
    e = estimate_peak_memory(JobSpec.parse({"base_model": "m", "training": {"max_steps": 1, "packing": True}}),
                             {**dims, "tie_word_embeddings": False}, micro_batch=batch, seq_len=seq)
    assert layers_side(e) == pytest.approx(live.peak, rel=0.10), (layers_side(e), live.peak)


def test_rows_longer_than_the_models_max_position_embeddings_are_counted_as_the_recipe_cuts_them(tmp_path, monkeypatch):
    """The recipe cuts rows at max_seq_length, never at the model's max_position_embeddings (rotary positions go
    on past it, and nothing refuses the spec): a Llama 2 (4,096) job at max_seq_length 8,192 carries 8,192 tokens a
    row. The estimate counted max_position_embeddings' tokens: half the activations of such a step."""
    monkeypatch.setattr(estimate, "LOSS_VOCAB_TILE", 0)
    dims = {**WIDE[1], "max_position_embeddings": 128}
    s, model = build(tmp_path, dims, checkpointing=True)
    measured = step_peak(model, dims, batch=4, seq=256)
    e = estimate_peak_memory(JobSpec.parse({"base_model": "m", "training": {"max_steps": 1, "max_seq_length": 256}}),
                             {**dims, "tie_word_embeddings": False}, micro_batch=4)
    assert layers_side(e) == pytest.approx(measured, rel=0.10), (layers_side(e), measured)
    assert e.seq_len == 256


def dpo_pairs(vocab: int, pairs: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch as trl's DataCollatorForPreference lays it out: the preferred answers' rows, then the others', padded on
    the right to the longest (one full row, the others 16 tokens shorter each), a quarter of each row prompt."""
    lengths = [seq - 16 * k for k in range(2 * pairs)]
    ids, attention, completion = (torch.zeros(2 * pairs, seq, dtype=torch.long) for _ in range(3))
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, vocab, (n,))
        attention[row, :n] = 1
        completion[row, seq // 4:n] = 1
    return ids, attention, completion


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_dpo_step_peak_matches_what_is_live_at_once(tmp_path, checkpointing, monkeypatch):
    """method dpo, as trl's DPOTrainer._compute_loss runs a step: the policy's forward, the reference's (the adapter
    switched off by trl's use_adapter, no grad, checkpointing off by trl's disable_gradient_checkpointing) while the
    policy's activations are kept, then the backward. The estimate counted the reference's layer as a layer's saved
    activations: 27 % over what is live without checkpointing. What a no-grad layer holds is what is in flight."""
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    monkeypatch.setattr(estimate, "LOSS_VOCAB_TILE", 0)  # the logits tiles are left out of both sides
    dims, pairs, seq = WIDE[0], 4, 256
    _, model = build(tmp_path, dims, checkpointing=checkpointing)
    ids, attention, completion = dpo_pairs(dims["vocab_size"], pairs, seq)
    labels = ids.masked_fill(completion == 0, -100)
    inputs = dict(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False, fused_lm_head=True)
    with LiveTensorBytes(model, dims["vocab_size"], widths=(LOGITS_TILE,)) as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = model(**inputs).log_probs.sum(dim=1)
            with torch.no_grad(), disable_gradient_checkpointing(model, None), use_adapter(model, adapter_name=None):
                reference = model(**inputs).log_probs.sum(dim=1)
            chosen, rejected = (logps - reference).chunk(2)
            loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()
        loss.backward()
    e = estimate_peak_memory(JobSpec.parse({"base_model": "m", "method": {"type": "dpo"}, "training": {
        "max_steps": 1, "gradient_checkpointing": checkpointing}}), {**dims, "tie_word_embeddings": False},
        micro_batch=pairs, seq_len=seq)
    assert layers_side(e) == pytest.approx(live.peak, rel=0.10), (layers_side(e), live.peak)


@pytest.fixture
def layer_norm_as_on_cuda(monkeypatch):
    """CUDA's autocast runs layer_norm in float32 (aten/src/ATen/autocast_mode.cpp: KERNEL_CUDA(layer_norm, fp32)):
    its input, weight and bias cast to float32 and a float32 result, which bitsandbytes' 4-bit layers hand on (they
    return their input's dtype). The CPU's autocast runs it in bf16, so on the CPU a LayerNorm family's block holds
    less than on a GPU, where the estimate is for. This runs it as CUDA's autocast does."""
    layer_norm = torch.nn.functional.layer_norm

    def in_float32(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled("cpu"):
            return layer_norm(x, normalized_shape, weight, bias, eps)
        with torch.autocast("cpu", enabled=False):
            return layer_norm(x.float(), normalized_shape, None if weight is None else weight.float(),
                              None if bias is None else bias.float(), eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", in_float32)


NEOX = dict(model_type="gpt_neox", hidden_size=1024, num_attention_heads=16, vocab_size=1500)


def kept_by_one_and_two_layers(tmp_path, dims: dict) -> tuple[list[int], list[int]]:
    """What a model of `dims` with one layer, then two, keeps for backward (4 x 64 tokens, no checkpointing), and what
    the estimate counts as kept for each: one more layer's share is the difference."""
    saved, estimated = [], []
    for layers in (1, 2):
        _, model = build(tmp_path / str(layers), {**dims, "num_hidden_layers": layers}, checkpointing=False)
        saved.append(saved_for_backward(model, 4, 64, dims["vocab_size"]))
        e = estimate_peak_memory(spec(gradient_checkpointing=False), {**dims, "num_hidden_layers": layers,
                                                                        "tie_word_embeddings": False},
                                 micro_batch=4, seq_len=64)
        estimated.append(e.parts["activations (kept for backward)"])
    return saved, estimated


@pytest.mark.parametrize("intermediate", [4096, 2048])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
def test_a_gpt_neox_layer_keeps_what_is_counted(tmp_path, parallel, intermediate, layer_norm_as_on_cuda):
    """GPT-NeoX's block (fused q/k/v, LayerNorms, by default attention and MLP side by side on one input): what one
    more layer keeps for backward, against what the estimate adds for it. Counted as a Llama block of its widths it
    was 12 % over at Pythia's proportions (intermediate 4 x hidden), 24 % at 2 x."""
    dims = {**NEOX, "intermediate_size": intermediate, "use_parallel_residual": parallel}
    saved, estimated = kept_by_one_and_two_layers(tmp_path, dims)
    assert estimated[1] - estimated[0] == pytest.approx(saved[1] - saved[0], rel=0.10), (estimated, saved)
    # And the whole model's (the loss head keeps the bf16 hidden states of the tokens it scores).
    assert estimated[1] + 4 * 64 * NEOX["hidden_size"] * 2 == pytest.approx(saved[1], rel=0.10), (estimated, saved)


# One family's block each, where its layer differs from Llama's in what it keeps for backward.
OWN_BLOCKS = [
    dict(model_type="stablelm", **SMALL_BLOCK),  # serial, as transformers' default: two float32 LayerNorms
    dict(model_type="stablelm", **SMALL_BLOCK, use_parallel_residual=True, qk_layernorm=True),  # StableLM 2 12B's
    dict(model_type="cohere", **SMALL_BLOCK),  # parallel attention and MLP after one float32 norm of its own
    dict(model_type="cohere", **SMALL_BLOCK, use_qk_norm=True),
    dict(model_type="phi3", **{**SMALL_BLOCK, "num_key_value_heads": 12}, pad_token_id=0),  # fused, keys as wide as h
    dict(model_type="nemotron", **SMALL_BLOCK, hidden_act="relu2"),
    *(dict(model_type=family, **dims) for family, dims in UNMEASURED_BLOCKS),
]


@pytest.mark.parametrize("dims", OWN_BLOCKS, ids=lambda dims: "-".join(
    [dims["model_type"], *(key for key in ("use_parallel_residual", "qk_layernorm", "use_qk_norm") if dims.get(key)),
     *(["mha"] if dims["num_key_value_heads"] == dims["num_attention_heads"] else [])]))
def test_a_familys_layer_keeps_what_is_counted(tmp_path, dims, layer_norm_as_on_cuda):
    """What one more layer keeps for backward, against what the estimate adds for it, LayerNorms run as on CUDA.
    Counted as a Llama layer, StableLM's read 0.81 (serial) and 0.84 (parallel) of what it keeps, Phi-3's 1.17 and
    Nemotron's 1.37 (its relu2 MLP counted as gated); Cohere's matched, and still does."""
    saved, estimated = kept_by_one_and_two_layers(tmp_path, dims)
    assert estimated[1] - estimated[0] == pytest.approx(saved[1] - saved[0], rel=0.05), (estimated, saved)


def test_a_gateless_mlp_counted_as_gated_keeps_its_stand_in_whole(tmp_path):
    """Apertus' xielu MLP (up, xielu, down) keeps more than a one-kernel activation's two intermediates, and is counted
    as a gated MLP, on the safe side. With the gated count's surplus less one LoRA input copy for its missing gate (the
    fused-layer adjustment), its layer read 0.98 of what it keeps (its step without checkpointing 0.96 of live)."""
    dims = dict(model_type="apertus", **SMALL_BLOCK, hidden_act="xielu", pad_token_id=0)
    assert not ModelShape.from_config({**dims, "num_hidden_layers": 1}).mlp_counted_as_its_own
    saved, estimated = kept_by_one_and_two_layers(tmp_path, dims)
    assert saved[1] - saved[0] <= estimated[1] - estimated[0] <= 1.05 * (saved[1] - saved[0]), (estimated, saved)


def test_which_blocks_read_one_input_is_each_familys_default():
    """use_parallel_residual is GPT-NeoX's default and not StableLM's (transformers' configs), where absent."""
    block = dict(SMALL_BLOCK, num_hidden_layers=2)
    assert ModelShape.from_config({**block, "model_type": "gpt_neox"}).parallel_residual
    assert not ModelShape.from_config({**block, "model_type": "stablelm"}).parallel_residual
    assert ModelShape.from_config({**block, "model_type": "stablelm", "use_parallel_residual": True}).parallel_residual
    assert not AutoConfig.for_model("stablelm").use_parallel_residual and AutoConfig.for_model("gpt_neox").use_parallel_residual


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_gpt_neox_step_peak_matches_what_is_live_at_once(tmp_path, checkpointing, layer_norm_as_on_cuda, monkeypatch):
    """The step's parts against its live-tensor peak, 8 x 64 tokens: without checkpointing the peak is the forward's last
    layer, at its MLP's output projection (10 bytes per intermediate unit in flight, where a two-matrix MLP's backward
    has 6), with every layer's activations kept; with checkpointing, that layer's recomputation in backward."""
    monkeypatch.setattr(estimate, "LOSS_VOCAB_TILE", 0)  # the logits tiles are left out of both sides
    dims = {**NEOX, "intermediate_size": 4096, "num_hidden_layers": 2}
    s, model = build(tmp_path, dims, checkpointing=checkpointing)
    measured = step_peak(model, dims, **LONG_STEP)
    e = estimate_peak_memory(s, {**dims, "tie_word_embeddings": False}, micro_batch=LONG_STEP["batch"],
                             seq_len=LONG_STEP["seq"])
    assert layers_side(e) == pytest.approx(measured, rel=0.10), (layers_side(e), measured)


@pytest.mark.parametrize("optimizer", ["adamw_torch", "paged_adamw_32bit"])
def test_host_memory_counts_no_more_paged_out_than_the_optimizer_state_that_pages(optimizer):
    """A job over the card (resident peak past it): what overflows is not pageable state, and not host memory.
    Counted as the whole overflow, adamw_torch (nothing pageable) held 2.5 GiB of "paged out" optimizer state, and
    a worker's run failed for host memory it would never use."""
    e = estimate_peak_memory(spec(per_device_batch_size=16, max_seq_length=2048, activation_offload=True,
                                  tiled_mlp=False, optimizer=optimizer), LLAMA3_8B)
    budget = 24 * GIB
    assert e.paged_bytes(budget) > e.pageable_bytes  # over the card by more than pages
    parts = e.host_parts(budget)
    assert parts.get("optimizer state paged out", 0) == e.pageable_bytes
    assert parts["offloaded activations (pinned)"] == e.host_bytes


def test_qlora_estimate_counts_the_datasets_host_memory_as_admission_does(tiny_model_dir, demo_data, tmp_path):
    """`qlora estimate --host-memory` gives admission's verdict for a class, and counted only a step's host memory:
    it printed a host total lower than what admission and the run check (their datasets, held for the whole run),
    and "auto" offloaded where, beside the datasets, the host could not hold it. --data (a local JSONL, its token
    estimate as an upload gets) counts them as admission does (steps_host_budget)."""
    import json
    import subprocess
    import sys

    from tests.training.conftest import dataset_bytes
    from worker.training.estimate import DATASET_BYTES_PER_TOKEN

    training = {"max_steps": 2, "per_device_batch_size": 16, "max_seq_length": 2048}
    (tmp_path / "auto.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "training": training}))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    offloaded = estimate_peak_memory(JobSpec.parse({"base_model": "m", "training": {
        **training, "activation_offload": True, "tiled_mlp": False}}), config).host_bytes
    data = dataset_bytes(demo_data["train"]) + dataset_bytes(demo_data["validation"])
    # A GPU the tiny model fits at 16 x 2,048 tokens with its activations offloaded or its MLPs tiled, not without
    # (test_memory.TIGHT_GPU); hosts with room for the activations, and for them beside the datasets or not.
    gpu = str(2_290_000_000 / GIB)

    def estimate_cli(*options):
        done = subprocess.run([sys.executable, "-m", "app.cli", "estimate", str(tmp_path / "auto.json"), "--gpu-memory",
                               gpu, *options, "--json"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)

    with_data = ("--data", str(demo_data["train"]), "--data", str(demo_data["validation"]))
    roomy = estimate_cli("--host-memory", str((offloaded + data) / GIB), *with_data)
    assert (roomy["activation_offload"], roomy["tiled_mlp"], roomy["fits"]) == (True, False, True)
    assert roomy["host"] == {"offloaded activations (pinned)": offloaded, "datasets (read and encoded)": data}
    assert roomy["host_total"] == offloaded + data and roomy["dataset_tokens"] == data // DATASET_BYTES_PER_TOKEN
    short = str((offloaded + data // 2) / GIB)
    assert estimate_cli("--host-memory", short)["activation_offload"] is True  # the datasets not counted
    tiled = estimate_cli("--host-memory", short, *with_data)  # counted: the host cannot pin the activations beside them
    assert (tiled["activation_offload"], tiled["tiled_mlp"], tiled["fits"]) == (False, True, True)
    assert tiled["host"] == {"datasets (read and encoded)": data}
    # Where the datasets alone do not fit, neither does the job, as admission refuses it.
    starved = estimate_cli("--host-memory", str(data / 2 / GIB), *with_data)
    assert starved["fits"] is False
    # ...and "auto" is decided as for a host with nothing to spare, as the run decides it (fit_to_device): tiling, which
    # holds nothing there; not every saver on, which counted pinned activations beside datasets that already do not fit.
    assert (starved["activation_offload"], starved["tiled_mlp"]) == (False, True)
    assert starved["host"] == {"datasets (read and encoded)": data}
