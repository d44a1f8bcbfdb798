"""The demo task's full training run, shared by the modules that look at it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from tests.once import once_per_suite
from worker.training.recipe import run
from worker.training.spec import JobSpec
from worker.training.tiny import demo_spec


class FrozenBaseProbe(TrainerCallback):
    """Snapshots every non-LoRA weight (the 4-bit base, its quant state, norms, embeddings) at the
    start of training and compares at the end."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
        import bitsandbytes as bnb

        # bnb's own 4-bit layers (peft's LoRA wrappers around them are a different class).
        self.quantized = sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
        self.changed = [k for k, v in self.before.items() if not torch.equal(v, after[k])]


@pytest.fixture(scope="session")
def demo_training_run(tiny_model_dir, demo_data, tmp_path_factory, worker_id):
    """demo_spec's run (160 steps, evaluation, merge, eval report) on the demo data with its validation set:
    (the RunResult, every record it sent its sink, what FrozenBaseProbe saw). test_recipe and test_report each
    ran this same run of their own, the longest of the training tier; its tests are all in test_report.py now,
    so one process trains it while the other runs other files (once_per_suite keeps it one run should another
    file in another process ask for it: that process would wait for it, idle)."""

    def make():
        probe, records = FrozenBaseProbe(), []
        result = run(JobSpec.parse(demo_spec(str(tiny_model_dir))), demo_data["train"],
                     tmp_path_factory.mktemp("demo-run"), validation_path=demo_data["validation"],
                     sink=records.append, extra_callbacks=(probe,))
        return result, records, SimpleNamespace(quantized=probe.quantized, changed=probe.changed)

    return once_per_suite("demo-training-run", tmp_path_factory, worker_id, make)


def dataset_bytes(path) -> int:
    """What a run counts its dataset at `path` to hold in host memory: the service's token estimate (characters / 4)."""
    from worker.training.data import read_jsonl
    from worker.training.estimate import DATASET_BYTES_PER_TOKEN, token_estimate

    return DATASET_BYTES_PER_TOKEN * token_estimate(sum(e.chars() for e in read_jsonl(path).examples))
