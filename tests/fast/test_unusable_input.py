"""A job's own input that went bad in storage after it was recorded (a dataset, the adapter of its initial job:
bit rot, a bad copy, a deletion by hand) fails the job, as every attempt would meet it, with an error in the
team's terms: which dataset or which initial job, and what to do. Before, the job failed "the worker failed:
ChecksumMismatch: object '<storage key>' is corrupt ... so upload it again": the service's internal key, and for
a starting adapter a fix the team cannot make."""

from __future__ import annotations

import pytest

from app.db import session_scope
from app.jobs import states
from app.jobs.runs import ClaimedJob, ObjectRef
from app.jobs.tables import Job
from app.storage.base import make_key, storage_from_settings
from worker.supervisor import JobRun


@pytest.fixture
def storage(settings):
    return storage_from_settings(settings)


def _put(storage, kind: str, data: bytes) -> ObjectRef:
    with storage.writer(make_key("team", kind)) as writer:
        writer.write(data)
        stored = writer.commit()
    return ObjectRef(f"{kind}-id", stored.key, stored.sha256, stored.size)


def _attempt(settings, make_job, **inputs) -> tuple[Job, ClaimedJob]:
    """The worker's attempt at a job it claimed (attempt 1), with these inputs; the job as it ends."""
    job_id = make_job(states.RUNNING, attempt=1, worker="w1")
    job = ClaimedJob(id=job_id, team_id="team", queue="gpu-default", attempt=1, spec={}, base_model={},
                     validation=None, **inputs)
    JobRun(settings, job_id, "w1")._attempt(job)
    with session_scope(settings.database_url) as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row, job


def test_a_corrupt_training_dataset_names_the_dataset_and_the_fix(settings, storage, make_job):
    train = _put(storage, "datasets", b'{"text": "hello"}\n')
    (storage.root / train.storage_key).write_bytes(b"rotten")  # the same key, other bytes

    ended, _ = _attempt(settings, make_job, train=ObjectRef("ds-42", train.storage_key, train.sha256, train.size))

    assert ended.status == states.FAILED and ended.attempt == 1
    assert ended.error == ("cannot train: its training dataset ds-42 is unusable (its bytes no longer match the sha256 "
                           "recorded at its upload); upload the file again (it gets a new dataset id) and create the "
                           "job again with that dataset_id")
    assert train.storage_key not in ended.error


def test_a_deleted_starting_adapter_names_the_initial_job_and_the_fix(settings, storage, make_job):
    train = _put(storage, "datasets", b'{"text": "hello"}\n')
    adapter = _put(storage, "artifacts", b"not even a tar")
    storage.delete(adapter.storage_key)

    ended, _ = _attempt(settings, make_job, train=train, initial_adapter=adapter, initial_job_id="job-7")

    assert ended.status == states.FAILED and ended.attempt == 1
    assert ended.error == ("cannot train: the adapter of its initial job job-7 is unusable (it is gone from storage); "
                           "create the job again from another job's adapter, or without initial_job_id")
    assert adapter.storage_key not in ended.error and "upload" not in ended.error


def test_a_hub_model_registered_with_a_revision_that_names_a_path_fails_its_job_before_any_download(
        settings, storage, make_job, tmp_path):
    """A row from before the registry checked revisions: snapshot_download joins the revision into its cache's paths
    (refs/<revision>), so "../../.." wrote outside the worker's hub cache. The job fails at once, saying why."""
    train = _put(storage, "datasets", b'{"text": "hello"}\n')
    job_id = make_job(states.RUNNING, attempt=1, worker="w1")
    escape = "/".join([".."] * 8) + str(tmp_path / "planted")
    job = ClaimedJob(id=job_id, team_id="team", queue="gpu-default", attempt=1, spec={}, validation=None, train=train,
                     base_model={"name": "old", "path": None, "hub_id": "org/model", "revision": escape})
    JobRun(settings, job_id, "w1")._attempt(job)
    with session_scope(settings.database_url) as session:
        ended = session.get(Job, job_id)
        assert ended is not None and ended.status == states.FAILED
        assert ended.error.startswith("cannot train: base model 'old' is registered with a revision that is not ")
    assert not (tmp_path / "planted").exists() and not (settings.home / "hub").exists()
