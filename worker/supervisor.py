"""One job on one worker: claim → prepare → spawn the training process → supervise → record.

The training runs in its own process (worker/runner.py) so a crash, an OOM or a kill of it never
takes the worker down, and this process never touches CUDA. They talk through files in the job's
work directory (worker/training/protocol.py: WorkDir): the trainer appends typed records and
rewrites its progress; this side creates the cancel (or pause) file to ask it to stop; the result
is its last word. This side owns every database write, each fenced by the attempt number it claimed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from app import logs
from app.config import Settings
from app.db import session_scope
from app.jobs import runs, states
from app.jobs.runs import ClaimedJob, LeaseLost
from app.storage.base import make_key, storage_from_settings
from worker.training.protocol import (
    AppendedLines,
    CheckpointStored,
    JobFile,
    Progress,
    QuantizedCache,
    RecordReader,
    Result,
    WorkDir,
)

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30  # what a crash report shows of the training process's output
ARTIFACTS = ("adapter", "merged")


class JobRun:
    def __init__(self, settings: Settings, job_id: str, worker: str):
        self.settings = settings
        self.job_id = job_id
        self.worker = worker
        self.storage = storage_from_settings(settings)
        self.db = settings.database_url

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        with logs.job_context(self.job_id):
            self._run()

    def _run(self) -> None:
        with session_scope(self.db) as session:
            job = runs.claim(session, self.job_id, self.worker)
        if job is None:
            log.info("job %s is not queued any more; nothing to do", self.job_id)
            return
        workdir = WorkDir(self.settings.work_dir / job.id / f"attempt-{job.attempt}")
        log.info("claimed job, attempt %s", job.attempt, extra={"worker": self.worker, "attempt": job.attempt})
        proc = None
        try:
            self._prepare(job, workdir)
            proc = self._spawn(workdir)
            log.info("training process started", extra={"pid": proc.pid, "attempt": job.attempt})
            outcome = self._supervise(job, workdir, proc)
            self._record(job, workdir, outcome, proc.returncode)
        except LeaseLost:
            log.warning("job %s attempt %s: lease lost; stopping without writing", job.id, job.attempt)
        except Exception as exc:
            log.exception("job %s failed in the worker", job.id)
            self._finish(job, states.FAILED, error=f"the worker failed: {type(exc).__name__}: {exc}")
        finally:
            if proc is not None and proc.poll() is None:
                _kill(proc)
            shutil.rmtree(workdir.root, ignore_errors=True)

    def _prepare(self, job: ClaimedJob, workdir: WorkDir) -> None:
        shutil.rmtree(workdir.root, ignore_errors=True)
        workdir.root.mkdir(parents=True)
        self.storage.download(job.train.storage_key, workdir.train_data, expected_sha256=job.train.sha256)
        if job.validation:
            self.storage.download(job.validation.storage_key, workdir.validation_data,
                                  expected_sha256=job.validation.sha256)
        if job.resume_from is not None:
            # The checkpoint archive holds checkpoints/step-N and the run manifest, as the recipe wrote them.
            self._download_tar(job.resume_from, workdir.out, workdir.archive("resume"))
        base_path = self._base_model_path(job.base_model)
        JobFile(
            job_id=job.id, team_id=job.team_id, spec=job.spec,
            train_path=str(workdir.train_data),
            validation_path=str(workdir.validation_data) if job.validation else None,
            registry={job.base_model["name"]: str(base_path)},
            out_dir=str(workdir.out),
            resume=job.attempt > 1,
            quantized_cache=self._quantized_cache(job, base_path, workdir),
        ).write(workdir.job)

    def _download_tar(self, ref: runs.ObjectRef, into: Path, archive: Path) -> None:
        """Fetch a stored tar (checked against its sha256) and unpack it into a directory."""
        self.storage.download(ref.storage_key, archive, expected_sha256=ref.sha256)
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
        archive.unlink()

    def _quantized_cache(self, job: ClaimedJob, base_path: Path, workdir: WorkDir) -> QuantizedCache | None:
        """Fetch the pre-quantized base for this model and quantization if one is cached (checked
        against its sha256), or name where the training process should save one."""
        if job.spec["quantization"]["bits"] == "none":
            return None
        identity = quantized_identity(job, base_path, job.queue)
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        with session_scope(self.db) as session:
            cached = runs.cached_base(session, key)
        if cached is not None:
            try:
                # The archive holds quantized/, which lands where workdir.quantized names it.
                self._download_tar(cached, workdir.root, workdir.archive("quantized"))
                return QuantizedCache(dir=str(workdir.quantized), key=key, hit=True, identity=identity)
            except Exception:  # a damaged entry must not fail the job: forget it and quantize afresh
                log.exception("the cached quantized base %s is unusable; quantizing afresh", key)
                shutil.rmtree(workdir.quantized, ignore_errors=True)
                with session_scope(self.db) as session:
                    stale = runs.forget_cached_base(session, key)
                self._delete([stale] if stale else [])
        return QuantizedCache(dir=str(workdir.quantized), key=key, hit=False, identity=identity)

    def _base_model_path(self, model: dict) -> Path:
        if model["path"]:
            return Path(model["path"])
        # A hub model pinned to a revision, for hosts that reach a hub; weights only, never code.
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            model["hub_id"], revision=model["revision"], cache_dir=str(self.settings.home / "hub"),
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]))

    def _spawn(self, workdir: WorkDir) -> subprocess.Popen:
        log_file = open(workdir.log, "ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "worker.runner", str(workdir.root)],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir.root,
                start_new_session=True,  # its own process group: a kill reaches its helpers too
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log_file.close()

    def _supervise(self, job: ClaimedJob, workdir: WorkDir, proc: subprocess.Popen) -> Result | None:
        """Relay records and heartbeats until the process exits; pass on a cancel; kill it if the
        lease is lost or a cancel is not obeyed in time. Returns its result, if it wrote one."""
        records = RecordReader(workdir.records)
        trainer_log = AppendedLines(workdir.log)
        cancel_sent_at = None
        while True:
            workdir.heartbeat.touch()  # the training process stops by itself when this goes stale
            exited = proc.poll() is not None
            # The trainer's own log lines (JSON, with the job id) join this worker's log stream.
            for line in trainer_log.read_new():
                sys.stderr.write(line.decode("utf-8", "replace") + "\n")
            batch = records.read_new()
            try:
                with session_scope(self.db) as session:
                    status, unkept = runs.report(session, job.id, job.attempt, batch,
                                                 Progress.read(workdir.progress), self.settings.keep_checkpoints)
            except LeaseLost:
                _kill(proc)
                # Checkpoints it uploaded that will never be recorded: nobody else would delete them.
                self._delete([r.key for r in batch + records.read_new() if isinstance(r, CheckpointStored)])
                raise
            self._delete(unkept)
            if exited:
                break
            if status == states.PAUSING:
                workdir.pause.touch()  # it saves a checkpoint, then stops
            if status == states.CANCELLING and cancel_sent_at is None:
                workdir.cancel.touch()
                cancel_sent_at = time.monotonic()
            if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > self.settings.cancel_grace_s:
                log.warning("job %s did not stop within %ss of its cancel; killing it", job.id,
                            self.settings.cancel_grace_s)
                _kill(proc)
                return Result(status=states.CANCELLED, error="cancelled; the training process had to be killed")
            time.sleep(self.settings.supervise_interval_s)
        return Result.read(workdir.result)

    def _record(self, job: ClaimedJob, workdir: WorkDir, outcome: Result | None, returncode: int) -> None:
        if outcome is None:
            self._finish(job, states.FAILED, error=(
                f"the training process exited with code {returncode} without a result; "
                f"last lines of its log:\n{_tail(workdir.log)}"))
            return
        if outcome.status == states.SUCCEEDED:
            for kind in ARTIFACTS:
                source = workdir.out / kind
                if source.is_dir():
                    self._upload_artifact(job, workdir, kind, source)
        self._finish(job, outcome.status, error=outcome.error, summary=outcome.summary)

    def _upload_artifact(self, job: ClaimedJob, workdir: WorkDir, kind: str, source: Path) -> None:
        archive = workdir.archive(kind)
        with tarfile.open(archive, "w") as tar:  # weights barely compress; plain tar is fast to make and read
            tar.add(source, arcname=kind)
        stored = self.storage.put_file(make_key(job.team_id, "artifacts"), archive)
        try:
            with session_scope(self.db) as session:
                runs.add_artifact(session, job.id, job.attempt, kind, stored.key, stored.size, stored.sha256)
        except BaseException:
            self.storage.delete(stored.key)  # not recorded, so not kept
            raise
        archive.unlink()

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.storage.delete(key)
            except Exception:  # a stray object costs storage, not correctness
                log.exception("could not delete %s", key)

    def _finish(self, job: ClaimedJob, status: str, *, error: str | None = None, summary: dict | None = None) -> None:
        with session_scope(self.db) as session:
            recorded = runs.finish(session, job.id, job.attempt, status, error=error, summary=summary)
        if recorded:
            log.info("job %s", status, extra={"attempt": job.attempt, "status": status})
        else:
            log.warning("job %s attempt %s: could not record %s; the job has moved on", job.id, job.attempt, status)


def quantized_identity(job: ClaimedJob, base_path: Path, queue: str) -> dict:
    """Everything that decides the bytes of a quantized base. A local directory has no revision, so
    its weight files' names, sizes and modification times stand in for one: a changed file is a new
    entry, never a stale hit."""
    from importlib.metadata import version

    model = job.base_model
    weights = None
    if model["path"]:
        weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in base_path.glob("*.safetensors"))
    return {
        "model": model["name"], "path": model["path"], "hub_id": model["hub_id"], "revision": model["revision"],
        "weights": weights, "quantization": job.spec["quantization"],
        # The compute dtype "auto" resolves per device kind: workers of one GPU class share entries.
        "gpu_class": queue,
        "transformers": version("transformers"), "bitsandbytes": version("bitsandbytes"),
    }


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    # Progress bars redraw with \r; keep what was last on each line.
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
