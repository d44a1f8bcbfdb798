"""Small factories that turn the flat job spec into library objects (after trl's trainer/utils.py)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, prepare_model_for_kbit_training

from worker.training.memory import ActivationOffload
from worker.training.spec import LoraSpec, QuantizationSpec, SpecError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Speedups:
    """What the spec's speed switches resolve to on this device with these libraries installed."""

    packing: bool
    group_by_length: bool
    liger: bool
    attention: str  # transformers' attn_implementation

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def flash_attention_available(device: str) -> bool:
    return device == "cuda" and importlib.util.find_spec("flash_attn") is not None


def liger_available(device: str) -> bool:
    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def resolve_speedups(training, device: str, method: str = "sft") -> Speedups:
    flash = flash_attention_available(device)
    if training.kernels == "liger" and not liger_available(device):
        raise SpecError([("training.kernels", "'liger' needs a CUDA GPU and the liger-kernel package; "
                          "allowed here: 'auto' | 'none'")])
    packing = flash if training.packing == "auto" else training.packing
    if method == "dpo":  # trl's DPO trainer pads each batch of pairs: no packing, and no length grouping
        packing = False
    return Speedups(
        packing=packing,
        # packed rows have no padding to save; DPO's rows are pairs, sampled as they come
        group_by_length=training.group_by_length and not packing and method != "dpo",
        liger=training.kernels == "liger" or (training.kernels == "auto" and liger_available(device)),
        # Varlen flash-attention for packed rows; elsewhere SDPA, which masks packed examples apart
        # (transformers builds a block-diagonal mask from the restarting position ids).
        attention="flash_attention_2" if flash else "sdpa",
    )


def device_map(device: str) -> dict[str, str | int]:
    # One process trains on one device; the worker pins which GPU via CUDA_VISIBLE_DEVICES.
    return {"": 0 if device == "cuda" else "cpu"}


def resolve_compute_dtype(choice: str, device: str) -> torch.dtype:
    """auto → bfloat16 where the device computes it natively, else float16 (old GPUs) / float32 (CPUs)."""
    if device == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if choice == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
        if choice == "bfloat16" and not bf16_ok:
            raise SpecError([("quantization.compute_dtype", f"bfloat16 is not supported by "
                              f"{torch.cuda.get_device_name()}; allowed here: 'auto' | 'float16' | 'float32'")])
        return getattr(torch, choice)
    if choice == "float16":
        raise SpecError([("quantization.compute_dtype", "float16 mixed precision needs a CUDA GPU and this run is "
                          "on the CPU; allowed here: 'auto' | 'bfloat16' | 'float32'")])
    if choice == "auto":
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native_bf16 else torch.float32
    return getattr(torch, choice)


def why_not_on(device: str, field: str, value) -> str | None:
    """Why `value`, what an earlier attempt of the run decided for `field` ("compute_dtype", "packing",
    "kernels") where the spec says "auto", cannot run on this device; None: it can. Packing always can:
    without flash-attention, SDPA masks the packed examples apart (the same rows in each step, slower)."""
    try:
        if field == "compute_dtype":
            resolve_compute_dtype(value, device)
        elif field == "kernels" and value == "liger" and not liger_available(device):
            return "liger-kernel needs a CUDA GPU with the liger-kernel package, and this worker has none"
    except SpecError as exc:
        return exc.errors[0][1]
    return None


def resolve_base_model(name: str, registry: Mapping[str, str | Path] | None = None) -> Path:
    """A registry name or a local directory of safetensors weights; anything else is refused."""
    if registry and name in registry:
        path = Path(registry[name])
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            known = ", ".join(sorted(registry)) if registry else "none registered"
            raise SpecError([("base_model", f"{name!r} is neither a registered model ({known}) nor a local directory")])
    if not (path / "config.json").is_file():
        raise SpecError([("base_model", f"{path} has no config.json; expected a transformers model directory")])
    files = [p.name for p in path.iterdir()]
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
        why = (f"it holds pickle weights ({', '.join(pickles)}), which can run code when loaded" if pickles
               else "it holds no weights")
        raise SpecError([("base_model",
                          f"{path} has no .safetensors weights: {why}. Convert the model to safetensors first.")])
    return path


def quantization_config(quant: QuantizationSpec, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quant.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(path: Path, quant: QuantizationSpec, compute_dtype: torch.dtype, device: str,
                    attention: str = "sdpa", quantized_cache: Path | None = None):
    """The base model, quantized as the spec says.

    With `quantized_cache`, a directory: when it holds pre-quantized weights (4-bit data plus the
    quantization state, as a previous job saved them) they are loaded as they are, which skips
    reading and quantizing the full-precision weights; otherwise the model is quantized from `path`
    and saved there for the jobs that come after.
    """
    from transformers import AutoModelForCausalLM

    common = dict(
        dtype=compute_dtype,
        device_map=device_map(device),
        attn_implementation=supported_attention(path, attention),
        use_safetensors=True,  # never unpickle weights
        trust_remote_code=False,  # a job spec is data, never code
        local_files_only=True,  # nothing downloads at run time
    )
    if cache_holds(quantized_cache, compute_dtype):
        model = AutoModelForCausalLM.from_pretrained(quantized_cache, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization_config(quant, compute_dtype), **common)
        if quantized_cache is not None and quant.bits != "none" and not (quantized_cache / "config.json").exists():
            model.save_pretrained(quantized_cache, safe_serialization=True)
    _keep_cpu_nf4_state_exact(model)
    return model


def cache_holds(quantized_cache: Path | None, compute_dtype: torch.dtype) -> bool:
    """Whether `quantized_cache` holds a pre-quantized base for this compute dtype. Its 4-bit layers compute in the
    dtype saved in its config (quantization_config), whatever the loading run asks: an entry saved by a run that
    computed in float32 (a CPU worker of the class, or a run that kept its first attempt's float32) loaded into a
    bfloat16 run computed in float32, and the other way round, unsaid. One saved for another dtype is passed over:
    the base is quantized from its weights, and the entry is left to the runs it serves."""
    if quantized_cache is None:
        return False
    try:
        saved = json.loads((quantized_cache / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quantization = saved.get("quantization_config") if isinstance(saved, dict) else None
    dtype = quantization.get("bnb_4bit_compute_dtype") if isinstance(quantization, dict) else None
    return dtype == str(compute_dtype).removeprefix("torch.")


def supported_attention(path: Path, attention: str) -> str:
    """`attention`, or "eager" where the model's class has no SDPA path (Gemma 2, whose attention
    soft-caps its scores, which SDPA cannot): transformers refuses to load such a model with "sdpa"."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if attention != "sdpa":
        return attention
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "sdpa" if model_class is None or model_class._supports_sdpa else "eager"


# Past this share of a model's weights left in 16 bits by bitsandbytes, it would not train as QLoRA.
MAX_UNQUANTIZED_SHARE = 0.10


def check_quantized(model, quant: QuantizationSpec) -> None:
    """SpecError where bitsandbytes left much of the base unquantized: it replaces torch linear layers
    only, so a model whose layers hold their weights otherwise (a mixture of experts' 3-D expert
    weights, Falcon's own linear class, GPT-2's Conv1D) would load, and train, in 16 bits, needing
    several times the memory its estimate says. The embeddings and the output head are never quantized."""
    import bitsandbytes as bnb

    if quant.bits == "none":
        return
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None and getattr(m, "weight", None) is not None}
    total, left = 0, []
    for name, param in model.named_parameters():
        if id(param) in embeddings or param.dim() < 2:
            continue
        total += param.numel()
        if not isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
            left.append((name, param.numel()))
    left.sort(key=lambda item: -item[1])  # the largest first: they are what the message must name
    unquantized = sum(n for _, n in left)
    if total and unquantized > MAX_UNQUANTIZED_SHARE * total:
        names = ", ".join(name for name, _ in left[:2]) + (f" and {len(left) - 2} more" if len(left) > 2 else "")
        raise SpecError([("base_model", f"bitsandbytes left {unquantized / total:.0%} of this model's layer weights "
                          f"unquantized ({names}): {type(model).__name__} keeps them outside torch linear layers "
                          f"(experts, or a linear class of its own), so it would train in 16 bits, not "
                          f"{quant.bits}. Use a dense model whose layers are linear layers (Llama, Mistral, Qwen, "
                          "Gemma and most others)")])


def fit_embeddings(model, tokenizer, *saved: Path | None) -> None:
    """Give the model an embedding row (and output row) for every id the tokenizer can produce: one more
    for a pad token added for training, or kept from a tokenizer whose pad lies past the model's rows.
    Never fewer rows than the model came with: Qwen and Gemma 3 ship spare rows past their tokenizers,
    and the merged model keeps the base's shape. Any other token past the rows means the tokenizer is
    not the model's: SpecError, rather than an index error in the first step.

    `saved`: adapter directories about to load onto the model (a started adapter, a checkpoint to resume, the
    adapter to merge or report on), whose rows it grows to as well: an adapter trained where a pad token was
    added carries the grown embeddings and head (the recipe's save_adapter), and a run that adds none (its
    tokenizer pads with a token it has: tokenization.spare_pad_token, or the base's tokenizer fixed) continues,
    resumes, merges or reports on it all the same, every row of its head included; peft refused the larger
    matrices. The saved rows replace the grown ones as the adapter loads."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        past = sorted((i, token) for token, i in tokenizer.get_vocab().items() if i >= rows and token != tokenizer.pad_token)
        if past:
            raise SpecError([("base_model", f"its tokenizer has {len(tokenizer)} tokens and its embeddings {rows} rows: "
                              f"{', '.join(repr(token) for _, token in past[:3])}{' and more' if len(past) > 3 else ''} "
                              "would index past them, so the tokenizer does not belong to this model")])
    wanted = max([len(tokenizer), *(_saved_embedding_rows(model, adapter) for adapter in saved if adapter is not None)])
    if wanted > rows:
        model.resize_token_embeddings(wanted)


def _saved_embedding_rows(model, adapter_dir: Path) -> int:
    """The embedding rows a saved adapter carries (0: it carries no embeddings), read from its file's header."""
    from safetensors import safe_open

    embeddings = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embeddings)
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), "pt") as weights:
        key = next((key for key in weights.keys() if key.endswith(f"{name}.weight")), None)
        return 0 if key is None else weights.get_slice(key).get_shape()[0]


def prepare_for_training(model, quant: QuantizationSpec, compute_dtype: torch.dtype, checkpointing: bool,
                         offload: ActivationOffload | None = None):
    """Freeze the base and, with gradient checkpointing, make the checkpointed blocks backprop to
    the adapter (their input must require grad, or the frozen blocks would cut the graph); with
    `offload`, what checkpointing keeps goes to pinned CPU memory (training.activation_offload).

    Frozen weights that are not quantized stay in the compute dtype unless
    `QuantizationSpec.float32_frozen_weights` says otherwise (float16), where peft's
    prepare_model_for_kbit_training does it all, upcast included."""
    gc_kwargs = {"use_reentrant": False}  # the reentrant variant drops gradients to frozen-input adapters
    if quant.float32_frozen_weights(str(compute_dtype).removeprefix("torch.")):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    if checkpointing and offload is not None:
        # transformers' own offload (activation_checkpointing_enable(offload=True)) copies on the
        # compute stream, so the step waits for every copy; ours overlaps them with compute.
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=partial(offload.checkpoint, **gc_kwargs))
    return model


def _keep_cpu_nf4_state_exact(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bnb's Linear4bit repacks its weight the first time it runs in eval
    mode without grad (an eval step, a fidelity check, generation): the double-quantized absmax is
    expanded and rounded to bfloat16, and re-quantized ("best effort") when the state dict is read.
    Both are lossy, so the frozen base the adapter trains against would drift after every eval
    and the merged model would no longer be the function that was trained. Slower CPU eval is
    the price of an exact base (the report, which generates token by token, gets the speed back
    exactly: dequantized_on_cpu); GPUs never take this path.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# Of the memory the host has available, what the dense copies of a model's 4-bit weights may take
# (dequantized_on_cpu): past it, each layer dequantizes per call as before, slower but within memory.
DENSE_CACHE_SHARE = 0.5


@contextmanager
def dequantized_on_cpu(model) -> Iterator[int]:
    """Inference on the CPU without dequantizing every 4-bit weight at every call; yields the layers it covers.

    bitsandbytes' CPU path for a 4-bit linear layer (its lossy AVX512-BF16 repacking being off:
    _keep_cpu_nf4_state_exact) dequantizes the whole weight, then multiplies: per call, for every
    generated token, and the dequantization costs several times the product (one token through a
    layer of the tiny model: ~0.5 ms to dequantize against ~0.08 ms to multiply). Within this
    context each such layer dequantizes once, with the very calls bitsandbytes makes (the nested absmax,
    then the 4-bit data, into the input's compute dtype), and then computes `linear(x, weight, bias)`
    as bitsandbytes would: the outputs are bitwise the same, only the repeated work is gone.

    Only where the layer would take that path: on the CPU, in eval mode, without grad, weight in
    [out, in] orientation; any other call goes to bitsandbytes. Nothing changes where the dense copies
    would take more than DENSE_CACHE_SHARE of the memory available, or on a GPU (whose kernels
    read the 4-bit weights directly). The layers are as they were on leaving.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules()
              if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"
              and getattr(m.weight, "quant_state", None) is not None
              and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
              and not getattr(m, "support_avx512bf16_for_cpu", False)]
    dense_bytes = sum(m.out_features * m.in_features * (m.compute_dtype or torch.float32).itemsize for m in layers)
    if not layers or dense_bytes > DENSE_CACHE_SHARE * available_host_memory():
        yield 0
        return
    # A layer's own forward, where it has one (accelerate's hooks set one when a device map dispatches the
    # model), is what it gets back; the others get the class's again.
    own = {layer: vars(layer).get("forward") for layer in layers}
    for layer in layers:
        layer.forward = partial(_dense_4bit_forward, layer, layer.forward, {})
    try:
        yield len(layers)
    finally:
        for layer, forward in own.items():  # the dense copies go with the partials
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def available_host_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def total_host_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


def _dense_4bit_forward(layer, bnb_forward, dense: dict, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward and matmul_4bit (0.50) for the CPU inference case, the weight
    dequantized once per dtype (`dense`) instead of at every call; other cases go to `bnb_forward`."""
    state = layer.weight.quant_state
    bias = layer.bias
    if (layer.training or not layer.compute_type_is_set or x.numel() == 0 or tuple(state.shape) != (layer.out_features, layer.in_features)
            or (state.nested and state.state2.blocksize != 256)
            or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
        return bnb_forward(x)
    in_dtype = x.dtype
    if layer.compute_dtype is not None:
        x = x.to(layer.compute_dtype)
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)  # as bitsandbytes does
        bias = bias.to(layer.compute_dtype)
    weight = dense.get(x.dtype)
    if weight is None:
        absmax = state.absmax
        if state.nested:  # per-block scale = code[absmax_8bit] * absmax2[block // 256] + offset (_gemm_4bit_default_impl)
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32) + state.offset
        weight = dense[x.dtype] = torch.ops.bitsandbytes.dequantize_4bit.default(
            layer.weight.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, x.dtype)
    return torch.nn.functional.linear(x, weight, bias).to(in_dtype)


def linear_layer_names(model) -> dict[str, list[str]]:
    """Short name → full names of every linear layer (4-bit, 8-bit or plain) except the output head."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    names: dict[str, list[str]] = {}
    for full_name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, torch.nn.Linear)):
            names.setdefault(full_name.rsplit(".", 1)[-1], []).append(full_name)
    return names


def resolve_target_modules(model, target: str | list[str]) -> list[str]:
    available = linear_layer_names(model)
    if target == "all-linear":
        return sorted(available)
    missing = [name for name in target if name not in available]
    if missing:
        raise SpecError([("lora.target_modules", f"no linear layer named {', '.join(missing)}; "
                                                 f"this model has: {', '.join(sorted(available))}")])
    return sorted(set(target))


def lora_config(lora: LoraSpec, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# What makes two LoRA adapters the same function of the same shape; dropout only matters while training.
_LORA_STRUCTURE = {"r": "r", "lora_alpha": "alpha", "target_modules": "target_modules", "bias": "bias",
                   "use_rslora": "use_rslora"}


def adapter_sha256(adapter_dir: Path) -> str:
    """The sha256 of a saved adapter's weights file: what a resume checks it starts from."""
    import hashlib

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not (Path(adapter_dir) / ADAPTER_CONFIG).is_file() or not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a saved adapter (it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_initial_adapter(model, adapter_dir: Path, config: LoraConfig):
    """The base with a saved adapter on it, trainable: training continues it instead of a fresh one.

    The adapter must have the structure the spec's lora section builds (r, alpha, target modules, bias,
    rsLoRA); a mismatch is refused (ValueError naming the field and both values) rather than trained with
    the adapter's: the spec is the record of what ran, and a job that continues another gives the same lora
    section. Loaded with the spec's config, so lora.dropout is the spec's (peft checks the weights fit)."""
    import json

    from peft import PeftModel

    saved = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    if saved.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"initial adapter: {adapter_dir} holds a {saved.get('peft_type')} adapter; only LoRA continues")
    wanted = config.to_dict()
    for key, field in _LORA_STRUCTURE.items():
        have, want = saved.get(key), wanted.get(key)
        if key == "target_modules":
            have, want = sorted(have or []), sorted(want or [])
        elif key == "use_rslora":
            have = bool(have)
        if have != want:
            raise ValueError(f"lora.{field}: the initial adapter has {have!r}, the spec asks for {want!r}; set "
                             f"lora.{field} to the initial adapter's (a continued adapter keeps its shape)")
    return PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=True)


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
