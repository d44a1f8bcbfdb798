"""A worker records a finished run's outcome (each artifact, then the final state) through a short database
outage, on real Postgres behind a TCP link the test cuts (tests/faults/tcp_link.py): the final state was tried 5
times, 1 supervise interval apart, then given up, and the attempt counted as lost. And the retries stay fenced by
the attempt: a job given to another attempt while the worker was cut off is not overwritten.
(tests/faults/test_lost_work.py shows the artifacts' side on a deployment, with a real training run.)"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.db import database_now, engine_for, session_scope
from app.jobs import states
from app.jobs.runs import ClaimedJob, LeaseLost, ObjectRef
from app.jobs.tables import Artifact, Checkpoint, Job, JobAttempt, JobEvent, JobMetric
from app.teams.service import create_team
from app.usage import ledger
from tests.deployment import stored_spec
from tests.faults.tcp_link import CuttableLink
from worker.supervisor import AttemptWatch, JobRun
from worker.training.protocol import CheckpointStored, Event, QuantizedBaseStored, RecordWriter, Result, TrainPoint, WorkDir

SUPERVISE_INTERVAL_S, HEARTBEAT_DEADLINE_S = 0.5, 6.0
# The outage lasts until the link has refused this many connections: more tries than the final state's 5 (after which
# the worker used to give up), about 2 s of the worker's waits, well within the deadline (6 s). Counted in tries, not
# timed: a 3 s timer on a loaded machine could come after the deadline, or before the sixth try.
OUTAGE_REFUSALS = 6


@pytest.fixture
def link(database_url) -> Iterator[CuttableLink]:
    url = make_url(database_url)
    link = CuttableLink((url.host or "127.0.0.1", url.port or 5432))
    yield link
    link.close()


@pytest.fixture
def worker_settings(database_url, link, tmp_path) -> Settings:
    """A worker's settings: its database reached through the link."""
    through = make_url(database_url).set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
    settings = Settings(home=tmp_path, database_url=through, storage_url=f"file://{tmp_path / 'storage'}",
                        broker_url="", supervise_interval_s=SUPERVISE_INTERVAL_S,
                        heartbeat_deadline_s=HEARTBEAT_DEADLINE_S)
    yield settings
    engine_for(JobRun(settings, "-", "w1").db).dispose()


def running_job(database_url: str) -> ClaimedJob:
    """A job attempt 1 of worker w1 runs, as a claim leaves it."""
    with session_scope(database_url) as session:
        team = create_team(session, "outage")
        job = Job(team_id=team.id, status=states.RUNNING, attempt=1, worker="w1", base_model="tiny",
                  spec=stored_spec(), queue="gpu-default")
        session.add(job)
        session.flush()
        return ClaimedJob(id=job.id, team_id=team.id, queue="gpu-default", attempt=1, spec={}, base_model={},
                          train=ObjectRef("d", "k", "s", 0), validation=None)


def given_to_attempt_2(database_url: str, job_id: str) -> None:
    """What the reaper and another worker do while this one is cut off: the job requeued and claimed again."""
    with session_scope(database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(attempt=2, worker="w2"))


def outage(link: CuttableLink) -> None:
    link.cut(restore_after=OUTAGE_REFUSALS)


def test_the_final_state_is_recorded_through_an_outage(database_url, link, worker_settings):
    job = running_job(database_url)
    run = JobRun(worker_settings, job.id, "w1")
    with session_scope(run.db):
        pass  # the worker's pool holds a connection, as it does after its last report
    outage(link)
    try:
        run._finish(job, states.SUCCEEDED)
    finally:
        link.restore()
    assert link.refused >= OUTAGE_REFUSALS  # the outage met the write, for more tries than it used to get
    with session_scope(database_url) as session:
        ended = session.get(Job, job.id)
        assert ended is not None and (ended.status, ended.attempt) == (states.SUCCEEDED, 1)


def test_the_wait_for_the_database_to_come_back_is_not_charged_to_the_team(database_url, link, worker_settings):
    """The run ended while the database was out of reach; the worker recorded its outcome once it came back. The
    attempt's GPU time (usage, the monthly budget, fair share) ends where the run ended, not where the write went
    through: the wait is the service's, as it is for an attempt handed back on an outage (README, "What counts").
    Before, it ended at the write, and the team was charged the outage (up to QLORA_HEARTBEAT_DEADLINE_S a job)."""
    job = running_job(database_url)
    with session_scope(database_url) as session:
        row = session.get(Job, job.id)
        assert row is not None
        row.claimed_at = database_now(session)
        ledger.start(session, row, row.claimed_at)  # as runs.claim opens the attempt
    run = JobRun(worker_settings, job.id, "w1")
    with session_scope(run.db):
        pass  # the worker's pool holds a connection, as it does after its last report
    link.cut()
    recording = threading.Thread(target=run._finish, args=(job, states.SUCCEEDED))
    try:
        recording.start()
        while link.refused < OUTAGE_REFUSALS:  # the worker is waiting for the database, try after try
            assert recording.is_alive(), "the worker gave up within the outage"
            time.sleep(0.02)
        with session_scope(database_url) as session:  # past the outage's first moments, by the database's clock
            during_the_outage = database_now(session)
    finally:
        link.restore()
        recording.join(30)
    with session_scope(database_url) as session:
        attempt = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job.id)).one()
        assert attempt.outcome == states.SUCCEEDED
        assert attempt.ended_at is not None and attempt.ended_at < during_the_outage, (attempt.ended_at,
                                                                                       during_the_outage)


def adapter_to_record(database_url: str, worker_settings: Settings, tmp_path):
    """A running job's worker with its adapter written, to store and record (its watch not started: no beats)."""
    job = running_job(database_url)
    run = JobRun(worker_settings, job.id, "w1")
    source = tmp_path / "out" / "adapter"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text("{}")
    return job, run, source, AttemptWatch(worker_settings, run.db, job, WorkDir(tmp_path / "attempt-1"))


def test_an_artifact_recorded_after_the_job_moved_on_is_not_kept(database_url, link, worker_settings, tmp_path):
    job, run, source, watch = adapter_to_record(database_url, worker_settings, tmp_path)
    outage(link)
    try:
        given_to_attempt_2(database_url, job.id)
        with pytest.raises(LeaseLost):
            run._upload_artifact(job, "adapter", source, watch)
        run._finish(job, states.SUCCEEDED)  # answered "moved on": nothing written
    finally:
        link.restore()
    with session_scope(database_url) as session:
        ended = session.get(Job, job.id)
        assert ended is not None and (ended.status, ended.attempt, ended.worker) == (states.RUNNING, 2, "w2")
        assert session.scalars(select(Artifact).where(Artifact.job_id == job.id)).all() == []
    stored = tmp_path / "storage"
    assert not [p for p in stored.rglob("*") if p.is_file()]  # the upload went with its record


def test_an_artifact_whose_record_landed_unheard_keeps_its_object(database_url, link, worker_settings, tmp_path):
    """The commit of an artifact's record reaches the database and its answer is lost with the connection, and the
    database stays out of reach past the deadline: the worker gives up on the attempt, but the object that the
    committed row names stays in storage. Before, it was deleted as "not recorded", and the job's adapter row
    named an object gone from storage (a download of it, or a next attempt's replacement, found nothing)."""
    job, run, source, watch = adapter_to_record(database_url, worker_settings, tmp_path)
    link.cut_at_answer(b"COMMIT\x00")  # the record's commit lands; the link goes down as its answer comes back
    try:
        with pytest.raises(DBAPIError):  # out of reach for the whole deadline: the worker gives up
            run._upload_artifact(job, "adapter", source, watch)
    finally:
        link.restore()
    with session_scope(database_url) as session:
        recorded = session.scalars(select(Artifact).where(Artifact.job_id == job.id)).one()
        key = recorded.storage_key
    assert run.storage.exists(key)


def test_a_lost_lease_deletes_only_the_objects_no_row_names(database_url, link, worker_settings, tmp_path):
    """A report's commit lands (a checkpoint and the quantized base it cached) and its answer is lost with the
    connection; while the worker is cut off the job goes to attempt 2, and its next report meets LeaseLost. The
    worker deletes what it uploaded and will never record, but not the objects of that committed report: deleted,
    the checkpoint row a resume reads and the cache entry later jobs fetch named objects gone (a 65B base: 35 GB
    quantized again by the next job of it)."""
    job = running_job(database_url)
    run = JobRun(worker_settings, job.id, "w1")
    workdir = WorkDir(tmp_path / "attempt-1")
    workdir.root.mkdir()
    workdir.log.touch()
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    checkpoint, base, later = (f"{job.team_id}/checkpoints/c1", "shared/quantized-bases/q1",
                               f"{job.team_id}/checkpoints/c2")
    for key in (checkpoint, base, later):
        run.storage.put_file(key, blob)
    with RecordWriter(workdir.records) as records:
        records(CheckpointStored(step=1, key=checkpoint, size=1, sha256="1" * 64))
        records(QuantizedBaseStored(key="q" * 64, storage_key=base, size=1, sha256="2" * 64, identity={}))
    trainer = subprocess.Popen(["sleep", "120"], start_new_session=True)  # the training process, as _spawn starts it
    link.cut_at_answer(b"COMMIT\x00")  # the first report's commit lands; its answer is lost
    with ThreadPoolExecutor(1) as pool:
        supervising = pool.submit(run._supervise, job, workdir, trainer, AttemptWatch(worker_settings, run.db, job,
                                                                                      workdir))
        try:
            while link.refused < 1:  # cut off, and trying again
                assert not supervising.done(), supervising.exception()
                time.sleep(0.02)
            with RecordWriter(workdir.records) as records:  # stored while cut off: never recorded
                records(CheckpointStored(step=2, key=later, size=1, sha256="3" * 64))
            given_to_attempt_2(database_url, job.id)
        finally:
            link.restore()
        with pytest.raises(LeaseLost):
            supervising.result(timeout=60)
    assert trainer.poll() is not None
    assert (run.storage.exists(checkpoint), run.storage.exists(base), run.storage.exists(later)) == (True, True, False)


def test_an_earlier_attempts_artifact_goes_with_its_object_when_the_rows_removal_landed_unheard(
        database_url, link, worker_settings, tmp_path):
    """A succeeding attempt removes the artifact rows of kinds it did not make (an earlier attempt's merged model,
    runs.keep_only_artifacts); that commit lands and its answer is lost. The try again finds the rows gone and
    answers no keys: the object must still go, as the rows did. Before, it stayed in storage, named by nothing.
    (This run made no artifact of its own, so the removal's COMMIT is the first the link cuts at.)"""
    job = running_job(database_url)
    run = JobRun(worker_settings, job.id, "w1")
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    merged = f"{job.team_id}/artifacts/m0"
    run.storage.put_file(merged, blob)
    with session_scope(database_url) as session:  # stored and recorded by an attempt lost after it
        session.add(Artifact(job_id=job.id, kind="merged", storage_key=merged, bytes=1, sha256="1" * 64))
    workdir = WorkDir(tmp_path / "attempt-1")
    watch = AttemptWatch(worker_settings, run.db, job, workdir)
    link.cut_at_answer(b"COMMIT\x00")
    link.restore_when(lambda: link.refused >= 1)  # the try again gets through
    assert run._record(job, workdir, Result(status=states.SUCCEEDED), 0, watch)[0] == states.SUCCEEDED
    assert link.refused >= 1  # the commit's answer was lost, and the worker tried again
    with session_scope(database_url) as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == job.id)).all() == []
    assert not run.storage.exists(merged)


def test_a_report_whose_commit_landed_unheard_is_not_written_twice(database_url, link, worker_settings, tmp_path):
    """A report's commit (a point of the curve, a checkpoint and its checkpoint_saved event) reaches the database and
    its answer is lost with the connection; the worker reports the same records again once the database answers.
    The curve's point and the checkpoint were written over, but the events were added again: the job's events said
    `checkpoint_saved` twice for one checkpoint."""
    job = running_job(database_url)
    run = JobRun(worker_settings, job.id, "w1")
    workdir = WorkDir(tmp_path / "attempt-1")
    workdir.root.mkdir()
    workdir.log.touch()
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    key = f"{job.team_id}/checkpoints/c1"
    run.storage.put_file(key, blob)
    with RecordWriter(workdir.records) as records:
        records(TrainPoint(step=1, epoch=0.1, train_loss=2.5, tokens_seen=64))
        records(Event(type="started", message="training started", step=0))
        records(CheckpointStored(step=1, key=key, size=1, sha256="1" * 64))
        records(Event(type="checkpoint_saved", message="checkpoint of step 1 saved", step=1))
    trainer = subprocess.Popen(["sleep", "120"], start_new_session=True)  # the training process, as _spawn starts it
    link.cut_at_answer(b"COMMIT\x00")  # the first report's commit lands; its answer is lost
    with ThreadPoolExecutor(1) as pool:
        supervising = pool.submit(run._supervise, job, workdir, trainer, AttemptWatch(worker_settings, run.db, job,
                                                                                      workdir))
        try:
            while link.refused < 1:  # cut off, and trying again
                assert not supervising.done(), supervising.exception()
                time.sleep(0.02)
        finally:
            link.restore()
            trainer.kill()  # it exits: the worker's last round reports what is left, then supervising ends
            trainer.wait()
        assert supervising.result(timeout=60) is None  # it wrote no result
    with session_scope(database_url) as session:
        told = session.execute(select(JobEvent.type, JobEvent.step).where(JobEvent.job_id == job.id)
                               .order_by(JobEvent.id)).all()
        assert [tuple(row) for row in told] == [("started", 0), ("checkpoint_saved", 1)]
        assert session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job.id)).all() == [1]
        assert session.scalars(select(JobMetric.step).where(JobMetric.job_id == job.id)).all() == [1]


def test_a_heartbeat_whose_commit_landed_unheard_does_not_tell_its_events_twice(database_url, link, worker_settings,
                                                                                tmp_path):
    """The heartbeat carries the progress events of a long transfer; its commit lands and its answer is lost with the
    connection, and the worker sends the same events with its next beat: the job's events said `uploading merged
    model, 40% …` twice for one moment of the upload."""
    job = running_job(database_url)
    run = JobRun(worker_settings, job.id, "w1")
    watch = AttemptWatch(worker_settings, run.db, job, WorkDir(tmp_path / "attempt-1"))  # not started: beaten by hand
    with watch._events_lock:
        watch._events.append(Event(type="transfer", message="uploading merged model, 40% (2.0 of 5.0 GiB)"))
    link.cut_at_answer(b"COMMIT\x00")  # the beat's commit lands; its answer is lost
    watch._beat()
    assert watch._events, "the beat did not fail: its commit never met the cut"
    link.restore()
    watch._beat()  # the next beat, the database back
    with session_scope(database_url) as session:
        told = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job.id)).all()
    assert told == ["uploading merged model, 40% (2.0 of 5.0 GiB)"]
