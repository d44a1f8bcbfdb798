"""The QLoRA recipe: setup → train → save → cleanup, readable top to bottom.

    from worker.training.recipe import run
    result = run(JobSpec.from_file("spec.json"), "train.jsonl", "out/", validation_path="val.jsonl")

Writes into out/: adapter/, merged/, metrics.jsonl, summary.json, checkpoints/step-N, run.json.
Needs nothing of the service: the service passes a `sink` for metrics and events, a `cancel`
hook, and a `registry` of base models; the CLI passes nothing and reads the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Nothing downloads at run time: base models are local, the hub is never asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset as HFDataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoTokenizer, PrinterCallback, set_seed  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from worker.training import checkpoints  # noqa: E402
from worker.training.callbacks import (  # noqa: E402
    CheckpointCallback, MetricsCallback, RichProgressCallback, Sink, StopCallback,
)
from worker.training.data import read_jsonl  # noqa: E402
from worker.training.estimate import resolve_auto_micro_batch  # noqa: E402
from worker.training.merge import (  # noqa: E402
    build_merged_model, fidelity_rows, forward_rows, free_memory, measure_fidelity,
)
from worker.training.model import (  # noqa: E402
    Speedups, load_base_model, lora_config, peak_memory_bytes, pick_device, prepare_for_training,
    resolve_base_model, resolve_compute_dtype, resolve_speedups, resolve_target_modules,
)
from worker.training.spec import JobSpec  # noqa: E402
from worker.training.tokenization import encode_examples, prepare_tokenizer  # noqa: E402

KEEP_CHECKPOINTS = 2  # the newest, plus one in case the newest was written just before a disk filled


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what happened and what to try."""


@dataclass
class RunResult:
    status: str  # "succeeded", "cancelled" or "paused"
    out_dir: Path
    summary: dict


class GuardedSFTTrainer(SFTTrainer):
    """SFTTrainer with fp32 adapter weights, stopping at the first non-finite loss or gradient norm."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # trl casts the LoRA weights of a quantized model to bfloat16. We keep them in float32:
        # an Adam step of lr ~2e-4 on a weight of ~0.05 is below bf16's resolution (2^-8 relative)
        # and would be rounded away, and a resume (which loads the adapter through peft, in fp32)
        # would silently continue in another precision than the run it resumes. The matmuls still
        # run in the compute dtype under autocast; the cost is a few MB for the adapter.
        for param in self.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()

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
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)


def run(
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
    progress: bool = False,
    extra_callbacks: tuple = (),
) -> RunResult:
    t_start = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"

    # ---------------------------------------------------------------- setup
    device = pick_device()
    compute_dtype = resolve_compute_dtype(spec.quantization.compute_dtype, device)
    base_path = resolve_base_model(spec.base_model, registry)
    spec = _resolve_micro_batch(spec, base_path, device)
    train_data = read_jsonl(train_path)
    val_data = read_jsonl(validation_path) if validation_path else None
    resume_from = _check_run_dir(out, ckpt_dir, spec, train_path, validation_path, resume)
    resumed_step = int(resume_from.name.split("-")[1]) if resume_from else 0
    staging = checkpoints.clear_staging(ckpt_dir)  # a crash mid-save leaves junk only here

    metrics_file = out / "metrics.jsonl"
    _drop_metrics_after(metrics_file, resumed_step)  # steps logged after the checkpoint are redone
    emit = _sink_to_file_and(metrics_file, sink)
    emit({"kind": "event", "type": "started", "level": "info", "step": resumed_step,
          "message": f"resuming from step {resumed_step}" if resume_from else "training started"})

    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True, trust_remote_code=False)
    tok_setup = prepare_tokenizer(tokenizer)
    encode = dict(max_seq_length=spec.training.max_seq_length, train_on_inputs=spec.training.train_on_inputs)
    train_rows, train_stats = encode_examples(train_data.examples, tokenizer, **encode)
    val_rows, val_stats = encode_examples(val_data.examples, tokenizer, **encode) if val_data else ([], None)
    if not train_rows:
        raise TrainingError(
            f"no training rows left: all {train_stats.rows} had nothing to learn within "
            f"max_seq_length={spec.training.max_seq_length}; raise max_seq_length"
        )
    if train_stats.truncated_rows:
        emit({"kind": "event", "type": "data_truncated", "level": "warning", "step": resumed_step,
              "message": f"{train_stats.truncated_rows} of {train_stats.rows} training rows were longer than "
                         f"max_seq_length={spec.training.max_seq_length} and were truncated"})

    set_seed(spec.training.seed)
    speedups = resolve_speedups(spec.training, device)
    cache_hit = quantized_cache is not None and (quantized_cache / "config.json").is_file()
    model = load_base_model(base_path, spec.quantization, compute_dtype, device, attention=speedups.attention,
                            quantized_cache=quantized_cache)
    if quantized_cache is not None and spec.quantization.bits != "none":
        emit({"kind": "event", "type": "base_loaded", "level": "info", "step": resumed_step,
              "message": "loaded the pre-quantized base from the cache" if cache_hit
              else "quantized the base model; saved for the cache"})
    # No KV cache in training: besides wasting memory, a cache hides packed rows' restarting
    # position ids from the attention mask, which would then let examples attend to each other.
    model.config.use_cache = False
    if tok_setup.pad_token_added:
        model.resize_token_embeddings(len(tokenizer))
    model = prepare_for_training(model, spec.quantization, compute_dtype, spec.training.gradient_checkpointing)
    target_modules = resolve_target_modules(model, spec.lora.target_modules)
    model = get_peft_model(model, lora_config(spec.lora, target_modules))
    trainable_params, total_params = model.get_nb_trainable_parameters()

    stop_cb = StopCallback(cancel or (lambda: False), pause or (lambda: False))
    callbacks = [MetricsCallback(emit, device), stop_cb, CheckpointCallback(ckpt_dir, staging, emit, KEEP_CHECKPOINTS)]
    if progress:
        callbacks.append(RichProgressCallback())
    trainer = GuardedSFTTrainer(
        model=model,
        args=_trainer_args(spec, staging, compute_dtype, device, speedups, has_eval=bool(val_rows)),
        train_dataset=HFDataset.from_list(train_rows),
        eval_dataset=HFDataset.from_list(val_rows) if val_rows else None,
        processing_class=tokenizer,
        callbacks=[*callbacks, *extra_callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout; the sink and progress bar replace them
    t_setup = time.monotonic()

    # ---------------------------------------------------------------- train
    try:
        try:
            train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except torch.OutOfMemoryError:
            raise TrainingError(out_of_memory_message(spec, trainer.state.global_step + 1, device)) from None
    except TrainingError as exc:
        emit({"kind": "event", "type": "failed", "level": "error", "step": trainer.state.global_step, "message": str(exc)})
        raise
    t_train = time.monotonic()
    state = trainer.state
    train_losses = [log["loss"] for log in state.log_history if "loss" in log]
    base_summary = {
        "spec": spec.model_dump(mode="json"),
        "base_model_path": str(base_path),
        "device": device,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "target_modules": target_modules,
        "speedups": speedups.as_dict(),
        "quantized_base": None if quantized_cache is None else ("cache" if cache_hit else "quantized"),
        "parameters": {"trainable": trainable_params, "total": total_params},
        "data": {"format": train_data.format, "train": train_stats.as_dict(),
                 "validation": val_stats.as_dict() if val_stats else None},
        "tokenizer": tok_setup.__dict__,
        "steps": {"completed": state.global_step, "planned": state.max_steps, "resumed_from": resumed_step},
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_final": train_losses[-1] if train_losses else None,
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": train_output.metrics.get("train_tokens_per_second")
        or round(state.num_input_tokens_seen / max(t_train - t_setup, 1e-9), 1),
        "peak_memory_bytes": peak_memory_bytes(device),
        "versions": _library_versions(),
    }
    stopped = {"cancelled": stop_cb.cancelled_at, "paused": stop_cb.paused_at}
    for status, step in stopped.items():
        if step is None:
            continue
        saved = " after saving a checkpoint to resume from" if status == "paused" else ""
        emit({"kind": "event", "type": status, "level": "warning" if status == "cancelled" else "info",
              "step": step, "message": f"{status} at step {step}{saved}"})
        summary = {"status": status, **base_summary,
                   "durations_s": _durations(t_start, t_setup, t_train, time.monotonic())}
        _write_json(out / "summary.json", summary)
        return RunResult(status, out, summary)

    eval_loss = None
    if val_rows:
        eval_loss = trainer.evaluate()["eval_loss"]  # the metrics callback records it

    # ---------------------------------------------------------------- save
    adapter_dir = out / "adapter"
    _replace_dir(adapter_dir, lambda tmp: (model.save_pretrained(tmp, safe_serialization=True),
                                           tokenizer.save_pretrained(tmp)))
    emit({"kind": "event", "type": "adapter_saved", "level": "info", "step": state.global_step, "path": str(adapter_dir)})
    t_save = time.monotonic()

    fidelity = None
    if spec.output.merge:
        rows = fidelity_rows(val_rows or train_rows)
        autocast = compute_dtype if compute_dtype != torch.float32 else None  # as the trainer ran it
        reference = forward_rows(model, rows, autocast_dtype=autocast)
        del trainer, model
        free_memory()
        merge_dtype = getattr(torch, spec.output.merge_dtype)
        merged = build_merged_model(base_path, adapter_dir, spec.quantization, compute_dtype,
                                    merge_dtype, device, vocab_size=len(tokenizer), quantized_cache=quantized_cache)
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
        merged.generation_config.eos_token_id = tokenizer.eos_token_id
        _replace_dir(out / "merged", lambda tmp: (merged.save_pretrained(tmp, safe_serialization=True),
                                                  tokenizer.save_pretrained(tmp)))
        del merged
        free_memory()
        from transformers import AutoModelForCausalLM

        # Measure what users download, not what is in memory: reload from disk.
        reloaded = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=merge_dtype, local_files_only=True)
        fidelity = {"rows_from": "validation" if val_rows else "train", **measure_fidelity(reference, reloaded, rows)}
        del reloaded
        free_memory()
        emit({"kind": "event", "type": "merged", "level": "info", "step": state.global_step,
              "message": f"merged model saved; max |logit diff| {fidelity['max_abs_logit_diff']:.3g}",
              "path": str(out / "merged")})
    t_merge = time.monotonic()

    # ---------------------------------------------------------------- cleanup
    shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "status": "succeeded",
        **base_summary,
        "eval_loss_final": eval_loss,
        "perplexity_final": math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
        "merge_fidelity": fidelity,
        "durations_s": _durations(t_start, t_setup, t_train, t_save, t_merge),
    }
    _write_json(out / "summary.json", summary)
    emit({"kind": "event", "type": "finished", "level": "info", "step": state.global_step, "message": "training finished"})
    return RunResult("succeeded", out, summary)


def _resolve_micro_batch(spec: JobSpec, base_path: Path, device: str) -> JobSpec:
    """per_device_batch_size "auto": the largest micro-batch the memory estimate fits on this GPU."""
    if spec.training.per_device_batch_size != "auto":
        return spec
    budget = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    config = json.loads((base_path / "config.json").read_text())
    try:
        return resolve_auto_micro_batch(spec, config, budget)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def out_of_memory_message(spec: JobSpec, step: int, device: str) -> str:
    t = spec.training
    hints = []
    if t.per_device_batch_size > 1:
        half = t.per_device_batch_size // 2
        hints.append(f"per_device_batch_size {half} with gradient_accumulation_steps "
                     f"{t.gradient_accumulation_steps * t.per_device_batch_size // half} (same effective batch)")
    hints.append(f"a shorter max_seq_length (now {t.max_seq_length})")
    if not t.gradient_checkpointing:
        hints.append("gradient_checkpointing true")
    if t.optimizer == "adamw_torch":
        hints.append("optimizer paged_adamw_8bit")
    hints.append("a GPU class with more memory")
    where = torch.cuda.get_device_name() if device == "cuda" else device
    return (f"out of memory on {where} at step {step} with micro-batch {t.per_device_batch_size} and "
            f"max_seq_length {t.max_seq_length}; try " + ", or ".join(hints))


def _trainer_args(spec: JobSpec, staging: Path, compute_dtype: torch.dtype, device: str, speedups: Speedups,
                  has_eval: bool) -> SFTConfig:
    t = spec.training
    return SFTConfig(
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
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
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
        packing=speedups.packing,
        packing_strategy="bfd",  # best-fit decreasing; implies padding-free rows with restarting position ids
        eval_packing=False,  # evaluate example by example, so eval loss means the same packed or not
        train_sampling_strategy="group_by_length" if speedups.group_by_length else "random",
        use_liger_kernel=speedups.liger,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _check_run_dir(out: Path, ckpt_dir: Path, spec: JobSpec, train_path, validation_path, resume: bool) -> Path | None:
    """Refuse to mix runs: resume only the same spec on the same data; never silently restart over checkpoints."""
    manifest = {
        "spec": spec.model_dump(mode="json"),
        "train_sha256": _sha256(train_path),
        "validation_sha256": _sha256(validation_path) if validation_path else None,
    }
    manifest_path = out / "run.json"
    latest = checkpoints.latest_complete(ckpt_dir)
    if manifest_path.exists() and latest is not None:
        if not resume:
            raise TrainingError(
                f"{out} already holds a run with checkpoints (newest: {latest.name}); "
                "pass --resume to continue it, or choose an empty output directory")
        previous = json.loads(manifest_path.read_text())
        changed = [k for k in manifest if previous.get(k) != manifest[k]]
        if changed:
            raise TrainingError(
                f"cannot resume: {', '.join(changed)} differ from the interrupted run in {out}; "
                "resume with the same spec and data, or start in an empty output directory")
        return latest
    _write_json(manifest_path, manifest)
    return None


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sink_to_file_and(path: Path, sink: Sink | None) -> Sink:
    def emit(record: dict) -> None:
        record = {"time": time.time(), **record}
        if record["kind"] in ("train", "eval"):
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if sink is not None:
            sink(record)
    return emit


def _drop_metrics_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _replace_dir(final: Path, write: Callable[[Path], object]) -> None:
    """Write a directory next to its final place, then swap it in: readers never see half of one."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _durations(*marks: float) -> dict:
    names = ["setup", "train", "save_adapter", "merge"]
    out = {f"{name}": round(b - a, 3) for name, a, b in zip(names, marks, marks[1:])}
    out["total"] = round(marks[-1] - marks[0], 3)
    return out


def _library_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in
            ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")}
