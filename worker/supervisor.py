"""One job on one worker: claim → prepare → spawn the training process → supervise → record.

The training runs in its own process (worker/runner.py) so a crash, an OOM or a kill of it never
takes the worker down, and this process never touches CUDA. They talk through files in the job's
work directory: the trainer appends records.jsonl and rewrites progress.json; this side creates
`cancel` (or `pause`) to ask it to stop; result.json is its last word. This side owns every database write,
each fenced by the attempt number it claimed.
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
        workdir = self.settings.work_dir / job.id / f"attempt-{job.attempt}"
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
            shutil.rmtree(workdir, ignore_errors=True)

    def _prepare(self, job: ClaimedJob, workdir: Path) -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        train = workdir / "train.jsonl"
        self.storage.download(job.train.storage_key, train, expected_sha256=job.train.sha256)
        validation = None
        if job.validation:
            validation = workdir / "validation.jsonl"
            self.storage.download(job.validation.storage_key, validation, expected_sha256=job.validation.sha256)
        out = workdir / "out"
        if job.resume_from is not None:
            # The checkpoint archive holds checkpoints/step-N and the run manifest, as the recipe wrote them.
            archive = workdir / "resume.tar"
            self.storage.download(job.resume_from.storage_key, archive, expected_sha256=job.resume_from.sha256)
            with tarfile.open(archive) as tar:
                tar.extractall(out, filter="data")
            archive.unlink()
        base_path = self._base_model_path(job.base_model)
        (workdir / "job.json").write_text(json.dumps({
            "spec": job.spec,
            "train_path": str(train),
            "validation_path": str(validation) if validation else None,
            "registry": {job.base_model["name"]: str(base_path)},
            "quantized_cache": self._quantized_cache(job, base_path, workdir),
            "out_dir": str(out),
            "team_id": job.team_id,
            "job_id": job.id,
            "resume": job.attempt > 1,
        }))

    def _quantized_cache(self, job: ClaimedJob, base_path: Path, workdir: Path) -> dict | None:
        """Fetch the pre-quantized base for this model and quantization if one is cached (checked
        against its sha256), or name where the training process should save one."""
        if job.spec["quantization"]["bits"] == "none":
            return None
        identity = quantized_identity(job, base_path, job.queue)
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        target = workdir / "quantized"
        with session_scope(self.db) as session:
            cached = runs.cached_base(session, key)
        if cached is not None:
            archive = workdir / "quantized.tar"
            try:
                self.storage.download(cached.storage_key, archive, expected_sha256=cached.sha256)
                with tarfile.open(archive) as tar:
                    tar.extractall(workdir, filter="data")
                archive.unlink()
                return {"dir": str(target), "key": key, "hit": True, "identity": identity}
            except Exception:  # a damaged entry must not fail the job: forget it and quantize afresh
                log.exception("the cached quantized base %s is unusable; quantizing afresh", key)
                shutil.rmtree(target, ignore_errors=True)
                with session_scope(self.db) as session:
                    stale = runs.forget_cached_base(session, key)
                self._delete([stale] if stale else [])
        return {"dir": str(target), "key": key, "hit": False, "identity": identity}

    def _base_model_path(self, model: dict) -> Path:
        if model["path"]:
            return Path(model["path"])
        # A hub model pinned to a revision, for hosts that reach a hub; weights only, never code.
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            model["hub_id"], revision=model["revision"], cache_dir=str(self.settings.home / "hub"),
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]))

    def _spawn(self, workdir: Path) -> subprocess.Popen:
        log_file = open(workdir / "train.log", "ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "worker.runner", str(workdir)],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir,
                start_new_session=True,  # its own process group: a kill reaches its helpers too
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log_file.close()

    def _supervise(self, job: ClaimedJob, workdir: Path, proc: subprocess.Popen) -> dict | None:
        """Relay records and heartbeats until the process exits; pass on a cancel; kill it if the
        lease is lost or a cancel is not obeyed in time. Returns result.json, if it wrote one."""
        records = RecordTail(workdir / "records.jsonl")
        trainer_log = RecordTail(workdir / "train.log", parse=False)
        heartbeat = workdir / "heartbeat"
        cancel_sent_at = None
        while True:
            heartbeat.touch()  # the training process stops by itself when this goes stale
            exited = proc.poll() is not None
            # The trainer's own log lines (JSON, with the job id) join this worker's log stream.
            for line in trainer_log.read_new():
                sys.stderr.write(line + "\n")
            batch = records.read_new()
            try:
                with session_scope(self.db) as session:
                    status, unkept = runs.report(session, job.id, job.attempt, batch,
                                                 _read_json(workdir / "progress.json"), self.settings.keep_checkpoints)
            except LeaseLost:
                _kill(proc)
                # Checkpoints it uploaded that will never be recorded: nobody else would delete them.
                self._delete([r["key"] for r in batch + records.read_new() if r.get("kind") == "checkpoint"])
                raise
            self._delete(unkept)
            if exited:
                break
            if status == states.PAUSING:
                (workdir / "pause").touch()  # it saves a checkpoint, then stops
            if status == states.CANCELLING and cancel_sent_at is None:
                (workdir / "cancel").touch()
                cancel_sent_at = time.monotonic()
            if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > self.settings.cancel_grace_s:
                log.warning("job %s did not stop within %ss of its cancel; killing it", job.id,
                            self.settings.cancel_grace_s)
                _kill(proc)
                return {"status": states.CANCELLED, "error": "cancelled; the training process had to be killed"}
            time.sleep(self.settings.supervise_interval_s)
        return _read_json(workdir / "result.json")

    def _record(self, job: ClaimedJob, workdir: Path, outcome: dict | None, returncode: int) -> None:
        if outcome is None:
            self._finish(job, states.FAILED, error=(
                f"the training process exited with code {returncode} without a result; "
                f"last lines of its log:\n{_tail(workdir / 'train.log')}"))
            return
        status = outcome["status"]
        if status == states.SUCCEEDED:
            for kind in ARTIFACTS:
                source = workdir / "out" / kind
                if source.is_dir():
                    self._upload_artifact(job, workdir, kind, source)
        self._finish(job, status, error=outcome.get("error"), summary=outcome.get("summary"))

    def _upload_artifact(self, job: ClaimedJob, workdir: Path, kind: str, source: Path) -> None:
        archive = workdir / f"{kind}.tar"
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


class RecordTail:
    """Reads the lines appended to a file since the last call (parsed as JSON unless parse=False);
    a half-written last line waits for the next call."""

    def __init__(self, path: Path, parse: bool = True):
        self.path = path
        self.parse = parse
        self.offset = 0

    def read_new(self) -> list:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        lines = [line for line in complete.splitlines() if line.strip()]
        return [json.loads(line) for line in lines] if self.parse else [
            line.decode("utf-8", "replace") for line in lines]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
