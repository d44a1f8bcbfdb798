"""How much device memory a job will need, before it gets near a GPU. No torch: the API uses it.

The peak of a QLoRA step is the sum of:
- the frozen base: linear layers in 4 bits plus their quantization constants; the rest (embeddings,
  output head, norms) in the compute dtype, or float32 where the engine upcasts them (float16
  compute: see QuantizationSpec.float32_frozen_weights);
- the LoRA adapter in lora.dtype (float32 by default, or bfloat16), its gradients, and the
  optimizer's two moments (float32 whatever the adapter's dtype);
- what the forward pass saves for backward (per layer, per token), or with gradient checkpointing
  only each layer's input (in the residual stream's dtype);
- the larger of the backward's two phases: the loss head (trl's SFTTrainer scores tokens through a
  chunked LM head that never holds the whole logits tensor, so its hidden states, their gradient
  and one tile of logits), then each layer with the gradients in flight and, with checkpointing,
  its recomputed activations: the larger of its MLP's phase and its norm's, which follows (with a
  tiled MLP the norm's float32 temporaries outweigh one chunk's intermediates past ~1,000 tokens),
  and of a layer's forward at its MLP's output projection, whose input is in flight three ways
  (the forward's last layer without checkpointing, each layer's recomputation with it);
- an allowance for the CUDA context, library workspaces and allocator fragmentation.

A DPO step (method dpo) runs each pair's two sequences, preferred and other, in one batch: twice the
tokens of an SFT micro-batch of the same size, in every per-token part. It also runs the reference: a
no-grad forward of the same batch, while the policy's activations are kept, so what one no-grad layer has
in flight (and its loss head's tile) competes with the backward for the step's peak. The reference adds no weights
when it is the adapter switched off (the base); continued from a saved adapter, trl keeps a frozen copy
of it, in the adapter's dtype (lora.dtype, as the recipe casts it): `reference_adapter=True` counts it.

A paged optimizer's state (QLoRA section 3: bitsandbytes allocates it in CUDA unified memory) is
*pageable*: under memory pressure the driver moves it to CPU memory and back for the optimizer step,
so a step can run with part of it off the GPU. The estimate keeps it apart from the *resident* parts
(Estimate.pageable_bytes, Estimate.resident), and a job fits a GPU when its resident peak does and
what overflows is no more than a stated share of the pageable state (Estimate.fits). Unified memory
lives outside PyTorch's caching allocator, so the fragmentation allowance covers the resident parts only.

The per-token activation coefficients were fitted (to within 0.5 %) on what the stack saves for
backward in Llama-architecture models of 1 and 3 layers and six shapes, bf16 compute, LoRA on every
linear layer, through the trainer's loss head; the attention's own width (heads x head_dim, which
Qwen 3 and Gemma make wider than the hidden size) on Llama models of three head sizes, and what Qwen 3,
Gemma 3 and OLMo 2 add to a layer (query and key norms, four norms a layer) on those families; what StableLM's
float32 LayerNorms, Phi-3's fused layers and Nemotron's relu2 MLP and bf16 norms change, on theirs (one and two
layers, LayerNorms run as a GPU's autocast runs them).
A mixture of experts is refused (ModelShape.from_config says why). tests/training/test_estimate.py re-measures them on
shapes the fit never saw, and checks the step's parts against every tensor live at its worst
moment; the allowance is the part to recalibrate against bench/ measurements on real GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.training.spec import JobSpec

GIB = 1024**3
NF4_BLOCK = 64  # bitsandbytes quantizes 4-bit weights in blocks of 64, one absmax each
NESTED_BLOCK = 256  # double quantization: the absmaxes themselves, in blocks of 256

# Bytes saved for backward per token per decoder layer, per unit of each dimension (bf16 compute).
ACT_PER_HIDDEN = 39.2
ACT_PER_QUERY = 10.3  # of the attention's width (heads x head_dim: the queries, its output, o_proj's input)
ACT_PER_INTERMEDIATE = 12.5
ACT_PER_INTERMEDIATE_F32_RESIDUAL = 18.5  # with float32 frozen weights, and so a float32 residual stream
ACT_PER_KV = 4.25
ACT_MLP_PER_HIDDEN = 12.5  # of ACT_PER_HIDDEN, what the MLP saves (its input, the adapter's dropout copies)
# A two-matrix MLP (up, activation, down: GPT-NeoX, StarCoder 2) whose activation is one kernel keeps two
# intermediate-wide tensors per token (the up projection's output and the activation's) where the gated MLP
# keeps four (gate, up, the activation, their product), one projection's copies of its input rather than two,
# and one intermediate-wide gradient in flight rather than two. Fitted, per module, on GPT-NeoX and StarCoder 2
# as the CPU runs them (GPT-NeoX's block is now counted on its own: GPT_NEOX_PER_HIDDEN); counted as gated, the
# estimate of a GPT-NeoX step was 26-33 % over what is live (docs/performance.md). relu2 (Nemotron, Jais 2) is two
# kernels whose first output is the second's saved input and its own backward's, so it keeps two as well (measured
# on Nemotron, intermediate 1,536 and 3,072: 8.25; counted as gated, its step was 28-35 % over). Other activations
# (gelu_new, xielu) keep more tensors of their own: their families are still counted as gated, on the safe side
# (whole: ModelShape.mlp_counted_as_its_own).
ACT_PER_INTERMEDIATE_TWO_MATRIX = 8.25
ACT_MLP_PER_HIDDEN_TWO_MATRIX = 6.4
GRAD_PER_INTERMEDIATE_TWO_MATRIX = 6  # bytes in flight per token per unit, where a gated MLP has two float32 (8)
# After a LayerNorm, on a GPU: CUDA's autocast runs layer_norm in float32 (the CPU's in bf16), and bitsandbytes'
# 4-bit layers return their input's dtype, so the up projection's output and the activation are float32: 2 bytes
# per intermediate unit more than the CPU keeps. Measured with layer_norm run as on CUDA (the test fixture
# layer_norm_as_on_cuda): StarCoder 2 (intermediate 1,536 and 3,072) and GPT-NeoX (2,048 and 4,096). Counted as
# the CPU runs it, a StarCoder 2 step read 0.90 of what a GPU's autocast keeps live (4 x 64 tokens).
ACT_PER_INTERMEDIATE_TWO_MATRIX_LAYER_NORM = 10.25
LAYER_NORM_FAMILIES = frozenset({"gpt_neox", "starcoder2", "stablelm", "jais2", "phi"})  # their blocks' norms are nn.LayerNorm
# StableLM's gated MLP after the same float32 LayerNorm: gate, up, the activation and their product float32 on a GPU,
# as with float32 frozen weights (ACT_PER_INTERMEDIATE_F32_RESIDUAL). Measured with layer_norm as on CUDA, hidden
# 768 and 1,024, intermediate 1,536 and 3,072: 18.4 bytes per intermediate unit a layer, Llama's count of its hidden
# and attention widths otherwise. Counted as a Llama layer, its step read 0.87 of what is live. With
# use_parallel_residual (StableLM 2 12B) attention and MLP read one norm's output: one float32 norm input fewer.
LAYER_NORM_PARALLEL_PER_HIDDEN = -4.0
# In its backward the MLP's gradients are float32 too: the product's, the activation's and the up projection's in
# flight at once (three, where the gated MLP's count has two); counting two, its checkpointed step at 4 x 256
# tokens read 0.99 of what is live.
GRAD_F32_INTERMEDIATES_LAYER_NORM = 3
# Phi-2's MLP (fc1, gelu_new, fc2) after the same float32 LayerNorm: gelu_new is a chain of element-wise ops, each
# saving a float32 intermediate-wide tensor on a GPU. Measured with layer_norm as on CUDA (hidden 768, intermediate
# 1,536 and 3,072): 22.25 bytes per intermediate unit a layer; counted as a gated MLP's 12.5, a Phi-2 step read 0.86
# of what is live.
ACT_PER_INTERMEDIATE_GELU_NEW_LAYER_NORM = 22.25
# Nemotron's LayerNorm1P casts its input to the autocast dtype and runs with autocast off, on a GPU as on the CPU:
# its two norms save bf16 inputs where Llama's RMSNorms save float32 ones (measured per layer: 4.2 bytes per hidden
# unit under the two-matrix count; with relu2 counted so, its step was 10 % over).
AUTOCAST_DTYPE_NORM_FAMILIES = frozenset({"nemotron"})
AUTOCAST_DTYPE_NORMS_PER_HIDDEN = -4.0
# With float32 frozen weights: scaled from the gated MLP's (18.5 / 12.5), not measured.
ACT_PER_INTERMEDIATE_TWO_MATRIX_F32_RESIDUAL = 12.25
ONE_KERNEL_ACTIVATIONS = frozenset({"gelu", "gelu_pytorch_tanh", "silu", "relu", "relu2"})  # config.json's hidden_act
# Per token per hidden unit, once per model rather than per layer: the first layer keeps less than
# the per-layer rate; with checkpointing, the final norm keeps its input beside the layers' inputs.
ACT_MODEL_PER_HIDDEN = -12.0
ACT_MODEL_CHECKPOINTED_PER_HIDDEN = 4.0
# GPT-NeoX's block (Pythia, GPT-NeoX 20B), counted on its own: its queries, keys and values are each as wide as the
# hidden size, so per hidden and per intermediate unit of one layer. Against the Llama count of its widths (47.65
# and 8.25): one fused q/k/v projection, so one LoRA copy of its input where Llama's three projections keep three;
# and LayerNorms, which CUDA's autocast runs in float32 (layer_norm is on its float32 list), so each saves a float32
# copy of its input and returns float32, which bitsandbytes' 4-bit layers hand on (they return their input's dtype):
# the MLP's up projection and activation are float32 on a GPU. The CPU's autocast runs layer_norm in bf16 and sees
# none of that (6 bytes per hidden unit and 2 per intermediate unit a layer less): measured per layer with
# layer_norm in float32 as on CUDA (saved_tensors_hooks, hidden 768 and 1,024, intermediate 2,048 to 4,096, 1 and
# 2 layers; tests/training/test_estimate.py). use_parallel_residual false: the MLP's norm reads its own input.
GPT_NEOX_PER_HIDDEN = 31.3  # and ACT_PER_INTERMEDIATE_TWO_MATRIX_LAYER_NORM per intermediate unit
GPT_NEOX_SERIAL_PER_HIDDEN = 35.3
GPT_NEOX_MODEL_PER_HIDDEN = -6.3  # once per model, where a Llama model's is ACT_MODEL_PER_HIDDEN
GPT_NEOX_SERIAL_MODEL_PER_HIDDEN = -2.15
# A LoRA layer keeps its own float32 copy of its input (the cast to the adapter's dtype, through lora.dropout), so a
# block whose fused layers read the norm's output fewer times than Llama's five (q, k, v, gate, up) keeps fewer:
# Phi-3's qkv_proj and gate_up_proj read it twice. Measured per layer on Phi-3 (hidden 768 and 1,024, intermediate
# 1,536 and 3,072, LoRA on every linear layer): 16 bytes per hidden unit under Llama's count for its three fewer
# readers: 5 per reader, the dropout's float32 output and its boolean mask (counted so, on the safe side). Counted
# as Llama's, a Phi-3 step was 12-15 % over what is live (the estimator's error, not the CPU's: a GPU keeps the
# same float32 copies).
LLAMA_INPUT_READERS = 5
ACT_PER_INPUT_READER = 5.0
# A fused q/k/v projection's one output holds the keys and values that attention reads as views of it, so the whole
# of it stays while they do: 2 bytes per unit of the keys' and values' width more than Llama's count (Phi-3, keys
# and values 256 and 768 wide at hidden 768).
ACT_PER_KV_FUSED = 2.0

# Without checkpointing, the forward's last layer runs with every layer's saved activations live, and its MLP's
# output projection holds its input three ways that nothing keeps (the 4-bit layer saves no input): in the compute
# dtype, cast to the adapter's dtype for LoRA, and the LoRA dropout's output in that dtype; beside them, per
# token, about 4 bytes per hidden unit more than the layer keeps (its input, the residual, the embeddings the
# model's loop still holds, less the final norm's saved input, which comes later). With checkpointing the same
# phase comes in each layer's recomputation, beside the layer's other recomputed activations. Measured (live
# tensors, hidden 768 and 1,024, Llama and GPT-NeoX, 512 to 2,048 tokens): the step's peak is there, in both
# modes, not in a layer's backward: 10 bytes per intermediate unit in flight where the backward has 8 (gated
# MLP) or 6 (two-matrix). Counting only the backward put a checkpointed Llama step 2 % under, GPT-NeoX's 8 %.
FORWARD_PER_HIDDEN = 4.0
# DPO's reference forward runs under no_grad, so a layer holds only what is in flight: four hidden-wide tensors
# in the residual stream's dtype (the embeddings and the layer's input, which the model's loop still holds, the
# residual and the norm's output) and its MLP's intermediates (gate, up and their product; a two-matrix MLP's
# up projection and activation), beside its own padding mask. Measured on Llama (hidden 768 and 1,024) and
# GPT-NeoX (768) at 4 pairs x 256 tokens: exactly these. Counting a layer's saved activations instead put a
# DPO step without checkpointing 27 % over what is live.
NO_GRAD_HIDDEN_TENSORS = 4
NO_GRAD_INTERMEDIATE_TENSORS = 3
NO_GRAD_INTERMEDIATE_TENSORS_TWO_MATRIX = 2

# The backward of a layer's post-attention RMSNorm, once the MLP's has ended: per token per hidden unit, its
# float32 temporaries (the gradient upcast from the residual stream's dtype, its products with the norm's scale
# and with its float32 input, the square's gradient: 4 bytes each) and the layer output's gradient (in the
# residual stream's dtype), beside what the layer saved and has not freed yet (its attention's; its norms'
# float32 inputs). Measured on a tiled step (tests/training/test_estimate.py, 1,024 to 4,096 tokens, hidden 768
# and 1,024): 11 float32 and 7 bf16 (tokens x hidden) tensors live at once, with the attention's queries, keys
# and values, where the layer's MLP phase counted 4 bytes of gradient; without tiling the MLP's phase is larger.
NORM_BACKWARD_F32_TENSORS = 4

# Offloaded layer inputs on the GPU at once: the one being copied out (or brought back) and its neighbour.
OFFLOAD_IN_FLIGHT = 2

# CUDA context, loaded kernels and library workspaces outside PyTorch's allocator: 0.83 GiB measured on an H200
# (torch 2.11, liger on; bench/gpu.sh estimate-1b, docs/performance.md), rounded up.
CONTEXT_BYTES = int(0.85 * GIB)
FRAGMENTATION = 0.08  # the caching allocator's slack over what tensors use

# Two moments a weight. bitsandbytes keeps its 32-bit moments in float32 whatever the weights; torch's AdamW
# (adamw_torch) keeps them in the weights' dtype, lora.dtype: 4 bytes a weight for a bfloat16 adapter.
OPTIMIZER_BYTES_PER_PARAM = {"paged_adamw_32bit": 8, "adamw_torch": 8, "paged_adamw_8bit": 2}
PAGED_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit")
OPTIMIZER_STATE = "optimizer state"
# How much of the pageable state may overflow the GPU by default: all of it. Each optimizer step then
# moves that much over PCIe and back (about 0.5 s for 6 GiB), small beside a step of the large models
# where it matters; an operator who prefers speed to fitting lowers it (QLORA_MAX_PAGED_FRACTION).
MAX_PAGED_FRACTION = 1.0
# The host (CPU) memory parts of a step (Estimate.host_parts).
HOST_OFFLOADED = "offloaded activations (pinned)"
HOST_PAGED = "optimizer state paged out"
HOST_DATASET = "datasets (read and encoded)"
# The host memory a run holds for each token of its datasets, from the start to the end of the run: the rows as
# read (the report prompts from them), as encoded (int32 Arrow columns, worker/training/rows.py) and as the trainer
# prepared them from those (a truncated or packed copy). bench/rows_bench.py, with the tiny tokenizer: 7 bytes a token
# as read and 17-24 as encoded and prepared at ~390-token rows, 20 and 28 at ~50-token rows (a row's own objects
# weigh more there); the larger, rounded up. (As Python lists, before, the encoded rows alone took ~75.)
DATASET_BYTES_PER_TOKEN = 48
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers: a dataset's token_estimate
COMPUTE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}  # auto is bf16 on current GPUs
ADAPTER_BYTES = {"float32": 4, "bfloat16": 2}  # lora.dtype: the adapter's weights and their gradients


def optimizer_bytes_per_param(optimizer: str, lora_dtype: str) -> int:
    if optimizer == "adamw_torch":
        return 2 * ADAPTER_BYTES[lora_dtype]
    return OPTIMIZER_BYTES_PER_PARAM[optimizer]


# What a family's decoder layer holds beyond a Llama layer, by config.json's model_type; a family not
# named here is estimated as a Llama layer (Mistral, Qwen2, Gemma, Granite, OLMo 2's norms and most others are one).
# RMSNorms on the queries and keys (per head, or over the whole width as OLMo 2 has them), which save
# their float32 input; some families say so in their config instead (use_qk_norm, qk_layernorm).
QK_NORM_FAMILIES = frozenset({"qwen3", "gemma3", "gemma3_text", "olmo2", "olmo3", "exaone4", "apertus",
                              "hunyuan_v1_dense"})
ACT_PER_QK_NORMED = 4.0  # per unit of the query and key widths
# Two more RMSNorms per layer, around the attention's and the MLP's outputs ("sandwich" norms).
SANDWICH_NORM_FAMILIES = frozenset({"gemma2", "gemma3", "gemma3_text", "glm4"})
ACT_PER_SANDWICH_HIDDEN = 7.5  # per unit of the hidden size: their float32 inputs
# Families transformers gives no SDPA path (Gemma 2 soft-caps its scores): without flash-attn installed
# they run eager attention, which keeps each layer's (heads x tokens x tokens) scores for backward, the
# softmax's float32 output and its bf16 copy; with flash-attn this over-counts, on the safe side.
EAGER_ATTENTION_FAMILIES = frozenset({"gemma2", "vaultgemma", "granite_swa"})
ACT_PER_SCORE = 7.75  # bytes per score, per layer: what the layer keeps
GRAD_PER_SCORE = 2.0  # and the scores' gradient, in flight as its backward runs
# SDPA (every other family, where flash-attn is not installed, as in the default worker image) gets a
# (rows, 1, row length, row length) boolean mask from transformers (masking_utils.sdpa_mask) wherever a plain
# causal mask would be wrong: a batch with padding (any SFT micro-batch over 1 row, every DPO batch of pairs),
# a packed row (packing true: the micro-batch flattened into one row of micro-batch x seq tokens, examples kept
# apart by a block-diagonal mask), or a sliding window shorter than the row. The model keeps it for the whole
# step (each checkpointed layer's input), and each attention call turns it into an additive mask of the compute
# dtype (torch's SDPA, on the CPU and in CUDA's memory-efficient kernel alike), which the call saves for its
# backward. Measured in tests/training/test_estimate.py (a packed row of 4,096 tokens: 16 MiB kept, 32 MiB a call).
MASK_BYTES_PER_ENTRY = 1  # bool
# The linear layers of one decoder block, as (name, input width, output width) in the block's widths:
# h the hidden size, q the queries' (heads x head_dim), kv the keys' and the values' each, i the MLP's.
LLAMA_LINEARS = (("q_proj", "h", "q"), ("k_proj", "h", "kv"), ("v_proj", "h", "kv"), ("o_proj", "q", "h"),
                 ("gate_proj", "h", "i"), ("up_proj", "h", "i"), ("down_proj", "i", "h"))
_ATTENTION, _TWO_MATRIX_MLP = LLAMA_LINEARS[:4], (("up_proj", "h", "i"), ("down_proj", "i", "h"))
# By config.json's model_type, the families whose blocks name or fuse their linear layers otherwise, as
# the pinned transformers builds them (tests/training/test_estimate.py builds each and compares). They
# matter twice: the 4-bit weights and the adapter are counted per layer, and an explicit
# lora.target_modules must name layers the block has (fused q/k/v or gate/up take LoRA as one layer).
FAMILY_LINEARS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "phi3": (("qkv_proj", "h", "qkv"), ("o_proj", "q", "h"), ("gate_up_proj", "h", "2i"), ("down_proj", "i", "h")),
    "glm": (*_ATTENTION, ("gate_up_proj", "h", "2i"), ("down_proj", "i", "h")),
    "glm4": (*_ATTENTION, ("gate_up_proj", "h", "2i"), ("down_proj", "i", "h")),
    "gpt_neox": (("query_key_value", "h", "qkv"), ("dense", "q", "h"), ("dense_h_to_4h", "h", "i"),
                 ("dense_4h_to_h", "i", "h")),
    "phi": (*_ATTENTION[:3], ("dense", "q", "h"), ("fc1", "h", "i"), ("fc2", "i", "h")),
    "starcoder2": (*_ATTENTION, ("c_fc", "h", "i"), ("c_proj", "i", "h")),
    **{family: (*_ATTENTION, *_TWO_MATRIX_MLP) for family in ("nemotron", "apertus", "arcee", "jais2")},
}
# The dense families whose blocks are Llama's seven layers (the same check keeps this list true). A
# family in neither table is estimated as a Llama block, and its explicit target names are checked
# only when the worker loads the model.
LLAMA_FAMILIES = frozenset({
    "llama", "mistral", "ministral", "ministral3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "vaultgemma", "granite", "granite_swa", "olmo", "olmo2", "olmo3", "cohere", "cohere2", "helium", "smollm3",
    "stablelm", "exaone4", "internlm3", "hunyuan_v1_dense", "seed_oss", "ernie4_5", "diffllama",
})
# A config that names experts: the keys families use for how many a layer routes between.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
MAX_DIMENSION = 2**31  # past any real model: a larger value is a broken or hostile config


def _dimension(config: dict, key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:  # absent, or null as transformers writes an unset head_dim
        value = default
    if value is None:
        raise ValueError(f"the model config has no '{key}'; cannot estimate its memory")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIMENSION:
        raise ValueError(f"the model config's '{key}' must be an integer in [1, {MAX_DIMENSION}], "
                         f"got {excerpt_value(value)}")
    return value


def _sliding_window(config: dict) -> int | None:
    """The attention window of a config whose layers use one (Qwen 2 names one it leaves off: use_sliding_window)."""
    window = config.get("sliding_window")
    usable = isinstance(window, int) and not isinstance(window, bool) and window > 0
    return window if usable and config.get("use_sliding_window", True) is not False else None


def _mixes_full_layers(config: dict) -> bool:
    """Sliding-window layers beside full-attention ones (Gemma 3's five to one): transformers builds both masks."""
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        return "full_attention" in layer_types
    return isinstance(config.get("sliding_window_pattern"), int) or config.get("model_type") in SANDWICH_NORM_FAMILIES


def excerpt_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool = False
    sandwich_norms: bool = False
    eager_attention: bool = False
    family: str = "llama"  # config.json's model_type: which linear layers a block has (FAMILY_LINEARS)
    activation: str = "silu"  # config.json's hidden_act: what a two-matrix MLP keeps (two_matrix_mlp)
    sliding_window: int | None = None  # config.json's, where its layers use it (Mistral 7B v0.1, Gemma 3)
    attention_masks: int = 1  # masks a step builds where one is needed: 2 where sliding and full layers mix
    parallel_residual: bool = True  # use_parallel_residual (GPT-NeoX, StableLM): attention and MLP read one input

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a transformers config.json of a dense decoder-only model (Llama, Mistral, Qwen, Gemma and
        the other families whose layers are attention and a gated MLP). ValueError, saying why, for a
        config that lacks a dimension or holds a broken one, and for a mixture-of-experts model."""
        if not isinstance(config.get("model_type", ""), str):  # a list was a TypeError below: a 500 at registration
            raise ValueError(f"the model config's 'model_type' must be a string, got "
                             f"{excerpt_value(config['model_type'])}")
        hidden = _dimension(config, "hidden_size")
        heads = _dimension(config, "num_attention_heads")
        kv_heads = _dimension(config, "num_key_value_heads", heads)
        if heads % kv_heads:
            # Grouped-query attention shares each key/value head among a whole number of query heads; transformers
            # builds such a model and fails only at its first forward pass, on the worker after the job's wait.
            raise ValueError(f"the model config's 'num_attention_heads' ({heads}) must be a multiple of its "
                             f"'num_key_value_heads' ({kv_heads})")
        shape = cls(
            layers=_dimension(config, "num_hidden_layers"), hidden=hidden,
            intermediate=_dimension(config, "intermediate_size"), heads=heads,
            kv_heads=kv_heads,
            head_dim=_dimension(config, "head_dim", max(hidden // heads, 1)), vocab=_dimension(config, "vocab_size"),
            tied=bool(config.get("tie_word_embeddings", False)),
            qk_norm=config.get("model_type") in QK_NORM_FAMILIES or bool(config.get("use_qk_norm"))
            or bool(config.get("qk_layernorm")),
            sandwich_norms=config.get("model_type") in SANDWICH_NORM_FAMILIES,
            eager_attention=config.get("model_type") in EAGER_ATTENTION_FAMILIES,
            family=config["model_type"] if isinstance(config.get("model_type"), str) else "llama",
            activation=config["hidden_act"] if isinstance(config.get("hidden_act"), str) else "silu",
            sliding_window=_sliding_window(config),
            attention_masks=2 if _sliding_window(config) and _mixes_full_layers(config) else 1,
            # transformers' defaults: GPT-NeoX's blocks are parallel, StableLM's serial
            parallel_residual=(config["use_parallel_residual"] if isinstance(config.get("use_parallel_residual"), bool)
                               else config.get("model_type") == "gpt_neox"),
        )
        experts = next((config[key] for key in EXPERT_KEYS if isinstance(config.get(key), int)), 0)
        if experts > 1:
            # transformers 5 keeps each layer's experts as 3-D parameters, not linear layers, and
            # bitsandbytes quantizes linear layers only: the experts, nearly all of such a model,
            # would load in 16 bits, and the estimate (and the QLoRA saving) would be far off.
            width = config.get("moe_intermediate_size") or shape.intermediate
            in_16_bits = shape.layers * experts * 3 * shape.hidden * (width if isinstance(width, int) else 0) * 2
            raise ValueError(f"this is a mixture-of-experts model ({experts} experts per layer): bitsandbytes "
                             f"quantizes only linear layers, and transformers keeps experts as 3-D weights, so its "
                             f"experts would load in 16 bits (about {gib(in_16_bits)}), not 4. Only dense models "
                             "are supported")
        if config.get("kv_lora_rank"):
            raise ValueError("this model's attention compresses keys and values through a low-rank projection "
                             "(kv_lora_rank, as DeepSeek's): the estimate knows only multi-head and grouped-query "
                             "attention")
        return shape

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block, by its name in the block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        width = {"h": self.hidden, "q": q, "kv": kv, "qkv": q + 2 * kv, "i": self.intermediate,
                 "2i": 2 * self.intermediate}
        return {name: (width[i], width[o]) for name, i, o in FAMILY_LINEARS.get(self.family, LLAMA_LINEARS)}

    def check_targets(self, targets: str | list[str]) -> None:
        """ValueError naming what an explicit lora.target_modules list names that this family's blocks do
        not have, and what they have; nothing to check for "all-linear", or a family the tables do not know."""
        if targets == "all-linear" or (self.family not in FAMILY_LINEARS and self.family not in LLAMA_FAMILIES):
            return
        layers = self.linear_shapes()
        missing = [excerpt_value(name) for name in dict.fromkeys(targets) if name not in layers]
        if missing:
            named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"no linear layer named {named} in a {self.family} model's blocks; "
                             f"they have: {', '.join(layers)}")

    def sliding_window_below(self, row_length: int) -> bool:
        """Whether a window shorter than the row makes attention need a mask even with no padding."""
        return self.sliding_window is not None and self.sliding_window < row_length

    @property
    def two_matrix_mlp(self) -> bool:
        """The block's MLP has no gate (one layer into the intermediate width, FAMILY_LINEARS) and its
        activation is one kernel: it keeps and backpropagates what ACT_PER_INTERMEDIATE_TWO_MATRIX counts."""
        into_intermediate = sum({"i": 1, "2i": 2}.get(o, 0)
                                for _, _, o in FAMILY_LINEARS.get(self.family, LLAMA_LINEARS))
        return into_intermediate == 1 and self.activation in ONE_KERNEL_ACTIVATIONS

    @property
    def mlp_counted_as_its_own(self) -> bool:
        """The count of the block's MLP is one measured for it: gated, two-matrix with a one-kernel activation (two_matrix_mlp),
        or Phi-2's gelu_new after LayerNorms. A gateless MLP with another activation (Apertus' xielu) is counted as gated,
        a stand-in whose surplus covers what its activation keeps: its one fewer reader is not taken off that (taken
        off, an Apertus layer read 0.98 of what it keeps, its step without checkpointing 0.96 of what is live)."""
        names = {name for name, _, _ in FAMILY_LINEARS.get(self.family, LLAMA_LINEARS)}
        return (self.two_matrix_mlp or bool(names & {"gate_proj", "gate_up_proj"})
                or (self.family in LAYER_NORM_FAMILIES and self.activation == "gelu_new"))

    @property
    def input_readers(self) -> int:
        """How many of the block's linear layers read a hidden-wide input (the norms' outputs; Llama's five)."""
        return sum(i == "h" for _, i, _ in FAMILY_LINEARS.get(self.family, LLAMA_LINEARS))

    @property
    def fused_qkv(self) -> bool:
        return any(o == "qkv" for _, _, o in FAMILY_LINEARS.get(self.family, LLAMA_LINEARS))

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, the output head (unless tied) and the norms: never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


@dataclass
class Estimate:
    parts: dict[str, int]
    micro_batch: int
    seq_len: int
    checkpointing: bool
    pageable: frozenset[str] = frozenset()  # the parts that may page to CPU memory (a paged optimizer's state)
    host_bytes: int = 0  # pinned CPU memory: the offloaded activations (training.activation_offload)
    offload: bool = False
    tiled: bool = False
    total: int = field(init=False)

    def __post_init__(self):
        self.total = sum(self.parts.values())

    @property
    def pageable_bytes(self) -> int:
        return sum(size for name, size in self.parts.items() if name in self.pageable)

    @property
    def resident(self) -> int:
        """What must stay on the GPU: the peak with every pageable byte paged out."""
        return self.total - self.pageable_bytes

    def paged_bytes(self, budget_bytes: int) -> int:
        """How much of the pageable state a GPU of this budget leaves in CPU memory (0: all of it fits)."""
        return max(self.total - budget_bytes, 0)

    def host_parts(self, budget_bytes: int | None) -> dict[str, int]:
        """The CPU (host) memory one step holds beyond the training process's own, by part, on a GPU of this
        budget: the offloaded activations (pinned: the kernel cannot swap them out) and the paged optimizer
        state that overflows the GPU (paged_bytes). None (no GPU known): only what does not depend on it."""
        parts = {HOST_OFFLOADED: self.host_bytes} if self.host_bytes else {}
        # No more than the pageable state can page out (none of adamw_torch's): past it, the overflow is
        # resident memory the GPU lacks (fits() refuses that), not host memory.
        paged = min(self.paged_bytes(budget_bytes), self.pageable_bytes) if budget_bytes else 0
        return parts | ({HOST_PAGED: paged} if paged else {})

    def host_need(self, budget_bytes: int | None) -> int:
        return sum(self.host_parts(budget_bytes).values())

    def fits(self, budget_bytes: int, max_paged_fraction: float = MAX_PAGED_FRACTION,
             host_budget_bytes: int | None = None) -> bool:
        """The resident peak fits the budget, and what overflows it is pageable, at most
        max_paged_fraction of the pageable state; and, where the host memory a job may hold is known
        (`host_budget_bytes`, QLORA_HOST_MEMORY), what it holds there (host_need) fits that."""
        return (self.resident <= budget_bytes
                and self.paged_bytes(budget_bytes) <= max_paged_fraction * self.pageable_bytes
                and (host_budget_bytes is None or self.host_need(budget_bytes) <= host_budget_bytes))

    def describe(self) -> str:
        width = max(map(len, self.parts))
        lines = [f"  {name:<{width}}  {gib(size):>9}{'  (pageable)' if name in self.pageable else ''}"
                 for name, size in self.parts.items()]
        host = [f"  {'offloaded activations (CPU)':<{width}}  {gib(self.host_bytes):>9}"] if self.host_bytes else []
        return "\n".join([*lines, f"  {'total':<{width}}  {gib(self.total):>9}",
                          f"  {'resident (pageable paged out)':<{width}}  {gib(self.resident):>9}", *host])


def memory_savers_note(estimate: Estimate) -> str:
    """"", or which of activation offload and tiled MLPs the estimate counts, for a sentence about it."""
    savers = [f"activations offloaded to {gib(estimate.host_bytes)} of pinned CPU memory"] if estimate.offload else []
    savers += ["tiled MLPs"] if estimate.tiled else []
    return f", {' and '.join(savers)}" if savers else ""


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def dataset_host_parts(tokens: int) -> dict[str, int]:
    """The host memory a run's datasets hold for the whole run, as a host part (Estimate.host_parts' beside it), for
    their tokens (train and validation): none for none."""
    return {HOST_DATASET: DATASET_BYTES_PER_TOKEN * tokens} if tokens > 0 else {}


def token_estimate(chars: int) -> int:
    """A dataset's tokens as the service estimates them on upload, from its characters (Example.chars): what its
    host memory is counted by (dataset_host_parts), wherever it is counted."""
    return chars // CHARS_PER_TOKEN


def steps_host_budget(host_bytes: int | None, dataset_tokens: int) -> int | None:
    """The host memory a run's steps may hold (offloaded activations, a paged optimizer's overflow: the
    `host_budget_bytes` of the functions below), out of `host_bytes` a run may hold in all (QLORA_HOST_MEMORY at
    admission and in `qlora estimate`, MemAvailable on a worker): what its datasets hold for the whole run
    (dataset_host_parts of their tokens, train and validation) is not there for them. Negative where the datasets
    alone do not fit; None where `host_bytes` is not known. Admission, the training process's "auto" and
    `qlora estimate` all count it so."""
    if host_bytes is None:
        return None
    return host_bytes - sum(dataset_host_parts(dataset_tokens).values())


def describe_host_memory(parts: dict[str, int]) -> str:
    """The host memory of Estimate.host_parts in words, as admission, its refusal and the training process say
    it: "8.00 GiB of host memory (offloaded activations (pinned) 8.00 GiB)"."""
    return (f"{gib(sum(parts.values()))} of host memory ("
            + ", ".join(f"{part} {gib(size)}" for part, size in parts.items()) + ")")


def quantized_weight_bytes(spec: JobSpec, shape: ModelShape) -> int:
    q, n = spec.quantization, shape.linear_params
    if q.bits == 4:
        blocks = n // NF4_BLOCK
        constants = blocks + 4 * (blocks // NESTED_BLOCK) if q.double_quant else 4 * blocks
        return n // 2 + constants
    if q.bits == 8:
        rows = shape.layers * sum(o for _, o in shape.linear_shapes().values())
        return n + 4 * rows  # int8 weights and a float32 scale per output row
    return n * COMPUTE_BYTES[q.compute_dtype]


def lora_params(spec: JobSpec, shape: ModelShape) -> int:
    shape.check_targets(spec.lora.target_modules)
    targets = shape.linear_shapes()
    names = targets if spec.lora.target_modules == "all-linear" else {
        k: v for k, v in targets.items() if k in spec.lora.target_modules}
    return shape.layers * sum(spec.lora.r * (i + o) for i, o in names.values())


def mlp_tile_tokens(hidden: int) -> int:
    """Tokens per chunk of a tiled MLP (training.tiled_mlp): as many as the hidden size, as Arctic Long
    Sequence Training does, so a chunk's intermediates weigh about what one token row of the
    (tokens x hidden) layer input does across the sequence, and matmuls stay large enough to be fast."""
    return hidden


# trl's chunked LM head (trl/kernels/chunked_logprob.py in the pinned trl 1.16): logits are computed
# in tiles of at most LOSS_TOKEN_TILE tokens x LOSS_VOCAB_TILE vocabulary entries, forward and again
# in backward.
LOSS_TOKEN_TILE = 4096
LOSS_VOCAB_TILE = 32768


def loss_head_bytes(shape: ModelShape, tokens: int, compute: int, frozen: int) -> int:
    """Peak of the loss head, which both the standard recipe and this engine run (SFTTrainer adds
    it to every model). Held at once in its backward: the hidden states of the labelled tokens it
    saved (in the residual stream's dtype, `frozen` bytes), their float32 gradient and its cast back
    to that dtype, the gradient scattered back to every position, the logits tile buffer (always
    LOSS_VOCAB_TILE wide, whatever the vocabulary), and the head's rows for a tile cast to the
    compute dtype when the head is kept in another one."""
    cast_back = frozen if frozen != 4 else 0
    hidden_states = tokens * shape.hidden * (frozen + 4 + cast_back + frozen)
    tile = min(tokens, LOSS_TOKEN_TILE) * LOSS_VOCAB_TILE * compute
    head_rows = min(shape.vocab, LOSS_VOCAB_TILE) * shape.hidden * compute if frozen != compute else 0
    return hidden_states + tile + head_rows + tokens * 8 * 4  # and a few float32 statistics per token


def keeps_reference_adapter(spec: JobSpec, starts_from_adapter: bool) -> bool:
    """Whether the job holds a frozen copy of its starting adapter as DPO's reference (estimate_peak_memory's
    `reference_adapter`): a DPO job continued from a saved adapter does; one from the base does not."""
    return spec.method.type == "dpo" and starts_from_adapter


def estimate_peak_memory(spec: JobSpec, model_config: dict, micro_batch: int | None = None,
                         seq_len: int | None = None, reference_adapter: bool = False) -> Estimate:
    """The peak device memory of one training step of `spec` on the model `model_config` describes.
    activation_offload and tiled_mlp "auto" count as off: `fit_memory_savers` decides them for a GPU.
    `reference_adapter`: a DPO job continued from a saved adapter, whose frozen copy is the reference."""
    shape = ModelShape.from_config(model_config)
    t = spec.training
    offload = t.activation_offload is True and t.gradient_checkpointing
    tiled = t.tiled_mlp is True
    batch = micro_batch or (t.per_device_batch_size if isinstance(t.per_device_batch_size, int) else 1)
    # max_seq_length as the recipe cuts rows, even past the model's max_position_embeddings: nothing cuts them
    # there (rotary positions go on), so a step carries max_seq_length tokens a row whatever the config says.
    seq = seq_len or t.max_seq_length
    dpo = spec.method.type == "dpo"
    tokens = batch * seq * (2 if dpo else 1)  # DPO: the preferred and the other sequence of each pair
    # The rows attention sees: a packed micro-batch is one row of all its tokens (trl's padding-free collator).
    packed = t.packing is True and not dpo
    rows, row_length = (1, tokens) if packed else (tokens // seq, seq)
    compute = COMPUTE_BYTES[spec.quantization.compute_dtype]
    compute_name = "bfloat16" if spec.quantization.compute_dtype == "auto" else spec.quantization.compute_dtype
    # The dtype of the embeddings, head and norms, and so of the residual stream they feed.
    frozen = 4 if spec.quantization.float32_frozen_weights(compute_name) else compute
    adapter = lora_params(spec, shape)

    f32_residual = frozen == 4 and compute < 4
    if shape.two_matrix_mlp and f32_residual:
        per_intermediate = ACT_PER_INTERMEDIATE_TWO_MATRIX_F32_RESIDUAL
    elif shape.two_matrix_mlp:
        per_intermediate = (ACT_PER_INTERMEDIATE_TWO_MATRIX_LAYER_NORM if shape.family in LAYER_NORM_FAMILIES
                            else ACT_PER_INTERMEDIATE_TWO_MATRIX)
    else:  # a float32 residual stream, or a float32 LayerNorm's output on a GPU, makes the MLP's intermediates float32
        per_intermediate = (ACT_PER_INTERMEDIATE_F32_RESIDUAL if f32_residual or shape.family in LAYER_NORM_FAMILIES
                            else ACT_PER_INTERMEDIATE)
        if shape.family in LAYER_NORM_FAMILIES and shape.activation == "gelu_new":
            per_intermediate = max(per_intermediate, ACT_PER_INTERMEDIATE_GELU_NEW_LAYER_NORM)
    # The MLP's intermediate-wide gradients in flight, bytes per token: gate's and up's (float32; a LayerNorm family's
    # three, GRAD_F32_INTERMEDIATES_LAYER_NORM), or a two-matrix MLP's up projection's and its activation's (bf16),
    # fitted as ACT_PER_INTERMEDIATE_TWO_MATRIX.
    if shape.two_matrix_mlp:
        intermediate_grads = GRAD_PER_INTERMEDIATE_TWO_MATRIX * shape.intermediate
    else:
        gated = shape.linear_shapes().keys() & {"gate_proj", "gate_up_proj"}  # Phi-2's gelu_new MLP has no product
        f32_grads = GRAD_F32_INTERMEDIATES_LAYER_NORM if shape.family in LAYER_NORM_FAMILIES and gated else 2
        intermediate_grads = 4 * f32_grads * shape.intermediate
    scale = compute / 2  # the coefficients are for bf16 compute
    # Per token, what the MLP alone saves (its intermediates, and its input and the adapter's copies of it)...
    mlp_per_hidden = ACT_MLP_PER_HIDDEN_TWO_MATRIX if shape.two_matrix_mlp else ACT_MLP_PER_HIDDEN
    mlp = scale * (per_intermediate * shape.intermediate + mlp_per_hidden * shape.hidden)
    query, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = scale * (ACT_PER_HIDDEN * shape.hidden + ACT_PER_QUERY * query + per_intermediate * shape.intermediate
                         + ACT_PER_KV * kv + (ACT_PER_QK_NORMED * (query + kv) if shape.qk_norm else 0)
                         + (ACT_PER_SANDWICH_HIDDEN * shape.hidden if shape.sandwich_norms else 0))
    if shape.two_matrix_mlp:  # ACT_PER_HIDDEN holds a gated MLP's copies of its input
        per_layer -= scale * (ACT_MLP_PER_HIDDEN - ACT_MLP_PER_HIDDEN_TWO_MATRIX) * shape.hidden
    elif shape.mlp_counted_as_its_own:  # and five LoRA copies of the norm's output, where fused layers keep fewer
        per_layer -= scale * ACT_PER_INPUT_READER * (LLAMA_INPUT_READERS - shape.input_readers) * shape.hidden
        per_layer += scale * (ACT_PER_KV_FUSED * kv if shape.fused_qkv else 0)
    if shape.family in AUTOCAST_DTYPE_NORM_FAMILIES:
        per_layer += scale * AUTOCAST_DTYPE_NORMS_PER_HIDDEN * shape.hidden
    if shape.family == "stablelm" and shape.parallel_residual:
        per_layer += scale * LAYER_NORM_PARALLEL_PER_HIDDEN * shape.hidden
    model_per_hidden = ACT_MODEL_PER_HIDDEN
    if shape.family == "gpt_neox" and shape.two_matrix_mlp and not f32_residual:  # its fused q/k/v, float32 LayerNorms
        per_layer = scale * ((GPT_NEOX_PER_HIDDEN if shape.parallel_residual else GPT_NEOX_SERIAL_PER_HIDDEN) * shape.hidden
                             + per_intermediate * shape.intermediate)
        model_per_hidden = GPT_NEOX_MODEL_PER_HIDDEN if shape.parallel_residual else GPT_NEOX_SERIAL_MODEL_PER_HIDDEN
    grads: float = 4 * shape.hidden + intermediate_grads  # gradients in flight: the hidden state's (float32), the MLP's
    mask = mask_per_call = 0
    if shape.eager_attention:  # each token's scores against the tokens of its row, per head
        per_layer += ACT_PER_SCORE * shape.heads * row_length
        grads += GRAD_PER_SCORE * shape.heads * row_length
    elif packed or rows > 1 or shape.sliding_window_below(row_length):
        entries = rows * row_length * row_length
        mask = shape.attention_masks * entries * MASK_BYTES_PER_ENTRY
        mask_per_call = entries * compute  # one layer's, of the one mask its kind of layer uses
    tile = 0
    if tiled:
        # ...which a tiled MLP replaces by its input alone; one chunk's intermediates and gradients
        # live only while that chunk backpropagates.
        tile = min(tokens, mlp_tile_tokens(shape.hidden))
        per_layer = per_layer - mlp + compute * shape.hidden
        grads = 4 * shape.hidden
    chunk = tile * (mlp + intermediate_grads)
    # A layer's backward has two phases whose larger is its peak: the MLP's (its intermediates, or one chunk's,
    # and their gradients in flight: `grads`, `chunk`), then its norms' and attention's, with the MLP's gone
    # and the norm's float32 temporaries in flight (NORM_BACKWARD_F32_TENSORS). A tiled MLP makes the second
    # the larger past ~1,000 tokens: counting only the first put a 4,096-token step 13 % under what is live.
    norm_grads = 4 * NORM_BACKWARD_F32_TENSORS * shape.hidden + frozen * shape.hidden
    host = 0
    if t.gradient_checkpointing:
        # Kept through the step: each layer's input, and the final norm's. Offloaded, the layers'
        # inputs live in pinned CPU memory; the GPU holds the ones in transit.
        inputs = tokens * shape.hidden * frozen
        if offload:
            host = shape.layers * inputs
            inputs_on_gpu = min(OFFLOAD_IN_FLIGHT, shape.layers) * inputs
        else:
            inputs_on_gpu = shape.layers * inputs
        kept = inputs_on_gpu + tokens * shape.hidden * ACT_MODEL_CHECKPOINTED_PER_HIDDEN + mask
        recomputed = tokens * per_layer + mask_per_call  # one layer at a time, during its backward
    else:
        kept = tokens * (shape.layers * per_layer + model_per_hidden * shape.hidden) + mask
        kept += shape.layers * mask_per_call  # each layer's additive mask, saved by its attention
        recomputed = 0
    # Backward runs the loss head first (its hidden states, gradients and logits tile), then each
    # layer, last to first, with the gradients in flight (float32, per token: the hidden state's and
    # the MLP's gate and up activations') and, with checkpointing, its recomputed activations. The
    # two never overlap; the larger is the step's peak beyond what is kept.
    layer_backward = max(recomputed + chunk + tokens * grads, recomputed + tokens * norm_grads)
    if not tiled:
        # A layer's forward at its MLP's output projection (FORWARD_PER_HIDDEN): without checkpointing the last
        # layer's, with every layer's activations kept; with it, each layer's recomputation in backward. The
        # adapter's gradients counted beside it are there from a step's second micro-batch on (accumulation).
        transient = (compute + 2 * ADAPTER_BYTES[spec.lora.dtype]) * shape.intermediate
        layer_backward = max(layer_backward, recomputed + tokens * (transient + FORWARD_PER_HIDDEN * frozen / 2 * shape.hidden))
    backward = max(loss_head_bytes(shape, tokens, compute, frozen), layer_backward)
    if dpo:
        # The reference's no-grad forward, after the policy's, whose activations are kept: what one layer has in
        # flight (NO_GRAD_HIDDEN_TENSORS), its padding mask, its attention's additive one, then the loss head's
        # tile; counted together, though the tile comes after the layers, on the safe side.
        intermediates = NO_GRAD_INTERMEDIATE_TENSORS_TWO_MATRIX if shape.two_matrix_mlp else NO_GRAD_INTERMEDIATE_TENSORS
        in_flight = NO_GRAD_HIDDEN_TENSORS * frozen * shape.hidden
        reference: float
        if tiled:  # one chunk's intermediates, and the chunks' outputs with their concatenation
            reference = tokens * (in_flight + 2 * compute * shape.hidden) + tile * intermediates * compute * shape.intermediate
        else:
            reference = tokens * (in_flight + intermediates * compute * shape.intermediate)
        if shape.eager_attention:  # its scores, their softmax and its copy (not measured: a layer's kept and in flight)
            reference += tokens * (ACT_PER_SCORE + GRAD_PER_SCORE) * shape.heads * row_length
        reference += mask // shape.attention_masks + mask_per_call
        backward = max(backward, reference + min(tokens, LOSS_TOKEN_TILE) * LOSS_VOCAB_TILE * compute)
    parts = {
        "base weights (quantized)": quantized_weight_bytes(spec, shape),
        "base weights (embeddings, head, norms)": shape.other_params * frozen,
        "LoRA adapter": adapter * ADAPTER_BYTES[spec.lora.dtype],
        "LoRA gradients": adapter * ADAPTER_BYTES[spec.lora.dtype],
        OPTIMIZER_STATE: adapter * optimizer_bytes_per_param(t.optimizer, spec.lora.dtype),
        "activations (kept for backward)": int(kept),
        "backward peak (loss head, or one layer)": int(backward),
    }
    if dpo and reference_adapter:
        parts["DPO reference adapter (frozen copy)"] = adapter * ADAPTER_BYTES[spec.lora.dtype]  # the policy's start
    pageable = frozenset({OPTIMIZER_STATE} if t.optimizer in PAGED_OPTIMIZERS else ())
    allocated = sum(size for name, size in parts.items() if name not in pageable)  # through PyTorch's allocator
    parts["allowance (context, fragmentation)"] = CONTEXT_BYTES + int(FRAGMENTATION * allocated)
    return Estimate(parts, batch, seq, t.gradient_checkpointing, pageable, host_bytes=int(host),
                    offload=offload, tiled=tiled)


def largest_micro_batch(spec: JobSpec, model_config: dict, budget_bytes: int, limit: int = 256,
                        max_paged_fraction: float = MAX_PAGED_FRACTION, reference_adapter: bool = False,
                        host_budget_bytes: int | None = None) -> int | None:
    """The largest micro-batch (a power of two up to `limit`) that fits the budget; None if not even 1.
    `reference_adapter`, here and in the functions below: as estimate_peak_memory's; `host_budget_bytes`:
    the host memory a job may hold (Estimate.fits; None: not known, not checked)."""
    best = None
    batch = 1
    while batch <= limit and estimate_peak_memory(spec, model_config, micro_batch=batch,
                                                  reference_adapter=reference_adapter).fits(budget_bytes,
                                                                                            max_paged_fraction,
                                                                                            host_budget_bytes):
        best, batch = batch, batch * 2
    return best


def with_micro_batch(spec: JobSpec, micro_batch: int) -> JobSpec:
    return with_training(spec, per_device_batch_size=micro_batch)


def fit_micro_batch(spec: JobSpec, model_config: dict, budget_bytes: int,
                    max_paged_fraction: float = MAX_PAGED_FRACTION, reference_adapter: bool = False,
                    host_budget_bytes: int | None = None) -> JobSpec | None:
    """`spec` sized for a budget (a GPU's memory): per_device_batch_size "auto" becomes the largest
    micro-batch that fits, and None says that not even a micro-batch of 1 does. A spec with a fixed
    micro-batch comes back as it is; whether that one fits is the caller's question (the estimate says)."""
    if spec.training.per_device_batch_size != "auto":
        return spec
    fitting = largest_micro_batch(spec, model_config, budget_bytes, max_paged_fraction=max_paged_fraction,
                                  reference_adapter=reference_adapter, host_budget_bytes=host_budget_bytes)
    return with_micro_batch(spec, fitting) if fitting is not None else None


def with_training(spec: JobSpec, **fields) -> JobSpec:
    return spec.model_copy(update={"training": spec.training.model_copy(update=fields)})


# (activation_offload, tiled_mlp), the cheaper first: offloading costs copies that overlap compute,
# tiling one more MLP forward per layer per step.
MEMORY_SAVERS = ((False, False), (True, False), (False, True), (True, True))


def fit_memory_savers(spec: JobSpec, model_config: dict, budget_bytes: int | None,
                      max_paged_fraction: float = MAX_PAGED_FRACTION, reference_adapter: bool = False,
                      host_budget_bytes: int | None = None) -> JobSpec:
    """training.activation_offload and tiled_mlp "auto" decided for a budget (a GPU's memory): on only
    where the job would not fit without them, the cheapest choice that fits (at the spec's micro-batch,
    or 1 for "auto"); everything allowed on where nothing fits, so a refusal counts all they save.
    Without a budget (the CPU, where RAM rather than device memory bounds it) "auto" is off. Where the host
    memory a job may hold is known (`host_budget_bytes`), a choice fits only if its pinned activations and
    paged overflow fit that too: "auto" never chooses offload that the host cannot hold. A negative one (the
    datasets alone take more than the host memory: steps_host_budget) is decided as none to spare: no choice fits
    a negative budget, and "everything on where nothing fits" turned offload on for a job whose GPU holds it without,
    counting pinned activations it would never hold in admission's refusal and `qlora estimate`'s host total."""
    t = spec.training
    if t.activation_offload != "auto" and t.tiled_mlp != "auto":
        return spec
    if host_budget_bytes is not None:
        host_budget_bytes = max(host_budget_bytes, 0)
    allowed = [(offload, tiled) for offload, tiled in MEMORY_SAVERS
               if t.activation_offload in ("auto", offload) and t.tiled_mlp in ("auto", tiled)
               and (t.gradient_checkpointing or not offload)]  # offload moves what checkpointing keeps
    if budget_bytes:
        probe = spec if isinstance(t.per_device_batch_size, int) else with_micro_batch(spec, 1)
        for offload, tiled in allowed:
            if estimate_peak_memory(with_training(probe, activation_offload=offload, tiled_mlp=tiled), model_config,
                                    reference_adapter=reference_adapter).fits(budget_bytes, max_paged_fraction,
                                                                              host_budget_bytes):
                return with_training(spec, activation_offload=offload, tiled_mlp=tiled)
    offload, tiled = allowed[-1] if budget_bytes else allowed[0]
    return with_training(spec, activation_offload=offload, tiled_mlp=tiled)


def fit_to_gpu(spec: JobSpec, model_config: dict, budget_bytes: int,
               max_paged_fraction: float = MAX_PAGED_FRACTION, reference_adapter: bool = False,
               host_budget_bytes: int | None = None) -> JobSpec | None:
    """`spec` as it will run on a GPU of this memory: the memory savers' "auto" decided
    (fit_memory_savers), then the micro-batch's (fit_micro_batch); None where not even 1 fits."""
    savers = fit_memory_savers(spec, model_config, budget_bytes, max_paged_fraction, reference_adapter,
                               host_budget_bytes)
    return fit_micro_batch(savers, model_config, budget_bytes, max_paged_fraction, reference_adapter,
                           host_budget_bytes)


def fit_to_device(spec: JobSpec, model_config: dict, budget_bytes: int | None,
                  max_paged_fraction: float = MAX_PAGED_FRACTION, reference_adapter: bool = False,
                  host_budget_bytes: int | None = None) -> JobSpec:
    """What the training process decides for its own device where the spec says "auto": the memory savers
    (fit_memory_savers), then the micro-batch (resolve_auto_micro_batch), by admission's rule for a GPU class
    (fit_to_gpu) and under the operator's max_paged_fraction (QLORA_MAX_PAGED_FRACTION), as admission and
    `qlora estimate` decide. Without GPU classes nothing was decided at admission: this is the only decision.
    `host_budget_bytes`: the host memory the run's steps may hold (steps_host_budget of the host's available
    memory), as QLORA_HOST_MEMORY is to admission: "auto" does not offload, nor size a micro-batch, past it.
    Where it is negative (the datasets alone take more than the host has available now) no choice fits it,
    and "everything on where nothing fits" would pin more on a host already short: "auto" is decided as for a
    host with nothing to spare for a step. The run's host check says what the datasets need."""
    if host_budget_bytes is not None:
        host_budget_bytes = max(host_budget_bytes, 0)
    savers = fit_memory_savers(spec, model_config, budget_bytes, max_paged_fraction, reference_adapter,
                               host_budget_bytes)
    return resolve_auto_micro_batch(savers, model_config, budget_bytes, max_paged_fraction, reference_adapter,
                                    host_budget_bytes)


def resolve_auto_micro_batch(spec: JobSpec, model_config: dict, budget_bytes: int | None,
                             max_paged_fraction: float = MAX_PAGED_FRACTION, reference_adapter: bool = False,
                             host_budget_bytes: int | None = None) -> JobSpec:
    """per_device_batch_size "auto" → the largest micro-batch that fits the budget (a GPU's memory);
    ValueError, saying what one needs and what there is, when not even 1 fits. Without a budget (the
    CPU, where RAM rather than device memory bounds it) "auto" means the default, 4."""
    if spec.training.per_device_batch_size != "auto":
        return spec
    if not budget_bytes:
        return with_micro_batch(spec, 4)
    sized = fit_micro_batch(spec, model_config, budget_bytes, max_paged_fraction, reference_adapter, host_budget_bytes)
    if sized is None:
        one = estimate_peak_memory(spec, model_config, micro_batch=1, reference_adapter=reference_adapter)
        if one.fits(budget_bytes, max_paged_fraction) and host_budget_bytes is not None:
            raise ValueError(f"training.per_device_batch_size: \"auto\" found no micro-batch that fits: even 1 holds "
                             f"{gib(one.host_need(budget_bytes))} of host memory and the host has {gib(host_budget_bytes)} "
                             "available")
        need = one.resident
        raise ValueError(f"training.per_device_batch_size: \"auto\" found no micro-batch that fits: even 1 needs "
                         f"{gib(need)} resident and the device has {gib(budget_bytes)}")
    return sized


def advice(spec: JobSpec, model_config: dict, budget_bytes: int,
           max_paged_fraction: float = MAX_PAGED_FRACTION, reference_adapter: bool = False,
           host_budget_bytes: int | None = None) -> list[str]:
    """What would make the job fit a budget (and the host memory, where known), each checked against the estimate."""
    t = spec.training

    def fits(candidate: JobSpec, **shape) -> bool:
        return estimate_peak_memory(candidate, model_config, reference_adapter=reference_adapter,
                                    **shape).fits(budget_bytes, max_paged_fraction, host_budget_bytes)

    batch = t.per_device_batch_size if isinstance(t.per_device_batch_size, int) else 1
    ideas = []
    fitting = largest_micro_batch(spec, model_config, budget_bytes, limit=max(batch - 1, 1),
                                  max_paged_fraction=max_paged_fraction, reference_adapter=reference_adapter,
                                  host_budget_bytes=host_budget_bytes)
    if fitting and fitting < batch:
        ideas.append(f"per_device_batch_size {fitting} with gradient_accumulation_steps "
                     f"{t.gradient_accumulation_steps * batch // fitting} (the same effective batch)")
    for seq in (t.max_seq_length // 2, t.max_seq_length // 4):
        if seq >= 8 and fits(spec, micro_batch=batch, seq_len=seq):
            ideas.append(f"max_seq_length {seq}")
            break
    if not t.gradient_checkpointing:
        on = with_training(spec, gradient_checkpointing=True)
        if fits(on):
            ideas.append("gradient_checkpointing true")
    for offload, tiled in MEMORY_SAVERS[1:]:
        on = with_training(spec, activation_offload=offload or t.activation_offload is True,
                           tiled_mlp=tiled or t.tiled_mlp is True)
        if on.training != t and (t.gradient_checkpointing or not offload) and fits(on):
            ideas.append(" and ".join(f"{name} true" for name, wanted in
                                      (("activation_offload", offload), ("tiled_mlp", tiled)) if wanted))
            break
    return ideas
