"""How a training run reports, and how the worker and its training process talk: one module owns it.

The recipe reports through typed records handed to a `Sink`: a point of the loss curve
(`TrainPoint`, `EvalPoint`) or an `Event`. In the service, the training process (worker/runner.py)
adds what only it knows (`CheckpointStored`, `QuantizedBaseStored`: objects it put in storage) and
appends every record to the work directory's records.jsonl, one JSON line each; the supervisor
(worker/supervisor.py) reads them back as the same types and hands them to app/jobs/runs.py, which
writes them to the database. `WorkDir` names every file the two processes share.

Torch-free and service-free: the engine, the worker and the API all import it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

# ---------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True)
class _Stamped:
    time: float = field(default_factory=time.time)  # when it happened, seconds since the epoch


@dataclass(frozen=True, kw_only=True)
class TrainPoint(_Stamped):
    """One point of the training curve, per logging step."""

    kind: ClassVar[str] = "train"
    step: int
    epoch: float
    train_loss: float | None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_seen: int = 0
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    gpu_utilization: float | None = None  # busy fraction, where NVML can say
    # method dpo only (None for sft): the share of pairs whose preferred answer out-scores the other, the mean
    # implicit rewards beta*(log p - log p_ref) of each side, and their mean margin. train_loss is the DPO loss.
    reward_accuracy: float | None = None
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    reward_margin: float | None = None


@dataclass(frozen=True, kw_only=True)
class EvalPoint(_Stamped):
    """One evaluation on the validation set."""

    kind: ClassVar[str] = "eval"
    step: int
    epoch: float
    eval_loss: float | None
    perplexity: float | None = None
    # method dpo only, on the validation pairs: as TrainPoint's. eval_loss is the DPO loss (perplexity None).
    reward_accuracy: float | None = None
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    reward_margin: float | None = None


@dataclass(frozen=True, kw_only=True)
class Event(_Stamped):
    """Something a person following the job should read: started, a warning, saved, merged, failed."""

    kind: ClassVar[str] = "event"
    type: str
    level: str = "info"  # info | warning | error
    message: str = ""
    step: int | None = None
    data: dict[str, Any] | None = None  # what a program may want beside the message (a path, a size)


# What a running attempt does, in order, each announced as it starts by an Event of type PHASE_EVENT (data
# {"phase": ...}): the job shows the newest while it runs (app/jobs/runs.py keeps it), so a job at its last step
# says whether it still saves, merges or uploads. preparing: the worker downloads the data and the base and loads
# it; evaluating: the final validation loss; reporting: the eval report's answers, base and tuned.
PHASES = ("preparing", "training", "evaluating", "saving", "merging", "reporting", "uploading")
PHASE_EVENT = "phase"


def phase_event(phase: str, message: str, step: int | None = None) -> Event:
    assert phase in PHASES, phase
    return Event(type=PHASE_EVENT, message=message, step=step, data={"phase": phase})


@dataclass(frozen=True, kw_only=True)
class CheckpointStored(_Stamped):
    """A complete checkpoint, uploaded to storage: only now can a later attempt resume from it."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    key: str
    size: int
    sha256: str
    tokens_seen: int = 0  # trained up to this step: what a later attempt resuming from it starts counting from


@dataclass(frozen=True, kw_only=True)
class QuantizedBaseStored(_Stamped):
    """The 4-bit base this run quantized, uploaded for later jobs; `key` is its cache identity's hash."""

    kind: ClassVar[str] = "quantized_base"
    key: str
    storage_key: str
    size: int
    sha256: str
    identity: dict[str, Any]


Record = TrainPoint | EvalPoint | Event | CheckpointStored | QuantizedBaseStored
MetricPoint = TrainPoint | EvalPoint
Sink = Callable[[Record], None]

RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls for cls in (TrainPoint, EvalPoint, Event, CheckpointStored, QuantizedBaseStored)}


def record_to_json(record: Record) -> dict[str, Any]:
    return {"kind": record.kind, **asdict(record)}


def record_from_json(data: dict[str, Any]) -> Record:
    """The record a line of records.jsonl (or metrics.jsonl) holds; fields it does not know are ignored,
    so a newer writer never breaks an older reader."""
    cls = RECORD_TYPES[data["kind"]]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------- the work directory


class WorkDir:
    """One attempt's directory on the worker host; every file the worker and its training process share."""

    def __init__(self, root: Path):
        self.root = root
        self.job = root / "job.json"  # worker → trainer: what to run (JobFile)
        self.records = root / "records.jsonl"  # trainer → worker: records, appended and flushed one line at a time
        self.progress = root / "progress.json"  # trainer → worker: Progress, rewritten whole every optimizer step
        self.result = root / "result.json"  # trainer → worker: Result, its last word
        self.log = root / "train.log"  # the trainer's stdout and stderr, relayed by the worker
        self.heartbeat = root / "heartbeat"  # worker → trainer: touched while the worker lives; stale means stop
        self.cancel = root / "cancel"  # worker → trainer: stop after the current step
        self.pause = root / "pause"  # worker → trainer: save a checkpoint after the current step, then stop
        self.train_data = root / "train.jsonl"
        self.validation_data = root / "validation.jsonl"
        self.out = root / "out"  # the recipe's output directory: checkpoints, adapter/, merged/
        self.quantized = root / "quantized"  # the pre-quantized base, fetched from the cache or saved for it
        self.initial = root / "initial"  # the adapter the job starts from (its initial job's), as initial/adapter/
        self.fault_stalled = root / "fault-stalled"  # tests/faults: the trainer stalled mid-upload on purpose

    def archive(self, name: str) -> Path:
        """Where a tar on its way to or from storage waits (resume, quantized, adapter, merged)."""
        return self.root / f"{name}.tar"


@dataclass(frozen=True)
class QuantizedCache:
    """Where the pre-quantized base is (hit) or should be saved (miss), and what decides its bytes."""

    dir: str
    key: str
    hit: bool
    identity: dict[str, Any]


@dataclass(frozen=True)
class JobFile:
    """job.json: everything the training process needs to run one attempt."""

    job_id: str
    team_id: str
    spec: dict[str, Any]
    train_path: str
    validation_path: str | None
    registry: dict[str, str]  # base model name → local directory
    out_dir: str
    resume: bool
    quantized_cache: QuantizedCache | None = None
    initial_adapter: str | None = None  # the starting adapter's directory (initial_job_id); None: a fresh adapter
    # What the adapter names its base (adapter_config.json): the registry's hub id and revision, else its name.
    base_model_id: str | None = None
    base_model_revision: str | None = None
    # What the adapter's model card names as its making: {"job", "dataset", "validation_dataset", "initial_job"} ids.
    provenance: dict[str, str | None] | None = None

    def write(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> JobFile:
        data = json.loads(path.read_text())
        cache = data.pop("quantized_cache", None)
        return cls(**data, quantized_cache=QuantizedCache(**cache) if cache else None)


@dataclass(frozen=True)
class Progress:
    """progress.json: where training is, for the heartbeat the worker writes to the database."""

    step: int
    total_steps: int | None
    tokens_seen: int = 0

    def write(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> Progress | None:
        data = read_json(path)
        return cls(**data) if data is not None else None


@dataclass(frozen=True)
class Result:
    """result.json: how the attempt ended. status: succeeded | failed | cancelled | paused."""

    status: str
    summary: dict[str, Any] | None = None
    error: str | None = None
    report: dict[str, Any] | None = None  # the eval report (worker/training/report.py), where the run made one
    # Failed out of memory at a training step with a micro-batch above 1: the training fields that continue the
    # same run with a smaller one (recipe.smaller_micro_batch); the worker queues the job again with them.
    retry_with: dict[str, int] | None = None

    def write(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> Result | None:
        data = read_json(path)
        return cls(**data) if data is not None else None


# ---------------------------------------------------------------- a full disk

# The training process's exit status when a disk it writes to is full (sysexits' EX_TEMPFAIL): it could
# write no result then, so the code says it, and the worker hands the job back rather than failing it.
EXIT_NO_SPACE = 75
# Its exit status when storage (or the database) was out of reach as it uploaded a checkpoint (sysexits'
# EX_UNAVAILABLE): the worker hands the job back after a wait, as for its own uploads, not at once.
EXIT_OUT_OF_REACH = 69
# A write the filesystem refused for want of room: full, over a quota, or over the largest file it (or
# the process's RLIMIT_FSIZE) allows. Freeing space or raising the limit lets the same write succeed.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Libraries that report a refused write as text: torch.save's writer comes up short without an errno;
# Rust's (safetensors: adapters, merged models) end with "No space left on device (os error 28)".
TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing")
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from or while handling, is a write a full disk refused."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            if current.errno in NO_SPACE_ERRNOS:
                return True
        else:
            said = str(current)
            if any(s in said for s in TORCH_SHORT_WRITE) or any(
                    int(n) in NO_SPACE_ERRNOS for n in RUST_OS_ERROR.findall(said)):
                return True
        current = current.__cause__ or current.__context__
    return False


# ---------------------------------------------------------------- files


def write_json_atomic(path: Path, data: Any, *, indent: int | None = None, mode: int | None = None) -> None:
    """Write a JSON file whole or not at all: a reader (another process, or a restart after a crash)
    sees the old file or the new one, never half of one.

    With `mode`, the file has it from its creation on, so a secret is never readable by others, not
    even half-written by a process that dies; without, the umask decides, as for any new file."""
    text = json.dumps(data, indent=indent, default=str)
    # A name of this write's own: two processes writing one file at once (two workers updating the host's
    # weight-digest memo) each rename a whole file of their own into place, and the last one wins. With one
    # shared temporary name, each removed or overwrote the other's half-written file, and could rename it into
    # place. O_EXCL guarantees the file written is one created here, with the mode asked for, never an
    # existing file (or a link planted there) keeping its own. A process killed between the two steps leaves
    # its temporary file (hidden; nothing reads it; the held-attempt markers' sweep removes theirs).
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with open(fd, "w", encoding="utf-8") as file:
            if mode is not None:
                os.fchmod(fd, mode)  # the umask can only have narrowed it: now exactly `mode`, as asked
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a write the full disk refused leaves nothing behind
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in this directory survive a crash (a file's own fsync does not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """A JSON file, or None where there is none yet (files here are written atomically, so never half)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class AppendedLines:
    """The whole lines appended to a file since the last call; a half-written last line waits for the next."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def read_new(self) -> list[bytes]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [line for line in complete.splitlines() if line.strip()]


class RecordReader:
    """The records appended to records.jsonl since the last call."""

    def __init__(self, path: Path):
        self.lines = AppendedLines(path)

    def read_new(self) -> list[Record]:
        return [record_from_json(json.loads(line)) for line in self.lines.read_new()]


class RecordWriter:
    """A sink that appends each record to a JSONL file and flushes it, so a reader sees it at once."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, record: Record) -> None:
        self.file.write(json.dumps(record_to_json(record), default=str) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
