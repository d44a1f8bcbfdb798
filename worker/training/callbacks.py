"""Trainer callbacks: metrics to a sink, cancellation, crash-safe checkpoints, a progress bar."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import TrainerCallback

from worker.training import checkpoints
from worker.training.model import peak_memory_bytes
from worker.training.protocol import EvalPoint, Event, Sink, TrainPoint


class MetricsCallback(TrainerCallback):
    """One point per logging step (TrainPoint) and per evaluation (EvalPoint) to the sink."""

    def __init__(self, sink: Sink, device: str):
        self.sink = sink
        self.device = device
        self._last_time = time.monotonic()
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume the token count starts where the checkpoint left it.
        self._last_time = time.monotonic()
        self._last_tokens = state.num_input_tokens_seen

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
        )
        self._last_time, self._last_tokens = now, tokens
        self.sink(point)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.sink(eval_record(state.global_step, state.epoch, metrics["eval_loss"]))


def gpu_utilization(device: str) -> float | None:
    """The GPU's busy fraction over the last sample period, where NVML (nvidia-ml-py) can say."""
    if device != "cuda":
        return None
    try:
        import torch

        return torch.cuda.utilization() / 100
    except Exception:  # no NVML library, or a device it cannot query
        return None


def eval_record(step: int, epoch: float | None, eval_loss: float) -> EvalPoint:
    return EvalPoint(
        step=step,
        epoch=round(epoch or 0.0, 4),
        eval_loss=eval_loss,
        perplexity=math.exp(eval_loss) if eval_loss < 50 else float("inf"),
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
    """Moves each checkpoint the trainer wrote into staging to checkpoints/step-N, atomically."""

    def __init__(self, checkpoints_dir: Path, staging: Path, sink: Sink, keep: int = 2):
        self.checkpoints_dir = checkpoints_dir
        self.staging = staging
        self.sink = sink
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        staged = self.staging / f"checkpoint-{state.global_step}"
        if not staged.is_dir():
            return
        final = checkpoints.finalize(staged, self.checkpoints_dir, state.global_step)
        checkpoints.prune(self.checkpoints_dir, self.keep)
        self.sink(Event(type="checkpoint_saved", level="info", step=state.global_step, data={"path": str(final)}))


class RichProgressCallback(TrainerCallback):
    """A progress bar for the CLI (the service shows progress from the metrics instead)."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
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
