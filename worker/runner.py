"""The training process: `python -m worker.runner WORKDIR`, spawned by the worker for one job.

Reads the job file, runs the recipe, and talks back through the work directory's files
(worker/training/protocol.py names them all): typed records (metrics, events, checkpoints),
appended and flushed one line at a time; progress, rewritten atomically every step; the result,
last. It uploads each complete checkpoint to object storage itself, before training goes on, and
only then reports it.

It stops after its current step when the cancel file appears (after saving a checkpoint when the
pause file appears), and also when its supervisor is gone (the parent process died) or silent (the
heartbeat file has not changed for the heartbeat deadline: the job has surely been requeued elsewhere),
so a lost worker never leaves a training process holding the GPU.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app import logs
from app.config import get_settings
from worker.training.host_claims import HOST_CLAIMS_DIR
from worker.training.protocol import (
    EXIT_NO_SPACE,
    EXIT_OUT_OF_REACH,
    CheckpointStored,
    Event,
    JobFile,
    Progress,
    QuantizedBaseStored,
    QuantizedCache,
    Record,
    RecordWriter,
    Result,
    Sink,
    WorkDir,
    out_of_space,
)

if __name__ == "__main__":
    # SIGTERM back to its default: the worker's pool process, which starts this one, ignores it (worker/tasks.py),
    # and an ignored signal stays ignored across exec; an operator's `kill` must still stop a training process.
    # So SIGHUP, which a local worker's pool process ignores too.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    # Before the imports below: transformers pulls in bitsandbytes, which logs as it loads. The
    # process trains one job, so every line it logs is about that job.
    logs.configure("trainer", get_settings().log_format)
    logs.job_id_var.set(JobFile.read(WorkDir(Path(sys.argv[1])).job).job_id)
    # The whole training stack, at once and for less (worker/training/stack.py): the imports below and
    # _train's then find it loaded.
    from worker.training import stack

    with stack.loading():
        import worker.training.recipe  # noqa: F401

from transformers import TrainerCallback  # noqa: E402

from app.storage.base import make_key, storage_from_settings, storage_out_of_reach  # noqa: E402
from worker.training.spec import JobSpec  # noqa: E402
from worker.transfer import WriterStream, tree_bytes  # noqa: E402

# Fault injection for tests/faults: stall forever halfway through uploading this step's checkpoint,
# so a test can kill the process while a checkpoint is being written.
FAULT_STALL_CHECKPOINT = "QLORA_FAULT_STALL_CHECKPOINT_STEP"
# Fault injection for tests/faults: after this optimizer step, wait until the file FAULT_RELEASE
# appears in the work directory (or until asked to stop), so a test knows the job is still running
# for as long as a fault it injects lasts, however fast the machine trains.
FAULT_HOLD_AT_STEP = "QLORA_FAULT_HOLD_AT_STEP"
FAULT_RELEASE = "fault-release"
# Fault injection for tests: "STEP:MICRO_BATCH": from optimizer step STEP on, a micro-batch larger than
# MICRO_BATCH runs out of device memory (torch's OutOfMemoryError, as the CUDA allocator raises it), as a
# job whose estimate fell short would on a GPU.
FAULT_OUT_OF_MEMORY = "QLORA_FAULT_OUT_OF_MEMORY"

log = logging.getLogger(__name__)


class ProgressFile(TrainerCallback):
    """Rewrites the progress file after every optimizer step: cheap, and always a whole file."""

    def __init__(self, path: Path):
        self.path = path

    def _write(self, state) -> None:
        Progress(step=state.global_step, total_steps=state.max_steps,
                 tokens_seen=state.num_input_tokens_seen).write(self.path)

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._write(state)


class CheckpointUpload(TrainerCallback):
    """After the recipe has moved a checkpoint into place, stream it (with the run manifest) to
    object storage as one tar and report it. A checkpoint exists for a resume only once reported.

    The recipe announces `checkpoint_saved` once the checkpoint is complete on this disk, which is
    saved for `qlora train`; for the service it is saved once it is in storage. So the recipe's
    records pass through `recipe_sink`, which holds that event back until the upload is reported:
    a client reloading the job's checkpoints on the event finds it there, and an upload that fails
    announces nothing."""

    def __init__(self, workdir: WorkDir, out_dir: Path, team_id: str, sink: Sink, storage):
        self.workdir = workdir
        self.out_dir = out_dir
        self.team_id = team_id
        self.sink = sink
        self.storage = storage
        self.stall_at = int(os.environ.get(FAULT_STALL_CHECKPOINT, "-1"))
        self.held: dict[int | None, Event] = {}  # by step: the recipe's checkpoint_saved, until uploaded

    def recipe_sink(self, record: Record) -> None:
        if isinstance(record, Event) and record.type == "checkpoint_saved":
            self.held[record.step] = record
        else:
            self.sink(record)

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        source = self.out_dir / "checkpoints" / f"step-{step}"
        if not source.is_dir():
            return
        expected = tree_bytes(source) + tree_bytes(self.out_dir / "run.json")
        with self.storage.writer(make_key(self.team_id, "checkpoints"), expected_size=expected) as writer:
            with tarfile.open(fileobj=WriterStream(writer), mode="w|") as tar:  # streamed: no temp archive on disk
                tar.add(self.out_dir / "run.json", arcname="run.json")
                tar.add(source, arcname=f"checkpoints/step-{step}")
                if step == self.stall_at:
                    self.workdir.fault_stalled.touch()
                    while True:
                        time.sleep(1)
            stored = writer.commit()
        self.sink(CheckpointStored(step=step, key=stored.key, size=stored.size, sha256=stored.sha256,
                                   tokens_seen=state.num_input_tokens_seen))
        saved = self.held.pop(step, None)
        if saved is not None:
            self.sink(saved)


class FaultOutOfMemory(TrainerCallback):
    """tests: the device's memory ends at a micro-batch (see FAULT_OUT_OF_MEMORY)."""

    def __init__(self, step: int, micro_batch: int):
        self.step, self.micro_batch = step, micro_batch

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 >= self.step and args.per_device_train_batch_size > self.micro_batch:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_OUT_OF_MEMORY}: micro-batch "
                                         f"{args.per_device_train_batch_size} at step {state.global_step + 1})")


class FaultHold(TrainerCallback):
    """tests/faults: hold the training loop after one step until released (see FAULT_HOLD_AT_STEP)."""

    def __init__(self, workdir: WorkDir, step: int, stop: Callable[[], bool]):
        self.release = workdir.root / FAULT_RELEASE
        self.step = step
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        while not self.release.exists() and not self.stop():
            time.sleep(0.1)


def supervisor_gone(workdir: WorkDir, parent: int, deadline_s: float) -> HeartbeatWatch:
    """True once the worker is gone (this process was handed to another parent) or silent: its heartbeat file
    unchanged for `deadline_s` (see HeartbeatWatch). The watch's thread runs until the process ends."""
    watch = HeartbeatWatch(workdir.heartbeat, parent, deadline_s)
    watch.start()
    return watch


class HeartbeatWatch(threading.Thread):
    """Whether the worker still touches the heartbeat file, judged by when this process saw its mtime change,
    on this process's monotonic clock. Not the file's age by the wall clock (now minus its mtime): a host's
    clock stepped ahead by more than the deadline (NTP correcting it, a VM resumed) made a live worker's file
    look that old, the run stopped as if cancelled, and the reaper took the job for a lost worker's.

    A thread samples the mtime about every second, so the answer does not depend on how often the run asks
    (once after setup, which can load a base for minutes, then once a step): a worker that touched the file
    during the load and then froze is silent from its last touch, not from when the run next looked. A change
    is dated at the sample before the one that saw it, the earliest it can have happened: after a gap in
    sampling (this process stopped or starved) it may be old, and counting it fresh would keep a run going for
    a deadline more after the reaper gave its job to another worker. A missing file is a value
    too, and no touch: the worker touches the file before it starts this process, so a missing one means the
    work directory was removed, and its absence counts toward the deadline like an unchanged mtime."""

    INTERVAL_S = 1.0

    def __init__(self, heartbeat: Path, parent: int, deadline_s: float, clock: Callable[[], float] = time.monotonic):
        super().__init__(name="heartbeat-watch", daemon=True)
        self.heartbeat, self.parent, self.deadline_s, self.clock = heartbeat, parent, deadline_s, clock
        self.interval_s = min(self.INTERVAL_S, deadline_s / 10)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._seen = _mtime(heartbeat)
        self._sampled_at = self._changed_at = clock()  # the worker touched the file as it spawned this process

    def run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stopped.set()

    def sample(self) -> None:
        with self._lock:
            now, seen = self.clock(), _mtime(self.heartbeat)
            if seen != self._seen:
                if seen is not None:  # touched (forward or back, whatever the wall clock did): alive by then
                    self._changed_at = self._sampled_at
                self._seen = seen
            self._sampled_at = now

    def __call__(self) -> bool:
        if os.getppid() != self.parent:
            return True
        self.sample()
        with self._lock:
            return self._sampled_at - self._changed_at > self.deadline_s


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def main(root: Path) -> int:
    workdir = WorkDir(root)
    _quiet_progress_bars()
    try:
        return _train(workdir, JobFile.read(workdir.job), get_settings())
    except Exception as exc:
        # A disk it writes to is full (a checkpoint, a record, the merged model; torch says so in its own
        # words), or storage is out of reach as a checkpoint goes up: the exit status says which, and the
        # worker hands the job back after a wait, to resume from its newest uploaded checkpoint. A
        # half-written checkpoint was never marked complete, nor reported, so nothing takes it for one.
        if out_of_space(exc):
            log.error("a disk is full; stopping so the job can resume from its newest checkpoint: %s", exc)
            return EXIT_NO_SPACE
        if storage_out_of_reach(exc):
            log.error("storage is out of reach (%s: %s)", type(exc).__name__, exc)  # the worker quotes this line
            return EXIT_OUT_OF_REACH
        raise


def _quiet_progress_bars() -> None:
    """Progress bars redraw one line with \r: noise in a log file. Progress goes to progress.json."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


def _train(workdir: WorkDir, job: JobFile, settings) -> int:
    # Imported once logging is set up: bitsandbytes and friends log as they load.
    from worker.training.data import DataError
    from worker.training.recipe import OutOfMemoryInTraining, TrainingError, run
    from worker.training.spec import SpecError
    from worker.training.tokenization import TemplateError

    gone = supervisor_gone(workdir, os.getppid(), settings.heartbeat_deadline_s)
    with RecordWriter(workdir.records) as sink:
        out_dir = Path(job.out_dir)
        storage = storage_from_settings(settings)
        cache = job.quantized_cache

        def cancel() -> bool:
            return workdir.cancel.exists() or gone()

        upload = CheckpointUpload(workdir, out_dir, job.team_id, sink, storage)
        callbacks: tuple[TrainerCallback, ...] = (ProgressFile(workdir.progress), upload)
        if FAULT_OUT_OF_MEMORY in os.environ:
            callbacks += (FaultOutOfMemory(*map(int, os.environ[FAULT_OUT_OF_MEMORY].split(":"))),)
        if FAULT_HOLD_AT_STEP in os.environ:
            # Released by the test, or by a cancel or pause: the run then stops after its next step.
            callbacks += (FaultHold(workdir, int(os.environ[FAULT_HOLD_AT_STEP]),
                                    lambda: cancel() or workdir.pause.exists()),)
        try:
            result = run(
                JobSpec.parse(job.spec, stored=True), job.train_path, out_dir,
                validation_path=job.validation_path, registry=job.registry, sink=upload.recipe_sink,
                resume=job.resume, cancel=cancel, pause=workdir.pause.exists,
                quantized_cache=Path(cache.dir) if cache else None, extra_callbacks=callbacks,
                initial_adapter=Path(job.initial_adapter) if job.initial_adapter else None,
                base_model_id=job.base_model_id, base_model_revision=job.base_model_revision, provenance=job.provenance,
                max_paged_fraction=settings.max_paged_fraction,
                # Shared with the other workers of this host: each run counts what the others claimed and have not
                # taken yet (worker/training/host_claims.py).
                host_claims=settings.work_dir / HOST_CLAIMS_DIR,
            )
            outcome = Result(status=result.status, summary=result.summary, report=result.report)
        except OutOfMemoryInTraining as exc:
            outcome = Result(status="failed", error=str(exc), retry_with=exc.smaller)
        except (SpecError, DataError, TemplateError, TrainingError) as exc:
            outcome = Result(status="failed", error=str(exc))
        if cache and not cache.hit and (Path(cache.dir) / "config.json").is_file():
            share_quantized_base(cache, storage, sink)
    outcome.write(workdir.result)
    return 0


def share_quantized_base(cache: QuantizedCache, storage, sink: Sink) -> None:
    """Upload the base this run quantized, for later jobs of any team (registry models are shared);
    the worker records it, and of two jobs that quantized the same base at once the first wins.

    Only a shortcut for later jobs, so a failure (storage refusing it, out of reach, full) is said as a
    warning and the run's result stands. It comes after the run and before its result is written: raised,
    the process exited with no result, and the finished run (evaluation, merge, eval report) was thrown
    away as a lost attempt and done again; a refusal that lasted (a 35 GB upload is a long window) lost
    every attempt. The writer's context removes a partial upload."""
    try:
        with storage.writer(make_key("shared", "quantized-bases"), expected_size=tree_bytes(Path(cache.dir))) as writer:
            with tarfile.open(fileobj=WriterStream(writer), mode="w|") as tar:
                tar.add(cache.dir, arcname="quantized")
            stored = writer.commit()
    except Exception as exc:
        said = f"{type(exc).__name__}: {exc}"
        log.warning("the quantized base was not stored for later jobs: %s", said, exc_info=True)
        sink(Event(type="quantized_base_not_cached", level="warning",
                   message=f"the quantized base this run made was not stored for later jobs "
                           f"({said[:300]}); the next job on this base quantizes it again"))
        return
    sink(QuantizedBaseStored(key=cache.key, storage_key=stored.key, size=stored.size, sha256=stored.sha256,
                             identity=cache.identity))


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
