"""Which failures of the worker give a job another attempt (storage or the database out of reach for a
moment: worker/supervisor.py, out_of_reach) and which fail it (anything else: a fault of the job, or a
bug, which another attempt would only repeat); and what a starting worker clears of attempts that ended
without cleaning up (sweep_work_dir)."""

from __future__ import annotations

from pathlib import Path

import botocore.exceptions
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from worker.supervisor import out_of_reach


def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                                           "PutObject")


@pytest.mark.parametrize("exc, another_attempt", [
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3:9000"), True),  # S3 down
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3:9000"), True),
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3:9000"), True),
    (client_error(503, "SlowDown"), True),
    (client_error(500, "InternalError"), True),
    (client_error(400, "SlowDown"), True),
    (client_error(403, "AccessDenied"), False),  # a wrong key stays wrong
    (client_error(404, "NoSuchKey"), False),
    (OperationalError("UPDATE jobs", {}, Exception("terminating connection due to administrator command")), True),
    (IntegrityError("INSERT", {}, Exception("duplicate key")), False),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (ValueError("a bug"), False),
    (KeyError("spec"), False),
])
def test_only_storage_or_the_database_out_of_reach_is_worth_another_attempt(exc, another_attempt):
    assert out_of_reach(exc) is another_attempt


def test_a_starting_worker_removes_what_ended_attempts_left_and_keeps_what_runs(settings, make_job):
    """A SIGKILLed worker's attempt directory (a quantized base, a merged model, checkpoints: gigabytes)
    stayed on the shared disk forever: only the attempt that ran removed its own."""
    import os
    import time

    from app.jobs import states
    from worker.supervisor import sweep_work_dir

    finished = make_job(states.SUCCEEDED, attempt=1)
    running = make_job(states.RUNNING, attempt=2)
    work = settings.work_dir
    left = [work / finished / "attempt-1", work / running / "attempt-1", work / "no-such-job" / "attempt-3"]
    live = work / running / "attempt-2"
    claimed_meanwhile = work / finished / "attempt-2"  # made after the sweep read the jobs: too fresh to judge
    for directory in [*left, live, claimed_meanwhile]:
        directory.mkdir(parents=True)
        (directory / "merged.safetensors").write_bytes(b"\0" * 1024)
    long_ago = time.time() - 3600
    for directory in [*left, live]:
        os.utime(directory, (long_ago, long_ago))

    removed = sweep_work_dir(settings)
    assert set(removed) >= set(left) and live not in removed
    assert live.is_dir() and claimed_meanwhile.is_dir() and not any(d.exists() for d in left)
    assert not (work / "no-such-job").exists()  # its job directory too, once empty


@pytest.mark.parametrize("outside_the_job, became", [(True, "paused"), (False, "failed")])
def test_the_last_lost_attempt_pauses_a_job_stopped_by_a_full_disk_or_an_outage_and_fails_any_other(
        session, settings, caller, make_job, outside_the_job, became):
    """Past QLORA_MAX_ATTEMPTS a job failed whatever ended its attempts, though a disk an operator had not
    yet freed, or an outage, is nothing the job did: it is paused instead, keeping its checkpoints, and its
    team's resume gives it QLORA_MAX_ATTEMPTS afresh. A crash of its own (a killed training process: the
    kernel's OOM killer) still fails it: another round would likely repeat it."""
    from app.db import utcnow
    from app.jobs import runs, service, states
    from app.jobs.tables import Job

    job_id = make_job(states.RUNNING, attempt=3, lost_workers=2, worker="gpu-3")
    why = "a disk was full (the training process stopped; on worker gpu-3: 0 bytes of 1.0 GiB free for /work)"
    assert runs.attempt_lost(session, session.get(Job, job_id), why, 3, utcnow(), 3600.0,
                             outside_the_job=outside_the_job) == became
    session.commit()
    job = session.get(Job, job_id)
    assert job.status == became
    (event,) = [e for e in service.events(session, caller, job_id, None, 100) if e.type == became]
    assert event.message.startswith(f"the job lost 3 attempts (last: {why}); ")
    if became == "failed":
        assert job.error == event.message and job.finished_at is not None
        return
    assert "paused rather than failed after QLORA_MAX_ATTEMPTS=3, keeping its checkpoints" in event.message
    assert job.error is None and job.finished_at is None and job.worker is None

    service.resume(session, settings, caller, job_id)
    session.commit()
    session.refresh(job)
    assert (job.status, job.lost_workers) == (states.QUEUED, 0)


def test_the_reaper_pauses_a_job_whose_last_attempt_lost_its_worker(session, settings, caller, make_job):
    """A silent worker is a host killed or preempted, a frozen VM, a partition, or the database out of reach
    for longer than the worker waits: nothing the job did, as a full disk is not. Past QLORA_MAX_ATTEMPTS
    the reaper failed such a job, so three spot preemptions lost a day's training; it is paused now, and a
    job with attempts left is still requeued."""
    from datetime import timedelta

    from app.db import utcnow
    from app.jobs import service, states
    from app.jobs.reaper import reap
    from app.jobs.tables import Job

    silent_since = utcnow() - timedelta(seconds=settings.heartbeat_deadline_s + 60)
    last = make_job(states.RUNNING, attempt=3, lost_workers=settings.max_attempts - 1, worker="gpu-3",
                    step=40, started_at=silent_since, heartbeat_at=silent_since)
    another = make_job(states.RUNNING, attempt=1, worker="gpu-4", started_at=silent_since, heartbeat_at=silent_since)
    alive = make_job(states.RUNNING, attempt=1, worker="gpu-5", started_at=silent_since, heartbeat_at=utcnow())

    assert reap(session, settings) == {"requeued": 1, "failed": 0, "cancelled": 0, "paused": 1}
    session.commit()
    assert [session.get(Job, j).status for j in (last, another, alive)] == [states.PAUSED, states.QUEUED, states.RUNNING]
    job = session.get(Job, last)
    assert job.error is None and job.finished_at is None and job.worker is None
    (event,) = [e for e in service.events(session, caller, last, None, 100) if e.type == states.PAUSED]
    assert event.message.startswith(f"the job lost {settings.max_attempts} attempts (last: worker gpu-3 stopped "
                                    "sending heartbeats at step 40); paused rather than failed"), event.message

    service.resume(session, settings, caller, last)
    session.commit()
    session.refresh(job)
    assert (job.status, job.lost_workers) == (states.QUEUED, 0)


def test_a_heartbeat_between_the_reapers_read_and_its_write_keeps_the_job_with_its_worker(session, settings, make_job):
    """The reaper reads the silent jobs, then requeues each, fenced by its status and attempt only: a heartbeat
    written between the two (a worker back from a database blip just at the deadline) still lost the job to a
    requeue, and its worker, fenced out, stopped training and lost its steps since the last checkpoint. The
    requeue now holds only while the heartbeat is still older than the deadline."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.db import utcnow
    from app.jobs import repository, states
    from app.jobs.runs import attempt_lost
    from app.jobs.tables import Job

    deadline = utcnow() - timedelta(seconds=settings.heartbeat_deadline_s)
    silent_since = deadline - timedelta(seconds=60)
    job_id = make_job(states.RUNNING, attempt=1, worker="gpu-1", started_at=silent_since, heartbeat_at=silent_since)
    (read,) = repository.stale_jobs(session, deadline)
    # The worker's heartbeat lands now, as the reaper's own read of the job stands.
    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow())
                    .execution_options(synchronize_session=False))
    assert attempt_lost(session, read, "worker gpu-1 stopped sending heartbeats", settings.max_attempts, silent_since,
                        settings.fair_share_half_life_s, outside_the_job=True, silent_before=deadline) is None
    session.commit()
    session.expire_all()
    job = session.get(Job, job_id)
    assert (job.status, job.worker, job.lost_workers) == (states.RUNNING, "gpu-1", 0)


@pytest.mark.parametrize("status", ["failed", "cancelled", "paused"])
@pytest.mark.parametrize("outside_the_job", [True, False])
def test_a_lost_attempt_leaves_a_job_its_own_watch_already_ended_as_it_is(
        session, settings, caller, make_job, status, outside_the_job):
    """The attempt's watch records the end itself: at the time limit it kills the training process, then
    records failed; the main thread may see the process gone without a result first (AttemptLost, "killed by
    SIGKILL") and, once the watch has stopped, lose the attempt (supervisor._lose) with the job failed by that
    same attempt. Likewise a cancel or pause before training as a transfer meets storage out of reach.
    attempt_lost moved the job from whatever state it found (its fence was that state and the attempt): a job
    failed at its time limit ("not retried") was queued again, a cancelled or team-paused one too, and past
    the last attempt a failed one was paused (outside_the_job) or failed again over its own error."""
    from app.db import utcnow
    from app.jobs import runs
    from app.jobs.tables import Job

    job_id = make_job(status, attempt=2, lost_workers=1 if outside_the_job else 0, worker="gpu-3")
    why = "storage or the database was out of reach (EndpointConnectionError)"
    assert runs.attempt_lost(session, session.get(Job, job_id), why, 2, utcnow(), 3600.0,
                             outside_the_job=outside_the_job) is None
    session.commit()
    session.expire_all()
    assert session.get(Job, job_id).status == status


@pytest.mark.parametrize("status, became, spec_changed", [
    ("running", "requeued", True), ("pausing", "paused", True), ("cancelling", "cancelled", False),
    ("failed", None, False), ("queued", None, False)])
def test_out_of_memory_at_a_step_continues_the_job_with_a_smaller_micro_batch_in_its_spec(
        session, settings, make_job, status, became, spec_changed):
    """runs.continue_smaller, which the worker calls when its training process ran out of memory at a step
    (worker/supervisor.py): a running job is queued again with the smaller micro-batch in its spec, for its
    next attempt to resume from its checkpoint; a pausing one is paused with it; a cancelling one cancelled;
    a job that moved on meanwhile (failed at its time limit, requeued by the reaper) is left as it is. It is
    not a lost attempt."""
    from app.db import utcnow
    from app.jobs import runs
    from app.jobs.tables import Job, JobEvent

    job_id = make_job(status, attempt=2, worker="gpu-3")
    smaller = {"per_device_batch_size": 2, "gradient_accumulation_steps": 8}
    assert runs.continue_smaller(session, job_id, 2, smaller, utcnow(), 3600.0) == became
    assert runs.continue_smaller(session, job_id, 1, smaller, utcnow(), 3600.0) is None  # an older attempt's: fenced
    session.commit()
    session.expire_all()
    job = session.get(Job, job_id)
    assert job.status == {"requeued": "queued"}.get(became, became or status)
    assert job.lost_workers == 0
    training = job.spec["training"]
    assert ({k: training[k] for k in smaller} == smaller) is spec_changed
    if became:
        (event,) = session.query(JobEvent).filter_by(job_id=job_id).all()
        assert event.type == became and event.level == "warning"
        if spec_changed:  # job_spec()'s micro-batch 4 x 4: the same 16 rows a step
            assert "micro-batch 2 and gradient_accumulation_steps 8 (from 4 and 4: the same 16 rows" in event.message


def test_a_job_whose_micro_batch_was_auto_continues_with_the_number_and_says_auto_chose_the_one_before(
        session, settings, make_job):
    from app.db import utcnow
    from app.jobs import runs
    from app.jobs.tables import Job, JobEvent

    job_id = make_job("running", attempt=1, worker="gpu-3")
    job = session.get(Job, job_id)
    job.spec = {**job.spec, "training": {**job.spec["training"], "per_device_batch_size": "auto"}}
    session.commit()
    smaller = {"per_device_batch_size": 8, "gradient_accumulation_steps": 8}
    assert runs.continue_smaller(session, job_id, 1, smaller, utcnow(), 3600.0) == "requeued"
    session.commit()
    session.expire_all()
    assert session.get(Job, job_id).spec["training"]["per_device_batch_size"] == 8  # what runs now, not "auto"
    (event,) = session.query(JobEvent).filter_by(job_id=job_id).all()
    assert ('micro-batch 8 and gradient_accumulation_steps 8 (from what per_device_batch_size "auto" chose: the same '
            "64 rows") in event.message


def test_an_attempts_end_removes_its_jobs_earlier_attempts_that_a_crash_of_the_host_left(settings):
    """After a crash of the host the starting worker's sweep keeps the dead attempt's directory (its job still
    runs it in the database until the reaper's deadline); the end of the next attempt removes it, unless its
    heartbeat is fresher than the deadline (a frozen worker's training process may still be running there)."""
    import os
    import time

    from worker.supervisor import remove_earlier_attempts

    job_dir = settings.work_dir / "job-1"
    long_ago = time.time() - 3600
    for n in (1, 2, 3, 12):
        (job_dir / f"attempt-{n}" / "checkpoints").mkdir(parents=True)
        (job_dir / f"attempt-{n}" / "heartbeat").touch()
        os.utime(job_dir / f"attempt-{n}" / "heartbeat", (long_ago, long_ago))
    (job_dir / "attempt-2" / "heartbeat").touch()  # its worker said it lived a moment ago
    (job_dir / "attempt-x").mkdir()  # no attempt's name: not ours to judge
    remove_earlier_attempts(job_dir, 3, deadline_s=120)
    assert sorted(d.name for d in job_dir.iterdir()) == ["attempt-12", "attempt-2", "attempt-3", "attempt-x"]
    remove_earlier_attempts(settings.work_dir / "no-such-job", 1, deadline_s=120)  # nothing there: nothing to do


# A worker of its own, as its pool process runs an attempt: it holds its marker, names its attempt there, and
# lives until the test kills it.
OTHER_WORKER = """
import sys
from pathlib import Path
from app.config import Settings
from worker.supervisor import held_marker
from worker.training.protocol import write_json_atomic

marker = held_marker(Settings(home=Path(sys.argv[1])))
write_json_atomic(marker, {"job_id": "theirs", "attempt": 2})
print(marker, flush=True)
sys.stdin.read()
"""


def test_workers_sharing_a_work_dir_each_hand_back_their_own_attempt(settings):
    """docker-compose's workers share the work directory, each in a container with a process-id namespace of its
    own, where each worker has the same small pid. The marker of the attempt a worker runs was named by that pid:
    one file between them, so a worker stopped with SIGTERM handed back another's job (which a live worker was
    training) and not its own, and a worker starting beside a live one removed its marker (no process of that id
    in its own namespace, or its own id), so that one's SIGTERM handed back nothing. Whatever the ids, each worker
    process has a marker of its own now, and a marker goes only once no process holds its worker's lock."""
    import subprocess
    import sys

    from worker.supervisor import held_attempt, held_marker, sweep_work_dir
    from worker.training.protocol import write_json_atomic

    other = subprocess.Popen([sys.executable, "-c", OTHER_WORKER, str(settings.home)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(other.stdout.readline().strip())
        mine = held_marker(settings)  # this process: a worker starting beside the other one
        assert sweep_work_dir(settings) == [] and theirs.exists()  # a live worker's marker stays
        assert held_attempt(mine) is None  # stopped now, this worker hands back nothing: it runs nothing
        write_json_atomic(mine, {"job_id": "mine", "attempt": 1})
        assert (held_attempt(mine), held_attempt(theirs)) == (("mine", 1), ("theirs", 2))
    finally:
        other.kill()  # killed outright, as a container's SIGKILL: it removes nothing
        other.wait()
    removed = sweep_work_dir(settings)  # the next worker to start
    assert sorted(removed) == sorted([theirs, theirs.with_suffix(".lock")]) and held_attempt(mine) == ("mine", 1)


def test_a_workers_half_made_marker_files_go_once_a_minute_old(settings):
    """A worker killed between locking its lock file and renaming it into place left `<token>.locking`, and one
    killed while writing its marker left write_json_atomic's `.<token>.json.tmp`: no sweep listed them, one more
    file per such start for ever. A minute old, they go; younger ones may be a worker's starting beside this one."""
    import os
    import time

    from worker.supervisor import HELD_DIR, sweep_work_dir

    held = settings.work_dir / HELD_DIR
    held.mkdir(parents=True)
    old = [held / "a.locking", held / ".b.json.tmp"]
    young = [held / "c.locking", held / ".d.json.tmp"]
    for path in old + young:
        path.touch()
    for path in old:
        os.utime(path, (time.time() - 120, time.time() - 120))
    assert sorted(sweep_work_dir(settings)) == sorted(old)
    assert all(path.exists() for path in young)


def test_a_lost_attempts_log_tail_reads_as_text(tmp_path):
    """The training process logs JSON where its output is no terminal: a lost attempt's requeued event (and
    the job's error) quoted its last lines as {"time": ..., "level": ..., "process": ...} records."""
    from worker.supervisor import _tail

    log = tmp_path / "train.log"
    log.write_text('{"time": "2026-12-06T19:00:00.000Z", "level": "info", "process": "trainer", "pid": 7, '
                   '"logger": "worker.training", "message": "step 40 of 160"}\n'
                   'a line of its own, as a library printed it\n'
                   'progress 10%\rprogress 20%\n'
                   '{"level": "error", "message": "writing the checkpoint failed", "exception": "Traceback ...\\nOSError"}\n'
                   '{"not": "a record"}\n')
    assert _tail(log).splitlines() == ["info: step 40 of 160", "a line of its own, as a library printed it",
                                       "progress 20%", "error: writing the checkpoint failed", "Traceback ...",
                                       "OSError", '{"not": "a record"}']
