"""A self-hosted service reports nothing of its teams' runs: trl's trainers send each run's trainer, model type and
GPU to Hugging Face from a thread as they are made (trl.trainer.base_trainer._send_telemetry), unless telemetry is
off or CI is set. Checked in a fresh process without either, that imported huggingface_hub before the engine, as a
program embedding it (or a test process) does: the environment the engine sets then comes too late."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.deployment import ROOT

PROBE = """
import huggingface_hub.constants  # first, as an embedding program may: its switches are read now
import worker.training.recipe  # the engine, as every training path loads it
from huggingface_hub.utils import _telemetry, send_telemetry

send_telemetry(topic="trl/SFTTrainer", library_name="trl", library_version="0")  # what trl's trainers call
print("reported" if _telemetry._TELEMETRY_THREAD is not None else "silent")
"""


def test_a_training_process_reports_nothing_to_hugging_face():
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "silent", done.stdout
