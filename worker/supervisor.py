"""One job on one worker: claim → prepare → spawn the training process → supervise → record.

The training runs in its own process (worker/runner.py) so a crash, an OOM or a kill of it never
takes the worker down, and this process never touches CUDA. They talk through files in the job's
work directory (worker/training/protocol.py: WorkDir): the trainer appends typed records and
rewrites its progress; this side creates the cancel (or pause) file to ask it to stop; the result
is its last word. This side owns every database write, each fenced by the attempt number it claimed.

From the claim to the final state a heartbeat thread (AttemptWatch) keeps the attempt alive and
bounded, whatever the main thread is doing: downloading a base, training, packing and uploading a
merged model. It is what the reaper and the training process watch, it reports long transfers, and
it ends the attempt when the lease is lost or the job's time limit has passed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from app import logs
from app.config import Settings
from app.db import dead_connection_params, on_database_clock, session_scope, utcnow, with_connection_params
from app.host import process_exists
from app.jobs import runs, states
from app.jobs.runs import ClaimedJob, LeaseLost
from app.jobs.tables import Job
from app.models.service import hub_source_problems
from app.scheduling.service import claim_next
from app.storage.base import (
    ChecksumMismatch,
    ObjectNotFound,
    delete_objects,
    make_key,
    storage_from_settings,
    storage_out_of_reach,
    storage_refuses_this_client,
)
from app.storage.local import LocalStorage
from app.text import format_bytes
from worker.quantized_bases import cache_key, quantized_identity
from worker.training.protocol import (
    EXIT_NO_SPACE,
    EXIT_OUT_OF_REACH,
    AppendedLines,
    CheckpointStored,
    Event,
    JobFile,
    Progress,
    QuantizedBaseStored,
    QuantizedCache,
    Record,
    RecordReader,
    Result,
    WorkDir,
    out_of_space,
    phase_event,
    write_json_atomic,
)
from worker.transfer import Transfer, WriterStream, format_duration, tree_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

LOG_TAIL_LINES = 30  # what a crash report shows of the training process's output
ARTIFACTS = {"adapter": "adapter", "merged": "merged model", "report": "eval report"}  # kind → what a person reads
CLAIM_TRIES = 10  # claims that met a database error that passes (see JobRun._claim)
CLAIM_BACKOFF_S = 0.1  # the first wait before a claim is tried again; doubled each try, up to MAX_CLAIM_BACKOFF_S
MAX_CLAIM_BACKOFF_S = 2.0
TAR_BUFFER = 1 << 20  # tar's stream-mode buffer: 1 MiB writes into the storage writer, not 10 KiB ones


class TimeLimitHit(Exception):
    """The attempt ran past QLORA_JOB_TIME_LIMIT_S; the job has been recorded failed, saying so."""


class StoppedBeforeTraining(Exception):  # noqa: N818 (an attempt's end, not an error)
    """The job was cancelled or paused while the attempt prepared (downloads, the quantized base); the
    job has been recorded cancelled or paused, saying so."""


# What the watch ends an attempt with: the main thread stops what it is doing, whatever that is.
ATTEMPT_ENDED = (LeaseLost, TimeLimitHit, StoppedBeforeTraining)
# A job asked to stop, and what it becomes when the attempt stops before its training process ran.
STOPPED_AS = {states.CANCELLING: states.CANCELLED, states.PAUSING: states.PAUSED}

# Fault injection for tests: an attempt number. The worker holds once that attempt of a job has ended, before it
# records how (the end's write waiting on a slow database, a stalled host), until the test releases it
# (fault_hold_end_markers names the files: the worker touches the first while it holds, the test the second).
FAULT_HOLD_END = "QLORA_FAULT_HOLD_END"


class AttemptWatch(threading.Thread):
    """The attempt's heartbeat, from the claim until the final state is written; a thread, so that no
    download, training step or upload can outlast the heartbeat deadline unnoticed. Every supervise
    interval it:

    - touches the work directory's heartbeat file (the training process stops by itself when that
      goes stale) and writes the job's heartbeat, fenced by the attempt number;
    - writes a progress event for a transfer running longer than QLORA_TRANSFER_EVENT_INTERVAL_S,
      one per that interval, and a last one when such a transfer ends;
    - when the lease is lost, kills the training process and stops beating;
    - when the attempt has run past QLORA_JOB_TIME_LIMIT_S, kills the training process and records
      the job failed, saying so (no retry: another attempt would hit the same limit);
    - when the job is being cancelled or paused before its training process started (a base model's
      download takes minutes), ends the attempt there: the training process passes on these once it runs.

    It beats until the attempt's end is written (stop() comes after), so the job is never silent while its
    worker records how the attempt ended: it was stopped before, and a worker that took longer than the
    reaper's deadline to write the end (a slow database, a loaded host) lost the attempt to the reaper, which
    queued the job again as it was; a job that ran out of memory then ran with its old micro-batch, its smaller
    one dropped, and ran out of memory again. ending() writes the pending events first, so they still come
    before the end.

    The main thread learns of each at its next check(), which raises LeaseLost, TimeLimitHit or
    StoppedBeforeTraining: between supervise rounds, and at every chunk of a transfer.
    """

    def __init__(self, settings: Settings, db: str, job: ClaimedJob, workdir: WorkDir):
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.settings = settings
        self.db = db
        self.job = job
        self.workdir = workdir
        self.started = time.monotonic()  # the claim: the time limit counts from here
        self._last_beat = self.started  # the last heartbeat in the database, this thread's or a report's
        self.proc: subprocess.Popen | None = None  # the training process, once spawned
        self.transfer: Transfer | None = None
        self._events: list[Event] = []  # to write with the next heartbeat
        self._events_tried = False  # _events hold events of a heartbeat that failed (it may have landed unheard)
        self._events_lock = threading.Lock()  # the main thread adds the last event of a transfer
        self._last_event_at = 0.0
        self._ended: tuple[type[Exception], str] | None = None
        self._stopped = threading.Event()
        self._workdir_lock = threading.Lock()  # a touch of the heartbeat file, or the end of them (ending)
        self._workdir_gone = False
        # ending() was called: the main thread writes how the attempt ended, and this thread only beats (a time
        # limit or a stop it decided now would race that write, and the first compare-and-set would win)
        self._ending = False

    # ------------------------------------------------------------------ the main thread's side
    def check(self) -> None:
        """Raise if the attempt has ended: its lease is lost, its time limit passed, or the job was cancelled
        or paused before training."""
        if self._ended is not None:
            kind, message = self._ended
            raise kind(message)

    @contextmanager
    def transferring(self, what: str, total: int | None, measure: Callable[[], int] | None = None) -> Iterator[Transfer]:
        """Count a transfer for the progress events; its `add` stops it (raises) once the attempt has ended."""
        transfer = Transfer(what, total, check=self.check, measure=measure)
        self.transfer = transfer
        try:
            yield transfer
        finally:
            self.transfer = None
        if time.monotonic() - transfer.started >= self.settings.transfer_event_interval_s:
            verb = what.replace("uploading", "uploaded").replace("downloading", "downloaded")
            with self._events_lock:
                self._events.append(_transfer_event(transfer, transfer.describe(verb)))

    def say(self, event: Event) -> None:
        """An event of the worker's own, written with the next heartbeat (within a supervise interval)."""
        with self._events_lock:
            self._events.append(event)

    def reported(self) -> None:
        """The main thread's report wrote the heartbeat too: while it reports every round, this thread
        need not write one as well (half the writes on the job's row while training)."""
        self._last_beat = time.monotonic()

    def ending(self) -> None:
        """The attempt is over, its end not yet written: the pending events (the last transfer's) are written
        now, before it, and the heartbeat file is no longer touched (the work directory goes next). The
        heartbeats in the database go on until stop(), once the end is written."""
        self._ending = True
        with self._workdir_lock:
            self._workdir_gone = True
        with self._events_lock:
            events, self._events = self._events, []
        if not events:
            return
        try:
            with session_scope(self.db) as session:
                runs.heartbeat(session, self.job.id, self.job.attempt, events)
        except Exception as exc:  # the next heartbeat writes them, after the end at worst
            log.warning("could not write the last events of job %s: %s", self.job.id, exc)
            with self._events_lock:
                self._events[:0] = events

    def stop(self) -> None:
        """Once the attempt's end is written (or found written by another): no more heartbeats."""
        self._stopped.set()
        self.join()

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        with logs.job_context(self.job.id):  # a thread starts without the main thread's log context
            while not self._stopped.wait(self.settings.supervise_interval_s):
                self._beat()
            self._beat()

    def _beat(self) -> None:
        if self._ended is not None:
            return
        with self._workdir_lock:
            try:
                if not self._workdir_gone:
                    self.workdir.heartbeat.touch()
            except FileNotFoundError:
                pass  # the work directory is being set up
        elapsed = time.monotonic() - self.started
        if elapsed > self.settings.job_time_limit_s and not self._stopped.is_set() and not self._ending:
            self._hit_time_limit(elapsed)
            return
        with self._events_lock:
            again = bool(self._events) and self._events_tried
            events, self._events = self._events + self._due_progress(), []
        if not events and time.monotonic() - self._last_beat < self.settings.supervise_interval_s:
            return  # a report wrote it within the interval: the database is at most two intervals behind
        try:
            with session_scope(self.db) as session:
                status = runs.heartbeat(session, self.job.id, self.job.attempt, events, again=again)
            self._last_beat = time.monotonic()
            self._events_tried = False
        except Exception as exc:  # the database's blip must not end the thread: beat again next interval
            log.warning("could not write the heartbeat of job %s: %s", self.job.id, exc)
            with self._events_lock:
                self._events[:0] = events
                self._events_tried = True  # its commit may have landed unheard: runs.heartbeat's `again`
            return
        if status is None:
            self._end(LeaseLost, f"job {self.job.id}: attempt {self.job.attempt} no longer owns it")
        elif status in STOPPED_AS and self.proc is None and not self._ending:
            self._stop_before_training(STOPPED_AS[status])

    def _due_progress(self) -> list[Event]:
        transfer = self.transfer
        every = self.settings.transfer_event_interval_s
        now = time.monotonic()
        if transfer is None or now - transfer.started < every or now - self._last_event_at < every:
            return []
        self._last_event_at = now
        return [_transfer_event(transfer, transfer.describe())]

    def _hit_time_limit(self, elapsed: float) -> None:
        self._kill()
        message = self._time_limit_message(elapsed)
        try:
            with session_scope(self.db) as session:
                recorded = runs.finish(session, self.job.id, self.job.attempt, states.FAILED, error=message,
                                       half_life_s=self.settings.fair_share_half_life_s)
        except Exception as exc:  # try again next interval; the training process is stopped already
            log.warning("could not record that job %s hit its time limit: %s", self.job.id, exc)
            return
        if recorded:
            log.warning("job %s hit its time limit after %.0f s; recorded failed", self.job.id, elapsed)
            self._end(TimeLimitHit, message)
        else:
            self._end(LeaseLost, f"job {self.job.id}: attempt {self.job.attempt} no longer owns it")

    def _stop_before_training(self, status: str) -> None:
        # Recorded here, at once: the main thread may be inside a long read, and this thread's heartbeats
        # stop with the attempt (the reaper would otherwise take the job for a lost one).
        message = f"{status} before training started, while {self._doing()}"
        try:
            with session_scope(self.db) as session:
                recorded = runs.finish(session, self.job.id, self.job.attempt, status, message=message,
                                       half_life_s=self.settings.fair_share_half_life_s)
        except Exception as exc:  # try again next interval
            log.warning("could not record job %s %s: %s", self.job.id, status, exc)
            return
        if recorded:
            self._end(StoppedBeforeTraining, message)
        else:
            self._end(LeaseLost, f"job {self.job.id}: attempt {self.job.attempt} no longer owns it")

    def _time_limit_message(self, elapsed: float) -> str:
        limit = self.settings.job_time_limit_s
        return (f"the job hit its time limit: attempt {self.job.attempt} ran for {format_duration(elapsed)}, past "
                f"QLORA_JOB_TIME_LIMIT_S={limit:g} s ({format_duration(limit)}), and was stopped while {self._doing()}. "
                "It is not retried, since another attempt would stop at the same limit: lower max_steps (or "
                "num_epochs), or ask an operator to raise QLORA_JOB_TIME_LIMIT_S")

    def _doing(self) -> str:
        """What the attempt is doing now, for a person: a transfer, training, or preparing."""
        transfer = self.transfer
        progress = Progress.read(self.workdir.progress)
        if transfer is not None:
            return transfer.describe()
        if progress is not None:
            return f"training, at step {progress.step} of {progress.total_steps}"
        return "preparing to train"

    def _end(self, kind: type[Exception], message: str) -> None:
        self._ended = (kind, message)
        self._kill()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill(self.proc)


def _uploaded_keys(records: list[Record]) -> list[str]:
    """The storage keys of the objects these records say the training process stored."""
    return [r.key if isinstance(r, CheckpointStored) else r.storage_key for r in records
            if isinstance(r, CheckpointStored | QuantizedBaseStored)]


def _transfer_event(transfer: Transfer, message: str) -> Event:
    return Event(type="transfer", message=message,
                 data={"what": transfer.what, "bytes": transfer.progress(), "total_bytes": transfer.total})


def session_url(settings: Settings) -> str:
    """The database URL of a worker's sessions. On Postgres:

    - a transaction the worker leaves idle longer than the heartbeat deadline is ended by the server: a worker
      frozen mid-transaction (a stopped VM, SIGSTOP) would otherwise keep its job's row locked, and the reaper
      that must requeue the job would wait on that lock for as long as the freeze lasts;
    - a connection that does not answer for settings.database_timeout_s counts as dropped (libpq's
      connect_timeout; tcp_user_timeout for a query whose packets go unacknowledged; TCP keepalives for one sent
      whose answer never comes), and the write is tried again (JobRun._write_through_outage). Without them, in a
      failover that drops packets instead of refusing them, one try waited for the kernel's retransmission
      timeout (about 15 minutes on Linux), or without end for an answer that never came: far past the heartbeat
      deadline, where a try on a new connection would have gone through in seconds.
    Settings the URL already names are kept: an operator's own choice wins."""
    if make_url(settings.database_url).get_backend_name() != "postgresql":
        return settings.database_url
    timeout_ms = int(settings.heartbeat_deadline_s * 1000)
    return with_connection_params(settings.database_url, dead_connection_params(settings.database_timeout_s),
                                  f"-c idle_in_transaction_session_timeout={timeout_ms}")


class JobRun:
    def __init__(self, settings: Settings, job_id: str, worker: str, home_lock_fd: int | None = None,
                 held: Path | None = None, stopping: Callable[[], bool] | None = None):
        self.settings = settings
        self.job_id = job_id
        self.worker = worker
        self.held = held  # the worker process's held_marker: it hands back on SIGTERM the attempt named there
        self.storage = storage_from_settings(settings)
        self.db = session_url(settings)
        # `serve`'s local worker holds its home's lock (app/cli/processes._hold_home) by this descriptor, and so does
        # this pool process, forked from it. The training process is given it too: started in a session of its own,
        # it outlives a SIGKILL to serve's process group (it stops after its current step, or its merge, on its
        # own), and the next `serve` on the home waits for it before it hands back this worker's job and resumes it.
        self.home_lock_fd = home_lock_fd
        self.stopping = stopping  # whether that worker is stopping (asked to: SIGTERM, Ctrl-C), when it can tell
        self.claim_token = uuid.uuid4().hex  # this run's claim, whichever try lands (_claim)
        self.training_pid: int | None = None  # the attempt's training process, once started

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        with logs.job_context(self.job_id):
            self._mark_held()  # before the claim: a worker killed right after it still leaves its token behind
            job = self._claim()
            if job is None:
                self._unmark_held()
                log.info("no job of this class may start now (the message named %s); nothing to do", self.job_id)
                return
        with logs.job_context(job.id):  # the message's job, or the one fair share put first
            self._attempt(job)

    def _claim(self) -> ClaimedJob | None:
        """The best queued job of the message's class, claimed (app/scheduling/service.claim_next). A claim that
        meets a database error that passes is tried again, after a jittered backoff (claims that collided once
        would collide again in step): SQLite refusing a transaction that writes after reading what another
        writer changed since (a claim reads the queue first), Postgres ending the claim as the victim of a
        deadlock or a serialization failure (a claim holds its candidate's team row while it fails a job whose
        base model or dataset is gone, then waits for the next team's), or a dropped connection. Raised instead,
        the task failed with its message spent (acks on failure), and the GPU stood idle while jobs waited, until
        the scheduler sent the message again (QLORA_REDISPATCH_AFTER_S). Each try is its own transaction, rolled
        back whole, so nothing of a failed try is left; but a commit whose connection dropped may have landed,
        its answer lost: a try after a failed one first looks for the job its claim token took (runs.landed_claim)
        and runs that one. Claimed anew, the worker ran a second job while the first stayed running, claimed by
        a worker that never ran it, until the reaper's deadline."""
        token = self.claim_token
        for tries_left in range(CLAIM_TRIES - 1, -1, -1):
            try:
                with session_scope(self.db) as session:
                    if tries_left < CLAIM_TRIES - 1 and (landed := runs.landed_claim(session, token)) is not None:
                        log.info("the claim of job %s had landed before its connection dropped; running it", landed.id)
                        return landed
                    return claim_next(session, self.settings, self.job_id, self.worker, token)
            except DBAPIError as exc:
                if not tries_left or not _passing(exc):
                    raise
                wait = min(CLAIM_BACKOFF_S * 2 ** (CLAIM_TRIES - 1 - tries_left), MAX_CLAIM_BACKOFF_S)
                wait *= random.uniform(0.5, 1.5)
                log.warning("the claim met a passing database error (trying again in %.2fs): %s", wait, _said(exc))
                time.sleep(wait)
        return None

    def _attempt(self, job: ClaimedJob) -> None:
        workdir = WorkDir(self.settings.work_dir / job.id / f"attempt-{job.attempt}")
        log.info("claimed job, attempt %s", job.attempt, extra={"worker": self.worker, "attempt": job.attempt})
        watch = AttemptWatch(self.settings, self.db, job, workdir)
        watch.start()
        final: tuple[str, str | None, dict | None, dict | None] | None = None
        lost: str | None = None  # why the attempt ended with no fault of the job's: it gets another
        stopped_at: datetime | None = None  # ...and when: its GPU time ends there, not after a wait for an outage to pass
        outside = False  # ...and the end was a full disk or an outage: past the last attempt, paused, not failed
        smaller: ContinueSmaller | None = None  # out of memory at a training step: the job goes on with less
        try:
            # Inside the try: a full work directory refuses even this small file, and must hand the job back
            # saying so, not end the task with the job left running and silent until the reaper's deadline.
            self._mark_held(job)
            if self.stopping is not None and self.stopping():
                self._hand_back_before_training(job)
            self._prepare(job, workdir, watch)
            watch.check()  # cancelled or paused as it prepared: no training process to start
            watch.proc = proc = self._spawn(workdir)
            log.info("training process started", extra={"pid": proc.pid, "attempt": job.attempt})
            self._name_training_process(job, proc.pid)
            outcome = self._supervise(job, workdir, proc, watch)
            final = self._record(job, workdir, outcome, proc.returncode, watch)
        except LeaseLost:
            log.warning("job %s attempt %s: lease lost; stopping without writing", job.id, job.attempt)
        except TimeLimitHit:
            log.warning("job %s attempt %s: time limit; stopped (recorded failed)", job.id, job.attempt)
        except StoppedBeforeTraining as exc:
            log.info("job %s attempt %s: %s (recorded)", job.id, job.attempt, exc)
        except UnusableInput as exc:  # every attempt would meet it: the job fails, saying what to do
            log.warning("job %s attempt %s: %s", job.id, job.attempt, exc)
            final = (states.FAILED, str(exc), None, None)
        except AttemptLost as exc:
            log.warning("job %s attempt %s lost: %s", job.id, job.attempt, exc)
            lost, stopped_at = str(exc), utcnow()
        except ContinueSmaller as exc:
            log.warning("job %s attempt %s: %s; continuing with %s", job.id, job.attempt, exc, exc.training)
            smaller, stopped_at = exc, utcnow()
        except Exception as exc:
            why = self._not_the_jobs_fault(exc)
            if why is not None:  # storage, the database or a disk, for a moment: the job is not at fault
                log.warning("job %s attempt %s lost: %s", job.id, job.attempt, why, exc_info=True)
                lost, outside, stopped_at = why, True, utcnow()
                # Its heartbeats go on meanwhile: the job stays this worker's while the outage may pass. The
                # wait is the service's, not the team's: the attempt's GPU time (usage, fair share) ends before it.
                time.sleep(min(self.settings.out_of_reach_wait_s * 2 ** (job.attempt - 1), MAX_OUT_OF_REACH_WAIT_S))
            else:
                log.exception("job %s failed in the worker", job.id)
                final = (states.FAILED, f"the worker failed: {type(exc).__name__}: {exc}", None, None)
        finally:
            self._mark_held(ending=True)  # nothing left for a SIGTERM to hand back; the end is not written yet
            watch.ending()  # the last transfer's event goes out now; the final state comes after
            if watch.proc is not None and watch.proc.poll() is None:
                _kill(watch.proc)
            shutil.rmtree(workdir.root, ignore_errors=True)
            remove_earlier_attempts(workdir.root.parent, job.attempt, self.settings.heartbeat_deadline_s)
            _remove_if_empty(workdir.root.parent)  # the job's directory, unless another attempt is in it
        try:
            if os.environ.get(FAULT_HOLD_END) == str(job.attempt):
                _hold_end(self.settings, job.id)
            if final is not None:
                self._finish(job, *final)
            elif smaller is not None:
                self._continue_smaller(job, smaller.training, stopped_at or utcnow())
            elif lost is not None:
                self._lose(job, lost, stopped_at or utcnow(), outside_the_job=outside)
        finally:
            watch.stop()  # the end is written: the reaper may take the job only now, if anything moved it back
            self._unmark_held()

    def _mark_held(self, job: ClaimedJob | None = None, *, ending: bool = False) -> None:
        """Say in held_marker what this pool process holds: its claim's token from before the claim until the
        attempt's end is written, and the job and attempt while the attempt runs (a SIGTERM to its worker hands
        those back: held_attempt). Whole or not at all: the worker may read it the moment SIGTERM comes (a torn one
        hands back nothing). `serve`'s local worker marks it as holding the home's lock: the next `serve` on the
        home, once it has that lock, knows the worker is gone and requeues the job its token took (local_claims_left).
        Raises OSError (a full disk) when the attempt starts (`job`), where the attempt hands the job back saying so;
        elsewhere a marker that cannot be written is only a hand-back left to the reaper's deadline."""
        if self.held is None:  # not run by a worker (a test's JobRun): no one to hand it back
            return
        marker: dict = {"claim_token": self.claim_token, "home_lock": self.home_lock_fd is not None}
        if job is not None:
            marker |= {"job_id": job.id, "attempt": job.attempt}
            if self.training_pid is not None:
                marker["training_pid"] = self.training_pid
        try:
            self.held.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.held, marker)
        except OSError:
            if job is not None:
                raise
            if ending:  # not one naming an attempt that has ended
                self.held.unlink(missing_ok=True)
            log.warning("could not write %s", self.held, exc_info=True)

    def _hand_back_before_training(self, job: ClaimedJob) -> None:
        """The worker was asked to stop as this claim landed: the job is paused and queued again at once (as a
        hand-back pauses it: runs.hand_back), before any training. The worker's hand-back runs once, as the stop
        comes: where its claim had not yet landed, it read a marker naming no job and handed back nothing, the
        claim committed, and the attempt trained until `serve` killed the worker 30 s later (a worker stopped
        gracefully elsewhere waited for the whole job). A job that its team is pausing stays paused; one being
        cancelled goes on to its cancel (the watch's, before training)."""
        message = f"handed back before training started: worker {self.worker} is shutting down"

        def hand_back(session: Session) -> bool:
            runs.hand_back(session, self.worker, job.id, job.attempt)  # pausing to make way, unless already pausing
            return runs.finish(session, job.id, job.attempt, states.PAUSED, message=message,
                               half_life_s=self.settings.fair_share_half_life_s)
        if self._write_through_outage(f"the hand-back of job {job.id}", hand_back):
            raise StoppedBeforeTraining(message)

    def _name_training_process(self, job: ClaimedJob, pid: int) -> None:
        """The training process's pid in the marker: should this worker be killed outright, the process (holding the
        home's lock) runs on, orphaned, and the next `serve` waiting for it names it (training_processes_left).
        Unwritten (a full disk), that serve only cannot say which process it waits for."""
        self.training_pid = pid
        try:
            self._mark_held(job)
        except OSError:
            log.warning("could not write %s", self.held, exc_info=True)

    def _unmark_held(self) -> None:
        if self.held is not None:
            self.held.unlink(missing_ok=True)

    def _not_the_jobs_fault(self, exc: Exception) -> str | None:
        """Why the attempt ended, where another attempt may well succeed: storage or the database out of
        reach, or a disk full (the worker's, or local storage's) until an operator frees space. None: the
        job's own fault or a bug, which another attempt would only repeat."""
        if isinstance(exc, NoSpace) or out_of_space(exc):
            said = "the training process stopped" if isinstance(exc, NoSpace) else _said(exc)
            disks = [self.settings.work_dir] + ([self.storage.root] if isinstance(self.storage, LocalStorage) else [])
            return (f"a disk was full ({said}; on worker {self.worker}: {free_space(disks)}); free space there")
        if isinstance(exc, TrainerOutOfReach) or out_of_reach(exc):
            return f"storage or the database was out of reach ({_said(exc)})"
        refused = storage_refuses_this_client(exc)
        if refused is not None:
            # This worker's settings, not the job: another bucket than the API's, or a key that was rotated on the
            # API's hosts and not on this one. Every job it took failed ("the worker failed: NoSuchBucket").
            return (f"storage refused worker {self.worker} ({refused}): its QLORA_STORAGE_URL, QLORA_S3_ENDPOINT_URL "
                    "or credentials are not the API's; give it the API's")
        return None

    def _prepare(self, job: ClaimedJob, workdir: WorkDir, watch: AttemptWatch) -> None:
        shutil.rmtree(workdir.root, ignore_errors=True)
        workdir.root.mkdir(parents=True)
        with _input_of_the_job(f"its training dataset {job.train.id}", UPLOAD_AGAIN.format(field="dataset_id")):
            self._download(watch, "training data", job.train, workdir.train_data)
        if job.validation:
            with _input_of_the_job(f"its validation dataset {job.validation.id}",
                                   UPLOAD_AGAIN.format(field="validation_dataset_id")):
                self._download(watch, "validation data", job.validation, workdir.validation_data)
        self._download_checkpoint(job, workdir, watch)
        if job.initial_adapter is not None:
            # The artifact is a tar of adapter/ (adapter_config.json, adapter_model.safetensors); job.json
            # tells the training process where it landed. Every attempt fetches the same one.
            with _input_of_the_job(f"the adapter of its initial job {job.initial_job_id}", ANOTHER_ADAPTER):
                self._download_tar(watch, f"adapter of job {job.initial_job_id}", job.initial_adapter,
                                   workdir.initial, workdir.archive("initial"))
        base_path = self._base_model_path(job.base_model, watch)
        JobFile(
            job_id=job.id, team_id=job.team_id, spec=job.spec,
            train_path=str(workdir.train_data),
            validation_path=str(workdir.validation_data) if job.validation else None,
            registry={job.base_model["name"]: str(base_path)},
            out_dir=str(workdir.out),
            resume=job.attempt > 1,
            quantized_cache=self._quantized_cache(job, base_path, workdir, watch),
            initial_adapter=str(workdir.initial / "adapter") if job.initial_adapter is not None else None,
            base_model_id=job.base_model["hub_id"] or job.base_model["name"],
            base_model_revision=job.base_model["revision"] if job.base_model["hub_id"] else None,
            provenance={"job": job.id, "dataset": job.train.id, "validation_dataset": job.validation.id if job.validation else None,
                        "initial_job": job.initial_job_id},
        ).write(workdir.job)

    def _download_checkpoint(self, job: ClaimedJob, workdir: WorkDir, watch: AttemptWatch) -> None:
        """Fetch the checkpoint a later attempt resumes from into the output directory. One that went bad in
        storage after it was recorded (its bytes changed, or it was deleted) would meet every attempt: it is
        dropped and the attempt falls back to the one before, or to step 0 when none is left, saying so
        (runs.checkpoint_unusable). Before, the job failed at once with all its other checkpoints."""
        while job.resume_from is not None:
            # The checkpoint archive holds checkpoints/step-N and the run manifest, as the recipe wrote them.
            try:
                self._download_tar(watch, f"checkpoint at step {job.resume_step}", job.resume_from, workdir.out,
                                   workdir.archive("resume"))
                return
            except (ChecksumMismatch, ObjectNotFound) as exc:  # both raised before a byte of it is unpacked
                why = _gone_bad(exc)
                log.warning("job %s: the checkpoint at step %s is unusable (%s); falling back", job.id,
                            job.resume_step, exc)
                def drop(session: Session, why: str = why) -> tuple[ClaimedJob, str]:
                    # A copy per try: a try rolled back must leave the attempt's resume point as it was, or the
                    # next try would drop the checkpoint before the bad one too.
                    plan = dataclasses.replace(job)
                    return plan, runs.checkpoint_unusable(session, plan, why)
                plan, dropped = self._write_through_outage(f"the unusable checkpoint of job {job.id}", drop,
                                                           check=watch.check)
                job.resume_from, job.resume_step = plan.resume_from, plan.resume_step
                delete_objects(self.storage, [dropped])  # its row is gone: a bad copy nobody will read again

    def _download(self, watch: AttemptWatch, what: str, ref: runs.ObjectRef, path: Path) -> None:
        """Fetch a stored object, checked against its sha256, counting it for the progress events."""
        with watch.transferring(f"downloading {what}", ref.size) as transfer:
            self.storage.download(ref.storage_key, path, expected_sha256=ref.sha256, progress=transfer.add)

    def _download_tar(self, watch: AttemptWatch, what: str, ref: runs.ObjectRef, into: Path, archive: Path) -> None:
        """Fetch a stored tar (checked against its sha256) and unpack it into a directory."""
        self._download(watch, what, ref, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
        archive.unlink()

    def _quantized_cache(self, job: ClaimedJob, base_path: Path, workdir: WorkDir,
                         watch: AttemptWatch) -> QuantizedCache | None:
        """Fetch the pre-quantized base for this model and quantization if one is cached (checked
        against its sha256), or name where the training process should save one."""
        if job.spec["quantization"]["bits"] == "none":
            return None
        identity = quantized_identity(job, base_path, job.queue, self.settings.work_dir)
        key = cache_key(identity)
        # Marked used before it is looked up, so a prune (app/jobs/quantized_cache.py) that has not deleted it
        # by now keeps it; one that has, the lookup misses. Only for the prune: a hit must not fail for it.
        try:
            self._write_through_outage(f"the use of the cached quantized base {key}",
                                       lambda session: runs.mark_cached_base_used(session, key), check=watch.check)
        except ATTEMPT_ENDED:
            raise
        except Exception:
            log.warning("could not record the use of the cached quantized base %s; loading it all the same", key,
                        exc_info=True)
        cached = self._write_through_outage(f"the lookup of the cached quantized base {key}",
                                            lambda session: runs.cached_base(session, key), check=watch.check)
        if cached is not None:
            try:
                # The archive holds quantized/, which lands where workdir.quantized names it.
                self._download_tar(watch, "quantized base", cached, workdir.root, workdir.archive("quantized"))
                return QuantizedCache(dir=str(workdir.quantized), key=key, hit=True, identity=identity)
            except ATTEMPT_ENDED:
                raise
            except Exception as exc:  # it must not fail the job: quantize afresh
                shutil.rmtree(workdir.quantized, ignore_errors=True)
                workdir.archive("quantized").unlink(missing_ok=True)  # a full disk's room, for the base made afresh
                if not isinstance(exc, ChecksumMismatch | ObjectNotFound | tarfile.TarError):
                    # Storage out of reach, this host's disk full: the entry is as good as it was, and stays for later
                    # jobs. It was forgotten and deleted as a damaged one, on a 503 of a moment, for every team.
                    # No cache for this run: the base it quantizes would be stored (35 GB for a 65B model) only for
                    # the worker to delete it, the entry being there (the first of two wins).
                    log.warning("could not fetch the cached quantized base %s; quantizing afresh (the entry stays)",
                                key, exc_info=True)
                    return None
                log.exception("the cached quantized base %s is unusable (damaged, or pruned since the lookup); "
                              "quantizing afresh", key)
                forgotten = self._write_through_outage(f"the unusable cached quantized base {key}",
                                                       lambda session: runs.forget_cached_base(session, cached),
                                                       check=watch.check)
                delete_objects(self.storage, [cached.storage_key] if forgotten else [])
        return QuantizedCache(dir=str(workdir.quantized), key=key, hit=False, identity=identity)

    def _base_model_path(self, model: dict, watch: AttemptWatch) -> Path:
        if model["path"]:
            path = Path(model["path"])
            if not (path / "config.json").is_file():
                # This host's fault, not the job's: another worker may have the files (it gets the job next).
                raise AttemptLost(f"the files of base model {model['name']} are not at {path} on worker "
                                  f"{self.worker}: every worker host needs the registered models at their path")
            return path
        # A hub model pinned to a revision, for hosts that reach a hub; weights only, never code. One registered
        # before the registry checked hub ids and revisions may name a path: snapshot_download joins the revision
        # into its cache's paths.
        problems = hub_source_problems(model["hub_id"], model["revision"])
        if problems:
            raise UnusableInput(f"cannot train: base model {model['name']!r} is registered with a "
                                + " and a ".join(f"{field} that is not {rule}" for field, rule in problems)
                                + "; an admin registers it again (DELETE /models/NAME?force=true, which cancels "
                                  "the jobs on it, then POST /models)")
        from huggingface_hub import snapshot_download

        cache_dir = self.settings.home / "hub"
        # The library moves the bytes; what has landed in its cache is the progress.
        with watch.transferring(f"downloading base model {model['hub_id']}", None,
                                measure=lambda: tree_bytes(cache_dir) if cache_dir.exists() else 0):
            path = snapshot_download(
                model["hub_id"], revision=model["revision"], cache_dir=str(cache_dir),
                allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"])
        watch.check()
        return Path(path)

    def _spawn(self, workdir: WorkDir) -> subprocess.Popen:
        workdir.heartbeat.touch()  # fresh from the start: the training process reads a stale one as "stop"
        log_file = open(workdir.log, "ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "worker.runner", str(workdir.root)],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir.root,
                start_new_session=True,  # its own process group: a kill reaches its helpers too
                pass_fds=() if self.home_lock_fd is None else (self.home_lock_fd,),
                # Its lines join this worker's stream (_supervise), so they take the format this worker's have.
                env={**os.environ, "PYTHONUNBUFFERED": "1",
                     "QLORA_LOG_FORMAT": logs.resolve_format(self.settings.log_format)},
            )
        finally:
            log_file.close()

    def _supervise(self, job: ClaimedJob, workdir: WorkDir, proc: subprocess.Popen,
                   watch: AttemptWatch) -> Result | None:
        """Relay records until the process exits; pass on a cancel; kill it if the lease is lost or a
        cancel is not obeyed in time. Returns its result, if it wrote one. (The heartbeat is the watch's.)"""
        records = RecordReader(workdir.records)
        trainer_log = AppendedLines(workdir.log)
        unreported: list[Record] = []
        tried = False  # a try of `unreported` failed: its commit may have landed, unheard (runs.report's `again`)
        cancel_sent_at = None
        while True:
            exited = proc.poll() is not None
            # The trainer's own log lines (in this worker's format, with the job id) join this worker's stream.
            for line in trainer_log.read_new():
                sys.stderr.write(line.decode("utf-8", "replace") + "\n")
            unreported += records.read_new()
            try:
                with session_scope(self.db) as session:
                    status, unkept = runs.report(session, job.id, job.attempt, unreported,
                                                 Progress.read(workdir.progress), self.settings.keep_checkpoints,
                                                 again=tried)
                unreported, tried = [], False
                watch.reported()
                watch.check()
            except LeaseLost:
                _kill(proc)
                # What it uploaded that will never be recorded (checkpoints, and the quantized base of a run that
                # finished cut off from the database: gigabytes): nobody else would delete them.
                self._delete_unrecorded(_uploaded_keys(unreported + records.read_new()))
                watch.check()  # the time limit, if that is what ended the attempt (the watch recorded it)
                raise
            except DBAPIError as exc:
                if not _passing(exc):
                    raise
                tried = bool(unreported)
                # The records wait for the next round; meanwhile the watch keeps the heartbeat going.
                log.warning("could not report on job %s (trying again in %ss): %s", job.id,
                            self.settings.supervise_interval_s, exc)
                time.sleep(self.settings.supervise_interval_s)
                continue
            delete_objects(self.storage, unkept)
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

    def _delete_unrecorded(self, keys: list[str]) -> None:
        """The objects of records never reported, but only those no row names: a report whose commit went through
        and whose answer was lost (tried again, then refused) recorded them, and a cache entry or a checkpoint
        naming a deleted object sends later jobs to fetch what is gone (a 65B base: 35 GB quantized again)."""
        if not keys:
            return
        try:
            with session_scope(self.db) as session:
                keys = runs.unrecorded_keys(session, keys)
        except DBAPIError as exc:  # left for `qlora admin sweep-storage`: a stray object costs less than a named one gone
            log.warning("could not read which of %d objects are recorded; leaving them: %s", len(keys), exc)
            return
        delete_objects(self.storage, keys)

    def _record(self, job: ClaimedJob, workdir: WorkDir, outcome: Result | None, returncode: int,
                watch: AttemptWatch) -> tuple[str, str | None, dict | None, dict | None]:
        """Upload what a successful run made; returns the final state to write (status, error, summary, report)."""
        if outcome is None and returncode == EXIT_NO_SPACE:
            raise NoSpace("the training process stopped: a disk it writes to is full")
        if outcome is None and returncode == EXIT_OUT_OF_REACH:  # its log's last line says what failed
            raise TrainerOutOfReach(f"the training process stopped; its log ends: {_tail(workdir.log, 1)}")
        if outcome is None:  # killed (the kernel's out-of-memory killer), or crashed on storage: another attempt
            how = (f"was killed by {signal.Signals(-returncode).name}" if returncode < 0
                   else f"exited with code {returncode}")
            if returncode == -signal.SIGKILL:  # what the kernel sends when the host is out of memory
                how += (f" (the kernel's out-of-memory killer sends it when the host runs out of memory: "
                        f"`dmesg` on worker {self.worker} says whether it did)")
            raise AttemptLost(f"the training process {how} without a result; last lines of its log:\n"
                              f"{_tail(workdir.log)}")
        if outcome.status == states.FAILED and outcome.retry_with:
            raise ContinueSmaller(outcome.error or "out of memory", outcome.retry_with)
        summary = None if outcome.summary is None else _summary_for_team(outcome.summary, job.initial_job_id)
        if outcome.status == states.SUCCEEDED:
            made = [kind for kind in ARTIFACTS if (workdir.out / kind).is_dir()]
            watch.say(phase_event("uploading", f"uploading the {', '.join(ARTIFACTS[kind] for kind in made)}"))
            for kind in made:
                self._upload_artifact(job, kind, workdir.out / kind, watch)
            self._keep_only_artifacts(job, made, watch)
        return (outcome.status, outcome.error, summary, outcome.report)

    def _keep_only_artifacts(self, job: ClaimedJob, made: list[str], watch: AttemptWatch) -> None:
        """What an earlier attempt stored and this one did not make (runs.keep_only_artifacts) goes: the job's
        artifacts are this run's, all of them. Their objects are deleted once the rows are: those of every try,
        since a try after one whose commit landed unheard finds the rows gone and answers none (the earlier
        attempt's merged model was left in storage, named by nothing)."""
        stale: list[str] = []

        def keep(session: Session) -> None:
            stale.extend(key for key in runs.keep_only_artifacts(session, job.id, job.attempt, made)
                         if key not in stale)
        self._write_through_outage(f"the artifacts of job {job.id} an earlier attempt stored", keep,
                                   check=watch.check)
        delete_objects(self.storage, stale)

    def _upload_artifact(self, job: ClaimedJob, kind: str, source: Path, watch: AttemptWatch) -> None:
        """Stream a tar of the directory into storage (weights barely compress; a plain tar is fast to
        make and read) and record it. Stopped midway (lease lost, time limit), nothing is kept."""
        size = tree_bytes(source)
        with (watch.transferring(f"uploading {ARTIFACTS[kind]}", size) as transfer,
              self.storage.writer(make_key(job.team_id, "artifacts"), expected_size=size) as writer):
            with tarfile.open(fileobj=WriterStream(writer, transfer.add), mode="w|", bufsize=TAR_BUFFER) as tar:
                tar.add(source, arcname=kind)
            stored = writer.commit()
        committing = False  # a try wrote the record and went on to commit it

        def record(session: Session) -> str | None:
            nonlocal committing
            replaced = runs.add_artifact(session, job.id, job.attempt, kind, stored.key, stored.size, stored.sha256)
            committing = True
            return replaced
        try:
            replaced = self._write_through_outage(f"the {ARTIFACTS[kind]} of job {job.id}", record, check=watch.check)
        except BaseException:
            # Not recorded, so not kept; unless a try's commit failed, which may have reached the database and
            # lost only its answer with the connection: its row may name the object, so it stays (a stray at worst,
            # for `qlora admin sweep-storage`). Deleted, the job's artifact row named an object gone from storage.
            if not committing:
                self.storage.delete(stored.key)
            raise
        if replaced is not None:
            delete_objects(self.storage, [replaced])  # a lost attempt's, no longer recorded

    def _lose(self, job: ClaimedJob, why: str, stopped_at: datetime, outside_the_job: bool) -> None:
        """Another attempt for the job, from its newest checkpoint (the reaper's way with a silent worker,
        here at once); after QLORA_MAX_ATTEMPTS lost ones, failed, or paused when this one ended on a full
        disk or an outage (runs.attempt_lost). The write rides out a short outage (_write_through_outage): given up
        at once, a blip of a second left the job running and silent until the reaper's deadline. Should the
        database be out of reach still, the job keeps its state and, with its heartbeats stopped, the reaper does
        the same. A try after one whose commit landed unheard finds the job moved on (fenced by state and
        attempt), and changes nothing."""
        def lose(session: Session) -> str | None:
            row = session.get(Job, job.id)
            if row is None or row.attempt != job.attempt:
                return None
            # stopped_at is this host's clock, the attempt's claimed_at the database's (usage, fair share)
            return runs.attempt_lost(session, row, why, self.settings.max_attempts,
                                     on_database_clock(session, stopped_at), self.settings.fair_share_half_life_s,
                                     outside_the_job=outside_the_job)
        try:
            became = self._write_through_outage(f"the lost attempt {job.attempt} of job {job.id}", lose)
        except DBAPIError as exc:
            log.warning("job %s attempt %s: could not record the lost attempt (the reaper will): %s", job.id,
                        job.attempt, exc)
            return
        log.info("job %s: attempt %s lost; the job is %s", job.id, job.attempt, became or "moved on already")

    def _continue_smaller(self, job: ClaimedJob, training: dict[str, int], stopped_at: datetime) -> None:
        """The job goes on from its newest checkpoint with a smaller micro-batch (runs.continue_smaller). The
        database out of reach for longer than the ride-out (_write_through_outage, as _lose): the reaper gives it
        another attempt as for a lost worker, with the spec it had. Fenced by the attempt: a try after one whose
        commit landed unheard finds the job moved on, and changes nothing."""
        try:
            became = self._write_through_outage(
                f"the out-of-memory retry of job {job.id}",
                lambda session: runs.continue_smaller(session, job.id, job.attempt, training,
                                                      on_database_clock(session, stopped_at),  # as in _lose
                                                      self.settings.fair_share_half_life_s))
        except DBAPIError as exc:
            log.warning("job %s attempt %s: could not record the out-of-memory retry (the reaper will requeue it): %s",
                        job.id, job.attempt, exc)
            return
        log.info("job %s: out of memory; the job is %s", job.id, became or "moved on already")

    def _finish(self, job: ClaimedJob, status: str, error: str | None = None, summary: dict | None = None,
                report: dict | None = None) -> None:
        # The attempt ends now: a wait for the database to come back is the service's, not the team's (usage,
        # budget, fair share), as for an attempt handed back on an outage (_lose). Ended at the write that went
        # through instead, an outage was charged to the job, up to QLORA_HEARTBEAT_DEADLINE_S.
        ended = utcnow()
        recorded = self._write_through_outage(
            f"job {job.id} {status}",
            lambda session: runs.finish(session, job.id, job.attempt, status, error=error, summary=summary,
                                        report=report, half_life_s=self.settings.fair_share_half_life_s,
                                        ended_at=on_database_clock(session, ended)))  # as in _lose
        if recorded:
            log.info("job %s", status, extra={"attempt": job.attempt, "status": status})
        else:
            log.warning("job %s attempt %s: could not record %s; the job has moved on", job.id, job.attempt, status)

    def _write_through_outage(self, what: str, write: Callable[[Session], T], check: Callable[[], None] | None = None) -> T:
        """One unit of the attempt's database work (a read or write as it prepares, an artifact, the final state, the
        job handed back, the out-of-memory retry), tried again while the database is out
        of reach (a restart, a failover, a dropped connection) for up to QLORA_HEARTBEAT_DEADLINE_S from its first
        failure, waiting a little longer each time up to QLORA_SUPERVISE_INTERVAL_S (so the write lands within a
        heartbeat's interval of the database's return). Given up sooner, the outage cost the whole run: the
        attempt counted as lost and the next one trained from the newest checkpoint and evaluated, merged and
        uploaded all over again (an artifact's record was not tried again at all; the final state 5 times, 1 s
        apart). Past the deadline the reaper, if it reaches the database, has given the job another attempt
        anyway. Each try is fenced by the attempt as any write of the worker's: a job requeued meanwhile raises
        LeaseLost (an artifact) or answers False (the final state), and nothing is overwritten; so too a try after one
        whose commit landed unheard (its connection dropped on the way back): `write` must be safe to repeat so.
        `check` (the watch's) runs before each try: the attempt may have ended meanwhile (time limit, lease lost).
        One try is bounded too (session_url: a connection unanswered for QLORA_WORKER_DATABASE_TIMEOUT_S counts as
        dropped), so the whole ends within about the deadline and one try."""
        wait = self.settings.supervise_interval_s / 8
        give_up_at: float | None = None
        while True:
            if check is not None:
                check()
            try:
                with session_scope(self.db) as session:
                    return write(session)
            except DBAPIError as exc:
                now = time.monotonic()
                give_up_at = give_up_at or now + self.settings.heartbeat_deadline_s
                if not _passing(exc) or now >= give_up_at:
                    raise
                log.warning("could not record %s: the database is out of reach (trying again for up to %.0f s "
                            "more): %s", what, give_up_at - now, exc)
                time.sleep(min(wait, give_up_at - now))
                wait = min(wait * 2, self.settings.supervise_interval_s)


def fault_hold_end_markers(settings: Settings, job_id: str) -> tuple[Path, Path]:
    """FAULT_HOLD_END's files: (held, release)."""
    return settings.work_dir / f".fault-end-held-{job_id}", settings.work_dir / f".fault-end-release-{job_id}"


def _hold_end(settings: Settings, job_id: str) -> None:
    held, release = fault_hold_end_markers(settings, job_id)
    held.touch()
    while not release.exists():
        time.sleep(0.1)
    held.unlink(missing_ok=True)
    release.unlink(missing_ok=True)


MAX_OUT_OF_REACH_WAIT_S = 300


HELD_DIR = ".held"  # in the work directory: per worker process, its lock and the attempt it runs (held_marker)


def held_marker(settings: Settings) -> Path:
    """Where this worker's pool process names the attempt it runs, for the worker process to hand back when it is
    stopped (SIGTERM). Called once by the worker process as it starts, before Celery forks its pool.

    By a name no other worker has, not by the worker's name (two hosts may start workers under one name) nor by its
    process id: the workers of a host share the work directory, and in containers (docker-compose.yml) each has a
    process-id namespace of its own, where every worker gets the same small id; with one marker file between them, a
    stopping worker handed back another's job (which a live worker was training) and not its own. Beside it, a lock
    file this process holds locked (flock) for its life and its pool processes inherit: the kernel drops the lock
    however the worker ends, and flock works across containers on one kernel, where a process id tells nothing.
    Returns the marker's path (which exists only while an attempt runs)."""
    directory = settings.work_dir / HELD_DIR
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    # Locked under a name the sweep does not list, then renamed into place (the lock stays with the file): a worker
    # starting beside it never finds it unlocked and takes it for a dead worker's.
    locking = directory / f"{token}.locking"
    fd = os.open(locking, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # never released: it goes with the process (and its pool processes)
        locking.rename(directory / f"{token}.lock")
    except OSError:  # a filesystem without flock (NFS mounted nolock): no marker, and nothing left of it either
        os.close(fd)
        locking.unlink(missing_ok=True)
        raise
    return directory / f"{token}.json"


def held_attempt(marker: Path) -> tuple[str, int] | None:
    """(job id, attempt) the worker whose held_marker is `marker` runs now, or None."""
    try:
        held = json.loads(marker.read_text())
        return str(held["job_id"]), int(held["attempt"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_claims_left(settings: Settings) -> dict[str, Path]:
    """The claim tokens that `serve`'s local workers of this home left in their held_marker files, each with its
    file: the claims of workers killed before their attempt's end was written (a SIGKILL to serve's process group,
    the out-of-memory killer, a crash of the machine). Only for a `serve` that has just taken the home's lock, before
    it starts its own worker: every such worker held that lock, so none of them runs any more. Markers of other
    workers (`qlora worker` started by hand on this home) are not among them: those may be running."""
    return {held["claim_token"]: marker for marker, held in _local_markers(settings)}


def _local_markers(settings: Settings) -> list[tuple[Path, dict]]:
    """The held_marker files of `serve`'s local workers of this home (marked as holding its lock), read."""
    found = []
    held_dir = settings.work_dir / HELD_DIR
    for marker in held_dir.glob("*.json") if held_dir.is_dir() else ():
        try:
            held = json.loads(marker.read_text())
            if held.get("home_lock") is True and isinstance(held.get("claim_token"), str):
                found.append((marker, held))
        except (OSError, ValueError, AttributeError):  # torn or gone: nothing to say of it
            continue
    return found


def training_processes_left(settings: Settings) -> dict[int, str]:
    """{pid: job id} of the training processes that `serve`'s local workers of this home started and that still run,
    as their markers (_local_markers) name them: for a `serve` waiting for the home's lock, which such a process
    holds on after its worker was killed outright. A pid reused since by a process of another program is left out."""
    return {pid: str(held["job_id"]) for _, held in _local_markers(settings)
            if (pid := _training_pid(held)) is not None and _training_runs(pid)}


def _training_pid(held: dict) -> int | None:
    """The pid of the training process a held_marker names (with its job), or None."""
    if "job_id" not in held:
        return None
    try:
        return int(held["training_pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _training_runs(pid: int) -> bool:
    """Whether `pid` is a training process still running: not one ended (a zombie has no command line), nor a pid
    reused since by a process of another program."""
    if not Path("/proc/self").is_dir():  # not Linux: whether it exists is all there is to go on
        return process_exists(pid)
    try:
        return b"worker.runner" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # ended
        return False


# How long `serve` waits, once its local worker ended unasked, for the worker's pool process to end with it and for
# the training process it sent SIGKILL to to be gone: a moment each (the kernel's), unless a process is stuck in the
# kernel (a GPU driver, a hung disk).
ENDED_WORKER_WAIT_S = 30


def claims_of_ended_local_worker(settings: Settings, wait_s: float = ENDED_WORKER_WAIT_S) -> dict[str, Path]:
    """For `serve`, once the local worker it started has ended unasked (killed by hand or by the out-of-memory killer,
    a crash) and before it starts the next: the claim tokens that worker left in its held_marker files, each with its
    file, as local_claims_left gives them to a `serve` that has just taken the home's lock, and only once nothing of
    the attempts they took runs any more, so that the job can be requeued at once without ever running twice.
    `serve` runs one local worker at a time, so every local marker is that worker's. Two processes of it outlive its
    main process: its pool process, which runs the attempt and writes its end (fenced by its attempt number), ends
    with it a moment later (Celery has the kernel kill it as its parent dies, PR_SET_PDEATHSIG), and the marker's lock
    is free once it has (the worker held it, and its pool processes with it); the training process, in a session of
    its own, stops by itself only after its current step (or its model's load, a merge, an upload: minutes), so it is
    sent SIGKILL, to its process group, and waited for: what it would still do no supervisor records. A marker whose
    lock is still held after `wait_s` (a pool process outliving its worker, where there is no PR_SET_PDEATHSIG), or
    whose training process has not ended by then, is left out, saying so: its job is the reaper's, at its deadline."""
    left = {}
    for marker, held in _local_markers(settings):
        lock = marker.with_suffix(".lock")
        if not _wait_until(lambda lock=lock: _unheld(lock), wait_s):
            log.warning("the ended local worker's pool process still holds %s after %g s: its job %s is left to the "
                        "reaper", lock, wait_s, held.get("job_id", "(none claimed yet)"))
            continue
        pid = _training_pid(held)
        if pid is not None and _training_runs(pid):
            try:
                os.killpg(pid, signal.SIGKILL)  # started in a session of its own: its group is its pid
            except ProcessLookupError:  # ended meanwhile
                pass
            if not _wait_until(lambda pid=pid: not _training_runs(pid), wait_s):
                log.warning("the training process (pid %s) of job %s has not ended %g s after SIGKILL: the job is left "
                            "to the reaper", pid, held["job_id"], wait_s)
                continue
            log.info("stopped the training process (pid %s) of job %s: its local worker ended", pid, held["job_id"])
        _remove_dead_attempt_dir(settings, held)
        left[held["claim_token"]] = marker
    return left


def _remove_dead_attempt_dir(settings: Settings, held: dict) -> None:
    """The work directory of the attempt a held_marker names, once nothing of that attempt runs: its quantized base and
    checkpoints (gigabytes for a large model) are no use to the next attempt, which resumes from storage in a directory
    of its own. Left to the age-based sweeps, it stayed until this job's next attempt ended, or the next `serve`."""
    try:
        job_id, attempt = str(held["job_id"]), int(held["attempt"])
    except (KeyError, TypeError, ValueError):  # no attempt claimed yet: nothing was made
        return
    if Path(job_id).name != job_id or job_id in ("", ".", ".."):  # a marker is this host's own, but never a path out
        return
    attempt_dir = settings.work_dir / job_id / f"attempt-{attempt}"
    if attempt_dir.is_dir():
        shutil.rmtree(attempt_dir, ignore_errors=True)
        _remove_if_empty(attempt_dir.parent)
        log.info("removed %s: the attempt of the local worker that ended", attempt_dir)


def _unheld(lock: Path) -> bool:
    """Whether no process holds `lock` (a held_marker's lock file), which a worker held for its life: a missing one
    was removed by a sweep that found it so."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _wait_until(done: Callable[[], bool], wait_s: float) -> bool:
    give_up_at = time.monotonic() + wait_s
    while not done():
        if time.monotonic() > give_up_at:
            return False
        time.sleep(0.1)
    return True


def sweep_work_dir(settings: Settings) -> list[Path]:
    """Removes what attempts that ended without cleaning up (a SIGKILLed worker: a quantized base, a
    merged model, checkpoints, the data; gigabytes each) left in the work directory, which workers of
    one host may share: an attempt's directory stays only while its job runs that very attempt, here
    or in another worker. A worker calls it as it starts. Returns what it removed."""
    root = settings.work_dir
    removed = _remove_stale_markers(root)
    # A job's directory, not the host's claims (HOST_CLAIMS_DIR) or another dot-directory beside them.
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")] if root.is_dir() else []
    if not dirs:
        return removed
    with session_scope(settings.database_url) as session:
        live = {(job_id, attempt) for job_id, attempt in session.execute(
            select(Job.id, Job.attempt).where(Job.id.in_([d.name for d in dirs]),
                                              Job.status.in_(states.WORKER_OWNED)))}
    # A directory made since the query above may be an attempt claimed meanwhile: left alone.
    settled = time.time() - settings.heartbeat_deadline_s
    for job_dir in dirs:
        for attempt_dir in [d for d in job_dir.iterdir() if d.is_dir()]:
            if (job_dir.name, _attempt_number(attempt_dir)) not in live and attempt_dir.stat().st_mtime < settled:
                shutil.rmtree(attempt_dir, ignore_errors=True)
                removed.append(attempt_dir)
        if _remove_if_empty(job_dir):
            removed.append(job_dir)
    return removed


# A held marker's files are half made (locked, not yet renamed; written, not yet renamed) for microseconds: one this
# old was left by a worker killed in between.
LEFT_HALF_MADE_S = 60


def _remove_stale_markers(root: Path) -> list[Path]:
    """The held_marker files of workers that are gone (one killed outright could not remove its own): those whose
    lock no process holds. Read on a SIGTERM, a stale one would hand back an attempt its worker no longer runs.
    Also what a worker killed between two calls microseconds apart left: a lock file not yet renamed into place
    (`.locking`), a marker not yet renamed into place (write_json_atomic's temporary file), once a minute old."""
    held = root / HELD_DIR
    if not held.is_dir():
        return []
    removed = []
    for lock in held.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            continue  # another starting worker removed it as we looked
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its worker holds it (live, wherever it runs), or no flock here: not ours to judge
                continue
            for path in (lock.with_suffix(".json"), lock):  # the lock last: a crash between leaves it to the next sweep
                if path.exists():
                    path.unlink(missing_ok=True)
                    removed.append(path)
        finally:
            os.close(fd)
    settled = time.time() - LEFT_HALF_MADE_S
    for leftover in [*held.glob("*.locking"), *held.glob(".*.tmp")]:
        try:
            if leftover.stat().st_mtime < settled:
                leftover.unlink()
                removed.append(leftover)
        except FileNotFoundError:
            continue
    return removed


def remove_earlier_attempts(job_dir: Path, attempt: int, deadline_s: float) -> None:
    """The directories of a job's earlier attempts on this host, removed as `attempt` ends. After a crash of the
    host the starting worker's sweep keeps the dead attempt's (its job still runs it in the database until the
    reaper's deadline), and nothing else removed it: gigabytes per crash. Only one whose heartbeat file was last
    touched more than the deadline ago by this host's clock: an attempt's training process (a frozen worker's,
    whose job went on here) stops by itself once the file has gone unchanged that long by its own monotonic clock,
    sampled about every second (runner.supervisor_gone), so nothing is removed from under a process still
    running, unless the host's clock stepped ahead meanwhile (it ages the file here, not there)."""
    settled = time.time() - deadline_s
    try:
        stale = [d for d in job_dir.glob("attempt-*")
                 if (n := _attempt_number(d)) is not None and n < attempt and _last_heartbeat(d) < settled]
    except OSError:  # the disk, unreadable for a moment: the next attempt's end, or the next worker's sweep, tries again
        return
    for attempt_dir in stale:
        shutil.rmtree(attempt_dir, ignore_errors=True)
        log.info("removed %s: an earlier attempt of this job", attempt_dir)


def _attempt_number(attempt_dir: Path) -> int | None:
    """The attempt an `attempt-N` directory is of; None for a name without a number."""
    number = attempt_dir.name.removeprefix("attempt-")
    return int(number) if number.isdigit() else None


def _last_heartbeat(attempt_dir: Path) -> float:
    """When the attempt's worker last said it lived (its heartbeat file; the directory's own time before one)."""
    try:
        return (attempt_dir / "heartbeat").stat().st_mtime
    except FileNotFoundError:
        return attempt_dir.stat().st_mtime


def _remove_if_empty(directory: Path) -> bool:
    try:
        directory.rmdir()
        return True
    except OSError:  # not empty (or already gone)
        return False


class UnusableInput(Exception):  # noqa: N818 (the job's end, said to its team)
    """A dataset or the starting adapter of the job went bad in storage after it was recorded: every attempt would
    meet it. Its message names it as the team knows it (a dataset id, the initial job) and what to do."""


# What a team does about a dataset that went bad in storage, and about a starting adapter that did.
UPLOAD_AGAIN = "upload the file again (it gets a new dataset id) and create the job again with that {field}"
ANOTHER_ADAPTER = "create the job again from another job's adapter, or without initial_job_id"


@contextmanager
def _input_of_the_job(what: str, fix: str) -> Iterator[None]:
    """A fetch of the job's own input whose stored copy went bad ends the job saying so in the team's terms. Before,
    it failed "the worker failed: ChecksumMismatch: object '<storage key>' is corrupt ... so upload it again":
    the service's internal key, and for a starting adapter a fix that cannot be done."""
    try:
        yield
    except (ChecksumMismatch, ObjectNotFound) as exc:
        raise UnusableInput(f"cannot train: {what} is unusable ({_gone_bad(exc)}); {fix}") from exc


def _gone_bad(exc: ChecksumMismatch | ObjectNotFound) -> str:
    """How a recorded object went bad in storage, for a person."""
    return ("its bytes no longer match the sha256 recorded at its upload" if isinstance(exc, ChecksumMismatch)
            else "it is gone from storage")


class AttemptLost(Exception):  # noqa: N818 (an attempt's end, not the job's)
    """The training process ended without a result (killed, or crashed on the way to storage)."""


class ContinueSmaller(Exception):  # noqa: N818 (an attempt's end, not the job's)
    """The training process ran out of memory at a step with a micro-batch above 1: the job continues with
    `training` (the run's Result.retry_with)."""

    def __init__(self, message: str, training: dict[str, int]):
        super().__init__(message)
        self.training = training


class NoSpace(Exception):  # noqa: N818 (an attempt's end, not the job's)
    """The training process stopped because a disk it writes to is full (worker/runner.py)."""


class TrainerOutOfReach(Exception):  # noqa: N818 (an attempt's end, not the job's)
    """The training process stopped because storage was out of reach as it uploaded a checkpoint."""


def _said(exc: BaseException) -> str:
    said = str(exc)
    return f"{type(exc).__name__}: {said if len(said) <= 300 else said[:300] + '…'}"


def free_space(paths: list[Path]) -> str:
    """What the filesystems holding `paths` have left, for a person; one filesystem named once:
    `0 bytes of 20.0 GiB free for /data/qlora/work`."""
    seen, said = set(), []
    for path in paths:
        while not path.exists() and path != path.parent:  # not made yet: it will be on its parent's filesystem
            path = path.parent
        try:
            device, stats = path.stat().st_dev, os.statvfs(path)
        except OSError as exc:
            said.append(f"the free space for {path} is unknown ({exc.strerror})")
            continue
        if device not in seen:
            seen.add(device)
            said.append(f"{format_bytes(stats.f_bavail * stats.f_frsize)} of "
                        f"{format_bytes(stats.f_blocks * stats.f_frsize)} free for {path}")
    return ", ".join(said)


def out_of_reach(exc: BaseException) -> bool:
    """Storage or the database out of reach for a moment (an outage, a dropped connection, a timeout),
    as opposed to a fault of the job or a bug: worth another attempt."""
    if isinstance(exc, DBAPIError):
        return _passing(exc)
    return storage_out_of_reach(exc)


def _passing(exc: DBAPIError) -> bool:
    """A database error that passes (a restart, a dropped or server-ended connection): try again."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")  # read_text() would make each \r a line break
    except FileNotFoundError:
        return "(no log)"
    # Progress bars redraw with \r; keep what was last on each line (read as text, or split by splitlines(), a
    # bar's every redraw was a line of its own, and its redraws filled the tail).
    return "\n".join(_readable(line.rsplit("\r", 1)[-1]) for line in text.rstrip("\n").split("\n")[-lines:])


def _readable(line: str) -> str:
    """A log line as a person reads it in an event: the training process logs JSON where its output is no
    terminal (app/logs.py), and its records read as {"time": ..., "level": ..., "process": ...} in the job's
    events. A JSON record becomes "level: message"; any other line stays as written."""
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or not isinstance(record.get("message"), str):
        return line
    return f"{record.get('level', 'info')}: {record['message']}" + (f"\n{record['exception']}" if record.get("exception") else "")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _summary_for_team(summary: dict, initial_job_id: str | None) -> dict:
    """The engine's summary as the team reads it through the API: the run's numbers, with the starting adapter
    named by its job (the lineage) and the base by the spec, not by directories on this worker's disk, which
    mean nothing to the team and show it the worker's layout."""
    summary = {key: value for key, value in summary.items() if key != "base_model_path"}
    if initial_job_id:
        summary["initial_job_id"] = initial_job_id
        if summary.get("initial_adapter"):
            summary["initial_adapter"] = {"job_id": initial_job_id, "sha256": summary["initial_adapter"]["sha256"]}
    return summary
