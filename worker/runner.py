"""The training process: `python -m worker.runner WORKDIR`, spawned by the worker for one job.

Reads WORKDIR/job.json, runs the recipe, and talks back only through files (see supervisor.py):
records.jsonl (metrics and events, appended and flushed one line at a time), progress.json
(rewritten atomically every step), result.json (last). It stops after its current step once
WORKDIR/cancel exists.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

from worker.training.data import DataError
from worker.training.recipe import TrainingError, run
from worker.training.spec import JobSpec, SpecError
from worker.training.tokenization import TemplateError


class ProgressFile(TrainerCallback):
    """Rewrites progress.json after every optimizer step: cheap, and always a whole file."""

    def __init__(self, path: Path):
        self.path = path

    def _write(self, state) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": state.global_step, "total_steps": state.max_steps,
                                   "tokens_seen": state.num_input_tokens_seen}))
        os.replace(tmp, self.path)

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._write(state)


def main(workdir: Path) -> int:
    job = json.loads((workdir / "job.json").read_text())
    result_path = workdir / "result.json"
    with open(workdir / "records.jsonl", "a", encoding="utf-8") as records:
        def sink(record: dict) -> None:
            records.write(json.dumps(record, default=str) + "\n")
            records.flush()

        try:
            result = run(
                JobSpec.parse(job["spec"]), job["train_path"], job["out_dir"],
                validation_path=job["validation_path"], registry=job["registry"], sink=sink,
                cancel=(workdir / "cancel").exists, extra_callbacks=(ProgressFile(workdir / "progress.json"),),
            )
            outcome = {"status": result.status, "summary": result.summary}
        except (SpecError, DataError, TemplateError, TrainingError) as exc:
            outcome = {"status": "failed", "error": str(exc)}
    _write_json(result_path, outcome)
    return 0


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
