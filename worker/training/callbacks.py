"""Trainer callbacks: metrics to a sink, the health watch, the best evaluation (early stopping, the best
adapter), cancellation, crash-safe checkpoints, a progress bar."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import TrainerCallback

from worker.training import checkpoints
from worker.training.health import BestEval, HealthWatch, early_stop_event
from worker.training.model import peak_memory_bytes
from worker.training.protocol import EvalPoint, Event, Sink, TrainPoint
from worker.training.spec import JobSpec

# trl's DPO trainer logs these (eval_ before each for an evaluation): the TrainPoint/EvalPoint fields they fill.
DPO_REWARDS = {"reward_accuracy": "rewards/accuracies", "reward_chosen": "rewards/chosen",
               "reward_rejected": "rewards/rejected", "reward_margin": "rewards/margins"}


def rewards(logs: dict, prefix: str = "") -> dict:
    """The DPO reward fields of a TrainPoint or EvalPoint from a trainer log (None where not logged: SFT)."""
    return {field: logs.get(prefix + key) for field, key in DPO_REWARDS.items()}


class MetricsCallback(TrainerCallback):
    """One point per logging step and at the last step (TrainPoint), and per evaluation (EvalPoint), to the
    sink. For method dpo, with the rewards trl logs, and no perplexity (exp of a DPO loss measures nothing)."""

    def __init__(self, sink: Sink, device: str, method: str = "sft"):
        self.sink = sink
        self.device = device
        self.method = method
        self._last_time = time.monotonic()
        self._last_tokens = 0
        self.tokens_at_start = 0  # the run's count as this training began: the checkpoint's, after a resume

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume the token count starts where the checkpoint left it.
        self._last_time = time.monotonic()
        self._last_tokens = self.tokens_at_start = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        # The trainer logs every logging_steps only: a run of 8 steps at 10 would end with no point at all
        # (no curve, no final loss), and one of 165 without its last 5 steps. The last step of the
        # schedule is always logged; a resumed run ends on the same step, so its curve stays the same.
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.monotonic()
        tokens = state.num_input_tokens_seen
        elapsed = max(now - self._last_time, 1e-9)
        point = TrainPoint(
            step=state.global_step,
            epoch=round(state.epoch or 0.0, 4),
            train_loss=logs["loss"],
            learning_rate=logs.get("learning_rate"),
            grad_norm=logs.get("grad_norm"),
            tokens_seen=tokens,
            tokens_per_second=round((tokens - self._last_tokens) / elapsed, 1),
            peak_memory_bytes=peak_memory_bytes(self.device),
            gpu_utilization=gpu_utilization(self.device),
            **rewards(logs),
        )
        self._last_time, self._last_tokens = now, tokens
        self.sink(point)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.sink(eval_record(state.global_step, state.epoch, metrics["eval_loss"], method=self.method,
                                  metrics=metrics))


class HealthCallback(TrainerCallback):
    """The live health watch (worker/training/health.py): its warnings, as events, to the sink."""

    def __init__(self, sink: Sink, spec: JobSpec):
        self.sink = sink
        self.watch = HealthWatch(spec)

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run replays the curve up to its checkpoint: the watch picks up its window and its
        # episodes where they were, so a warning given before the pause is not given again.
        for _ in _feed(self.watch, state.log_history):
            pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        for event in _feed(self.watch, [{**(logs or {}), "step": state.global_step}]):
            self.sink(event)


def _feed(watch: HealthWatch, entries: list[dict]):
    """The watch's warnings for log entries (the trainer's log_history format), in order."""
    for entry in entries:
        if "loss" in entry:
            yield from watch.train_loss(entry["step"], entry["loss"])
        if "eval_loss" in entry:
            yield from watch.eval_loss(entry["step"], entry["eval_loss"])


BEST_ADAPTER_FILE = "best_adapter.safetensors"  # in each checkpoint, with output.use_best_checkpoint


class BestEvalCallback(TrainerCallback):
    """Follows the evaluation with the lowest eval loss. With `patience` (training.early_stopping), stops
    training once that many evaluations in a row have not beaten it. With `model` (for
    output.use_best_checkpoint), keeps a CPU copy of the trainable (LoRA) weights at each new best,
    writes it into every checkpoint (`write_into`), takes it back from the checkpoint a run resumes
    from, and puts it into the model before the adapter is saved (`restore`).

    The trainable weights are the whole difference between any two steps of a run (the 4-bit base is
    frozen), and a few MB to a few hundred MB even for a 70B base: copying them beats keeping whole
    checkpoints of every best step against the pruning of older ones."""

    def __init__(self, sink: Sink, *, patience: int | None = None, model=None, resume_from: Path | None = None):
        self.sink = sink
        self.patience = patience
        self.model = model
        self.resume_from = resume_from
        self.best = BestEval()
        self.weights: dict | None = None  # the best evaluation's trainable weights, on the CPU
        self.training = False
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        for entry in state.log_history:  # a resumed run: the evaluations before its checkpoint
            if "eval_loss" in entry:
                self.best.observe(entry["step"], entry["eval_loss"])
        if self.model is not None and self.resume_from is not None and self.best.step is not None:
            self.weights = self._read_checkpoint(self.resume_from)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False  # the evaluation after training is a candidate, but stops nothing

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return
        improved = self.best.observe(state.global_step, metrics["eval_loss"])
        if improved and self.model is not None:
            self.weights = {name: p.detach().to("cpu", copy=True).contiguous()
                            for name, p in self.model.named_parameters() if p.requires_grad}
        if (improved is False and self.training and self.patience is not None
                and self.best.evals_since >= self.patience and self.stopped_at is None):
            self.stopped_at = state.global_step
            control.should_training_stop = True
            self.sink(early_stop_event(state.global_step, self.best, self.patience))

    def write_into(self, checkpoint: Path) -> None:
        """The best weights so far into a (staged) checkpoint: a resume must ship the same adapter."""
        if self.model is None or self.weights is None:
            return
        from safetensors.torch import save_file

        save_file(self.weights, str(checkpoint / BEST_ADAPTER_FILE),
                  metadata={"step": str(self.best.step), "eval_loss": repr(self.best.eval_loss)})

    def _read_checkpoint(self, checkpoint: Path) -> dict:
        from safetensors import safe_open

        path = checkpoint / BEST_ADAPTER_FILE
        if not path.is_file():
            raise _training_error(f"cannot resume with output.use_best_checkpoint: {checkpoint.name} holds no "
                                  f"{BEST_ADAPTER_FILE} for the best evaluation (step {self.best.step}); start the "
                                  "run afresh in an empty output directory")
        with safe_open(str(path), framework="pt") as f:
            step = int((f.metadata() or {}).get("step", -1))
            weights = {name: f.get_tensor(name) for name in f.keys()}
        if step != self.best.step:
            raise _training_error(f"cannot resume with output.use_best_checkpoint: {checkpoint.name} holds the "
                                  f"weights of step {step}, but its logged evaluations make step {self.best.step} "
                                  "the best; start the run afresh in an empty output directory")
        return weights

    def restore(self) -> Event | None:
        """Put the best evaluation's weights into the model (before the adapter is saved); the event that
        says which step ships. None where there is nothing to restore (no evaluation, or the last is the best)."""
        if self.model is None or self.weights is None or self.best.step == self.best.last_step:
            return None
        params = dict(self.model.named_parameters())
        missing = sorted(set(self.weights) - set(params))
        if missing:
            raise _training_error(f"the best adapter's weights do not fit the model (no {missing[0]})")
        import torch

        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value)
        return Event(type="best_checkpoint_used", level="info", step=self.best.step,
                     message=f"the adapter is step {self.best.step}'s, the best evaluation (eval loss "
                             f"{self.best.eval_loss:.4g}), not the last step's (step {self.best.last_step}); "
                             "output.use_best_checkpoint",
                     data=self.best.as_dict())

    def summary(self, final_step: int) -> dict | None:
        """summary.json's best_eval: the best evaluation, whether the shipped adapter is it, and where
        early stopping ended the run (None: it did not). None where nothing was evaluated."""
        if self.best.step is None:
            return None
        shipped_best = self.weights is not None or self.best.step == final_step
        return {**self.best.as_dict(), "final_adapter_is_best": shipped_best, "early_stopped_at": self.stopped_at}


def _training_error(message: str) -> Exception:
    from worker.training.recipe import TrainingError  # the recipe owns it; imported late (it imports us)

    return TrainingError(message)


def gpu_utilization(device: str) -> float | None:
    """The GPU's busy fraction over the last sample period, where NVML (nvidia-ml-py) can say."""
    if device != "cuda":
        return None
    try:
        import torch

        return torch.cuda.utilization() / 100
    except Exception:  # no NVML library, or a device it cannot query
        return None


def eval_record(step: int, epoch: float | None, eval_loss: float, *, method: str = "sft",
                metrics: dict | None = None) -> EvalPoint:
    return EvalPoint(
        step=step,
        epoch=round(epoch or 0.0, 4),
        eval_loss=eval_loss,
        perplexity=None if method != "sft" else math.exp(eval_loss) if eval_loss < 50 else float("inf"),
        **rewards(metrics or {}, prefix="eval_"),
    )


@dataclass(frozen=True)
class TrainingEnd:
    """How training ended: every planned step done ("finished"), or stopped after optimizer step
    `step` by the cancel hook ("cancelled": nothing to resume) or the pause hook ("paused": a
    checkpoint to resume from was saved at that step)."""

    how: Literal["finished", "cancelled", "paused"]
    step: int

    @property
    def stopped_early(self) -> bool:
        return self.how != "finished"


class StopCallback(TrainerCallback):
    """Asks the cancel and pause hooks after every optimizer step and stops training cleanly:
    a cancel stops at once (nothing to resume), a pause saves a checkpoint first (to resume from)."""

    def __init__(self, cancel: Callable[[], bool], pause: Callable[[], bool]):
        self.cancel = cancel
        self.pause = pause
        self.stopped: TrainingEnd | None = None  # set once, by the hook that said yes

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped is not None:
            return
        if self.cancel():
            self.stopped = TrainingEnd("cancelled", state.global_step)
            control.should_training_stop = True
            control.should_save = False
        elif self.pause():
            self.stopped = TrainingEnd("paused", state.global_step)
            control.should_training_stop = True
            control.should_save = True


class CheckpointCallback(TrainerCallback):
    """Moves each checkpoint the trainer wrote into staging to checkpoints/step-N, atomically.

    `extra_files` write what else a resume needs into the staged checkpoint before it is marked
    complete, so it travels with the checkpoint (to storage and back, on another host)."""

    def __init__(self, checkpoints_dir: Path, staging: Path, sink: Sink, keep: int = 2,
                 extra_files: Sequence[Callable[[Path], None]] = ()):
        self.checkpoints_dir = checkpoints_dir
        self.staging = staging
        self.sink = sink
        self.keep = keep
        self.extra_files = extra_files

    def on_save(self, args, state, control, **kwargs):
        staged = self.staging / f"checkpoint-{state.global_step}"
        if not staged.is_dir():
            return
        for write in self.extra_files:
            write(staged)
        final = checkpoints.finalize(staged, self.checkpoints_dir, state.global_step)
        checkpoints.prune(self.checkpoints_dir, self.keep)
        self.sink(Event(type="checkpoint_saved", level="info", step=state.global_step,
                        message=f"checkpoint of step {state.global_step} saved", data={"path": str(final)}))


class RichProgressCallback(TrainerCallback):
    """A progress bar for the CLI (the service shows progress from the metrics instead)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # On stderr: `qlora train`'s stdout holds its result alone (JSON on a pipe, for `| jq`).
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=Console(stderr=True),
        )
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, loss="-")

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.progress.stop()
