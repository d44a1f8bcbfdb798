"""The QLoRA recipe: setup → train → save → cleanup, readable top to bottom.

    from worker.training.recipe import run
    result = run(JobSpec.from_file("spec.json"), "train.jsonl", "out/", validation_path="val.jsonl")

spec.method says what is learned: "sft" (the assistant turns) or "dpo" (preference rows: the preferred answer
over the other, against a frozen reference; see GuardedDPOTrainer). `initial_adapter` starts either from a
saved adapter (SFT, then DPO from it) instead of a fresh one.

Writes into out/: adapter/, merged/, report/report.json, metrics.jsonl, summary.json, checkpoints/step-N, run.json.
Needs nothing of the service: the service passes a `sink` for the typed records it reports
(worker/training/protocol.py: metrics and events), a `cancel` hook, and a `registry` of base
models; the CLI passes nothing and reads the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Nothing downloads at run time: base models are local, the hub is never asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trl's trainers report each run to Hugging Face (trainer, model type, GPU) from a thread as they are made: a
# self-hosted service says nothing of its teams' runs to anyone. Without a network that thread waits on DNS, and
# it was seen to crash a process (a segfault in getaddrinfo). trl skips it only where CI is set.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from worker.training.stack import import_bitsandbytes  # noqa: E402

import_bitsandbytes()  # before transformers and peft import it: see stack.py

import huggingface_hub.constants  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoTokenizer, PrinterCallback, TrainerCallback, set_seed  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from worker.training import checkpoints  # noqa: E402
from worker.training.callbacks import (  # noqa: E402
    BestEvalCallback,
    CheckpointCallback,
    HealthCallback,
    MetricsCallback,
    RichProgressCallback,
    StopCallback,
    TrainingEnd,
    rewards,
)
from worker.training.card import write_model_card  # noqa: E402
from worker.training.data import read_jsonl  # noqa: E402
from worker.training.estimate import (  # noqa: E402
    HOST_DATASET,
    MAX_PAGED_FRACTION,
    PAGED_OPTIMIZERS,
    dataset_host_parts,
    describe_host_memory,
    estimate_peak_memory,
    fit_to_device,
    gib,
    keeps_reference_adapter,
    mlp_tile_tokens,
    steps_host_budget,
    token_estimate,
)
from worker.training.host_claims import HostClaims  # noqa: E402
from worker.training.memory import ActivationOffload, is_out_of_memory, tile_mlps  # noqa: E402
from worker.training.merge import (  # noqa: E402
    FIDELITY_MEMORY_SHARE,
    MERGE_ON_GPU_SHARE,
    MERGED_SHARD_SIZE,
    MergePlan,
    fidelity_rows,
    forward_rows,
    free_memory,
    load_merged_for_fidelity,
    loaded_weights,
    measure_fidelity,
    parse_size,
    plan_merge,
    stop_token_ids,
    streaming_merge_unsupported,
    write_merged,
)
from worker.training.model import (  # noqa: E402
    Speedups,
    adapter_sha256,
    available_host_memory,
    cache_holds,
    check_quantized,
    device_map,
    fit_embeddings,
    load_base_model,
    load_initial_adapter,
    lora_config,
    peak_memory_bytes,
    pick_device,
    prepare_for_training,
    resolve_base_model,
    resolve_compute_dtype,
    resolve_speedups,
    resolve_target_modules,
    total_host_memory,
    why_not_on,
)
from worker.training.protocol import (  # noqa: E402
    EvalPoint,
    Event,
    Record,
    Sink,
    TrainPoint,
    phase_event,
    record_to_json,
    write_json_atomic,
)
from worker.training.report import (  # noqa: E402
    REPORT_PATH,
    describe_report,
    make_report,
    perplexity,
    reward_movement,
)
from worker.training.rows import rows_dataset  # noqa: E402
from worker.training.spec import MAX_ACCUMULATION, METHOD_FORMATS, STORED, JobSpec, TrainingSpec, agreeing, counted  # noqa: E402
from worker.training.tokenization import (  # noqa: E402
    IGNORE_INDEX,
    EncodeStats,
    kept_pairs,
    kept_rows,
    preferred_rows,
    prepare_tokenizer,
)

# The variables at the top are read as huggingface_hub is imported: a process that imported it before this module (an
# embedding program, a test) would still report. The telemetry switch is read at each call, so it is set here too.
huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True

KEEP_CHECKPOINTS = 2  # the newest, plus one in case the newest was written just before a disk filled
LOSS_SINCE_LOG_FILE = "loss_since_log.json"  # in each checkpoint: TrainerGuards._save_checkpoint
EPOCH_SEEDED_ORDER = "epoch_seeded_order"  # in it: the run's group_by_length order is EpochSeededLengthGroupedSampler's


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what happened and what to try."""


class OutOfMemoryInTraining(TrainingError):
    """Out of memory at a training step. `smaller`: the training fields that train the same rows at each
    optimizer step with a smaller micro-batch (smaller_micro_batch), for the worker to continue the job from
    its newest checkpoint with them; None where the micro-batch is 1 already, or the spec says to fail
    (training.on_out_of_memory)."""

    def __init__(self, message: str, smaller: dict[str, int] | None):
        super().__init__(message)
        self.smaller = smaller


def smaller_micro_batch(training: TrainingSpec) -> dict[str, int] | None:
    """The micro-batch divided by its smallest prime factor (8 → 4, 6 → 3, 5 → 1) and the gradient accumulation
    multiplied by it: the same rows at each optimizer step (the product), in smaller pieces, so the same data
    order (the sampler's batches are the product's size), the same gradient up to float rounding, and a
    smaller peak. None at micro-batch 1, or where the accumulation would pass its bound."""
    micro = training.per_device_batch_size
    if not isinstance(micro, int) or micro <= 1:  # decided on the device by now ("auto" → an int)
        return None
    factor = next(f for f in range(2, micro + 1) if micro % f == 0)
    accumulation = training.gradient_accumulation_steps * factor
    if accumulation > MAX_ACCUMULATION:
        return None
    return {"per_device_batch_size": micro // factor, "gradient_accumulation_steps": accumulation}


@dataclass
class RunResult:
    status: str  # "succeeded", "cancelled" or "paused"
    out_dir: Path
    summary: dict
    report: dict | None = None  # the eval report (report/report.json), for a run that succeeded and made one


class TrainerGuards:
    """What every trainer of the recipe does beside its method: the adapter in the spec's lora.dtype, and a
    stop at the first non-finite loss or gradient norm. Mixed in before trl's SFTTrainer and DPOTrainer."""

    def __init__(self, *args, adapter_dtype: torch.dtype = torch.float32, **kwargs):
        # trl casts the LoRA weights of a quantized model to bfloat16. We keep them in the dtype the spec
        # asks for, float32 by default: an Adam step of lr ~2e-4 on a weight of ~0.05 is below bf16's
        # resolution (2^-8 relative) and would be rounded away, and a resume (which loads the adapter
        # through peft, in fp32) would silently continue in another precision than the run it resumes.
        # The matmuls still run in the compute dtype under autocast; the cost is a few MB for the
        # adapter, and bfloat16 (lora.dtype) saves it where memory is what limits. The weights come back
        # as they were given, not through trl's rounding: a started adapter (initial_adapter) must start
        # exactly where it ended, and equal DPO's frozen copy of it.
        given = {name: p.detach().clone() for name, p in kwargs["model"].named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        self.adapter_dtype = adapter_dtype
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in given:
                    param.data = given[name].to(param.device)
        self._cast_adapter()

    def _cast_adapter(self) -> None:
        """The trained adapter in lora.dtype, and DPO's frozen copy of a started one (trl's "ref", made from the start
        as given, and loaded from a checkpoint's ref/ on a resume, both upcast to float32 by peft) too: in another
        dtype than the trained copy, with lora.dtype bfloat16 the policy was not its reference at step 0, and every
        reward measured the rounding beside the preference; a resume brought the float32 copy back."""
        for name, param in self.model.named_parameters():
            if (param.requires_grad or ".ref." in name) and param.dtype != self.adapter_dtype:
                param.data = param.data.to(self.adapter_dtype)

    def _load_from_checkpoint(self, resume_from_checkpoint, *args, **kwargs):
        # peft loads a saved adapter upcast to float32 (autocast_adapter_dtype): a bfloat16 adapter must
        # go back to bfloat16, or the resumed run would take float32 steps that the run it resumes did not.
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        self._cast_adapter()
        saved = Path(resume_from_checkpoint) / LOSS_SINCE_LOG_FILE  # absent from a checkpoint of an older release
        self._loss_since_log = json.loads(saved.read_text()) if saved.is_file() else None
        # A run an older release began drew group_by_length's order from the global RNG, as transformers does: it
        # goes on in that order (its checkpoints say so from here on), or the batches a resume skips by count would
        # be another order's, and some rows trained twice in the epoch, others never. In its first epoch that order
        # is drawn again alike; past it, no order is the one it trained, as before.
        self._epoch_seeded_order = self._loss_since_log is not None and self._loss_since_log.get(EPOCH_SEEDED_ORDER, True)

    def _save_checkpoint(self, model, trial):
        # The summed loss of the steps since the last log, and that log's step: a resume starts them at zero and
        # the resumed step, so the first point it logged (logging_steps > 1) was the mean of the resumed steps alone,
        # another point than the uninterrupted run's. A float32 sum as a Python float is exact, so is the sum resumed.
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        staged = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        carried: dict[str, Any] = {"loss_sum": float(self._tr_loss), "last_logged_step": self._globalstep_last_logged,
                                   EPOCH_SEEDED_ORDER: self._epoch_seeded_order}
        # trl's own per-step values since the last log (DPO's rewards, margins, accuracies, log-probs), which its
        # log() averages: without them the first point a resumed run logged had the uninterrupted run's loss but
        # rewards averaged over the resumed steps alone.
        trl_metrics = getattr(self, "_metrics", None)
        if isinstance(trl_metrics, dict) and "train" in trl_metrics:
            carried["metrics_since_log"] = {name: list(values) for name, values in trl_metrics["train"].items()}
        # ...and each of those batches' pairs (GuardedDPOTrainer.log weighs the batches by them): without them the
        # resumed point's rewards fell back to trl's mean of batch means: an epoch's last, smaller batch (or the halved
        # micro-batches of an out-of-memory continuation) weighed as a full one.
        pairs = getattr(self, "_pairs", None)
        if isinstance(pairs, dict):
            carried["pairs_since_log"] = list(pairs["train"])
        write_json_atomic(staged / LOSS_SINCE_LOG_FILE, carried)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self._loss_since_log is not None:  # the first step after a resume, before its loss is added
            self._tr_loss += self._loss_since_log["loss_sum"]
            self._globalstep_last_logged = self._loss_since_log["last_logged_step"]
            for name, values in self._loss_since_log.get("metrics_since_log", {}).items():
                self._metrics["train"][name] = values + self._metrics["train"][name]
            if "pairs_since_log" in self._loss_since_log:
                self._pairs["train"] = self._loss_since_log["pairs_since_log"] + self._pairs["train"]
            self._loss_since_log = None
        # Resumed from a checkpoint of the last planned step (the run was lost after it, in the merge
        # say), transformers would take one more step: it looks for the end only after a step. That step
        # changed the adapter (at a constant learning rate) and put step N+1 on the curve. No batches: no step.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # Runs after every optimizer step, before that step's log or checkpoint: a diverged
        # model is never saved. tr_loss accumulates since the last log, so a NaN stays visible.
        step = self.state.global_step
        loss = float(tr_loss)
        norm = float(grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(loss) or not math.isfinite(norm):
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
            raise TrainingError(
                f"training diverged at step {step}: the {what}. Try a lower learning_rate "
                f"(now {self.args.learning_rate}), max_grad_norm > 0 (now {self.args.max_grad_norm}), "
                "or compute_dtype bfloat16/float32 instead of float16."
            )
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)  # type: ignore[misc]

    _loss_since_log: dict | None = None  # from the checkpoint a run resumes, until its first step
    # group_by_length's order is EpochSeededLengthGroupedSampler's; False for a run an older release began
    _epoch_seeded_order: bool = True

    # The attributes the trainers this mixes into have (for type checkers).
    _tr_loss: torch.Tensor
    _globalstep_last_logged: int
    _pairs: dict[str, list[int]]  # GuardedDPOTrainer's: the pairs of each batch since the last log
    model: Any
    args: Any
    state: Any
    control: Any


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from a generator seeded by the data seed and the epoch, as accelerate
    seeds the plain random order (SeedableRandomSampler): an epoch's order is the same in a run resumed in it.

    transformers' sampler draws from the global RNG when the epoch starts, and a resume restores the RNG state only
    after that: resumed past its first epoch, a run trained another order than the one it resumes, some rows twice in
    the epoch and others not at all (the Trainer skips the batches already trained by count, not by row)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it before each epoch, a resumed one too
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class GuardedSFTTrainer(TrainerGuards, SFTTrainer):
    """trl's SFTTrainer with the recipe's guards, a length-grouped order that a resume continues
    (EpochSeededLengthGroupedSampler), and an eval loss per token whatever the batch size.

    transformers averages the eval batches' losses weighing each by its rows (by 1 where trl's padding-free
    collator makes a batch one row), and each is its batch's mean per token: the eval loss then depends on the
    batch size, the micro-batch here (huggingface/transformers#39241), so it moved when an out-of-memory
    continuation halved the micro-batch, and it was not the report's loss per token (report.mean_loss). Here
    each batch's token sum and count are added up as it is evaluated, and the eval loss is their quotient."""

    _eval_sums: list | None = None  # [summed loss, trained tokens] while an evaluation runs

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and self._epoch_seeded_order:  # training.group_by_length
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, self.args.data_seed)
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._eval_sums is not None and not self.model.training:
            loss = result[0] if return_outputs else result
            # The tokens trl's loss averages over: each label but a row's first (predicted from the ones before;
            # a padding-free batch's later rows start with -100 too).
            tokens = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
            self._eval_sums[0] += loss.detach().double() * tokens
            self._eval_sums[1] += tokens
        return result

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums = [0.0, 0]
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            total, tokens = self._eval_sums
        finally:
            self._eval_sums = None
        if f"{metric_key_prefix}_loss" in output.metrics and int(tokens):
            output.metrics[f"{metric_key_prefix}_loss"] = float(total / tokens)
        return output


class GuardedDPOTrainer(TrainerGuards, DPOTrainer):
    """trl's DPOTrainer with the recipe's guards, on rows tokenized by tokenization.encode_preferences.

    The reference is what trl makes of a PeftModel passed without a peft_config: a fresh adapter's
    reference is the base (the adapter switched off for the reference pass); a started adapter
    (initial_adapter) gets a frozen copy of itself as a second adapter named "ref". Either way one copy
    of the 4-bit base is in memory."""

    # trl's metrics that are a mean over the batch's pairs (the curve's rewards, and the log-probabilities beside them).
    PER_PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                        "logps/rejected")

    def __init__(self, *args, **kwargs):
        self._pairs: dict[str, list[int]] = {"train": [], "eval": []}  # pairs of each batch since the last log
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Already tokenized and truncated by encode_preferences, the one preflight reports: what trains is
        # what it counted. (trl would tokenize again; its result is the same, by tests/training/test_dpo.py.)
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # The collator stacks each pair's two sides: the batch's pairs are half its rows.
        self._pairs["train" if self.model.training else "eval"].append(inputs["input_ids"].shape[0] // 2)
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # trl logs each metric as the mean of its batches' means: an evaluation of 5 pairs in batches of 4 gave the
        # last pair the weight of the other four (reward_accuracy 0.25 where 2 of 5 pairs were won), in the curve and
        # the report's rewards, which say they are the share (the mean) over the validation pairs. Each batch's mean
        # is weighed here by its pairs, so the point is the mean over the pairs. (The eval loss is: transformers
        # weighs each batch's loss by its rows.)
        mode = "train" if self.model.training else "eval"
        pairs, self._pairs[mode] = self._pairs[mode], []
        metrics = self._metrics[mode]
        for key in self.PER_PAIR_METRICS:
            if key in metrics and len(metrics[key]) == len(pairs) and sum(pairs):
                metrics[key] = [sum(m * n for m, n in zip(metrics[key], pairs, strict=True)) / sum(pairs)]
        super().log(logs, start_time)


def run(spec: JobSpec, train_path: str | Path, out_dir: str | Path, **options: Any) -> RunResult:
    """Train, evaluate, save and merge one job; `options` are QLoRARecipe's keyword arguments."""
    recipe = QLoRARecipe(spec, train_path, out_dir, **options)
    try:
        return _run(recipe)
    finally:
        if recipe.host_claims is not None:  # its process may go on (a test, a notebook): no claim outlives the run
            recipe.host_claims.withdraw()


def _run(recipe: QLoRARecipe) -> RunResult:
    with recipe.out_of_memory_in("loading the base model", "a GPU class with more memory"):
        recipe.setup()
    # Asked while the base loaded (minutes, for a large model): not one step after it. A pause then has no new
    # step to save: the run resumes from the checkpoint it loaded, or from the start.
    if recipe.cancel():
        return recipe.summarize(TrainingEnd("cancelled", recipe.resumed_step))
    if recipe.pause():
        return recipe.summarize(TrainingEnd("paused", recipe.resumed_step))
    ended = recipe.train()
    if ended.stopped_early:  # cancelled: nothing to keep; paused: its checkpoint is what a resume needs
        return recipe.summarize(ended)
    try:
        with recipe.out_of_memory_in("the final evaluation", "a smaller per_device_batch_size (evaluation uses it "
                                     "too), or a GPU class with more memory"):
            eval_loss = recipe.evaluate()
        recipe.save_adapter()
        with recipe.out_of_memory_in("merging the adapter into the base", "output.merge false (the adapter is "
                                     "saved; merge it where there is memory), or a GPU class with more memory"):
            fidelity = recipe.merge_and_measure_fidelity()  # None where the spec asks for the adapter alone
        with recipe.out_of_memory_in("the eval report", "fewer eval.prompts or a smaller eval.max_new_tokens, "
                                     "or eval.prompts 0"):
            report = recipe.eval_report()  # None where spec.eval.prompts is 0
    except CancelledAfterTraining:
        return recipe.summarize(TrainingEnd("cancelled", ended.step))
    recipe.cleanup()
    return recipe.summarize(ended, eval_loss=eval_loss, merge_fidelity=fidelity, report=report)


class WithdrawHostClaim(TrainerCallback):
    """Withdraws the run's claim on the host's memory (host_claims) once its first step has run: what it claimed
    (its datasets, encoded; its offloaded activations, pinned; a paged optimizer's state) is held by then, and
    MemAvailable says so to the runs that start after."""

    def __init__(self, claims: HostClaims):
        self.claims = claims

    def on_step_end(self, args, state, control, **kwargs):
        self.claims.withdraw()


class CancelledAfterTraining(Exception):  # noqa: N818 (a request obeyed, not an error)
    """The cancel hook said yes after the last optimizer step: the steps after training (an evaluation,
    a merge, a report: minutes each on a large model) each ask it before they begin, as training asks
    it after each step, so a cancel then ends the run cancelled instead of being ignored to the end."""


class QLoRARecipe:
    """One run, one method per step of its lifecycle, called in order by `run()`: setup → train →
    evaluate → save adapter → merge → eval report → cleanup → summarize. Each step keeps on `self` what later
    steps need."""

    def __init__(
        self,
        spec: JobSpec,
        train_path: str | Path,
        out_dir: str | Path,
        *,
        validation_path: str | Path | None = None,
        resume: bool = False,
        registry: Mapping[str, str | Path] | None = None,
        sink: Sink | None = None,
        cancel: Callable[[], bool] | None = None,
        pause: Callable[[], bool] | None = None,
        quantized_cache: Path | None = None,
        initial_adapter: Path | None = None,
        base_model_id: str | None = None,
        base_model_revision: str | None = None,
        progress: bool = False,
        extra_callbacks: tuple = (),
        host_memory: int | None = None,
        max_paged_fraction: float = MAX_PAGED_FRACTION,
        disk_free: int | None = None,
        merge_shard_size: str = MERGED_SHARD_SIZE,
        host_claims: Path | None = None,
        provenance: Mapping[str, str | None] | None = None,
    ):
        # The start, then the end of each phase: setup, train, save_adapter, merge, report (summary's durations_s).
        self.clock = [time.monotonic()]
        self.spec = spec
        self.train_path = train_path
        self.validation_path = validation_path
        self.resume = resume
        self.registry = registry
        self.sink = sink
        self.cancel = cancel or (lambda: False)
        self.pause = pause or (lambda: False)
        self.quantized_cache = quantized_cache
        # A saved adapter (adapter_config.json + adapter_model.safetensors) to start from instead of a fresh one.
        self.initial_adapter = Path(initial_adapter) if initial_adapter is not None else None
        # What the adapter names its base (adapter_config.json's base_model_name_or_path and revision, its model
        # card): where the base was loaded from is a directory of the machine that trained it (a worker's model
        # path, or its attempt's quantized copy), of no use to whoever downloads the adapter. The service gives
        # the registry's hub id; else the job spec's base_model, as the user named it.
        self.base_model_id = base_model_id or spec.base_model
        self.base_model_revision = base_model_revision
        # How much of a paged optimizer's state may page out when "auto" is decided here (the worker's
        # QLORA_MAX_PAGED_FRACTION, as admission has it).
        self.max_paged_fraction = max_paged_fraction
        self.progress = progress
        self.extra_callbacks = extra_callbacks
        # The host memory this run may take (offloaded activations, a paged optimizer's overflow, a merge on the
        # CPU); None: what the host has available when each is checked (MemAvailable).
        self.host_memory = host_memory
        # Where the training processes of this host claim the host memory they will hold (worker/training/
        # host_claims.py: a worker's work directory); None: no other run on this host is counted.
        self.host_claims = HostClaims(host_claims, label=str(out_dir)) if host_claims is not None else None
        # The disk space the merged model's files may take; None: what the output directory's disk has free.
        self.disk_free = disk_free
        self.merge_shard_size = merge_shard_size  # the largest of the merged model's safetensors files
        # The service's ids of what made the run (job, dataset, validation_dataset, initial_job), for the model card.
        self.provenance = provenance
        self.merge_plan: MergePlan | None = None  # how it was built, where output.merge asked for it
        self.out = Path(out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_file = self.out / "metrics.jsonl"
        self.trained: dict = {}  # the summary's account of training, once it ran (_measure_training)

    def emit(self, record: Record) -> None:
        """Every record to the caller's sink; the loss curve (train and eval points) also to metrics.jsonl."""
        if isinstance(record, (TrainPoint, EvalPoint)):
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record_to_json(record)) + "\n")
        if self.sink is not None:
            self.sink(record)

    @contextlib.contextmanager
    def out_of_memory_in(self, what: str, try_this: str) -> Iterator[None]:
        """An out-of-memory in `what` (a step of the run outside training's, which train() names itself) as
        a TrainingError saying where and what to try: the job fails with that, once, where a crash would
        lose its attempt and run it again to the same end."""
        try:
            yield
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            device = getattr(self, "device", "cpu")
            where = torch.cuda.get_device_name() if device == "cuda" else device
            error = TrainingError(f"out of memory on {where} in {what}; try {try_this}")
            state = getattr(self, "state", None)  # none before training
            self.emit(Event(type="failed", level="error", step=state.global_step if state else 0, message=str(error)))
            raise error from None

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        """Everything training needs; the cheap checks (spec, data, output directory) before the model loads."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._setup_data()  # first: "auto" is decided (_setup_device) for what its datasets leave of the host
        self._pick_device()
        # The host's memory decided on (the "auto" savers), checked and claimed as one, under the lock of the host's
        # claims: a run starting beside this one decides after it, counting its claim. Only that under the lock, which
        # every run starting on the host waits for: the device (CUDA's start) and the data's hashes are read before.
        with self.host_claims.locked() if self.host_claims is not None else contextlib.nullcontext():
            self._setup_device()
            self._setup_run_dir()
            self._check_host_memory()
            if self.host_claims is not None:  # withdrawn after the first step (WithdrawHostClaim), or as it ends
                self.host_claims.claim(self.host_need)
        self._setup_tokenizer()
        self._encode_data()
        if self.host_claims is not None:  # the datasets are held now, in MemAvailable: what is left to take, the step's
            self.host_claims.claim(self.host_need - sum(dataset_host_parts(self.dataset_tokens).values()))
        self._setup_model()
        self._setup_trainer()
        self.clock.append(time.monotonic())

    def _pick_device(self) -> None:
        """The device, its memory and the base model's local path. Before the lock of the host's claims (setup):
        reading a GPU's memory starts CUDA, seconds, and for ever on a GPU fallen off its bus, where every other run
        starting on the host waited on the lock behind it."""
        self.device = pick_device()
        self.gpu_memory = _gpu_memory(self.device)
        self.base_path = resolve_base_model(self.spec.base_model, self.registry)

    def _setup_device(self) -> None:
        """What the spec leaves to the machine, each "auto" decided for _pick_device's device: per_device_batch_size,
        activation_offload and tiled_mlp (by the estimate, against the GPU's memory and the host's, less what the
        datasets hold there: steps_host_budget, as admission and `qlora estimate` count it), packing, kernels and
        compute_dtype (by what the device and its libraries run).
        _setup_run_dir then keeps what an interrupted run of the job decided instead."""
        self.requested_spec = self.spec  # as given: a resume keeps the interrupted run's "auto" decisions
        self.spec = _decide_speed_and_precision(
            _fit_to_device(self.spec, self.base_path, self.gpu_memory, self.max_paged_fraction,
                           keeps_reference_adapter(self.spec, self.initial_adapter is not None),
                           self._host_available(), self.dataset_tokens), self.device)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the run computes in: the spec's, decided for this device (_setup_device) or kept from the
        interrupted run (_setup_run_dir)."""
        return getattr(torch, self.spec.quantization.compute_dtype)

    def _check_host_memory(self) -> None:
        """TrainingError, before the base loads, where the host memory the run holds (the estimate's host parts:
        offloaded activations, pinned; the paged optimizer's overflow; and its datasets, read and encoded, for the
        whole run) can never be had here: more than the run may take (`host_memory`, given), or, without that,
        more than the host has in all. Pinning them failed at the first step, after the load and the wait, or the
        kernel killed the process (the datasets: as they were encoded, or in training). More than the host has
        available only now (another GPU's job merging on the CPU, say) is said in a warning, and the run goes
        on: a failure is for good, and the memory may be free by then. Admission checks it against
        QLORA_HOST_MEMORY where the class's is given."""
        t = self.spec.training
        parts: dict[str, int] = {}
        estimate = None
        if t.activation_offload is True or t.optimizer in PAGED_OPTIMIZERS:  # else a step holds none by design
            try:
                config = json.loads((self.base_path / "config.json").read_text())
                estimate = estimate_peak_memory(self.spec, config, reference_adapter=keeps_reference_adapter(
                    self.spec, self.initial_adapter is not None))
                parts = estimate.host_parts(self.gpu_memory)
            except (OSError, ValueError):
                pass  # a config the estimate cannot read: loading the model says what is wrong with it
        parts |= dataset_host_parts(self.dataset_tokens)
        available = self._host_available()
        need = self.host_need = sum(parts.values())
        if need <= available:
            return
        held = describe_host_memory(parts)
        if self.host_memory is None:
            total = total_host_memory()
            if need <= total:
                claimed = self.host_claims.others() if self.host_claims is not None else 0
                self.emit(Event(type="host_memory_short", level="warning", step=0, message=(
                    f"this job holds {held} and this host has {gib(available)} available now (of {gib(total)}"
                    + (f"; less {gib(claimed)} that other training runs here claimed and have not taken yet"
                       if claimed else "")
                    + "): it goes on, and runs out of memory if the host's other work still holds it then"),
                    data={"host_needed_bytes": need, "host_available_bytes": available, "host_claimed_bytes": claimed}))
                return
        limit, has = (available, f"{gib(available)} available") if self.host_memory is not None else \
            (total, f"{gib(total)} in all")
        if estimate is None or need - parts.get(HOST_DATASET, 0) <= limit:  # its steps alone would fit: its datasets not
            raise TrainingError(f"dataset: this job holds {held} and this host has {has}; try training on fewer rows "
                                "per job (a later job can start from this one's adapter), or a host with more memory")
        field = "training.activation_offload" if estimate.offload else "training.optimizer"
        fix = ("activation_offload false (on a GPU that holds the activations), a shorter max_seq_length or a smaller "
               "micro-batch" if estimate.offload else "a GPU class with more memory, so less of it pages")
        raise TrainingError(f"{field}: this job holds {held} and this host has {has}; try {fix}, or a host with more "
                            "memory")

    def _setup_data(self) -> None:
        self.train_data = read_jsonl(self.train_path)
        self.val_data = read_jsonl(self.validation_path) if self.validation_path else None
        # Their tokens as the service estimates them on upload, each set's (admission sums the two): what their
        # host memory is counted by, here as there.
        self.dataset_tokens = sum(token_estimate(sum(example.chars() for example in data.examples))
                                  for data in (self.train_data, self.val_data) if data is not None)
        method = self.spec.method.type
        for name, data in (("training", self.train_data), ("validation", self.val_data)):
            if data is not None and data.format not in METHOD_FORMATS[method]:
                raise TrainingError(f"method {method} trains on {' or '.join(METHOD_FORMATS[method])} rows, and the "
                                    f"{name} data is in {data.format} format; use a dataset of the right format, or "
                                    f"set method.type to {'dpo' if data.format == 'preference' else 'sft'}")
        # Hashed here, before the lock of the host's claims (setup): a 2 GiB file takes seconds, which no other run
        # starting on the host waits for. What a resumed run's data is compared by (_check_run_dir).
        self.train_sha256 = _sha256(self.train_path)
        self.validation_sha256 = _sha256(self.validation_path) if self.validation_path else None
        self.initial_adapter_sha256 = None
        if self.initial_adapter is not None:
            try:
                self.initial_adapter_sha256 = adapter_sha256(self.initial_adapter)
            except FileNotFoundError as exc:
                raise TrainingError(f"initial adapter: {exc}") from None

    def _setup_run_dir(self) -> None:
        """The checkpoint to resume from, if any; a clean staging directory; the loss curve up to it."""
        own = self.spec  # what this worker decides for "auto" by itself
        self.resume_from, self.spec, unheld = _check_run_dir(
            self.out, self.ckpt_dir, self.spec, self.requested_spec, self.train_sha256, self.validation_sha256,
            self.resume, self.initial_adapter_sha256, self.device)
        self.resumed_step = int(self.resume_from.name.split("-")[1]) if self.resume_from else 0
        self.staging = checkpoints.clear_staging(self.ckpt_dir)  # a crash mid-save leaves junk only here
        _drop_metrics_after(self.metrics_file, self.resumed_step)  # steps logged after the checkpoint are redone
        self.emit(Event(type="started", level="info", step=self.resumed_step,
                        message=f"resuming from step {self.resumed_step}" if self.resume_from else "training started"))
        for event in _decisions_events(self.requested_spec, own, self.spec, unheld, self.resumed_step):
            self.emit(event)
        optimizer = self.spec.training.optimizer
        if self.device == "cpu" and optimizer.startswith("paged_"):  # bitsandbytes' own warning is left out (stack.py)
            self.emit(Event(type="optimizer_unpaged", level="info", step=self.resumed_step,
                            message=f"on the CPU, training.optimizer {optimizer} runs unpaged: its state is in host "
                                    "memory already, where paging would move it on a GPU"))

    def _setup_tokenizer(self) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path, local_files_only=True, trust_remote_code=False)
        self.base_padding_side = self.tokenizer.padding_side  # what the shipped tokenizer keeps (_save_tokenizer)
        self.tok_setup = prepare_tokenizer(self.tokenizer)

    def _encode_data(self) -> None:
        t = self.spec.training
        # Each set becomes the trainer's dataset as it is encoded, a batch of rows at a time (rows_dataset): held
        # whole as Python lists, the rows took ~49 bytes a token for the whole run.
        if self.spec.method.type == "dpo":  # rows of prompt_ids, chosen_ids, rejected_ids
            def encode(examples):
                stats = EncodeStats.for_pairs()
                rows = kept_pairs(examples, self.tokenizer, stats, max_seq_length=t.max_seq_length)
                return rows_dataset(rows, ("prompt_ids", "chosen_ids", "rejected_ids")), stats
        else:  # rows of input_ids, labels
            def encode(examples):
                stats = EncodeStats()
                rows = kept_rows(examples, self.tokenizer, stats, max_seq_length=t.max_seq_length,
                                 train_on_inputs=t.train_on_inputs)
                return rows_dataset(rows, ("input_ids", "labels")), stats
        self.train_rows, self.train_stats = encode(self.train_data.examples)
        self.val_rows, self.val_stats = encode(self.val_data.examples) if self.val_data else ([], None)
        if not self.train_rows:
            ties = self.train_stats.tied_rows
            raise TrainingError(
                f"no training rows left: all {self.train_stats.rows} had nothing to learn within "
                f"max_seq_length={t.max_seq_length}; raise max_seq_length"
                + (f" ({ties} of them are pairs whose two answers are the same tokens within it: make the answers "
                   "differ)" if ties else "")
            )
        if self.val_data and not self.val_rows:  # the service's preflight refuses such a job; the engine alone says so
            self.emit(Event(
                type="validation_empty", level="warning", step=self.resumed_step,
                message=f"no validation row has anything to evaluate within max_seq_length={t.max_seq_length}: "
                        "the run has no evaluation, and the report prompts from the train set"))
        if not self.val_rows and self.spec.validation_needed_by():
            field, why = self.spec.validation_needed_by()[0]
            raise TrainingError(f"{field}: there is no validation set (or none of its rows has a trained token left "
                                f"within max_seq_length={t.max_seq_length}); this setting {why}")
        for name, stats in (("training", self.train_stats), ("validation", self.val_stats)):
            if stats is not None and stats.truncated_rows:
                self.emit(Event(type="data_truncated", level="warning", step=self.resumed_step,
                                message=truncation_warning(name, stats, t.max_seq_length),
                                data={"set": name, "truncated_rows": stats.truncated_rows,
                                      "dropped_rows": stats.dropped_rows, "dropped_lines": stats.dropped_lines[:20]}))

    def _setup_model(self) -> None:
        """The base (4-bit, or loaded pre-quantized from the cache) with fresh LoRA adapters on it."""
        spec = self.spec
        set_seed(spec.training.seed)
        self.speedups = resolve_speedups(spec.training, self.device, spec.method.type)
        self.cache_hit = cache_holds(self.quantized_cache, self.compute_dtype)
        model = load_base_model(self.base_path, spec.quantization, self.compute_dtype, self.device,
                                attention=self.speedups.attention, quantized_cache=self.quantized_cache)
        check_quantized(model, spec.quantization)
        # what the model runs, where its class had no SDPA path (supported_attention)
        self.speedups = replace(self.speedups, attention=model.config._attn_implementation)
        if self.quantized_cache is not None and spec.quantization.bits != "none":
            self.emit(Event(type="base_loaded", level="info", step=self.resumed_step,
                            message="loaded the pre-quantized base from the cache" if self.cache_hit
                            else "quantized the base model; saved for the cache"))
        # No KV cache in training: besides wasting memory, a cache hides packed rows' restarting
        # position ids from the attention mask, which would then let examples attend to each other.
        model.config.use_cache = False
        rows = model.get_input_embeddings().weight.shape[0]
        # The rows a started adapter or the checkpoint to resume carries too (from before a pad was no longer added).
        fit_embeddings(model, self.tokenizer, self.initial_adapter, self.resume_from)
        t = spec.training
        self.offload = ActivationOffload() if t.activation_offload is True else None
        model = prepare_for_training(model, spec.quantization, self.compute_dtype, t.gradient_checkpointing,
                                     offload=self.offload)
        self.target_modules = resolve_target_modules(model, spec.lora.target_modules)
        config = lora_config(spec.lora, self.target_modules)
        if self.initial_adapter is not None:
            try:
                self.model = load_initial_adapter(model, self.initial_adapter, config)
            except ValueError as exc:
                raise TrainingError(str(exc)) from None
        else:
            self.model = get_peft_model(model, config)
        # Rows grown past the base's (a pad row added for training, or those a started adapter carries): the adapter
        # carries the grown embeddings and head. peft would decide that by reading the base's config.json at the
        # path the adapter names, no longer this machine's (save_adapter).
        self.embeddings_resized = self.model.get_input_embeddings().weight.shape[0] != rows
        if self.speedups.liger:
            # On this model, here, rather than by the trainer (use_liger_kernel), which patches at train()
            # and would write Liger's MLP forward over the tiled one. The loss stays trl's chunked head,
            # as trl asks (fused_linear_cross_entropy off).
            from transformers.integrations.liger import apply_liger_kernel

            apply_liger_kernel(self.model, {"fused_linear_cross_entropy": False})
        if t.tiled_mlp is True:  # after the adapter is in place: the MLP's LoRA layers run inside each chunk
            tile_mlps(self.model, mlp_tile_tokens(model.config.hidden_size))
        self.trainable_params, self.total_params = self.model.get_nb_trainable_parameters()

    def _setup_trainer(self) -> None:
        self.stop = StopCallback(self.cancel, self.pause)
        # training.early_stopping and output.use_best_checkpoint; with the latter it keeps the best weights
        self.best = BestEvalCallback(self.emit, patience=self.spec.training.early_stopping, resume_from=self.resume_from,
                                     model=self.model if self.spec.output.use_best_checkpoint else None)
        self.metrics = metrics = MetricsCallback(self.emit, self.device, method=self.spec.method.type)
        callbacks = [metrics, self.stop, HealthCallback(self.emit, self.spec), self.best,
                     CheckpointCallback(self.ckpt_dir, self.staging, self.emit, KEEP_CHECKPOINTS,
                                        extra_files=[self.best.write_into, _drop_load_kwargs])]
        if self.host_claims is not None:
            callbacks.append(WithdrawHostClaim(self.host_claims))
        if self.progress:
            callbacks.append(RichProgressCallback())
        trainer = GuardedDPOTrainer if self.spec.method.type == "dpo" else GuardedSFTTrainer
        self.trainer = trainer(
            adapter_dtype=getattr(torch, self.spec.lora.dtype),
            model=self.model,
            args=_trainer_args(self.spec, self.staging, self.compute_dtype, self.device, self.speedups,
                               has_eval=bool(self.val_rows)),
            train_dataset=self.train_rows,
            eval_dataset=self.val_rows or None,
            processing_class=self.tokenizer,
            callbacks=[*callbacks, *self.extra_callbacks],
        )
        self.trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout; the sink and progress bar replace them

    # ---------------------------------------------------------------- train

    def train(self) -> TrainingEnd:
        """Train from the resume point to the last planned step, or until the cancel or pause hook
        says stop; a divergence or an out-of-memory ends the run with a TrainingError."""
        self.emit(phase_event("training", f"training from step {self.resumed_step}", step=self.resumed_step))
        try:
            try:
                self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                step = self.trainer.state.global_step + 1
                go_on = self.spec.training.on_out_of_memory == "smaller_micro_batch"
                raise OutOfMemoryInTraining(out_of_memory_message(self.spec, step, self.device),
                                            smaller_micro_batch(self.spec.training) if go_on else None) from None
        except TrainingError as exc:
            if isinstance(exc, OutOfMemoryInTraining) and exc.smaller is not None:
                # Not the job's end where a worker runs it: it continues from its newest checkpoint with a
                # smaller micro-batch (worker/supervisor.py), and says so in the event that follows; what to
                # try by hand is for the end of `qlora train`, the exception's message.
                step = self.trainer.state.global_step
                self.emit(Event(type="out_of_memory", level="warning", step=step,
                                message=out_of_memory_at(self.spec, step + 1, self.device)))
            else:
                self.emit(Event(type="failed", level="error", step=self.trainer.state.global_step, message=str(exc)))
            raise
        self.clock.append(time.monotonic())
        self.state = self.trainer.state  # the trainer made it anew in train(); it outlives the trainer (merge frees it)
        self.trained = self._measure_training()
        return self.stop.stopped or TrainingEnd("finished", self.state.global_step)

    def _measure_training(self) -> dict:
        """The summary's account of training, measured as it ends: before evaluation and the merge add to the peak."""
        state = self.state
        train_losses = [log["loss"] for log in state.log_history if "loss" in log]
        t_setup, t_train = self.clock[1:3]  # the ends of setup and of training
        # The speed of this training alone: a resumed run's count includes the tokens of the steps before its
        # checkpoint, trained by an earlier run in a time not measured here. Divided by this run's time, a run
        # resumed halfway read twice its speed, and one resumed from its last step's checkpoint (nothing left to
        # train) ten times, on a 0.08 s "training". None where this run trained nothing.
        trained_here = state.num_input_tokens_seen - self.metrics.tokens_at_start
        return {
            "steps": {"completed": state.global_step, "planned": state.max_steps, "resumed_from": self.resumed_step},
            "train_loss_first": train_losses[0] if train_losses else None,
            "train_loss_final": train_losses[-1] if train_losses else None,
            "tokens_seen": state.num_input_tokens_seen,
            "tokens_per_second": round(trained_here / max(t_train - t_setup, 1e-9), 1) if trained_here else None,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            # training.activation_offload: the pinned CPU memory the offloaded layer inputs took at most
            "offloaded_activation_bytes": self.offload.peak_held_bytes if self.offload else None,
        }

    def evaluate(self) -> float | None:
        """The final validation loss, where there is a validation set: the trainer's own evaluation when
        the last step was an eval step (the same weights; again, it would cost a pass over the set and
        put a second point at that step on the curve), else a new one, which the metrics callback records."""
        self._unless_cancelled()
        if not self.val_rows:
            return None
        last = next((entry for entry in reversed(self.trainer.state.log_history) if "eval_loss" in entry), None)
        if last is not None and last.get("step") == self.trainer.state.global_step:
            return last["eval_loss"]
        self.emit(phase_event("evaluating", f"evaluating the final weights on {len(self.val_rows):,} validation rows",
                              step=self.trainer.state.global_step))
        return self.trainer.evaluate()["eval_loss"]

    # ---------------------------------------------------------------- save

    def save_adapter(self) -> None:
        self._unless_cancelled()
        self.emit(phase_event("saving", "saving the adapter", step=self.state.global_step))
        shipped = self.best.restore()  # output.use_best_checkpoint: the best evaluation's weights go out
        self.shipped_step = self.state.global_step if shipped is None else shipped.step
        if shipped is not None:
            self.emit(shipped)
        adapter_dir = self.out / "adapter"
        config = self.model.peft_config["default"]
        config.base_model_name_or_path, config.revision = self.base_model_id, self.base_model_revision
        base = self.model.get_base_model()  # what the model card writes as its base_model and its tags
        base.name_or_path = base.config.name_or_path = self.base_model_id
        # The trained adapter alone: not DPO's frozen reference copy ("ref") beside it.
        _replace_dir(adapter_dir, lambda tmp: (self.model.save_pretrained(tmp, safe_serialization=True,
                                                                          selected_adapters=["default"],
                                                                          save_embedding_layers=self.embeddings_resized),
                                               self._save_tokenizer(tmp)))
        self.emit(Event(type="adapter_saved", level="info", step=self.state.global_step,
                        message="adapter saved", data={"path": str(adapter_dir)}))
        self.clock.append(time.monotonic())

    def merge_and_measure_fidelity(self) -> dict | None:
        """merged/: the adapter merged into the base it was trained against, and how faithfully the
        saved model reproduces the trained one. None (and nothing written) where spec.output.merge is off."""
        self._unless_cancelled()
        fidelity = None
        if self.spec.output.merge:
            self.emit(phase_event("merging", "merging the adapter into the base and measuring the merged model's "
                                  "fidelity (output.merge)", step=self.state.global_step))
            rows = fidelity_rows(self._sft_rows(self.val_rows or self.train_rows))
            autocast = self.compute_dtype if self.compute_dtype != torch.float32 else None  # as the trainer ran it
            reference = forward_rows(self.model, rows, autocast_dtype=autocast)
            base_bytes, largest_tensor = loaded_weights(self.model)  # what a streaming merge loads again
            del self.trainer, self.model
            free_memory()
            merge_dtype = getattr(torch, self.spec.output.merge_dtype)
            plan = self.merge_plan = self._plan_merge(merge_dtype, base_bytes, largest_tensor)
            if plan.how == "skipped":  # succeeded with the adapter, rather than killed after training, attempt after attempt
                self.emit(Event(type="merge_skipped", level="warning", step=self.state.global_step, message=plan.why))
            else:
                if plan.why:
                    self.emit(Event(type="merging_on_cpu" if plan.how == "in_memory" else "merging_streamed",
                                    level="info", step=self.state.global_step, message=plan.why))
                fidelity = self._save_merged_and_measure(merge_dtype, plan, reference, rows)
        self.clock.append(time.monotonic())
        return fidelity

    def _plan_merge(self, merge_dtype: torch.dtype, base_bytes: int, largest_tensor: int) -> MergePlan:
        return plan_merge(
            dense_bytes=self._dense_bytes(merge_dtype), merge_dtype=self.spec.output.merge_dtype,
            training_device=self.device, gpu_free=torch.cuda.mem_get_info()[0] if self.device == "cuda" else 0,
            host_available=self._host_available(), base_bytes=base_bytes, largest_tensor_params=largest_tensor,
            disk_free=self.disk_free if self.disk_free is not None else shutil.disk_usage(self.out).free,
            shard_bytes=parse_size(self.merge_shard_size),
            streaming_unsupported=streaming_merge_unsupported(self.spec.quantization))

    def _host_available(self) -> int:
        """`host_memory` where given (this run's own share); else what the host has available less what the other
        runs of this host claimed and have not taken yet (host_claims)."""
        if self.host_memory is not None:
            return self.host_memory
        claimed = self.host_claims.others() if self.host_claims is not None else 0
        return max(available_host_memory() - claimed, 0)

    def _save_merged_and_measure(self, merge_dtype: torch.dtype, plan: MergePlan, reference: list,
                                 rows: list[dict]) -> dict:
        self._save_merged(merge_dtype, plan)
        free_memory()  # the merged model (or the quantized base it was streamed from) went with _save_merged's frame
        # Measure what users download, not what is in memory: reload from disk, where it was built; after a streaming
        # merge, which the host could not hold whole, with the layers past a share of the memory left in the files.
        if plan.how == "streaming":
            memory: dict[int | str, int] = {"cpu": int(FIDELITY_MEMORY_SHARE * self._host_available())}
            if plan.device == "cuda":
                memory[0] = int(MERGE_ON_GPU_SHARE * torch.cuda.mem_get_info()[0])
            reloaded = load_merged_for_fidelity(self.out / "merged", merge_dtype, plan.device, memory,
                                                offload_dir=self.staging / "fidelity-offload")
        else:
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(self.out / "merged", dtype=merge_dtype,
                                                            device_map=device_map(plan.device), local_files_only=True)
        fidelity = {"rows_from": "validation" if self.val_rows else "train", "merge": plan.how,
                    # the modules whose weights stayed in the files, read as each ran (0: the model was loaded whole)
                    "modules_read_from_disk": sum(where == "disk" for where in getattr(reloaded, "hf_device_map", {}).values()),
                    **measure_fidelity(reference, reloaded, rows, device=torch.device(plan.device))}
        del reloaded
        free_memory()
        self.emit(Event(type="merged", level="info", step=self.state.global_step,
                        message=f"merged model saved ({plan.how.replace('_', ' ')}); max |logit diff| "
                                f"{fidelity['max_abs_logit_diff']:.3g}",
                        data={"path": str(self.out / "merged"), "merge": plan.how}))
        return fidelity

    def _dense_bytes(self, merge_dtype: torch.dtype) -> int:
        """The merged model's weights in merge_dtype: the base's, dequantized (the adapter's merge into them)."""
        return (self.total_params - self.trainable_params) * merge_dtype.itemsize

    def _save_merged(self, merge_dtype: torch.dtype, plan: MergePlan) -> None:
        def configure(merged) -> None:
            merged.generation_config.pad_token_id = self.tokenizer.pad_token_id
            merged.generation_config.eos_token_id = stop_token_ids(merged.generation_config.eos_token_id, self.tokenizer)

        _replace_dir(self.out / "merged", lambda tmp: (
            write_merged(plan.how, tmp, base_path=self.base_path, adapter_dir=self.out / "adapter",
                         quant=self.spec.quantization, compute_dtype=self.compute_dtype, merge_dtype=merge_dtype,
                         device=plan.device, tokenizer=self.tokenizer, max_shard_size=self.merge_shard_size,
                         quantized_cache=self.quantized_cache, configure=configure),
            self._save_tokenizer(tmp)))

    def _save_tokenizer(self, directory: Path) -> None:
        """The tokenizer as trained (its chat template, its pad token), padding on the side the base's pads: training
        pads on the right (prepare_tokenizer), and saving that turned a base that pads on the left (Phi-3's) into one
        whose batched generate() continues each shorter prompt after its padding, answering something else."""
        trained = self.tokenizer.padding_side
        self.tokenizer.padding_side = self.base_padding_side
        try:
            self.tokenizer.save_pretrained(directory)
        finally:
            self.tokenizer.padding_side = trained
        _drop_load_kwargs(directory)

    def eval_report(self) -> dict | None:
        """report/report.json: base and tuned answers to the spec's eval prompts, scored, with the loss of
        both (worker/training/report.py). None (and nothing written) where spec.eval.prompts is 0."""
        self._unless_cancelled()
        report = None
        if self.spec.eval.prompts:
            self.emit(phase_event("reporting", "writing the eval report: the base's and the tuned model's answers to "
                                  "the eval prompts", step=self.state.global_step))
            # The report loads the models it compares; the one trained goes first where the merge left it.
            for name in ("trainer", "model"):
                vars(self).pop(name, None)
            free_memory()
            source = "validation" if self.val_data and self.val_rows else "train"
            examples, rows = ((self.val_data.examples, self.val_rows) if self.val_data and source == "validation"
                              else (self.train_data.examples, self.train_rows))
            report = make_report(self.spec, base_path=self.base_path, out_dir=self.out, tokenizer=self.tokenizer,
                                 compute_dtype=self.compute_dtype, device=self.device, examples=examples,
                                 examples_from=source, loss_rows=self._sft_rows(rows),
                                 quantized_cache=self.quantized_cache, rewards=self._reward_movement(),
                                 # After a streaming merge, the model the host could not hold whole: the adapter answers.
                                 merged=self.merge_plan is not None and self.merge_plan.how == "in_memory")
            self.emit(Event(type="report", level="info", step=self.state.global_step, message=describe_report(report),
                            data={"path": str(self.out / REPORT_PATH)}))
        self.clock.append(time.monotonic())
        return report

    def _reward_movement(self) -> dict | None:
        """Method dpo: the rewards on the validation pairs at the first evaluation and at the shipped weights',
        from the trainer's log (a resumed run's holds the evaluations before its checkpoint too)."""
        if self.spec.method.type != "dpo":
            return None
        evaluations = [{"step": entry["step"], "eval_loss": entry["eval_loss"], **rewards(entry, prefix="eval_")}
                       for entry in self.state.log_history if "eval_loss" in entry]
        return reward_movement(evaluations, self.shipped_step, pairs=len(self.val_rows),
                               reference=self._reference_model())

    def _reference_model(self) -> str | None:
        """What DPO's rewards are measured against: a frozen copy of the starting adapter, or the base."""
        if self.spec.method.type != "dpo":
            return None
        return "initial_adapter" if self.initial_adapter is not None else "base"

    def _sft_rows(self, rows: list[dict]) -> list[dict]:
        """Rows of input_ids and labels, what a plain forward scores: a DPO run's are its prompts with the
        preferred answers (the merge's fidelity and the report's loss are the NLL of those answers)."""
        return preferred_rows(rows) if self.spec.method.type == "dpo" else rows

    # ---------------------------------------------------------------- cleanup

    def _unless_cancelled(self) -> None:
        if self.cancel():
            raise CancelledAfterTraining()

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def summarize(self, ended: TrainingEnd, *, eval_loss: float | None = None,
                  merge_fidelity: dict | None = None, report: dict | None = None) -> RunResult:
        """summary.json, and the event that says how the run ended."""
        if ended.stopped_early:
            saved = ""
            if ended.how == "paused":
                saved = (" after saving a checkpoint to resume from" if ended.step > self.resumed_step
                         else f" before training; it resumes from {'this step' if self.resume_from else 'the start'}")
            self.emit(Event(type=ended.how, level="warning" if ended.how == "cancelled" else "info",
                            step=ended.step, message=f"{ended.how} at step {ended.step}{saved}"))
            summary = {"status": ended.how, **self._summary_of_run(),
                       # Stopped in training, its end is now; after it, the steps that ran have their ends.
                       "durations_s": _durations(*self.clock, *([time.monotonic()] if len(self.clock) < 3 else []))}
            write_json_atomic(self.out / "summary.json", summary, indent=2)
            return RunResult(ended.how, self.out, summary)
        summary = {
            "status": "succeeded",
            **self._summary_of_run(),
            "eval_loss_final": eval_loss,
            "perplexity_final": perplexity(eval_loss) if self.spec.method.type == "sft" else None,  # exp(DPO loss): no
            "merge_fidelity": merge_fidelity,
            # why no merged model, where output.merge asked for one
            "merge_skipped": self.merge_plan.why if self.merge_plan and self.merge_plan.how == "skipped" else None,
            "best_eval": self.best.summary(self.state.global_step),  # None where nothing was evaluated
            "report": report["metrics"] if report else None,  # the means; the rows are in report/report.json
            "durations_s": _durations(*self.clock),
        }
        write_json_atomic(self.out / "summary.json", summary, indent=2)
        # Written last, over peft's empty template: the card tells the merge's fidelity and the eval report, which
        # come after the adapter is saved; the adapter goes out (the service's upload) only once the run is done.
        write_model_card(self.out / "adapter", summary, base_model_id=self.base_model_id,
                         base_model_revision=self.base_model_revision, report=report, provenance=self.provenance)
        self.emit(Event(type="finished", level="info", step=self.state.global_step, message="training finished"))
        return RunResult("succeeded", self.out, summary, report)

    def _summary_of_run(self) -> dict:
        """What every summary says, however the run ended: what ran, on what, and how training went."""
        return {
            "spec": self.spec.model_dump(mode="json"),
            "method": self.spec.method.model_dump(mode="json"),
            # The adapter training started from (initial_adapter), or None: a fresh one.
            "initial_adapter": None if self.initial_adapter is None else {
                "path": str(self.initial_adapter), "sha256": self.initial_adapter_sha256},
            "reference_model": self._reference_model(),
            "base_model_path": str(self.base_path),
            "device": self.device,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "target_modules": self.target_modules,
            "speedups": self.speedups.as_dict(),
            "quantized_base": None if self.quantized_cache is None else ("cache" if self.cache_hit else "quantized"),
            "parameters": {"trainable": self.trainable_params, "total": self.total_params},
            "data": {"format": self.train_data.format, "train": self.train_stats.as_dict(),
                     "validation": self.val_stats.as_dict() if self.val_stats else None},
            "tokenizer": self.tok_setup.__dict__,
            **self.trained,
            "versions": _library_versions(),
        }


# What transformers 5's save_pretrained writes into tokenizer_config.json from how this process loaded the
# tokenizer (from a local directory, offline): facts of the machine that trained it, not of the tokenizer, as
# name_or_path is, which transformers leaves out. A loader overwrites both with its own call's (5.x), so they
# change nothing there; they told anyone who reads the download it was to be loaded offline from disk.
TOKENIZER_LOAD_KWARGS = ("local_files_only", "is_local")


def _drop_load_kwargs(directory: Path) -> None:
    """TOKENIZER_LOAD_KWARGS out of the tokenizer_config.json in `directory`: the adapter's, the merged model's,
    and each checkpoint's (the Trainer saves the tokenizer into every checkpoint it writes; CheckpointCallback
    runs this on it before marking it complete). A directory without one (no tokenizer saved) is left as it is."""
    tokenizer_config = directory / "tokenizer_config.json"
    if not tokenizer_config.is_file():
        return
    config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    if any(key in config for key in TOKENIZER_LOAD_KWARGS):
        kept = {key: value for key, value in config.items() if key not in TOKENIZER_LOAD_KWARGS}
        # As transformers writes it.
        tokenizer_config.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def truncation_warning(name: str, stats: EncodeStats, max_seq_length: int) -> str:
    """What max_seq_length cut from a set: the rows truncated and, by their lines, those left out because the cut left
    them nothing to learn (an answer cut off whole is never trained as an empty one), which the summary lists too."""
    was = agreeing(stats.truncated_rows, "was", "were")
    message = (f"{stats.truncated_rows:,} of {counted(stats.rows, f'{name} row')} {was} longer than "
               f"max_seq_length={max_seq_length} and {was} truncated")
    if stats.dropped_rows:
        lines = ", ".join(map(str, stats.dropped_lines[:5])) + (", ..." if stats.dropped_rows > 5 else "")
        message += (f"; {stats.dropped_rows:,} of them had nothing left to {'evaluate' if name == 'validation' else 'learn'} "
                    f"and {agreeing(stats.dropped_rows, 'is', 'are')} left out ({agreeing(stats.dropped_rows, 'line', 'lines')} {lines})")
    return message


def _gpu_memory(device: str) -> int | None:
    """The GPU's memory in bytes; None on the CPU."""
    return torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None


def _fit_to_device(spec: JobSpec, base_path: Path, budget: int | None, max_paged_fraction: float,
                   reference_adapter: bool, host_available: int, dataset_tokens: int) -> JobSpec:
    """What the memory estimate decides for a device of `budget` bytes (None: the CPU): activation_offload and
    tiled_mlp "auto" (on only where the job would not fit without), then per_device_batch_size "auto" (the largest
    micro-batch that fits). A job the service admitted comes with these decided for its GPU class."""
    config = json.loads((base_path / "config.json").read_text())
    try:
        # "auto" is decided on a GPU only, where offload and paging put a step's memory on the host: against what
        # the host has available less what the datasets hold there for the whole run, as admission decides it
        # against QLORA_HOST_MEMORY less theirs.
        return fit_to_device(spec, config, budget, max_paged_fraction, reference_adapter,
                             host_budget_bytes=steps_host_budget(host_available, dataset_tokens) if budget else None)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def out_of_memory_at(spec: JobSpec, step: int, device: str) -> str:
    """Where a training step ran out of memory, and with what."""
    t = spec.training
    where = torch.cuda.get_device_name() if device == "cuda" else device
    return f"out of memory on {where} at step {step} with micro-batch {t.per_device_batch_size} and max_seq_length {t.max_seq_length}"


def out_of_memory_message(spec: JobSpec, step: int, device: str) -> str:
    """out_of_memory_at, and what to change."""
    t = spec.training
    hints = []
    smaller = smaller_micro_batch(t)
    if smaller is not None:
        hints.append(f"per_device_batch_size {smaller['per_device_batch_size']} with gradient_accumulation_steps "
                     f"{smaller['gradient_accumulation_steps']} (same effective batch)")
    hints.append(f"a shorter max_seq_length (now {t.max_seq_length})")
    if not t.gradient_checkpointing:
        hints.append("gradient_checkpointing true")
    elif t.activation_offload is not True:
        hints.append("activation_offload true")
    if t.tiled_mlp is not True:
        hints.append("tiled_mlp true")
    if t.optimizer == "adamw_torch":
        hints.append("optimizer paged_adamw_8bit")
    hints.append("a GPU class with more memory")
    return f"{out_of_memory_at(spec, step, device)}; try " + ", or ".join(hints)


def _trainer_args(spec: JobSpec, staging: Path, compute_dtype: torch.dtype, device: str, speedups: Speedups,
                  has_eval: bool) -> SFTConfig | DPOConfig:
    """The trainer's arguments: what every method shares, then the method's own."""
    t = spec.training
    common: dict[str, Any] = dict(
        output_dir=str(staging),  # checkpoints land here, then CheckpointCallback moves them into place
        num_train_epochs=t.epochs or 1,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        # prepare_for_training enabled it (with the offloading checkpoint where asked); the Trainer would
        # enable it again with its own checkpoint function.
        activation_checkpointing=False,  # transformers 5.23 name; gradient_checkpointing is deprecated
        seed=t.seed,
        data_seed=t.seed,  # same data order on every attempt, so a resume continues the same run
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=device == "cpu",
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach the divergence guard, not be averaged away
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # CheckpointCallback prunes complete checkpoints itself
        max_length=t.max_seq_length,
        use_liger_kernel=False,  # applied to the model in _setup_model, where speedups.liger says
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if spec.method.type == "dpo":
        method = spec.method
        return DPOConfig(
            **common,
            beta=method.beta,
            **_dpo_loss(method.loss, method.label_smoothing),
            # What DataCollatorForPreference does with max_length, and what encode_preferences counted.
            truncation_mode="keep_start",
            # The reference pass runs beside each step (no pass over the data before training): a resume
            # needs no cache of reference log-probs, and it costs one no-grad forward per step.
            precompute_ref_log_probs=False,
            padding_free=False,  # trl 1.16 has none for DPO; sequences are padded per batch
            # trl's default: dropout would make the policy's log-probs noisy against the reference's, so
            # lora.dropout does not apply to a DPO run.
            disable_dropout=True,
        )
    return SFTConfig(
        **common,
        packing=speedups.packing,
        packing_strategy="bfd",  # best-fit decreasing; implies padding-free rows with restarting position ids
        eval_packing=False,  # evaluate example by example, so eval loss means the same packed or not
        train_sampling_strategy="group_by_length" if speedups.group_by_length else "random",
        # Unpacked, trl's preparation of rows already encoded (kept_rows: truncated to max_seq_length, each with a
        # trained token) changes nothing (the same batches, tests/training/test_rows.py) and copies the rows once
        # more, ~8 bytes a token for the whole run (bench/rows_bench.py): the trainer takes them as they are. Packed,
        # it packs them: prepared (the flag is the trainer's, for the eval rows too).
        dataset_kwargs=None if speedups.packing else {"skip_prepare_dataset": True},
    )


def _dpo_loss(loss: str, label_smoothing: float) -> dict[str, Any]:
    """DPOConfig's loss_type, loss_weights and label_smoothing for the spec's method.loss and label_smoothing.

    label_smoothing ε on the sigmoid loss is conservative DPO (cDPO, the README's "share of pairs you believe are
    mislabelled"): -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ). trl 1.16's "sigmoid" loss ignores label_smoothing (only its
    "robust", "exo_pair" and "aot" losses read it), so passing it there trained plain DPO, whatever ε the job
    asked for. trl has no cDPO loss, but its robust loss, (-(1-ε)·logσ(βΔ) + ε·logσ(-βΔ)) / (1-2ε), weighed
    against its sigmoid loss gives it exactly: 2(1-ε)·sigmoid - (1-2ε)·robust = cDPO (trl sums the losses of
    loss_type, each times its weight)."""
    if loss == "sigmoid" and label_smoothing > 0:
        return {"loss_type": ["sigmoid", "robust"], "loss_weights": [2 * (1 - label_smoothing), -(1 - 2 * label_smoothing)],
                "label_smoothing": label_smoothing}
    return {"loss_type": [loss], "label_smoothing": label_smoothing}


def _check_run_dir(out: Path, ckpt_dir: Path, spec: JobSpec, requested: JobSpec, train_sha256: str,
                   validation_sha256: str | None,
                   resume: bool, initial_adapter_sha256: str | None, device: str,
                   ) -> tuple[Path | None, JobSpec, list[Unheld]]:
    """Refuse to mix runs: resume only the same spec on the same data from the same starting adapter; never
    silently restart over checkpoints. Returns the checkpoint to resume from (None: a fresh run), the
    spec to run: `spec` (fitted to this device from `requested`), with a resumed run's own decisions for
    what `requested` left "auto", and those of its decisions this `device` cannot run (this run's instead)."""
    manifest_path = out / "run.json"
    latest = checkpoints.latest_complete(ckpt_dir)
    resuming = manifest_path.exists() and latest is not None
    if resuming and not resume:
        raise TrainingError(
            f"{out} already holds a run with checkpoints (newest: {latest.name}); "
            "pass --resume to continue it, or choose an empty output directory")
    previous = json.loads(manifest_path.read_text()) if resuming else {}
    written = previous.get("spec") if isinstance(previous.get("spec"), dict) else {}
    unheld: list[Unheld] = []
    if resuming:
        spec, unheld = _as_decided_before(requested, spec, written, device)
    manifest = {
        "spec": spec.model_dump(mode="json"),
        "train_sha256": train_sha256,
        "validation_sha256": validation_sha256,
        "initial_adapter_sha256": initial_adapter_sha256,  # None: a fresh adapter (and a run.json from before it)
    }
    if not resuming:
        write_json_atomic(manifest_path, manifest, indent=2)
        return None, spec, []
    # The interrupted run's spec as this version reads it: a field added since (a new release between a
    # pause and its resume) takes its default, as the job's stored spec does, and a decided one this
    # run's decision: the interrupted run had none to keep (a field added since, or one an earlier release
    # left "auto" in run.json, as it did compute_dtype, packing and kernels), or one this device cannot run.
    asked = requested.model_dump(mode="json")
    try:
        filled = JobSpec.model_validate(written, context=STORED).model_dump(mode="json")
        for section, field in DECIDED_ON_THE_DEVICE:
            part = written.get(section, {})  # a present section validated: a dict
            if (field not in part or part[field] == "auto" and asked[section][field] == "auto"
                    or (section, field) in {u[:2] for u in unheld}):
                filled[section][field] = manifest["spec"][section][field]
        previous["spec"] = filled
    except (ValueError, TypeError):
        pass  # not a spec this version reads: it differs
    def compared(key: str, value):
        return _rows_per_step(value) if key == "spec" else value
    changed = [k for k in manifest if compared(k, previous.get(k)) != compared(k, manifest[k])]
    if changed:
        raise TrainingError(
            f"cannot resume: {', '.join(changed)} differ from the interrupted run in {out}; "
            "resume with the same spec and data, or start in an empty output directory")
    # A smaller micro-batch since, a decision this device cannot run, or one the interrupted run left "auto":
    # run.json says what runs now.
    if written != manifest["spec"]:
        write_json_atomic(manifest_path, manifest, indent=2)
    return latest, spec, unheld


def _rows_per_step(spec):
    """A spec with its micro-batch and gradient accumulation as their product, the rows of one optimizer step:
    a run continued with a smaller micro-batch and more accumulation (smaller_micro_batch, after running out of
    memory) is the same run, in the same data order, with the same gradients up to float rounding."""
    if not isinstance(spec, dict) or not isinstance(spec.get("training"), dict):
        return spec
    training = dict(spec["training"])
    micro, accumulation = training.pop("per_device_batch_size", None), training.pop("gradient_accumulation_steps", None)
    whole = isinstance(micro, int) and isinstance(accumulation, int)
    training["rows per step"] = micro * accumulation if whole else (micro, accumulation)
    return {**spec, "training": training}


# What a run decides for its device where the spec says "auto" (_fit_to_device, _decide_speed_and_precision), as
# (section, field). Each is written into run.json's spec, which travels inside every checkpoint, and a resume
# keeps it: packing decides which rows make each step (a resume that packed otherwise would skip or repeat rows
# at the checkpoint's data position), the compute dtype and the kernels the numbers of every step.
DECIDED_ON_THE_DEVICE = (("training", "per_device_batch_size"), ("training", "activation_offload"),
                         ("training", "tiled_mlp"), ("training", "packing"), ("training", "kernels"),
                         ("quantization", "compute_dtype"))
# (section, field, the interrupted run's decision, why this device cannot run it): _as_decided_before
Unheld = tuple[str, str, Any, str]


def _decide_speed_and_precision(spec: JobSpec, device: str) -> JobSpec:
    """`spec` with compute_dtype, packing and kernels "auto" decided for this device (resolve_compute_dtype,
    resolve_speedups), so that run.json records them as it does the memory decisions."""
    speedups = resolve_speedups(spec.training, device, spec.method.type)
    t, q = spec.training, spec.quantization
    training = t.model_copy(update={
        "packing": speedups.packing if t.packing == "auto" else t.packing,
        "kernels": ("liger" if speedups.liger else "none") if t.kernels == "auto" else t.kernels})
    quantization = q.model_copy(update={
        "compute_dtype": str(resolve_compute_dtype(q.compute_dtype, device)).removeprefix("torch.")})
    return spec.model_copy(update={"training": training, "quantization": quantization})


def _as_decided_before(requested: JobSpec, fitted: JobSpec, written: dict, device: str) -> tuple[JobSpec, list[Unheld]]:
    """`fitted` with the interrupted run's decisions (`written`, its manifest's spec) for what `requested`
    leaves "auto": a resumed run goes on as it started, though this release's estimate, or a worker with
    other memory, other libraries (flash-attention, liger-kernel) or another device might decide otherwise
    (and the spec compared would then differ, failing the job, or, for what run.json did not record, the run
    went on otherwise unsaid). A decision the interrupted run did not record (a release before the field)
    stays this run's; so does one this device cannot run (a compute dtype it lacks: the same rows in the same
    order, computed otherwise), returned with why, for the run to say so."""
    data = fitted.model_dump(mode="json")
    asked = requested.model_dump(mode="json")
    unheld: list[Unheld] = []
    for section, field in DECIDED_ON_THE_DEVICE:
        part = written.get(section)
        before = part.get(field) if isinstance(part, dict) else None
        if asked[section][field] == "auto" and before is not None and before != "auto" and before != data[section][field]:
            why = why_not_on(device, field, before)
            if why is None:
                data[section][field] = before
            else:
                unheld.append((section, field, before, why))
    try:
        return JobSpec.model_validate(data, context=STORED), unheld
    except ValueError:
        return fitted, unheld  # not a decision this version reads: the comparison says what differs


def _decisions_events(requested: JobSpec, own: JobSpec, kept: JobSpec, unheld: list[Unheld], step: int) -> list[Event]:
    """What a resumed run says of the "auto" decisions it took over: those the interrupted run made otherwise than
    this worker would (kept, so the run goes on as it began), and those this worker cannot run (changed)."""
    asked, mine, runs = (s.model_dump(mode="json") for s in (requested, own, kept))
    events = []
    held = [(section, field) for section, field in DECIDED_ON_THE_DEVICE
            if asked[section][field] == "auto" and runs[section][field] != mine[section][field]]
    if held:
        said = [f"{section}.{field} {json.dumps(runs[section][field])} (this worker alone would choose "
                f"{json.dumps(mine[section][field])})" for section, field in held]
        if ("training", "packing") in held and runs["training"]["packing"] is True:
            said.append("packed rows without flash-attention are masked apart by SDPA: the same rows in each step, "
                        "slower")
        events.append(Event(type="decisions_kept", level="info", step=step,
                            message="kept as the interrupted run decided \"auto\" on its worker, so it goes on as it "
                                    "began: " + "; ".join(said),
                            data={f"{section}.{field}": runs[section][field] for section, field in held}))
    for section, field, before, why in unheld:
        now = runs[section][field]
        events.append(Event(
            type="decision_changed", level="warning", step=step,
            message=f"{section}.{field}: the interrupted run decided \"auto\" as {json.dumps(before)}, which this "
                    f"worker cannot run ({why.split('; allowed here')[0]}); it goes on with {json.dumps(now)}: the same "
                    "rows in the same order, with other rounding, so the loss curve may differ slightly from here",
            data={"field": f"{section}.{field}", "before": before, "now": now}))
    return events


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _drop_metrics_after(path: Path, step: int) -> None:
    """The curve up to the checkpoint a run resumes from: the steps after it are redone. A line that is not JSON is
    one a full disk or a crash cut short as it was appended (the last): it goes too. Read as JSON, it failed the
    resume, and every resume after it, until the file was mended by hand. Rewritten whole or not at all: cut short
    itself, the rewrite would lose the curve."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            point = json.loads(line)
        except ValueError:
            continue
        if point["step"] <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _replace_dir(final: Path, write: Callable[[Path], object]) -> None:
    """Write a directory next to its final place, then swap it in: readers never see half of one."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


def _durations(*marks: float) -> dict:
    names = ["setup", "train", "save_adapter", "merge", "report"]
    out = {f"{name}": round(b - a, 3) for name, a, b in zip(names, marks, marks[1:], strict=False)}
    out["total"] = round(marks[-1] - marks[0], 3)
    return out


def _library_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in
            ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")}
