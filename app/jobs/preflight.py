"""Preflight in the service: what a job will train on, before it queues (POST /jobs/preflight) and
as it is created (POST /jobs refuses a job that cannot learn anything).

The report is worker/training/preflight.py's, computed with the base model's real tokenizer and chat
template from the files the registry keeps (app/models/service.py). Tokenizing a dataset is seconds of
CPU, and the tokenizer library comes with transformers and torch, which the API process never imports:
so it runs in child processes (`PreflightRunner`), a few at a time, each behind a timeout. The API's
own threads only wait, and its requests keep being answered. Waiting preflights get a child team by team
(`TeamSlots`), so one team's stream of them never keeps another's waiting longer than one turn each.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.datasets import service as datasets
from app.errors import AppError, Invalid, field_errors
from app.host import process_exists
from app.models import service as models
from app.models.tables import RegisteredModel
from app.storage.base import Storage
from app.teams.service import Caller
from worker.training.spec import JobSpec

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0  # a preflight reads at most 50,000 rows: seconds, far from this
# A new child's start (an interpreter, then the API's modules it imports) is no part of a preflight's time: it
# is waited for apart, this long. Seconds when idle, several times that on a loaded host, where counted in
# TIMEOUT_S it ate a shorter timeout whole and the child was killed before it began, and each next one too.
START_TIMEOUT_S = 120.0
WAIT_FOR_SLOT_S = 30.0  # a preflight waits this long for a free child (then POST /jobs creates the job unchecked)


DIED = "the preflight process died (killed, or out of memory)"


class PreflightBusy(AppError):
    status = 429
    code = "preflight_busy"
    retry_after_s = 60  # its message says "try again in a minute"


class NoReport(Exception):  # noqa: N818 (not an error of the request: it is created, or answered, without a report)
    """Why the runner made no report: no child free in time, no answer in time, or the child failed."""


class PreflightRefused(Invalid):
    """The job could not learn anything (or be evaluated, with a validation set of nothing left): 422 with each reason."""

    code = "preflight_refused"


class TeamSlots:
    """At most `size` holders at once. A freed slot goes to the waiting team served longest ago (or never),
    and within a team to its earliest waiter: round robin between teams, whatever order their requests
    come in. (A plain semaphore wakes its waiters in no stated order, and one team sending a preflight as
    each of its last ones ends would take the slot back, time after time, from a team that waits.)"""

    def __init__(self, size: int):
        self._free = size
        self._changed = threading.Condition()
        self._tickets = itertools.count()
        self._waiting: list[tuple[str, int]] = []  # (team, ticket), in the order they came
        self._served: dict[str, int] = {}  # each team's last grant, as a ticket number

    def acquire(self, team: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            mine = (team, next(self._tickets))
            self._waiting.append(mine)
            try:
                while not (self._free and self._next() == mine):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
                self._free -= 1
                self._served[team] = next(self._tickets)
                return True
            finally:
                self._waiting.remove(mine)
                self._changed.notify_all()  # the next in line has changed: each waiter looks again

    def release(self) -> None:
        with self._changed:
            self._free += 1
            self._changed.notify_all()

    def _next(self) -> tuple[str, int]:
        return min(self._waiting, key=lambda waiter: (self._served.get(waiter[0], -1), waiter[1]))


class PreflightRunner:
    """At most `processes` preflights at once, each in a child process of its own (spawned on first use,
    kept while it answers in time), given to the waiting teams in turn.

    A child that takes longer than `timeout_s` is killed, not left to run on: with one child, a team's
    huge dataset would otherwise keep every other team's preflights waiting behind it. A child that dies
    (killed, or out of memory on a huge row) fails the one preflight it ran; the next gets a new child."""

    def __init__(self, processes: int, timeout_s: float = TIMEOUT_S, target: Callable[[dict], dict] | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, warm_up: Callable[[], object] | None = None):
        self.processes = processes
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._target = target or _in_child  # what a child runs on each request's inputs (a test's stand-in aside)
        # What a child does before it says it started (its start is bounded by start_timeout_s, apart from any
        # preflight's timeout): for the engine's preflight, import the tokenizer's libraries.
        self._warm_up = warm_up or (_load_engine if target is None else None)
        self._slots = TeamSlots(max(processes, 1))
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._all: set[_Child] = set()
        remove_orphaned_scratch()

    @contextmanager
    def turn(self, team: str, wait_s: float) -> Iterator[Callable[..., dict]]:
        """A child of this team's for the block, as a function of the preflight's inputs that returns its
        report; NoReport when no child was free for this team within wait_s (POST /jobs goes on unchecked),
        or from the function when the report did not come within the timeout or the child failed."""
        if not self._slots.acquire(team, wait_s):
            raise NoReport(f"every preflight process was busy for {wait_s:g} s")
        try:
            yield self._ask
        finally:
            self._slots.release()

    def _ask(self, **inputs: Any) -> dict:
        for attempt in (1, 2):
            child = self._take()
            try:
                kind, value = child.ask(inputs, self.timeout_s, self.start_timeout_s)
                break
            except _Died:  # gone since it last answered (killed while idle): this preflight gets a new one
                self._drop(child)
                if attempt == 2:
                    raise NoReport(DIED) from None
            except BaseException:
                self._drop(child)
                raise
        if kind == "unstarted":
            self._drop(child)
            log.error("a preflight process did not start within %g s: it was stopped", self.start_timeout_s)
            raise NoReport(f"its process did not start within {self.start_timeout_s:g} s")
        if kind == "slow":
            self._drop(child)
            log.warning("a preflight took longer than %g s: its process was stopped", self.timeout_s)
            raise NoReport(f"it took longer than {self.timeout_s:g} s")
        if kind == "died":
            self._drop(child)
            log.error("a preflight process died (killed, or out of memory); the next preflight starts a new one")
            raise NoReport(DIED)
        with self._lock:
            self._idle.append(child)
        if kind == "failed":  # a bug of the engine's preflight must not fail the creation it only checks
            log.error("a preflight failed:\n%s", value)
            raise NoReport("it failed (the API's log has why)")
        return value

    def _take(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.alive():
                    return child
                self._all.discard(child)
                child.stop()
            child = _Child(self._target, self._warm_up)
            self._all.add(child)
            return child

    def _drop(self, child: _Child) -> None:
        with self._lock:
            self._all.discard(child)
        child.stop()

    def close(self) -> None:
        """Stops every child, a busy one included (its preflight then answers that the child died)."""
        with self._lock:
            children, self._all, self._idle = list(self._all), set(), []
        for child in children:
            child.stop()


class _Died(Exception):
    """The child was gone before it took the request."""


class _Child:
    """One preflight process and the pipe it is asked through. spawn, not fork: a fork of a threaded
    server would copy its locks mid-use."""

    def __init__(self, target: Callable[[dict], dict], warm_up: Callable[[], object] | None = None):
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        # What the child writes (the models' tokenizer files) goes under a directory this side removes
        # when it stops the child: a child is killed, never asked to end, so it cannot clean up itself.
        self._scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
        # daemon: killed with the API process if it ends without closing the runner.
        self._process = context.Process(target=_serve, args=(theirs, target, self._scratch, warm_up), daemon=True,
                                        name="qlora-preflight")
        self._process.start()
        theirs.close()
        # The runner's close() and the preflight it interrupts both stop the child, at the same moment: closing
        # the pipe twice at once closed its file descriptor twice (EBADF, and close() stopped no other child).
        self._stopping = threading.Lock()
        self._started = False  # its READY came: the preflight's timeout starts with the request

    def alive(self) -> bool:
        return self._process.is_alive()

    def ask(self, inputs: dict, timeout_s: float, start_timeout_s: float) -> tuple[str, Any]:
        """("report", report), ("failed", traceback), ("slow", None), ("unstarted", None) or ("died", None);
        _Died when the request could not even be sent."""
        if not self._started:
            try:
                if not self._conn.poll(start_timeout_s):
                    return "unstarted", None
                self._conn.recv()  # READY
            except (EOFError, OSError):  # it died starting, or the runner closed
                return "died", None
            self._started = True
        try:
            self._conn.send(inputs)
        except OSError as exc:  # a broken pipe, or closed by the runner's close()
            raise _Died() from exc
        try:
            if not self._conn.poll(timeout_s):  # poll also returns on the child's end of file: it died
                return "slow", None
            return self._conn.recv()
        except (EOFError, OSError):  # it died, or the runner closed (the API is stopping)
            return "died", None

    def stop(self) -> None:
        with self._stopping:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(5)
            self._conn.close()  # a second stop finds it closed: a no-op
            shutil.rmtree(self._scratch, ignore_errors=True)


READY = ("ready", None)  # a child's first message, before any request
SCRATCH_PREFIX = "qlora-preflight-child-"  # then the API process's id, "-" and mkdtemp's random part


def remove_orphaned_scratch() -> None:
    """Remove the scratch directories of API processes that are gone. One killed outright (SIGKILL, the OOM
    killer) could not stop its children, so their directories stayed; its process id, in their names, tells
    them apart from those of API processes still running beside this one on the host."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        owner = path.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not process_exists(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _serve(conn: Connection, target: Callable[[dict], dict], scratch: str,
           warm_up: Callable[[], object] | None = None) -> None:
    """The child's loop: a report for each request, until the API closes its end. `scratch`: where it
    may write, removed by the API when the child stops. `warm_up`: run before it says it started."""
    global _SCRATCH
    _SCRATCH = scratch
    # Ctrl-C reaches the whole process group: the API stops this child (it closes its end, or ends it as a
    # daemon); the signal itself only printed a KeyboardInterrupt traceback over `serve`'s shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if warm_up is not None:
        warm_up()
    conn.send(READY)  # started: the target's module is imported (it came with `target`), and warm_up has run
    while True:
        try:
            inputs = conn.recv()
        except EOFError:
            return
        try:
            answer: tuple[str, Any] = ("report", target(inputs))
        except Exception:
            answer = ("failed", traceback.format_exc())
        conn.send(answer)


# In the child: the tokenizer files written once per content, by their digest, under its scratch directory.
_TOKENIZER_DIRS: dict[str, str] = {}
_SCRATCH: str | None = None


def _load_engine() -> None:
    """The child's warm-up: the engine's preflight and the libraries it tokenizes with. Imported on the first
    request instead, they took seconds of that preflight's TIMEOUT_S (more on a loaded host)."""
    importlib.import_module(ENGINE).load_libraries()


# Imported by name, in the child only: the engine's preflight brings transformers (and torch), which the API
# process must not load.
ENGINE = "worker.training.preflight"


def _in_child(inputs: dict) -> dict:
    engine = importlib.import_module(ENGINE)
    files, digest = inputs["tokenizer_files"], inputs["tokenizer_sha256"]
    if digest not in _TOKENIZER_DIRS:
        directory = tempfile.mkdtemp(prefix="tokenizer-", dir=_SCRATCH)
        for name, text in files.items():
            (Path(directory) / name).write_text(text, encoding="utf-8")
        _TOKENIZER_DIRS[digest] = directory
    spec = JobSpec.model_validate(inputs["spec"])
    return engine.preflight(spec, _TOKENIZER_DIRS[digest], inputs["train_path"],
                            validation_path=inputs.get("validation_path"), examples=inputs.get("examples", 0))


@dataclass
class Checked:
    report: dict | None
    note: str  # why there is no report, or "" when there is one
    ran: bool = True  # False: the runner was asked and made no report (busy, slow, or its child failed)


def check(session: Session, storage: Storage, runner: PreflightRunner | None, caller: Caller, model: RegisteredModel,
          spec: JobSpec, meta: dict, *, examples: int = 0) -> Checked:
    """The preflight report of a job about to be created (`spec` as admission sized it, `meta` its
    own fields); PreflightRefused when the job cannot learn. A report that cannot be made (no runner,
    no tokenizer files for the model, every child busy) is a note, not an error: the job is then created
    unchecked, as one whose model has no config is created with its memory unchecked."""
    if runner is None or runner.processes < 1:
        return Checked(None, "preflight not run: it is turned off on this service (QLORA_PREFLIGHT_PROCESSES=0)")
    files = models.tokenizer_files(session, model)
    if not files:
        return Checked(None, f"preflight not run: the registry has no tokenizer files for {model.name}")
    try:
        # The slot first, then the data: a request that waits for a child holds no copy of its dataset.
        with runner.turn(caller.team_id, WAIT_FOR_SLOT_S) as ask, ExitStack() as stack:
            paths = {}
            for field in ("dataset_id", "validation_dataset_id"):
                if meta.get(field) is not None:
                    dataset = datasets.get(session, caller, meta[field])
                    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qlora-preflight-"))
                    paths[field] = Path(tmp) / "data.jsonl"
                    storage.download(dataset.storage_key, paths[field])
            digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
            session.commit()  # nothing written yet but the tokenizer files: give the connection back while the child works
            report = ask(spec=spec.model_dump(mode="json"), tokenizer_files=files, tokenizer_sha256=digest,
                         train_path=str(paths["dataset_id"]), validation_path=str(paths["validation_dataset_id"])
                         if "validation_dataset_id" in paths else None, examples=examples)
    except NoReport as exc:
        return Checked(None, f"preflight not run: {exc}", ran=False)
    return Checked(report, "")


# The request's field that names each set a refusal can be about (the engine's report says which: refusal_sets).
SET_FIELDS = {"train": "dataset_id", "validation": "validation_dataset_id"}


def refuse_if_it_cannot_learn(report: dict) -> None:
    if report["refusals"]:
        reasons = report["refusals"]
        # Not all "cannot learn": a validation set with nothing left to evaluate refuses a job that could.
        # A report from an engine older than refusal_sets (a preflight process mid-upgrade) names the train set.
        sets = report.get("refusal_sets") or ["train"] * len(reasons)
        raise PreflightRefused("the preflight refuses this job: " + "; ".join(reasons),
                               details=field_errors([(SET_FIELDS[data], reason)
                                                     for data, reason in zip(sets, reasons, strict=True)]))


def needs_validation(spec: JobSpec, meta: dict) -> None:
    """early_stopping and use_best_checkpoint decide by eval loss: without a validation set there is none."""
    needs = spec.validation_needed_by() if meta.get("validation_dataset_id") is None else []
    if needs:
        raise Invalid("; ".join(f"{field}: {why}" for field, why in needs),
                      details=field_errors([(field, "needs a validation_dataset_id") for field, _ in needs]),
                      code="invalid_job")
