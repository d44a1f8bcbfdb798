"""The live health watch: what the loss curves say while a run trains, said as events a person reads.

A falling train loss is not yet a fine-tune that works. Three shapes of the curves are worth a
warning while there is still time to act, each once per episode (it warns when a shape starts and
again only after it has ended), each with the step, what it saw and what to try:

- `loss_spike`: a logged train loss far above the recent ones (a destabilised step or a bad batch);
- `overfitting`: eval loss rising evaluation after evaluation while train loss keeps falling;
- `memorising`: train loss near zero while eval loss stays far from it;
- `not_learning`: train loss no lower, over the last logs, than where the run started (a learning rate so
  high that the loss jumped and stayed there; a spike warns only about a loss above the recent ones).

And the best evaluation (lowest eval loss), which `training.early_stopping` and
`output.use_best_checkpoint` act on.

Pure functions of the logged numbers, torch-free and service-free: the trainer's callbacks
(worker/training/callbacks.py) feed them, a resumed run replays its logged history through them to
pick up where it was. (Which settings need a validation set is the spec's own question: JobSpec.validation_needed_by.)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from worker.training.protocol import Event
from worker.training.spec import JobSpec

# Loss spike: a logged train loss above SPIKE_FACTOR times the median of the last SPIKE_WINDOW logged
# losses. The median, not the mean, so one spike (or a few noisy logs) does not move the yardstick;
# 20 logs span enough steps to smooth batch-to-batch noise yet follow a falling curve. A logged loss is
# a batch mean (of logging_steps optimizer steps, each of an effective batch), so noise alone rarely
# doubles it: a factor 2 is a step that undid a good part of what was learned. At small losses a
# doubling means little (0.02 to 0.05 nats is a still near-perfect model); SPIKE_MIN_NATS asks for a
# jump a person would call one: half a nat per token is a ~40% drop in the right token's probability.
SPIKE_FACTOR = 2.0
SPIKE_MIN_NATS = 0.5
SPIKE_WINDOW = 20
# The first logs fall steeply from the untrained loss (and warmup's first steps can wobble): judge only
# once the median has SPIKE_WARMUP_LOGS logs behind it.
SPIKE_WARMUP_LOGS = 5

# Not learning: the median of the last SPIKE_WINDOW logged train losses at or above the first logged loss,
# judged once that many logs came after the first. A healthy run ends below where it started, however flat
# its curve (a strong base on familiar data falls a little, then levels off); one whose learning rate is far
# too high jumps (to ~ln(vocabulary): 10.4 nats for Llama's 32k tokens, where a pretrained base starts near
# 1 to 3) and stays there, and the median of the recent logs, which a spike warns about only at its start,
# says the run learns nothing. At or above, not near: a curve that has fallen 5% is learning.

# Overfitting: eval loss higher than the evaluation before, OVERFIT_RISES times in a row, while the
# train loss at the latest evaluation is below its value where the rise began. One or two rises happen
# on a healthy curve (the model moves between evaluations); three in a row is a trend.
OVERFIT_RISES = 3

# Memorising: train loss below MEMORISE_TRAIN_NATS ("near zero": the right token at ~90% probability
# on average, training rows reproduced almost verbatim) while the eval loss is "far": at least
# MEMORISE_RATIO times the train loss and at least MEMORISE_MIN_EVAL_NATS. The ratio says the model is
# ten times surer (in nats) of the rows it saw than of new ones; the floor keeps a model that learned
# the task well (train 0.02, eval 0.15 on the demo task) from being called a memoriser.
MEMORISE_TRAIN_NATS = 0.1
MEMORISE_RATIO = 10.0
MEMORISE_MIN_EVAL_NATS = 0.5


class HealthWatch:
    """Feed it every logged train loss and every eval loss, in order; it answers with the warnings due."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)  # the last logged train losses
        self.since_eval: list[float] = []  # train losses logged since the last evaluation
        self.last_train: float | None = None
        self.first_train: float | None = None  # the first logged train loss: where the run started
        self.logs = 0  # finite train losses logged so far
        # (step, eval loss, train loss at that evaluation) of every evaluation so far
        self.evals: list[tuple[int, float, float | None]] = []
        self.in_spike = self.in_overfitting = self.in_memorising = self.in_stall = False

    def train_loss(self, step: int, loss: float) -> list[Event]:
        if not math.isfinite(loss):
            return []  # the trainer stops a non-finite loss itself (GuardedSFTTrainer), as an error
        warnings = []
        if len(self.recent) >= SPIKE_WARMUP_LOGS:
            median = statistics.median(self.recent)
            spiking = loss > SPIKE_FACTOR * median and loss - median > SPIKE_MIN_NATS
            if spiking and not self.in_spike:
                warnings.append(self._spike(step, loss, median))
            self.in_spike = spiking
        self.recent.append(loss)
        self.since_eval.append(loss)
        self.last_train = loss
        self.first_train = loss if self.first_train is None else self.first_train
        self.logs += 1
        if self.logs > SPIKE_WINDOW:  # the window holds no log of the start (the first is the yardstick)
            median = statistics.median(self.recent)
            stalled = median >= self.first_train
            if stalled and not self.in_stall:
                warnings.append(self._not_learning(step, median))
            self.in_stall = stalled
        return warnings

    def eval_loss(self, step: int, loss: float) -> list[Event]:
        if not math.isfinite(loss) or (self.evals and step <= self.evals[-1][0]):
            return []  # the final evaluation repeats the last one where training ended on an eval step
        # The train loss "at" an evaluation: the median of the logs since the one before (robust to one
        # odd batch), or the latest log where none came between.
        train = statistics.median(self.since_eval) if self.since_eval else self.last_train
        self.since_eval = []
        self.evals.append((step, loss, train))
        return [*self._check_overfitting(), *self._check_memorising()]

    # ---------------------------------------------------------------- the shapes

    def _spike(self, step: int, loss: float, median: float) -> Event:
        t = self.spec.training
        return Event(
            type="loss_spike", level="warning", step=step,
            message=f"loss spike at step {step}: train loss {loss:.4g} is {loss / median:.1f}x the median "
                    f"{median:.4g} of the last {len(self.recent)} logged losses. If it does not come back down "
                    f"within a few logs, try a lower training.learning_rate (now {t.learning_rate:g}), "
                    f"training.max_grad_norm 0.3 or lower (now {t.max_grad_norm:g}) or a longer "
                    f"training.warmup_ratio (now {t.warmup_ratio:g}); a spike that recurs at the same point of "
                    "each epoch points at a bad row in the data",
            data={"train_loss": loss, "median": median, "window": len(self.recent), "factor": SPIKE_FACTOR},
        )

    def _not_learning(self, step: int, median: float) -> Event:
        t = self.spec.training
        return Event(
            type="not_learning", level="warning", step=step,
            message=f"not learning at step {step}: the median train loss of the last {len(self.recent)} logs, "
                    f"{median:.4g}, is no lower than the first logged, {self.first_train:.4g}. Where the loss "
                    f"jumped early and stayed up, training.learning_rate (now {t.learning_rate:g}) is too high: "
                    "try a tenth of it, or a longer training.warmup_ratio; where it never moved, the rate is too "
                    "low, or the base model already answers these rows as they are written",
            data={"train_loss_median": median, "first_train_loss": self.first_train, "window": len(self.recent)},
        )

    def _check_overfitting(self) -> list[Event]:
        rises = 0
        while rises + 1 < len(self.evals) and self.evals[-1 - rises][1] > self.evals[-2 - rises][1]:
            rises += 1
        if rises == 0:
            self.in_overfitting = False  # eval loss fell again: the episode is over
            return []
        if rises < OVERFIT_RISES or self.in_overfitting:
            return []
        (start_step, start_eval, start_train), (step, loss, train) = self.evals[-1 - rises], self.evals[-1]
        if start_train is None or train is None or train >= start_train:
            return []  # both rising is not overfitting (a learning rate too high shows as a spike or divergence)
        self.in_overfitting = True
        lora = self.spec.lora
        return [Event(
            type="overfitting", level="warning", step=step,
            message=f"overfitting at step {step}: eval loss rose {rises} evaluations in a row, from {start_eval:.4g} "
                    f"at step {start_step} to {loss:.4g}, while train loss fell from {start_train:.4g} to "
                    f"{train:.4g}. The model is learning its training rows rather than the task; try fewer "
                    "training.epochs or max_steps, training.early_stopping with output.use_best_checkpoint (ships "
                    f"the best evaluation's adapter), more data, or more regularisation: lora.dropout (now "
                    f"{lora.dropout:g}), a smaller lora.r (now {lora.r})",
            data={"rises": rises, "from_step": start_step, "from_eval_loss": start_eval, "eval_loss": loss,
                  "from_train_loss": start_train, "train_loss": train},
        )]

    def _check_memorising(self) -> list[Event]:
        step, loss, train = self.evals[-1]
        memorising = (train is not None and train < MEMORISE_TRAIN_NATS
                      and loss >= MEMORISE_RATIO * train and loss >= MEMORISE_MIN_EVAL_NATS)
        warn = memorising and not self.in_memorising
        self.in_memorising = memorising
        if not warn:
            return []
        assert train is not None
        t, lora = self.spec.training, self.spec.lora
        return [Event(
            type="memorising", level="warning", step=step,
            message=f"memorising at step {step}: train loss {train:.4g} is near zero while eval loss is {loss:.4g} "
                    f"({loss / max(train, 1e-12):.0f}x). The model reproduces its training rows but does not "
                    "carry that to rows it has not seen; try more (and more varied) training data, fewer "
                    f"training.epochs or max_steps, a lower training.learning_rate (now {t.learning_rate:g}), "
                    f"lora.dropout (now {lora.dropout:g}) or a smaller lora.r (now {lora.r})",
            data={"train_loss": train, "eval_loss": loss, "near_zero": MEMORISE_TRAIN_NATS, "ratio": MEMORISE_RATIO},
        )]


@dataclass
class BestEval:
    """The evaluation with the lowest eval loss so far, and how many have come since without beating it."""

    step: int | None = None
    eval_loss: float = math.inf
    evals_since: int = 0
    last_step: int = -1

    def observe(self, step: int, eval_loss: float) -> bool | None:
        """True: a new best; False: no improvement; None: a repeat of the last evaluation (ignored)."""
        if step <= self.last_step:
            return None
        self.last_step = step
        # Strictly lower: an equal loss is no improvement, as in every early-stopping rule people know.
        if eval_loss < self.eval_loss:
            self.step, self.eval_loss, self.evals_since = step, eval_loss, 0
            return True
        self.evals_since += 1
        return False

    def as_dict(self) -> dict:
        return {"step": self.step, "eval_loss": self.eval_loss if self.step is not None else None}


def early_stop_event(step: int, best: BestEval, patience: int) -> Event:
    return Event(
        type="early_stopped", level="info", step=step,
        message=f"stopped early at step {step}: eval loss has not improved for {patience} evaluations "
                f"(training.early_stopping {patience}); the best was {best.eval_loss:.4g} at step {best.step}",
        data={"patience": patience, "best_step": best.step, "best_eval_loss": best.eval_loss},
    )
