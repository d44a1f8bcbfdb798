"""How much device memory a job will need, before it gets near a GPU. No torch: the API uses it.

The peak of a QLoRA step is the sum of:
- the frozen base: linear layers in 4 bits plus their quantization constants; the rest (embeddings,
  output head, norms) in float32, because peft's prepare_model_for_kbit_training upcasts them;
- the LoRA adapter in float32, its gradients, and the optimizer's two moments;
- what the forward pass saves for backward (per layer, per token), or with gradient checkpointing
  only each layer's input plus one layer recomputed at a time;
- the logits, which dominate for large vocabularies: bf16 logits, their float32 copy for the loss,
  and that copy's gradient;
- an allowance for the CUDA context, library workspaces and allocator fragmentation.

The per-token activation coefficients were measured on Llama-architecture models with bf16 compute
and LoRA on every linear layer (tests/training/test_estimate.py re-measures them on shapes the fit
never saw); the allowance is the part to recalibrate against bench/ measurements on real GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.training.spec import JobSpec

GIB = 1024**3
NF4_BLOCK = 64  # bitsandbytes quantizes 4-bit weights in blocks of 64, one absmax each
NESTED_BLOCK = 256  # double quantization: the absmaxes themselves, in blocks of 256

# Bytes saved for backward per token per decoder layer, per unit of each dimension (bf16 compute).
ACT_PER_HIDDEN = 50.0
ACT_PER_INTERMEDIATE = 18.4
ACT_PER_KV = 4.25
# With gradient checkpointing a layer keeps only its (float32) input, plus bookkeeping.
ACT_CHECKPOINTED_PER_HIDDEN = 5.0

CONTEXT_BYTES = int(0.6 * GIB)  # CUDA context, cuBLAS and attention workspaces
FRAGMENTATION = 0.08  # the caching allocator's slack over what tensors use

OPTIMIZER_BYTES_PER_PARAM = {"paged_adamw_32bit": 8, "adamw_torch": 8, "paged_adamw_8bit": 2}
COMPUTE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}  # auto is bf16 on current GPUs


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

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a transformers config.json (Llama, Mistral, Qwen2 and other decoder-only families)."""
        try:
            hidden = config["hidden_size"]
            heads = config["num_attention_heads"]
            return cls(
                layers=config["num_hidden_layers"], hidden=hidden, intermediate=config["intermediate_size"],
                heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or hidden // heads, vocab=config["vocab_size"],
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except KeyError as missing:
            raise ValueError(f"the model config has no {missing}; cannot estimate its memory") from None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

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
    total: int = field(init=False)

    def __post_init__(self):
        self.total = sum(self.parts.values())

    def describe(self) -> str:
        width = max(map(len, self.parts))
        lines = [f"  {name:<{width}}  {gib(size):>9}" for name, size in self.parts.items()]
        return "\n".join([*lines, f"  {'total':<{width}}  {gib(self.total):>9}"])


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


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
    targets = shape.linear_shapes()
    names = targets if spec.lora.target_modules == "all-linear" else {
        k: v for k, v in targets.items() if k in spec.lora.target_modules}
    return shape.layers * sum(spec.lora.r * (i + o) for i, o in names.values())


def estimate_peak_memory(spec: JobSpec, model_config: dict, micro_batch: int | None = None,
                         seq_len: int | None = None) -> Estimate:
    """The peak device memory of one training step of `spec` on the model `model_config` describes."""
    shape = ModelShape.from_config(model_config)
    t = spec.training
    batch = micro_batch or (t.per_device_batch_size if isinstance(t.per_device_batch_size, int) else 1)
    seq = seq_len or min(t.max_seq_length, model_config.get("max_position_embeddings") or t.max_seq_length)
    tokens = batch * seq
    compute = COMPUTE_BYTES[spec.quantization.compute_dtype]
    other_dtype = 4 if spec.quantization.bits != "none" else compute  # upcast by prepare_model_for_kbit_training
    adapter = lora_params(spec, shape)

    per_layer = (compute / 2) * (ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTERMEDIATE * shape.intermediate
                                 + ACT_PER_KV * shape.kv_heads * shape.head_dim)
    if t.gradient_checkpointing:
        # Each layer's input is kept; one layer at a time is recomputed and its activations live.
        activations = tokens * (shape.layers * ACT_CHECKPOINTED_PER_HIDDEN * shape.hidden + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    parts = {
        "base weights (quantized)": quantized_weight_bytes(spec, shape),
        "base weights (embeddings, head, norms)": shape.other_params * other_dtype,
        "LoRA adapter": adapter * 4,
        "LoRA gradients": adapter * 4,
        "optimizer state": adapter * OPTIMIZER_BYTES_PER_PARAM[t.optimizer],
        "activations": int(activations),
        # Logits in the compute dtype, their float32 copy for the loss, and that copy's gradient.
        "logits": tokens * shape.vocab * (compute + 4 + 4),
    }
    parts["allowance (context, fragmentation)"] = CONTEXT_BYTES + int(FRAGMENTATION * sum(parts.values()))
    return Estimate(parts, batch, seq, t.gradient_checkpointing)


def largest_micro_batch(spec: JobSpec, model_config: dict, budget_bytes: int, limit: int = 256) -> int | None:
    """The largest micro-batch (a power of two up to `limit`) whose peak fits the budget; None if not even 1."""
    best = None
    batch = 1
    while batch <= limit and estimate_peak_memory(spec, model_config, micro_batch=batch).total <= budget_bytes:
        best, batch = batch, batch * 2
    return best


def with_micro_batch(spec: JobSpec, micro_batch: int) -> JobSpec:
    return spec.model_copy(update={"training": spec.training.model_copy(update={"per_device_batch_size": micro_batch})})


def resolve_auto_micro_batch(spec: JobSpec, model_config: dict, budget_bytes: int | None) -> JobSpec:
    """per_device_batch_size "auto" → the largest micro-batch that fits the budget (a GPU's memory).
    Without a budget (the CPU, where RAM rather than device memory bounds it) "auto" means the default, 4."""
    if spec.training.per_device_batch_size != "auto":
        return spec
    fitting = largest_micro_batch(spec, model_config, budget_bytes) if budget_bytes else 4
    if fitting is None:
        need = estimate_peak_memory(spec, model_config, micro_batch=1).total
        raise ValueError(f"training.per_device_batch_size: \"auto\" found no micro-batch that fits: even 1 needs "
                         f"{gib(need)} and the device has {gib(budget_bytes)}")
    return with_micro_batch(spec, fitting)


def advice(spec: JobSpec, model_config: dict, budget_bytes: int) -> list[str]:
    """What would make the job fit a budget, each checked against the estimate."""
    t = spec.training
    batch = t.per_device_batch_size if isinstance(t.per_device_batch_size, int) else 1
    ideas = []
    fitting = largest_micro_batch(spec, model_config, budget_bytes, limit=max(batch - 1, 1))
    if fitting and fitting < batch:
        ideas.append(f"per_device_batch_size {fitting} with gradient_accumulation_steps "
                     f"{t.gradient_accumulation_steps * batch // fitting} (the same effective batch)")
    for seq in (t.max_seq_length // 2, t.max_seq_length // 4):
        if seq >= 8 and estimate_peak_memory(spec, model_config, micro_batch=batch, seq_len=seq).total <= budget_bytes:
            ideas.append(f"max_seq_length {seq}")
            break
    if not t.gradient_checkpointing:
        on = spec.model_copy(update={"training": t.model_copy(update={"gradient_checkpointing": True})})
        if estimate_peak_memory(on, model_config).total <= budget_bytes:
            ideas.append("gradient_checkpointing true")
    return ideas
