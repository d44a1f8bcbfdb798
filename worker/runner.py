"""The training process: `python -m worker.runner WORKDIR`, spawned by the worker for one job.

Reads WORKDIR/job.json, runs the recipe, and talks back through files (see supervisor.py):
records.jsonl (metrics, events and checkpoints, appended and flushed one line at a time),
progress.json (rewritten atomically every step), result.json (last). It uploads each complete
checkpoint to object storage itself, before training goes on, and only then reports it.

It stops after its current step when WORKDIR/cancel appears (after saving a checkpoint when
WORKDIR/pause appears), and also when its supervisor is
gone (the parent process died) or silent (the heartbeat file is older than the heartbeat
deadline: the job has surely been requeued elsewhere), so a lost worker never leaves a training
process holding the GPU.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import time
from pathlib import Path

from app import logs
from app.config import get_settings

if __name__ == "__main__":
    # Before the imports below: transformers pulls in bitsandbytes, which logs as it loads. The
    # process trains one job, so every line it logs is about that job.
    logs.configure("trainer", get_settings().log_format)
    logs.job_id_var.set(json.loads((Path(sys.argv[1]) / "job.json").read_text())["job_id"])

from transformers import TrainerCallback  # noqa: E402

from app.storage.base import make_key, storage_from_settings  # noqa: E402
from worker.training.spec import JobSpec  # noqa: E402

# Fault injection for tests/faults: stall forever halfway through uploading this step's checkpoint,
# so a test can kill the process while a checkpoint is being written.
FAULT_STALL_CHECKPOINT = "QLORA_FAULT_STALL_CHECKPOINT_STEP"


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


class CheckpointUpload(TrainerCallback):
    """After the recipe has moved a checkpoint into place, stream it (with the run manifest) to
    object storage as one tar and report it. A checkpoint exists for a resume only once reported."""

    def __init__(self, out_dir: Path, team_id: str, sink, storage):
        self.out_dir = out_dir
        self.team_id = team_id
        self.sink = sink
        self.storage = storage
        self.stall_at = int(os.environ.get(FAULT_STALL_CHECKPOINT, "-1"))

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        source = self.out_dir / "checkpoints" / f"step-{step}"
        if not source.is_dir():
            return
        with self.storage.writer(make_key(self.team_id, "checkpoints")) as writer:
            with tarfile.open(fileobj=_Stream(writer), mode="w|") as tar:  # streamed: no temp archive on disk
                tar.add(self.out_dir / "run.json", arcname="run.json")
                tar.add(source, arcname=f"checkpoints/step-{step}")
                if step == self.stall_at:
                    (self.out_dir.parent / "fault-stalled").touch()
                    while True:
                        time.sleep(1)
            stored = writer.commit()
        self.sink({"kind": "checkpoint", "step": step, "key": stored.key, "size": stored.size,
                   "sha256": stored.sha256})


class _Stream:
    """The write-only file object tarfile's stream mode needs, over a storage writer."""

    def __init__(self, writer):
        self.writer = writer

    def write(self, data: bytes) -> int:
        self.writer.write(bytes(data))
        return len(data)


def supervisor_gone(workdir: Path, parent: int, deadline_s: float):
    heartbeat = workdir / "heartbeat"

    def check() -> bool:
        if os.getppid() != parent:
            return True
        try:
            return time.time() - heartbeat.stat().st_mtime > deadline_s
        except FileNotFoundError:
            return False
    return check


def main(workdir: Path) -> int:
    job = json.loads((workdir / "job.json").read_text())
    _quiet_progress_bars()
    return _train(workdir, job, get_settings())


def _quiet_progress_bars() -> None:
    """Progress bars redraw one line with \r: noise in a log file. Progress goes to progress.json."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


def _train(workdir: Path, job: dict, settings) -> int:
    # Imported once logging is set up: bitsandbytes and friends log as they load.
    from worker.training.data import DataError
    from worker.training.recipe import TrainingError, run
    from worker.training.spec import SpecError
    from worker.training.tokenization import TemplateError

    gone = supervisor_gone(workdir, os.getppid(), settings.heartbeat_deadline_s)
    cancel_file, pause_file = workdir / "cancel", workdir / "pause"
    with open(workdir / "records.jsonl", "a", encoding="utf-8") as records:
        def sink(record: dict) -> None:
            records.write(json.dumps(record, default=str) + "\n")
            records.flush()

        out_dir = Path(job["out_dir"])
        storage = storage_from_settings(settings)
        cache = job.get("quantized_cache")
        try:
            result = run(
                JobSpec.parse(job["spec"]), job["train_path"], out_dir,
                validation_path=job["validation_path"], registry=job["registry"], sink=sink,
                resume=job["resume"], cancel=lambda: cancel_file.exists() or gone(), pause=pause_file.exists,
                quantized_cache=Path(cache["dir"]) if cache else None,
                extra_callbacks=(ProgressFile(workdir / "progress.json"),
                                 CheckpointUpload(out_dir, job["team_id"], sink, storage)),
            )
            outcome = {"status": result.status, "summary": result.summary}
        except (SpecError, DataError, TemplateError, TrainingError) as exc:
            outcome = {"status": "failed", "error": str(exc)}
        if cache and not cache["hit"] and (Path(cache["dir"]) / "config.json").is_file():
            share_quantized_base(cache, storage, sink)
    _write_json(workdir / "result.json", outcome)
    return 0


def share_quantized_base(cache: dict, storage, sink) -> None:
    """Upload the base this run quantized, for later jobs of any team (registry models are shared);
    the worker records it, and of two jobs that quantized the same base at once the first wins."""
    with storage.writer(make_key("shared", "quantized-bases")) as writer:
        with tarfile.open(fileobj=_Stream(writer), mode="w|") as tar:
            tar.add(cache["dir"], arcname="quantized")
        stored = writer.commit()
    sink({"kind": "quantized_base", "key": cache["key"], "storage_key": stored.key, "size": stored.size,
          "sha256": stored.sha256, "identity": cache["identity"]})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
