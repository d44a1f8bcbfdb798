"""The job spec: one pydantic model shared by the engine, the CLI and the API.

Defaults follow the QLoRA paper (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs") and common practice; each one says why. Importing this module must not
import torch: the API validates specs without it.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

EXCERPT_CHARS = 60  # of a value an error message echoes: enough to recognise it


def excerpt(value: Any, *, quote: bool = True) -> str:
    """A value from the input as an error message echoes it: its repr (a string's own text with
    quote=False), cut to EXCERPT_CHARS and saying how long it was. A 2 MB string sent as a role or a
    field becomes some 90 characters, in an answer and in what is stored (a dataset's errors are
    listed with it)."""
    if isinstance(value, str):
        shown = repr(value[:EXCERPT_CHARS]) if quote else value[:EXCERPT_CHARS]
        return shown if len(value) <= EXCERPT_CHARS else f"{shown}… ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= EXCERPT_CHARS else f"{text[:EXCERPT_CHARS]}… ({len(text):,} characters)"


class RepeatedKey(ValueError):
    """A key given twice in one JSON object, which DECODER_WITHOUT_REPEATS refuses: a dataset's row, an API body
    (app/routing.py) and a spec file (load_spec_json) alike, with this one message naming the key."""

    def __init__(self, key: str):
        super().__init__(f"the key {excerpt(key)} appears twice in one object: JSON readers keep one of the two "
                         "(this service's the last, silently), so what is used would depend on the reader; give "
                         "each key once")
        self.key = key


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict, refusing a key given twice ({"messages": [...], "messages": [...]}), which a
    dict would silently take as the last. A call per object: validating 50k chat rows took 1% longer, 4% for
    rows of eight turns, against json.loads."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKey(key)
            seen.add(key)
    return obj


# One decoder for every row: json.loads(text, object_pairs_hook=...) would build a new one per line.
DECODER_WITHOUT_REPEATS = json.JSONDecoder(object_pairs_hook=_object_without_repeats)


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """"1 job", "3 jobs", "0 jobs": a count and its noun, in the plural (noun + "s", or `plural`) where it is not
    one. Every message that counts things says it with this (the API's too, through app/text.py)."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def agreeing(count: int, one: str, many: str) -> str:
    """The word that agrees with `count` things: agreeing(1, "was", "were") is "was" ("1 of 21 rows was truncated")."""
    return one if count == 1 else many


class SpecError(ValueError):
    """A job spec that cannot run. `errors` holds (field, message) pairs; the text lists them all."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("invalid job spec:\n" + "\n".join(f"  {field}: {msg}" for field, msg in errors))


class _Strict(BaseModel):
    # A typo like "learning_rat" must fail loudly, not train with the default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, data: Any) -> Any:
        """A JSON true or false where a number goes is refused, naming the fields: pydantic reads it as 1 or 0, so a
        script's `"learning_rate": true` (a template's slip, a YAML `yes`) trained at 1.0, and `"max_steps": true`
        one step. (A model's validator, not a field's: pydantic allows none before a method's discriminator.)"""
        if isinstance(data, dict):
            named = [name for name, value in data.items()
                     if isinstance(value, bool) and name in cls.model_fields and _takes_a_number(cls, name)]
            if named:  # "<fields>: <rule>", as a rule across fields names them (describe_validation_error)
                raise ValueError(f"{' / '.join(named)}: a number, not true or false")
        return data


@functools.cache
def _takes_a_number(model: type[BaseModel], field: str) -> bool:
    """Whether the field's type takes an int or a float and no bool (its unions and Annotated types looked into)."""
    pending, numbers = [model.model_fields[field].annotation], False
    while pending:
        kind = pending.pop()
        if kind is bool:
            return False
        numbers = numbers or kind in (int, float)
        pending.extend(arg for arg in get_args(kind) if isinstance(arg, type) or get_origin(arg) is not None)
    return numbers


class QuantizationSpec(_Strict):
    # 4-bit is the QLoRA recipe; 8 and "none" (plain LoRA on a 16/32-bit base) are fidelity baselines.
    bits: Literal[4, 8, "none"] = 4
    # NF4 is information-theoretically optimal for normally distributed weights (QLoRA §3).
    quant_type: Literal["nf4", "fp4"] = "nf4"
    # Quantizing the quantization constants saves ~0.37 bits per parameter at no quality cost (QLoRA §3).
    double_quant: bool = True
    # auto = bfloat16 where the device computes it natively, else float16 on older GPUs, float32 on CPUs.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    def float32_frozen_weights(self, compute_dtype: str) -> bool:
        """Whether training keeps the weights that are not quantized (embeddings, output head, norms)
        in float32 rather than in the compute dtype (a name: "bfloat16", "float16", "float32").

        Only for float16, where norms in half precision overflow: that is why QLoRA's recipe (peft's
        prepare_model_for_kbit_training) upcasts them. In bfloat16 the upcast buys no stability
        (Llama-family norms already compute in float32) and costs memory twice over: the weights
        (2 GiB more for Llama 3 8B) and a float32 residual stream, which doubles every input that
        gradient checkpointing keeps. trl's standard recipe does not upcast either. The engine and
        the memory estimate both follow this rule."""
        return self.bits != "none" and compute_dtype == "float16"


MAX_TARGET_MODULES, MAX_MODULE_NAME = 64, 128


class LoraSpec(_Strict):
    # QLoRA §4: r matters little once every linear layer is adapted; 16 is the common default.
    r: int = Field(16, ge=1, le=1024)
    # alpha = 2r keeps the update scale alpha/r = 2, the common practice for r=16.
    alpha: float = Field(32, gt=0, le=4096)
    # QLoRA used 0.1 for its 7B and 13B models and 0.05 for 33B and 65B (appendix B); 0.05 is the common default.
    dropout: float = Field(0.05, ge=0, lt=1)
    # QLoRA §4: adapting all linear layers is what matches full 16-bit fine-tuning quality.
    # "all-linear" resolves to the model's (4-bit) linear layers minus the output head.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # Training biases changes the base function even with the adapter off; "none" keeps the adapter separable.
    bias: Literal["none", "all", "lora_only"] = "none"
    # rsLoRA scales by alpha/sqrt(r); off by default to match the paper and most published adapters.
    use_rslora: bool = False
    # The adapter's weights and gradients. float32: an Adam step of lr ~2e-4 on a weight of ~0.05 is below
    # bfloat16's resolution and would be rounded away; a resume continues bit for bit. bfloat16 (the QLoRA
    # paper's choice) halves the adapter's weights and gradients (the paged optimizers' moments stay float32;
    # adamw_torch's are the weights' dtype):
    # small updates round away, and a resume is still exact, since it restores the bf16 weights as saved.
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraSpec:
        names = self.target_modules
        if isinstance(names, list) and (not names or not all(isinstance(name, str) and name.strip() for name in names)):
            raise ValueError("target_modules: must be \"all-linear\" or a non-empty list of module names")
        # A block has a dozen linear layers at most: a longer list, or a longer name, is a mistake.
        if isinstance(names, list) and (len(names) > MAX_TARGET_MODULES
                                        or any(len(name) > MAX_MODULE_NAME for name in names)):
            raise ValueError(f"target_modules: at most {MAX_TARGET_MODULES} module names of at most "
                             f"{MAX_MODULE_NAME} characters each")
        return self


MAX_ACCUMULATION = 4096  # training.gradient_accumulation_steps
# The least a new request may ask for. Smaller values were in range (> 0) and did nothing sensible: epochs 1e-300
# trained one optimizer step, whatever the data, as ceil(epochs x steps per epoch) is at least 1; a learning rate of
# 1e-300 held a GPU for the whole run and moved the adapter by nothing. A hundredth of the data is the least an
# epoch count means (for a few steps, max_steps says so); 1e-7 is below the smallest rate published for DPO (5e-7).
MIN_EPOCHS = 0.01
MIN_LEARNING_RATE = 1e-7


class TrainingSpec(_Strict):
    # Exactly one of epochs / max_steps: a run must know when it is done.
    epochs: float | None = Field(None, gt=0, le=100)
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    # QLoRA used 2e-4 for 7B-13B models (1e-4 for 33B-65B). A dpo job's default is its own (LEARNING_RATES).
    learning_rate: float = Field(2e-4, gt=0, le=1)
    # Micro-batch size per device; with gradient_accumulation_steps=4 the effective batch is 16 (QLoRA used 16).
    # "auto": the largest micro-batch the memory estimate fits on the GPU the job runs on.
    per_device_batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = 4
    gradient_accumulation_steps: int = Field(4, ge=1, le=MAX_ACCUMULATION)
    # Rows longer than this are truncated (and counted); 2048 fits most chat data on one 24 GB GPU at 7B.
    max_seq_length: int = Field(2048, ge=8, le=1_048_576)
    # QLoRA used a constant schedule; cosine is the common alternative.
    lr_scheduler: Literal["cosine", "linear", "constant"] = "constant"
    # A short warmup (3% as in QLoRA) keeps the freshly initialised adapter from a destructive first step.
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    # QLoRA used no weight decay on the adapter.
    weight_decay: float = Field(0.0, ge=0, le=1)
    # QLoRA clips at 0.3; 0 disables clipping.
    max_grad_norm: float = Field(0.3, ge=0, le=1000)
    # Paged optimizers move optimizer state to CPU under memory spikes instead of OOM-ing (QLoRA §3).
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "paged_adamw_32bit"
    # Recomputing activations trades ~30% speed for fitting long sequences; QLoRA's memory numbers assume it.
    gradient_checkpointing: bool = True
    # Padding-free packing: several examples per row, position ids restarting at each, so attention
    # never crosses examples. "auto" = on where flash-attention's varlen kernels make it fast (CUDA with
    # flash-attn installed); elsewhere the block-diagonal mask fallback is correct but slower.
    packing: bool | Literal["auto"] = "auto"
    # Unpacked runs: batch examples of similar length together, so less compute goes to padding.
    # Off by default: same-length batches are less varied, and on our demo task the loss after the
    # same steps was ten times worse with it on; use it for data whose lengths are unrelated to content.
    group_by_length: bool = False
    # Fused kernels (Liger: RMSNorm, SwiGLU, RoPE) where the device runs them; "auto" = on CUDA when
    # liger-kernel is installed, off on the CPU. The loss needs none: trl's trainer already scores
    # tokens through a chunked LM head that never builds the full logits (and refuses Liger's).
    kernels: Literal["auto", "liger", "none"] = "auto"
    # Long context: what gradient checkpointing keeps (each layer's input, layers x tokens x hidden) held
    # in pinned CPU memory, copied out in forward and back in backward on a side stream, overlapped with
    # compute. The numbers are the same; the cost is host memory and PCIe traffic. "auto" = on only where
    # the memory estimate says the job would not fit its GPU otherwise. Needs gradient_checkpointing.
    activation_offload: bool | Literal["auto"] = "auto"
    # Long context: each MLP computed over chunks of the sequence, and its backward recomputed chunk by
    # chunk, so a layer's backward holds one chunk's intermediates, not the whole sequence's. Costs one
    # more MLP forward per layer per step; with lora.dropout > 0 the masks are drawn per chunk (the same
    # training in distribution, not step for step). "auto" as above.
    tiled_mlp: bool | Literal["auto"] = "auto"
    # A training step that runs out of GPU memory (an estimate that fell short, a fragmented GPU):
    # "smaller_micro_batch" goes on from the newest checkpoint with the micro-batch divided and the
    # accumulation multiplied alike, the same rows at each optimizer step (README, "When things break");
    # "fail" ends the job there, for a team measuring what a fixed micro-batch does.
    on_out_of_memory: Literal["smaller_micro_batch", "fail"] = "smaller_micro_batch"
    # Off by default: learning to produce prompts wastes capacity and teaches the model to talk as the user.
    train_on_inputs: bool = False
    seed: int = Field(42, ge=0, le=2**32 - 1)
    # Every 10 optimizer steps is dense enough for a loss curve without flooding the metrics store.
    logging_steps: int = Field(10, ge=1, le=1_000_000)
    # Evaluate on the validation set this often (and always at the end); only used when one is given.
    eval_steps: int = Field(100, ge=1, le=1_000_000)
    # A checkpoint every 100 steps bounds the work a crash can cost.
    save_steps: int = Field(100, ge=1, le=1_000_000)
    # Stop when eval loss has not improved for this many evaluations in a row (needs a validation set).
    # Off by default: a run does what it was asked; with it on, eval_steps sets how often it can stop.
    early_stopping: int | None = Field(None, ge=1, le=1000)

    @model_validator(mode="after")
    def _one_stopping_rule(self, info: ValidationInfo) -> TrainingSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError(f"epochs / max_steps: set one of them (epochs in [{MIN_EPOCHS:g}, 100], max_steps in "
                             "[1, 10000000])")
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("epochs / max_steps: set only one of them, not both")
        if not (info.context or {}).get("stored"):  # a job accepted before these minimums runs as it was accepted
            if self.epochs is not None and self.epochs < MIN_EPOCHS:
                raise ValueError(f"epochs: {self.epochs:g} is below the least an epoch count means, {MIN_EPOCHS:g} (a "
                                 f"hundredth of the data; less trains one step, whatever the data); allowed: "
                                 f"[{MIN_EPOCHS:g}, 100], or set training.max_steps instead for a number of steps")
            if self.learning_rate < MIN_LEARNING_RATE:
                raise ValueError(f"learning_rate: {self.learning_rate:g} is below {MIN_LEARNING_RATE:g}, too small to "
                                 f"move the adapter; allowed: [{MIN_LEARNING_RATE:g}, 1]")
        if self.activation_offload is True and not self.gradient_checkpointing:
            raise ValueError("activation_offload: true offloads what gradient checkpointing keeps; "
                             "set gradient_checkpointing true, or activation_offload \"auto\" or false")
        return self


class OutputSpec(_Strict):
    # Merged weights are what most serving stacks load; the adapter is always kept too.
    merge: bool = True
    # bfloat16 keeps the dynamic range of the training compute at half the size of float32.
    merge_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Ship the adapter (and merged model) of the evaluation with the lowest eval loss rather than the
    # last step's (needs a validation set). Off by default: the last step is what was asked for.
    use_best_checkpoint: bool = False


class EvalSpec(_Strict):
    """The report made when a job ends: base and tuned answers side by side, with metrics."""

    # A list of prompts, or N rows sampled from the validation set (the train set where there is none),
    # whose last assistant turn is the reference. 8 reads at a glance and costs seconds; 0: no report.
    prompts: Annotated[int, Field(ge=0, le=256)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=20_000)]], Field(min_length=1, max_length=256)] = 8
    # Enough for a paragraph: the report is for reading side by side, not for long generations.
    max_new_tokens: int = Field(64, ge=1, le=2048)
    # 0 = greedy: the same answers every time, so base and tuned differ by the model, not the dice.
    temperature: float = Field(0.0, ge=0, le=2)


class SftMethod(_Strict):
    """Supervised fine-tuning: learn the assistant turns of chat, prompt/completion, alpaca or text rows."""

    type: Literal["sft"] = "sft"


class DpoMethod(_Strict):
    """Direct Preference Optimization (Rafailov et al., 2023) on `preference` rows: raise the likelihood of
    the preferred answer over the other, relative to a frozen reference (the starting adapter, or the
    base where there is none), held close to it by beta."""

    type: Literal["dpo"]
    # How far the policy may move from the reference: 0.1 is the DPO paper's and trl's default; lower lets
    # it drift further (stronger preference, more forgetting), higher keeps it closer. At least 0.001: the
    # rewards and the sigmoid loss's gradient scale with beta, so a run below it has a flat loss and learns
    # nothing (1e-300 is 0 in float32: log 2 and a zero gradient at every step), and ipo's target margin
    # 1/(2 beta) overflows float32 (an inf loss at step 1). Published recipes use 0.01 to 0.5.
    beta: float = Field(0.1, ge=0.001, le=10, allow_inf_nan=False)
    # sigmoid: the DPO paper's loss. ipo (Azar et al., 2023): a squared loss that keeps the margin at
    # 1/(2 beta) instead of pushing it to infinity, which overfits less on pairs that are always right.
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # The share of pairs assumed mislabelled (conservative DPO, sigmoid loss only); 0 trusts every label.
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, allow_inf_nan=False)

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> DpoMethod:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError("label_smoothing: only for loss \"sigmoid\" (ipo has no label smoothing); set it to 0")
        return self


Method = Annotated[SftMethod | DpoMethod, Field(discriminator="type")]
# training.learning_rate where the spec gives none, by method. DPO moves a model that already answers,
# and moves it fast: LoRA DPO recipes (the alignment handbook's QLoRA Zephyr, LLaMA-Factory's) use 5e-6,
# 40x below SFT's; at SFT's 2e-4 a DPO run garbles the answers it starts from.
LEARNING_RATES = {"sft": 2e-4, "dpo": 5e-6}
METHODS: dict[str, type[BaseModel]] = {"sft": SftMethod, "dpo": DpoMethod}
# The validation context of a spec already accepted (a job's stored spec, a run's manifest): a check added
# since that refuses what an earlier release accepted and ran (dpo's packing, train_on_inputs) asks a new
# request only, or a job queued or paused across the upgrade would fail on the worker as an invalid spec.
STORED = {"stored": True}
# The dataset format each method trains on (worker/training/data.py); the API refuses a mismatch.
METHOD_FORMATS = {"sft": ("chat", "prompt_completion", "alpaca", "text"), "dpo": ("preference",)}


class JobSpec(_Strict):
    # A registry name or a local directory of safetensors weights. Never remote code, never pickles.
    base_model: str = Field(min_length=1, max_length=512)
    # sft (the default) or dpo; a dpo job usually continues an sft job's adapter (the API's initial_job_id).
    method: Method = SftMethod()
    quantization: QuantizationSpec = QuantizationSpec()
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec
    output: OutputSpec = OutputSpec()
    eval: EvalSpec = EvalSpec()

    @model_validator(mode="before")
    @classmethod
    def _method_learning_rate(cls, data: Any) -> Any:
        """A learning rate the spec leaves out is its method's (LEARNING_RATES); the stored spec records it."""
        if not isinstance(data, dict):
            return data  # the field checks say what is wrong
        method, training = data.get("method"), data.get("training")
        kind = method.get("type") if isinstance(method, dict) else getattr(method, "type", "sft")
        # A type that is no string (a list, an object: unhashable) is left to the field checks to name.
        if isinstance(kind, str) and kind in LEARNING_RATES and isinstance(training, dict) and "learning_rate" not in training:
            return {**data, "training": {**training, "learning_rate": LEARNING_RATES[kind]}}
        return data

    @model_validator(mode="after")
    def _sft_only_settings(self, info: ValidationInfo) -> JobSpec:
        """Settings a dpo run cannot follow, refused where asked for rather than silently not done. Not in a
        spec already stored (STORED): a job accepted before this check runs and resumes as it was accepted."""
        if self.method.type != "dpo" or (info.context or {}).get("stored"):
            return self
        if self.training.train_on_inputs:
            raise ValueError("training.train_on_inputs: method dpo compares the two answers only and never learns "
                             "the prompt; set it to false (or leave it out)")
        if self.training.packing is True:
            raise ValueError("training.packing: method dpo never packs (a batch pads each pair's two answers); set it "
                             "to \"auto\" or false (or leave it out)")
        return self

    def validation_needed_by(self) -> list[tuple[str, str]]:
        """(field, why) for each setting that judges by eval loss, and so needs a validation set: the
        engine refuses such a run at setup, and POST /jobs such a job."""
        needs = []
        if self.training.early_stopping is not None:
            needs.append(("training.early_stopping",
                          f"stops when eval loss has not improved for {self.training.early_stopping} evaluations, "
                          "so it needs a validation set; add one, or set training.early_stopping to null"))
        if self.output.use_best_checkpoint:
            needs.append(("output.use_best_checkpoint",
                          "ships the adapter of the evaluation with the lowest eval loss, so it needs a validation "
                          "set; add one, or set output.use_best_checkpoint to false"))
        return needs

    @classmethod
    def parse(cls, data: dict[str, Any], *, stored: bool = False) -> JobSpec:
        """Validate a spec; on failure raise SpecError naming each field and its allowed values. `stored`: a
        job's spec as the service stored it, perhaps under an earlier release (see STORED)."""
        try:
            return cls.model_validate(data, context=STORED if stored else None)
        except ValidationError as exc:
            raise SpecError(describe_validation_error(exc, cls)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        try:
            data = load_spec_json(Path(path).read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise SpecError([("(file)", spec_file_error(path, exc))]) from None
        if not isinstance(data, dict):
            raise SpecError([("(file)", f"{path} must hold a JSON object")])
        return cls.parse(data)


def load_spec_json(text: str | bytes) -> Any:
    """A spec file's JSON value, as json.loads reads it, but with a number too long to read as the float it denotes
    (long_numbers_as_floats), as the API reads a body: a 5,000-digit training.max_steps was "not valid JSON: Exceeds
    the limit (4300 digits) for integer string conversion ... use sys.set_int_max_str_digits()", naming no field and
    a fix meant for Python programmers; now the field's own check refuses it, naming it and its range. A key given
    twice in one object is refused (RepeatedKey), as the API refuses it in a body: json.loads kept the last, so
    `qlora train` trained with another learning_rate than the one its user read first. Raises ValueError
    (JSONDecodeError, UnicodeDecodeError, RepeatedKey) where the text is no spec's JSON: spec_file_error says why."""
    try:
        return json.loads(text, object_pairs_hook=_object_without_repeats)  # bytes too: json.loads finds their encoding
    except (json.JSONDecodeError, UnicodeDecodeError, RepeatedKey):
        raise
    except ValueError:  # int() refuses an integer of more digits than sys.get_int_max_str_digits() (4300 by default)
        return json.loads(long_numbers_as_floats(text.encode() if isinstance(text, str) else text),
                          object_pairs_hook=_object_without_repeats)


# pydantic-core's from_json (the API's parser, and the database's reader of JSON) refuses a number whose integer part
# has more digits than this, as Python's int() does past sys.int_info.default_max_str_digits, the same 4300.
FROM_JSON_MAX_DIGITS = 4300
# A string (skipped: its digits are no number; an unrolled loop, which reads a 15 MiB string in 0.08 s) or a number
# whose integer part is past FROM_JSON_MAX_DIGITS; a number starts where no other number's character is before it
# (the digits after a point or an `e` are no number's start).
_STRING_OR_LONG_NUMBER = re.compile(
    rb'"[^"\\]*(?:\\.[^"\\]*)*"|(?<![0-9.eE+-])-?[0-9]{%d,}(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?' % (FROM_JSON_MAX_DIGITS + 1),
    re.DOTALL)


def long_numbers_as_floats(body: bytes) -> bytes:
    """The JSON text `body` with each number from_json refuses for its length (a 5,000-digit max_steps) written as
    the float it denotes: past every float (1e400, which from_json reads as inf, as it reads any number past
    float's range) unless its exponent brings it back (`1<4,400 zeros>e-4400` is 1.0). So it is the field's own
    check that refuses it, naming the field and its range (`training.max_steps: ... got inf; allowed: ...`), as
    for `1e999`, instead of the whole body refused as "number out of range at line 1 column 4302". No field of
    a spec takes a number that large, and one brought back into range is read as any float is, to the nearest.
    The API's body reader (app/routing.py) and the spec files' (load_spec_json) both use it."""
    def short(token: re.Match[bytes]) -> bytes:
        text = token[0]
        if text.startswith(b'"'):
            return text
        number = float(text)  # correctly rounded however many digits it has; inf past float's range
        return repr(number).encode() if math.isfinite(number) else b"-1e400" if number < 0 else b"1e400"
    return _STRING_OR_LONG_NUMBER.sub(short, body)


def spec_file_error(path: str | Path, exc: ValueError) -> str:
    """Why a spec file could not be read as JSON, with what it most likely is instead: the dataset or an archive
    given where the spec goes (`qlora jobs create demo/train.jsonl`). The CLI's commands that read a spec say it alike."""
    if isinstance(exc, RepeatedKey):
        return f"{path}: {exc}"
    if isinstance(exc, UnicodeDecodeError):
        return (f"{path} is not a JSON text file (byte {exc.start + 1} is not UTF-8): a job spec is one JSON object, "
                "such as demo/spec.json from `qlora demo-data`")
    if isinstance(exc, json.JSONDecodeError):
        hint = ""
        if exc.msg == "Extra data" and exc.colno == 1:  # a value per line: JSONL
            hint = ("; it holds one JSON value per line, as a dataset (JSONL) does: a job spec is one JSON object, "
                    "and the data is given apart")
        return f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}{hint}"
    return f"{path} is not valid JSON: {exc}"


MAX_ERRORS_SHOWN = 20


# What a spec's required fields are, said where one is missing.
_REQUIRED = {
    "base_model": "required: the name of a registered model (GET /models, qlora admin list-models)",
    "training": 'required: an object setting training.epochs or training.max_steps, e.g. {"max_steps": 100}',
}


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """Turn pydantic errors into (dotted field, message + allowed range) pairs: one per field (a Literal|list
    union reports the same field twice), the first MAX_ERRORS_SHOWN of them, then how many more.

    Only the fields shown get their message: a body of 10,000 misspelt fields (within the API's bound on a
    body's values) took 1.2 s of the API's CPU to describe each with its allowed names and nearest match, for
    an answer that shows 20."""
    messages: dict[str, Callable[[], str]] = {}
    for err in exc.errors():
        field, message = _described(err, model)
        messages.setdefault(field, message)
    fields = list(messages)
    errors = [(field, messages[field]()) for field in fields[:MAX_ERRORS_SHOWN]]
    if len(fields) > MAX_ERRORS_SHOWN:  # a body of thousands of bad fields gets an answer of a few KiB
        errors.append(("(more)", f"{len(fields) - MAX_ERRORS_SHOWN} more fields are refused too; fix these and "
                                 "send it again to see them"))
    return errors


def _described(err: Any, model: type[BaseModel]) -> tuple[str, Callable[[], str]]:
    """One pydantic error's dotted field, and what makes its message (called for the fields shown alone)."""
    # Drop the union branch tags pydantic adds ("literal['auto']", "constrained-int", "list[str]", and "bool" for a
    # switch that may also be "auto"): no field is named so, and each branch's error is the one field's.
    loc = [str(part) for part in err["loc"]
           if not str(part).startswith(("literal[", "list[", "constrained-")) and part != "bool"]
    msg = err["msg"].removeprefix("Value error, ")
    # A method's fields are reported as "method.beta", looked up in the method the tag chose ("method.dpo.beta").
    where, prefix = model, []
    if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in METHODS:
        where, prefix, loc = METHODS[loc[1]], ["method"], loc[2:]
    if loc == ["method"] and err["type"] == "model_attributes_type":  # "method": "dpo", a string for an object
        return "method", lambda: (f"must be an object, {{\"type\": \"sft\"}} or {{\"type\": \"dpo\", \"beta\": 0.1, "
                                  f"\"loss\": \"sigmoid\", \"label_smoothing\": 0.0}} (got {excerpt(err.get('input'))})")
    if err["type"] in ("model_type", "model_attributes_type"):  # a list or a number where a section goes
        # pydantic says "a valid dictionary or instance of TrainingSpec": a class name the caller never wrote.
        return ".".join([*prefix, *loc]), lambda: (f"must be an object with fields among {', '.join(_fields_at(where, loc))} "
                                                   f"(got {excerpt(err.get('input'))})")
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        given = err["input"].get("type") if isinstance(err.get("input"), dict) else None
        return ".".join([*loc, "type"]), lambda: (f"must be one of {', '.join(map(repr, METHODS))} "
                                                  f"(got {excerpt(given) if given is not None else 'none'})")
    if err["type"] == "missing" and ".".join(loc) in _REQUIRED:  # pydantic says only "Field required"
        return ".".join([*prefix, *loc]), lambda: _REQUIRED[".".join(loc)]
    if err["type"] == "extra_forbidden":  # the field's name is the caller's: echoed as an excerpt too
        return ".".join([*prefix, *loc[:-1], excerpt(loc[-1], quote=False)]), lambda: _unknown(where, loc)
    if err["type"] == "value_error" and ": " in msg:  # a cross-field rule names its own fields
        fields, rule = msg.split(": ", 1)
        return ".".join([*prefix, *loc, fields]), lambda: rule

    def out_of_range() -> str:
        allowed = _allowed(where, loc)
        return f"{msg} (got {excerpt(err.get('input'))}; allowed: {allowed})" if allowed else msg

    return ".".join([*prefix, *loc]) or "(spec)", out_of_range


def _unknown(where: type[BaseModel], loc: list[str]) -> str:
    allowed_here = _fields_at(where, loc[:-1])
    # A typo ("learnin_rate") is named with the field meant: in a list of 24 it read as an unknown setting.
    meant = difflib.get_close_matches(loc[-1], allowed_here, n=1, cutoff=0.8)
    return "unknown field" + (f" (did you mean {meant[0]}?)" if meant else "") + f"; allowed here: {', '.join(allowed_here)}"


def _field_info(model: type[BaseModel] | None, loc: list[str]):
    info = None
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        annotation = info.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return info


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return list(model.model_fields)


def _allowed(model: type[BaseModel], loc: list[str]) -> str:
    info = _field_info(model, loc)
    if info is None:
        return ""
    allowed = [_range(info.metadata)] if _range(info.metadata) else []
    # A range inside a union (an integer or "auto") sits on the union's Annotated member.

    for arg in get_args(info.annotation):
        if get_origin(arg) is Annotated:
            ranges = [_range(getattr(meta, "metadata", [meta])) for meta in get_args(arg)[1:]]
            allowed += [f"an integer {r}" for r in ranges if r]
    if info.annotation is bool or bool in get_args(info.annotation):  # a switch, perhaps "auto" too
        allowed += ["true", "false"]
    allowed += [repr(v) if isinstance(v, str) else str(v) for v in _literal_values(info.annotation)]
    if any(get_origin(arg) is list or get_origin(get_args(arg)[0] if get_origin(arg) is Annotated else arg) is list
           for arg in get_args(info.annotation)):
        allowed.append(_LIST_OF.get(loc[-1], "[a list]"))
    return " | ".join(allowed)


_LIST_OF = {"target_modules": "[list of module names]", "prompts": "[list of 1 to 256 prompts]"}


def _range(metadata) -> str:
    low = high = None
    for meta in metadata:
        if isinstance(meta, annotated_types.Gt):
            low = f"> {meta.gt}"
        elif isinstance(meta, annotated_types.Ge):
            low = f">= {meta.ge}"
        elif isinstance(meta, annotated_types.Lt):
            high = f"< {meta.lt}"
        elif isinstance(meta, annotated_types.Le):
            high = f"<= {meta.le}"
    return " and ".join(part for part in (low, high) if part)


def _literal_values(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    values: list[Any] = []
    for arg in get_args(annotation):
        values.extend(_literal_values(arg))
    return values
