"""The live health watch, early stopping and the best adapter, on real QLoRA runs of the tiny model.

The warnings are found in the events of real training runs (SFTTrainer, NF4 layers, the paged
optimizer), one with a loss spike injected through a trainer callback and one that overfits for real:
four training rows of the demo task, a high learning rate, an epoch per step. The watch's rules are
also checked on numbers alone, where each threshold can be put to the test on both sides.
"""

import json
from itertools import pairwise

import pytest
import torch
from datasets import Dataset as HFDataset
from peft import PeftModel
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from tests.training.test_recipe import pause_after
from worker.training.callbacks import BEST_ADAPTER_FILE
from worker.training.data import read_jsonl
from worker.training.health import (
    MEMORISE_TRAIN_NATS,
    OVERFIT_RISES,
    SPIKE_WARMUP_LOGS,
    BestEval,
    HealthWatch,
)
from worker.training.model import load_base_model
from worker.training.protocol import Event
from worker.training.recipe import TrainingError, run
from worker.training.spec import JobSpec
from worker.training.tiny import demo_rows, demo_spec, write_jsonl


def spec_of(model_dir, training: dict, output: dict | None = None) -> JobSpec:
    data = demo_spec(str(model_dir))
    data["training"].update(training)
    data["output"] = {"merge": False, **(output or {})}
    data["eval"] = {"prompts": 0}  # the eval report is tested on its own; here it would only cost time
    return JobSpec.parse(data)


def warnings_of(events, kind: str) -> list[Event]:
    return [e for e in events if isinstance(e, Event) and e.type == kind]


def curve(out_dir, kind: str) -> dict[int, float]:
    key = "train_loss" if kind == "train" else "eval_loss"
    return {r["step"]: r[key] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind}


# ---------------------------------------------------------------- the rules, on numbers


def test_a_spike_warns_once_per_episode_after_the_first_logs():
    watch = HealthWatch(JobSpec.parse({"base_model": "m", "training": {"max_steps": 100}}))
    # The first logs fall steeply and wobble: never judged, however they jump.
    assert [w for step, loss in enumerate([4.0, 9.0, 3.0, 2.5], 1) for w in watch.train_loss(step, loss)] == []
    for step in range(SPIKE_WARMUP_LOGS, 20):
        assert watch.train_loss(step, 1.0) == []
    spike = watch.train_loss(20, 3.2)
    assert [(e.type, e.level, e.step) for e in spike] == [("loss_spike", "warning", 20)]
    assert "train loss 3.2 is 3.2x the median 1 " in spike[0].message and "learning_rate (now 0.0002)" in spike[0].message
    assert watch.train_loss(21, 4.0) == []  # the same episode
    assert watch.train_loss(22, 1.1) == []  # over
    assert [e.step for e in watch.train_loss(23, 2.6)] == [23]  # a new one


def test_small_losses_doubling_is_not_a_spike():
    watch = HealthWatch(JobSpec.parse({"base_model": "m", "training": {"max_steps": 100}}))
    for step in range(1, 21):
        assert watch.train_loss(step, 0.02 if step > 1 else 1.5) == []  # learned, then level
    assert watch.train_loss(21, 0.3) == []  # 15x the median, but a jump of 0.28 nats: a near-perfect model still
    assert watch.train_loss(22, 0.6) != []  # half a nat above it: a spike


def test_a_run_whose_loss_jumped_and_stayed_up_is_not_learning():
    """A learning rate far too high: the loss jumps within the first logs, which the spike rule does not judge,
    and stays up, so no later log is a spike either. The median of the last 20 logs no lower than the first
    logged loss says it (once per episode); a curve that fell and levelled off, however flat, does not."""
    spec = JobSpec.parse({"base_model": "m", "training": {"max_steps": 100, "learning_rate": 0.05}})
    diverged = HealthWatch(spec)
    losses = [2.1, 9.5, 11.0, *[10.3 + 0.1 * (i % 3) for i in range(18)]]  # 21 logs: the 21st is the first judged
    warned = [(step, e) for step, loss in enumerate(losses, 1) for e in diverged.train_loss(step, loss)]
    assert [(step, e.type, e.level) for step, e in warned] == [(21, "not_learning", "warning")]
    message = warned[0][1].message
    assert "the median train loss of the last 20 logs, 10.4, is no lower than the first logged, 2.1" in message
    assert "training.learning_rate (now 0.05) is too high" in message
    assert diverged.train_loss(22, 10.4) == []  # the same episode
    for step in range(23, 43):
        diverged.train_loss(step, 1.5)  # recovered: the episode is over once the median is below the start
    again = [e.type for step in range(43, 63) for e in diverged.train_loss(step, 12.0)]
    assert again == ["loss_spike", "not_learning"]  # the jump is a spike; staying up, not learning again

    levelled = HealthWatch(spec)  # a strong base on familiar data: falls a little, then flat with noise
    curve = [1.30, 1.22, 1.18, *[1.17 + 0.02 * (i % 5) for i in range(200)]]
    assert [e for step, loss in enumerate(curve, 1) for e in levelled.train_loss(step, loss)] == []


def test_overfitting_needs_rising_eval_and_falling_train():
    spec = JobSpec.parse({"base_model": "m", "training": {"max_steps": 100}})
    watch = HealthWatch(spec)
    evals = [2.0, 1.5, 1.6, 1.7, 1.8, 1.9, 1.4, 1.5, 1.6, 1.7]
    found = []
    for i, loss in enumerate(evals):
        step = 10 * (i + 1)
        watch.train_loss(step - 5, 1.0 - 0.05 * i)  # train falls throughout
        found += [(e.type, e.step) for e in watch.eval_loss(step, loss)]
    # Three rises after step 20: a warning at step 50; none for the fourth rise (same episode); eval fell at
    # step 70, so three rises after it are a new episode.
    assert found == [("overfitting", 50), ("overfitting", 100)]
    assert OVERFIT_RISES == 3

    both_rise = HealthWatch(spec)
    for i, loss in enumerate([1.0, 1.1, 1.2, 1.3]):
        both_rise.train_loss(10 * i + 5, 1.0 + 0.1 * i)
        assert both_rise.eval_loss(10 * i + 10, loss) == []  # a learning rate too high, not overfitting
    assert both_rise.eval_loss(40, 9.0) == []  # the final evaluation repeating the last step's: ignored


def test_memorising_is_train_near_zero_with_eval_far_from_it():
    spec = JobSpec.parse({"base_model": "m", "training": {"max_steps": 100}})
    watch = HealthWatch(spec)
    watch.train_loss(1, 0.02)
    assert watch.eval_loss(2, 0.15) == []  # learned the task: both small (the demo task ends like this)
    watch.train_loss(3, 0.05)
    [event] = watch.eval_loss(4, 0.9)
    assert (event.type, event.step, event.data["train_loss"], event.data["eval_loss"]) == ("memorising", 4, 0.05, 0.9)
    watch.train_loss(5, 0.04)
    assert watch.eval_loss(6, 1.0) == []  # the same episode
    watch.train_loss(7, MEMORISE_TRAIN_NATS)
    assert watch.eval_loss(8, 5.0) == []  # not near zero: over
    watch.train_loss(9, 0.05)
    assert [e.step for e in watch.eval_loss(10, 0.6)] == [10]


def test_best_eval_counts_evaluations_without_improvement():
    best = BestEval()
    assert [best.observe(s, loss) for s, loss in [(2, 3.0), (4, 2.0), (6, 2.0), (8, 2.5), (8, 2.5), (10, 1.9)]] == [
        True, True, False, False, None, True]
    assert (best.step, best.eval_loss, best.evals_since) == (10, 1.9, 0)


# ---------------------------------------------------------------- a spike, injected into a real run


class PoisonedSteps(TrainerCallback):
    """Poisoned steps, `first` to `last`: the output head negated for those steps alone, so their loss
    jumps as a run of bad batches would, and put back before the next."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.first:
            self._flip(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.last:
            self._flip(model)

    @staticmethod
    def _flip(model):
        with torch.no_grad():
            model.get_output_embeddings().weight.neg_()


def test_a_loss_spike_in_training_is_warned_once_at_its_step(tiny_model_dir, demo_data, tmp_path):
    events = []
    spec = spec_of(tiny_model_dir, dict(max_steps=16, logging_steps=1, save_steps=1000, per_device_batch_size=4))
    result = run(spec, demo_data["train"], tmp_path, sink=events.append, extra_callbacks=(PoisonedSteps(11, 12),))
    assert result.status == "succeeded"
    train = curve(tmp_path, "train")
    healthy = max(train[s] for s in range(5, 11))
    assert train[11] > 2 * healthy and train[12] > 2 * healthy and train[13] < healthy  # what was injected
    [spike] = warnings_of(events, "loss_spike")  # once: step 12 is the same episode
    assert spike.step == 11 and spike.level == "warning" and spike.data["train_loss"] == train[11]
    assert "loss spike at step 11" in spike.message and "learning_rate (now 0.003)" in spike.message
    assert not warnings_of(events, "overfitting") and not warnings_of(events, "memorising")  # no validation set


# ---------------------------------------------------------------- a run that overfits


@pytest.fixture(scope="module")
def overfit_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("overfit-data")
    # Four rows (four animals) to learn from, eight held-out prompts about all sorts of animals: the model
    # first learns the answer's form (eval falls), then the four answers by heart (eval rises).
    return {"train": write_jsonl(demo_rows(0, 4), d / "train.jsonl"),
            "validation": write_jsonl(demo_rows(0, 8, split="heldout"), d / "validation.jsonl")}


PATIENCE = 4  # more than OVERFIT_RISES: the run warns of overfitting before early stopping ends it
OVERFIT = dict(max_steps=40, learning_rate=3e-3, lr_scheduler="constant", warmup_ratio=0.0, per_device_batch_size=4,
               logging_steps=1, eval_steps=2, save_steps=1000, early_stopping=PATIENCE)


def overfit_spec(model_dir) -> JobSpec:
    return spec_of(model_dir, OVERFIT, {"use_best_checkpoint": True})


@pytest.fixture(scope="module")
def overfit_run(tiny_model_dir, overfit_data, tmp_path_factory):
    events = []
    out = tmp_path_factory.mktemp("overfit-run")
    result = run(overfit_spec(tiny_model_dir), overfit_data["train"], out,
                 validation_path=overfit_data["validation"], sink=events.append)
    return result, events


def test_an_overfitting_run_is_warned_at_the_steps_its_curves_turn(overfit_run):
    result, events = overfit_run
    evals, train = curve(result.out_dir, "eval"), curve(result.out_dir, "train")
    steps = sorted(evals)
    # Where the recorded curves turn: the third rise in a row of eval loss after its lowest point.
    lowest = min(steps, key=evals.get)
    rising = steps[steps.index(lowest):][:OVERFIT_RISES + 1]
    turned = rising[-1]
    assert all(evals[a] < evals[b] for a, b in pairwise(rising)) and train[turned] < train[lowest]

    [overfitting] = warnings_of(events, "overfitting")
    assert (overfitting.step, overfitting.level, overfitting.data["from_step"]) == (turned, "warning", lowest)
    assert f"from {evals[lowest]:.4g} at step {lowest} to {evals[turned]:.4g}" in overfitting.message

    # Memorising: the first evaluation at which train loss (the logs since the evaluation before) is near
    # zero while eval loss is far from it.
    [memorising] = warnings_of(events, "memorising")
    at = memorising.step
    assert memorising.data["eval_loss"] == evals[at] and evals[at] > 10 * memorising.data["train_loss"]
    assert memorising.data["train_loss"] == pytest.approx((train[at - 1] + train[at]) / 2)  # two logs' median
    before = steps[steps.index(at) - 1]
    assert (train[before - 1] + train[before]) / 2 >= MEMORISE_TRAIN_NATS  # not near zero one evaluation earlier
    assert not warnings_of(events, "loss_spike")


def test_early_stopping_ends_the_run_patience_evaluations_after_the_best(overfit_run):
    result, events = overfit_run
    evals = curve(result.out_dir, "eval")
    best_step = min(evals, key=evals.get)
    stop_step = best_step + PATIENCE * OVERFIT["eval_steps"]
    assert result.summary["steps"]["completed"] == stop_step < result.summary["steps"]["planned"] == 40
    [stopped] = warnings_of(events, "early_stopped")
    assert stopped.step == stop_step and stopped.data == {
        "patience": PATIENCE, "best_step": best_step, "best_eval_loss": evals[best_step]}
    assert max(evals) == stop_step  # no evaluation (nor step) after it
    assert result.summary["best_eval"] == {"step": best_step, "eval_loss": evals[best_step],
                                           "final_adapter_is_best": True, "early_stopped_at": stop_step}


def test_the_summary_as_printed_says_the_run_stopped_early_and_which_adapter_shipped(overfit_run):
    """`qlora train` and `qlora jobs show` print the summary: an early-stopped run read "steps 20 / 40, eval loss
    2.2100" (the last step's), saying neither why it stopped at half nor that the adapter shipped is the best
    evaluation's, with a lower eval loss."""
    from app.cli.render import summary_rows

    result, _ = overfit_run
    summary, best = result.summary, result.summary["best_eval"]
    rows = dict(summary_rows(summary))
    completed = summary["steps"]["completed"]
    assert rows["steps"] == (f"{completed} / 40, stopped early at step {completed}: the eval loss stopped improving "
                             "(training.early_stopping)")
    assert rows["eval loss"] == f"{summary['eval_loss_final']:.4f} (the last step's)"
    assert rows["best eval loss"] == f"{best['eval_loss']:.4f} at step {best['step']}; the adapter shipped"


def eval_loss_of_adapter(adapter_dir, base_dir, summary: dict, validation_path, tmp_path) -> float:
    """The eval loss of a saved adapter, measured afresh: the base loaded again (in the run's compute
    dtype: bfloat16 on a CPU that computes it natively), the adapter read from disk, the validation rows
    through trl's evaluation loop (the trainer's own loss, as the run measures it)."""
    from worker.training.tokenization import encode_examples

    spec, compute_dtype = JobSpec.parse(summary["spec"]), getattr(torch, summary["compute_dtype"])
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(load_base_model(base_dir, spec.quantization, compute_dtype, "cpu"), adapter_dir)
    t = spec.training
    rows, _ = encode_examples(read_jsonl(validation_path).examples, tokenizer,
                              max_seq_length=t.max_seq_length, train_on_inputs=t.train_on_inputs)
    dataset = HFDataset.from_list(rows)  # trl asks for a train set too; nothing trains
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, eval_dataset=dataset,
                         args=SFTConfig(output_dir=str(tmp_path), per_device_eval_batch_size=t.per_device_batch_size,
                                        max_length=t.max_seq_length, eval_packing=False, use_cpu=True,
                                        bf16=compute_dtype == torch.bfloat16,
                                        report_to="none", disable_tqdm=True))
    return trainer.evaluate()["eval_loss"]


def test_use_best_checkpoint_ships_the_best_steps_adapter(overfit_run, tiny_model_dir, overfit_data, tmp_path):
    result, events = overfit_run
    evals = curve(result.out_dir, "eval")
    best = result.summary["best_eval"]
    assert evals[best["step"]] == best["eval_loss"] == min(evals.values())
    last = evals[result.summary["steps"]["completed"]]
    assert last > best["eval_loss"] + 0.1  # the last step's adapter is clearly another one
    [used] = warnings_of(events, "best_checkpoint_used")
    assert used.step == best["step"]

    shipped = eval_loss_of_adapter(result.out_dir / "adapter", tiny_model_dir, result.summary,
                                   overfit_data["validation"], tmp_path)
    assert shipped == pytest.approx(best["eval_loss"], rel=1e-5, abs=1e-6)


def test_a_paused_run_resumes_knowing_its_best_adapter_and_its_warnings(overfit_run, tiny_model_dir, overfit_data,
                                                                        tmp_path):
    """Paused after its best evaluation and its memorising warning, on another host for all it knows: the
    best weights come back from the checkpoint, the watch from the logged curve, and the resumed run
    warns and ships as the run that was never paused."""
    straight, straight_events = overfit_run
    best_step = straight.summary["best_eval"]["step"]
    [memorising], [overfitting] = warnings_of(straight_events, "memorising"), warnings_of(straight_events, "overfitting")
    pause_at = memorising.step
    assert best_step < pause_at < overfitting.step  # what this test is about
    spec = overfit_spec(tiny_model_dir)
    paused = run(spec, overfit_data["train"], tmp_path, validation_path=overfit_data["validation"],
                 pause=pause_after(pause_at))
    assert paused.status == "paused" and (tmp_path / "checkpoints" / f"step-{pause_at}" / BEST_ADAPTER_FILE).is_file()

    events = []
    resumed = run(spec, overfit_data["train"], tmp_path, validation_path=overfit_data["validation"], resume=True,
                  sink=events.append)
    assert resumed.summary["steps"]["resumed_from"] == pause_at
    assert resumed.summary["best_eval"] == straight.summary["best_eval"]
    assert warnings_of(events, "memorising") == []  # warned before the pause: not again
    assert [e.step for e in warnings_of(events, "overfitting")] == [overfitting.step]
    assert [e.step for e in warnings_of(events, "early_stopped")] == [straight.summary["steps"]["completed"]]
    name = "adapter_model.safetensors"
    assert (tmp_path / "adapter" / name).read_bytes() == (straight.out_dir / "adapter" / name).read_bytes()


def test_early_stopping_and_best_checkpoint_refuse_a_run_without_validation(tiny_model_dir, demo_data, tmp_path):
    for training, output, field in [({"early_stopping": 3}, {}, "training.early_stopping"),
                                    ({}, {"use_best_checkpoint": True}, "output.use_best_checkpoint")]:
        spec = spec_of(tiny_model_dir, training, output)
        assert [f for f, _ in spec.validation_needed_by()] == [field]
        with pytest.raises(TrainingError, match=f"^{field}: there is no validation set") as info:
            run(spec, demo_data["train"], tmp_path / field)
        assert "add one, or set" in str(info.value)
        assert not (tmp_path / field / "metrics.jsonl").exists()  # refused before a step was trained
