"""Pruning the pre-quantized base cache (app/jobs/quantized_cache.py): the reaper's pass deletes the entries
no job has loaded for QLORA_QUANTIZED_CACHE_KEEP_DAYS, row and object, and keeps the rest; a job that loads an
entry marks it used; a job whose entry is pruned as it loads it quantizes afresh instead of failing."""

from __future__ import annotations

import io
import logging
import tarfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import select, update

from app.db import session_scope, utcnow
from app.jobs import repository
from app.jobs.quantized_cache import prune
from app.jobs.reaper import ReaperThread
from app.jobs.tables import QuantizedBase
from app.migrate import alembic_config
from app.storage.base import ObjectNotFound, make_key, storage_from_settings
from tests.fast.conftest import make_settings
from worker.quantized_bases import cache_key, quantized_identity
from worker.supervisor import AttemptWatch, JobRun
from worker.training.protocol import WorkDir

DAY = timedelta(days=1)


def quantized_tar() -> bytes:
    """What a worker stores for an entry: a tar of quantized/ (worker/runner.py share_quantized_base)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        config = b'{"model_type": "llama"}'
        info = tarfile.TarInfo("quantized/config.json")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
    return data.getvalue()


def store_entry(settings, storage, key: str, model: str, last_used_ago: timedelta) -> QuantizedBase:
    """An entry as a worker records one (object, then row), last loaded `last_used_ago`."""
    with storage.writer(make_key("shared", "quantized-bases")) as writer:
        writer.write(quantized_tar())
        stored = writer.commit()
    identity = {"model": model, "quantization": {"bits": 4, "quant_type": "nf4"}, "gpu_class": "gpu-default",
                "transformers": "4.0.0", "bitsandbytes": "0.1.0"}
    with session_scope(settings.database_url) as session:
        assert repository.add_quantized_base(session, key, stored.key, stored.size, stored.sha256, identity)
        session.flush()
        session.execute(update(QuantizedBase).where(QuantizedBase.key == key)
                        .values(last_used_at=utcnow() - last_used_ago, created_at=utcnow() - last_used_ago - DAY))
    return entry(settings, key)


def entry(settings, key: str) -> QuantizedBase | None:
    with session_scope(settings.database_url) as session:
        return session.scalars(select(QuantizedBase).where(QuantizedBase.key == key)).one_or_none()


@pytest.fixture
def storage(settings):
    return storage_from_settings(settings)


def test_the_reapers_pass_deletes_an_entry_unused_for_keep_days_with_its_object_and_keeps_a_used_one(settings, storage):
    old = store_entry(settings, storage, "a" * 64, "llama-old-transformers", last_used_ago=31 * DAY)
    used = store_entry(settings, storage, "b" * 64, "llama", last_used_ago=29 * DAY)

    counts = ReaperThread(settings, storage).pass_once()  # the default: 30 days

    assert counts is not None
    assert (counts["quantized_bases_pruned"], counts["quantized_base_bytes_freed"]) == (1, old.bytes)
    assert entry(settings, old.key) is None and not storage.exists(old.storage_key)
    assert entry(settings, used.key) is not None and storage.exists(used.storage_key)


def test_keep_days_0_keeps_every_entry_however_old(tmp_path, settings, storage):
    ancient = store_entry(settings, storage, "a" * 64, "llama", last_used_ago=3650 * DAY)
    keep_for_ever = make_settings(settings.home, quantized_cache_keep_days=0)

    counts = ReaperThread(keep_for_ever, storage).pass_once()

    assert counts is not None and counts["quantized_bases_pruned"] == 0
    assert entry(settings, ancient.key) is not None and storage.exists(ancient.storage_key)


# ---------------------------------------------------------------- the worker's side (worker/supervisor.py)

def base_model(tmp_path: Path) -> Path:
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"weights")
    (base / "config.json").write_text("{}")
    return base


def claimed_job(base: Path):
    """What _quantized_cache reads of a claimed job (app/jobs/runs.py ClaimedJob)."""
    return SimpleNamespace(id="job-1", queue="gpu-default", spec={"quantization": {"bits": 4, "quant_type": "nf4"}},
                           base_model={"name": "base", "path": str(base), "hub_id": None, "revision": None})


def load_from_cache(run: JobRun, job, base: Path, tmp_path: Path):
    """The worker's step before it starts the training process: fetch the cached base, or name where to save one."""
    workdir = WorkDir(tmp_path / "attempt")
    workdir.root.mkdir(exist_ok=True)
    return run._quantized_cache(job, base, workdir, AttemptWatch(run.settings, run.db, job, workdir)), workdir


def test_a_job_that_loads_an_entry_marks_it_used_so_the_reaper_keeps_it(settings, storage, tmp_path):
    base = base_model(tmp_path)
    job = claimed_job(base)
    key = cache_key(quantized_identity(job, base, job.queue, settings.work_dir))
    cached = store_entry(settings, storage, key, "base", last_used_ago=40 * DAY)
    run = JobRun(settings, job.id, "w1")

    loaded, workdir = load_from_cache(run, job, base, tmp_path)

    assert loaded.hit and (workdir.quantized / "config.json").is_file()
    assert utcnow() - entry(settings, key).last_used_at < timedelta(minutes=1)
    ReaperThread(settings, storage).pass_once()
    assert entry(settings, key) is not None and storage.exists(cached.storage_key)


def test_a_hit_does_not_fail_when_its_use_cannot_be_recorded(settings, storage, tmp_path, caplog):
    base = base_model(tmp_path)
    job = claimed_job(base)
    key = cache_key(quantized_identity(job, base, job.queue, settings.work_dir))
    store_entry(settings, storage, key, "base", last_used_ago=2 * DAY)
    with session_scope(settings.database_url) as session:  # the database refuses the UPDATE, as a locked table would
        session.execute(sa.text("CREATE TRIGGER refuse BEFORE UPDATE ON quantized_bases "
                                "BEGIN SELECT RAISE(ABORT, 'no updates today'); END"))

    with caplog.at_level(logging.WARNING, logger="worker.supervisor"):
        loaded, workdir = load_from_cache(JobRun(settings, job.id, "w1"), job, base, tmp_path)

    assert loaded.hit and (workdir.quantized / "config.json").is_file()
    assert any("could not record the use of the cached quantized base" in r.getMessage() for r in caplog.records)


class PrunedWhileLoading:
    """Local storage where, as the job starts downloading the entry it looked up, a prune has just deleted
    it (an operator's `prune-quantized-bases --older-than 1h` on an entry last loaded two hours ago by a job
    still downloading it, or a reaper whose clock runs days ahead) and another worker's job, finding no entry,
    quantized the base itself and stored it again under the same key."""

    def __init__(self, settings, storage, key: str):
        self.settings, self.storage, self.key = settings, storage, key
        self.stored_again: QuantizedBase | None = None

    def __getattr__(self, name):
        return getattr(self.storage, name)

    def download(self, key, path, expected_sha256=None, progress=None):
        if self.stored_again is None:
            with session_scope(self.settings.database_url) as session:
                pruned = prune(session, self.storage, older_than_s=3600, now=utcnow() + 30 * DAY)
            assert [e["storage_key"] for e in pruned.entries] == [key] and not self.storage.exists(key)
            self.stored_again = store_entry(self.settings, self.storage, self.key, "base", last_used_ago=timedelta(0))
        return self.storage.download(key, path, expected_sha256=expected_sha256, progress=progress)


def test_a_job_whose_entry_is_pruned_as_it_loads_it_quantizes_afresh_and_keeps_the_entry_stored_again(
        settings, storage, tmp_path):
    base = base_model(tmp_path)
    job = claimed_job(base)
    key = cache_key(quantized_identity(job, base, job.queue, settings.work_dir))
    store_entry(settings, storage, key, "base", last_used_ago=DAY)
    run = JobRun(settings, job.id, "w1")
    run.storage = racing = PrunedWhileLoading(settings, storage, key)  # type: ignore[assignment]

    loaded, workdir = load_from_cache(run, job, base, tmp_path)  # raises nothing: the job goes on

    # The training process quantizes the base from its own weights and offers it for the cache.
    assert not loaded.hit and loaded.key == key and not workdir.quantized.exists()
    # What the other job stored since is not this job's damaged entry: it stays, row and object.
    assert racing.stored_again is not None
    still = entry(settings, key)
    assert still is not None and still.storage_key == racing.stored_again.storage_key
    assert storage.exists(still.storage_key)


def test_a_load_of_a_pruned_object_raises_object_not_found_which_the_worker_falls_back_on(settings, storage):
    """The fallback above rests on this: a deleted object is ObjectNotFound, not storage out of reach (which
    would hand the job back instead)."""
    gone = store_entry(settings, storage, "c" * 64, "base", last_used_ago=60 * DAY)
    with session_scope(settings.database_url) as session:
        prune(session, storage, older_than_s=30 * 86400)
    with pytest.raises(ObjectNotFound):
        storage.download(gone.storage_key, settings.home / "x.tar", expected_sha256=gone.sha256)


def test_the_upgrade_counts_as_an_existing_entrys_last_use_so_the_first_pass_after_it_keeps_an_old_entry(tmp_path):
    """When an entry stored before migration 0020 was last loaded is not known. Taken from its creation (as first
    written), the reaper's first pass after the upgrade deleted every entry stored over 30 days ago, the base
    every job loads included, and each of their next jobs quantized afresh; from the upgrade, it goes 30 days
    later if no job loads it meanwhile."""
    home = tmp_path / "home"
    home.mkdir()
    settings = make_settings(home)
    command.upgrade(alembic_config(settings.database_url), "0019")
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO quantized_bases (id, key, storage_key, bytes, sha256, identity, created_at) "
                             "VALUES ('e1', :key, 'shared/quantized-bases/x', 10, :sha, '{}', '2026-01-02 03:04:05.000000')"),
                     {"key": "d" * 64, "sha": "0" * 64})
    engine.dispose()
    before = utcnow()
    command.upgrade(alembic_config(settings.database_url), "head")
    kept = entry(settings, "d" * 64)
    assert kept is not None and before <= kept.last_used_at <= utcnow()
    storage = storage_from_settings(settings)
    assert ReaperThread(settings, storage).pass_once()["quantized_bases_pruned"] == 0
    assert entry(settings, "d" * 64) is not None
    with session_scope(settings.database_url) as session:  # unused for 30 days after the upgrade: pruned then
        assert len(prune(session, storage, older_than_s=30 * 86400, now=utcnow() + 31 * DAY).entries) == 1
