"""A checkpoint that went bad in storage after it was recorded (its bytes changed: bit rot, a bad copy; or it
was deleted: an operator, a bucket lifecycle rule) must not end a job that has others: the attempt resuming
from it drops it and falls back to the one before, or to step 0 when none is left, and says so. Before, the
job failed at once ("the worker failed: ChecksumMismatch ... so upload it again"), with all its checkpoints.
(tests/faults/test_lost_work.py shows the same on a real deployment, with a real training run.)"""

from __future__ import annotations

import dataclasses
import io
import tarfile

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.jobs import repository, runs, states
from app.jobs.runs import ClaimedJob, LeaseLost, ObjectRef
from app.jobs.tables import Checkpoint, JobEvent, JobMetric
from app.storage.base import make_key, storage_from_settings
from worker.supervisor import AttemptWatch, JobRun
from worker.training.protocol import WorkDir


def checkpoint_tar(step: int) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        state = b'{"global_step": %d}' % step
        info = tarfile.TarInfo(f"checkpoints/step-{step}/trainer_state.json")
        info.size = len(state)
        tar.addfile(info, io.BytesIO(state))
    return data.getvalue()


@pytest.fixture
def storage(settings):
    return storage_from_settings(settings)


@pytest.fixture
def job_with_checkpoints(settings, storage, make_job):
    """A job on its second attempt, with checkpoints 10, 20 and 30 in storage and its curve up to step 35."""
    job_id = make_job(states.RUNNING, attempt=2, worker="w1")
    keys = {}
    with session_scope(settings.database_url) as session:
        for step in (10, 20, 30):
            stored = _put(storage, checkpoint_tar(step))
            repository.add_checkpoint(session, job_id, 1, step, stored.key, stored.size, stored.sha256, 1.0, None)
            keys[step] = stored.key
        for step in range(1, 36):
            repository.upsert_metric(session, job_id, {"kind": "train", "step": step, "train_loss": 1.0})
    return job_id, keys


def _put(storage, data: bytes):
    with storage.writer(make_key("team", "checkpoints")) as writer:
        writer.write(data)
        return writer.commit()


def resume(settings, storage, job_id: str, tmp_path) -> tuple[ClaimedJob, WorkDir]:
    """As a claim plans it (runs._plan_resume), then as the worker fetches it before training."""
    job = ClaimedJob(id=job_id, team_id="team", queue="gpu-default", attempt=2, spec={}, base_model={},
                     train=ObjectRef("d", "k", "s", 0), validation=None)
    with session_scope(settings.database_url) as session:
        runs._plan_resume(session, job)
    workdir = WorkDir(tmp_path / "attempt-2")
    workdir.root.mkdir()
    run = JobRun(settings, job_id, "w1")
    run._download_checkpoint(job, workdir, AttemptWatch(settings, run.db, job, workdir))
    return job, workdir


def rows(settings, job_id: str):
    with session_scope(settings.database_url) as session:
        steps = [c.step for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                                  .order_by(Checkpoint.step))]
        curve = [m.step for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)
                                                 .order_by(JobMetric.step))]
        resumed = [(e.step, e.level, e.message) for e in session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "resumed").order_by(JobEvent.id))]
    return steps, curve, resumed


def test_a_corrupt_newest_checkpoint_and_a_deleted_one_fall_back_to_the_one_before(
        settings, storage, job_with_checkpoints, tmp_path):
    job_id, keys = job_with_checkpoints
    _put_over(storage, keys[30], b"rotten")  # the same key, other bytes
    storage.delete(keys[20])

    job, workdir = resume(settings, storage, job_id, tmp_path)

    assert job.resume_step == 10 and job.resume_from.storage_key == keys[10]
    assert (workdir.out / "checkpoints" / "step-10" / "trainer_state.json").is_file()
    steps, curve, resumed = rows(settings, job_id)
    assert steps == [10] and curve == list(range(1, 11))  # the curve goes back to where training resumes
    assert [(step, level) for step, level, _ in resumed] == [(30, "warning"), (20, "warning"), (10, "warning")]
    assert "the checkpoint at step 30 is unusable and was dropped: its bytes no longer match the sha256" in resumed[1][2]
    assert "the checkpoint at step 20 is unusable and was dropped: it is gone from storage" in resumed[2][2]
    assert not storage.exists(keys[30])  # the bad copy is not left behind as a stray


def test_with_no_usable_checkpoint_left_the_attempt_starts_over_saying_so(settings, storage, job_with_checkpoints,
                                                                         tmp_path):
    job_id, keys = job_with_checkpoints
    for key in keys.values():
        _put_over(storage, key, b"rotten")

    job, workdir = resume(settings, storage, job_id, tmp_path)

    assert job.resume_from is None and job.resume_step == 0 and not (workdir.out / "checkpoints").exists()
    steps, curve, resumed = rows(settings, job_id)
    assert steps == [] and curve == []
    assert resumed[-1][0] == 0 and resumed[-1][2].startswith(
        "attempt 2 starts over from step 0: no usable checkpoint is left (the checkpoint at step 10 is unusable")


def test_an_attempt_that_no_longer_owns_its_job_drops_nothing(settings, storage, job_with_checkpoints, tmp_path):
    job_id, keys = job_with_checkpoints
    _put_over(storage, keys[30], b"rotten")
    with session_scope(settings.database_url) as session:  # the reaper gave the job to attempt 3 meanwhile
        assert repository.transition(session, job_id, states.QUEUED, attempt=2, only_from=[states.RUNNING])
    with pytest.raises(LeaseLost):
        resume(settings, storage, job_id, tmp_path)
    assert rows(settings, job_id)[0] == [10, 20, 30]


def test_a_drop_tried_again_after_its_commit_landed_changes_nothing_more(settings, job_with_checkpoints):
    """The worker rides out a database outage as it drops the checkpoint (worker/supervisor._write_through_outage),
    and a try whose commit landed unheard (its connection dropped on the way back) is tried again from the
    attempt's plan as it was: that try must find the drop done, and neither write a second resumed event nor drop
    the checkpoint before."""
    job_id, keys = job_with_checkpoints
    job = ClaimedJob(id=job_id, team_id="team", queue="gpu-default", attempt=2, spec={}, base_model={},
                     train=ObjectRef("d", "k", "s", 0), validation=None)
    with session_scope(settings.database_url) as session:
        runs._plan_resume(session, job)
    why = "its bytes no longer match the sha256 recorded at its upload"
    with session_scope(settings.database_url) as session:  # it landed; the worker never heard
        runs.checkpoint_unusable(session, dataclasses.replace(job), why)
    again = dataclasses.replace(job)
    with session_scope(settings.database_url) as session:
        assert runs.checkpoint_unusable(session, again, why) == keys[30]
    assert again.resume_step == 20 and again.resume_from is not None and again.resume_from.storage_key == keys[20]
    steps, curve, resumed = rows(settings, job_id)
    assert steps == [10, 20] and curve == list(range(1, 21))
    assert [step for step, _, _ in resumed] == [30, 20]


def _put_over(storage, key: str, data: bytes) -> None:
    """Other bytes under an existing key, as storage that rots or is overwritten by hand has them."""
    path = storage.root / key
    path.write_bytes(data)
