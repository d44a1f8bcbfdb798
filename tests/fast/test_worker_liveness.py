"""What operators see of each queue (app/operations/service.queue_health, /metrics): the workers that said
they are up, busy or idle (app/operations/workers.py), the jobs waiting and for how long. On SQLite here;
tests/service/test_operations.py scrapes a deployment with a real worker."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import select, update

from app.db import session_scope, utcnow
from app.jobs import repository, states
from app.jobs.reaper import housekeeping
from app.operations.service import FinishedJobs, QueueHealth, prometheus_text, queue_health
from app.operations.tables import Worker
from app.operations.workers import WORKER_ALIVE_S, WORKER_FORGOTTEN_AFTER_S, WorkerBeat, beat, forget
from app.storage.local import LocalStorage
from bench.metrics_bench import samples
from tests.fast.conftest import make_settings


def health(settings, queue: str = "gpu-default") -> QueueHealth:
    with session_scope(settings.database_url) as session:
        return {q.queue: q for q in queue_health(session, settings)}[queue]


def say_up(settings, name: str, queue: str = "gpu-default", ago_s: float = 0) -> None:
    """As worker `name`'s beat would, `ago_s` seconds ago."""
    with session_scope(settings.database_url) as session:
        beat(session, name, queue, utcnow())
        session.execute(update(Worker).where(Worker.name == name).values(seen_at=utcnow() - timedelta(seconds=ago_s)))


def test_jobs_waiting_while_the_queues_workers_went_silent_are_stranded(settings, make_job):
    make_job(created_at=utcnow() - timedelta(minutes=12))
    nobody = health(settings)
    assert (nobody.workers_alive, nobody.queued, nobody.stranded, nobody.last_seen) == (0, 1, True, None)
    assert 12 * 60 <= nobody.oldest_wait_s < 13 * 60

    say_up(settings, "host:gpu0")  # idle: it trains nothing, so no job's heartbeat says it lives
    alive = health(settings)
    assert (alive.workers_alive, alive.stranded) == (1, False)

    say_up(settings, "host:gpu0", ago_s=WORKER_ALIVE_S + 1)  # killed or cut off: its beats stopped
    silent = health(settings)
    assert (silent.workers_alive, silent.stranded) == (0, True)
    assert silent.last_seen is not None and silent.last_seen.name == "host:gpu0"

    say_up(settings, "other:gpu0", queue="gpu-a100")  # a worker of another class serves none of these jobs
    assert health(settings).stranded and health(settings, "gpu-a100").workers_alive == 1

    with session_scope(settings.database_url) as session:
        forget(session, "host:gpu0", health(settings).last_seen.started_at)  # stopped cleanly
    assert health(settings).last_seen is None


def test_every_queue_the_deployment_serves_is_in_the_metrics_when_empty(tmp_path, migrated_template):
    """A dashboard's graph of a queue with nothing waiting showed "no data" rather than 0."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "qlora.db").write_bytes(migrated_template.read_bytes())
    settings = make_settings(home, gpu_classes={"l4": 24}, extra_gpu_classes=["a100"], default_gpu_class="l4")
    with session_scope(settings.database_url) as session:
        text = prometheus_text(session, FinishedJobs(), settings)
    for family in ("qlora_queue_depth", "qlora_queue_oldest_wait_seconds", "qlora_workers_alive"):
        assert samples(text, family) == {'{queue="gpu-l4"}': 0, '{queue="gpu-a100"}': 0}, family


def test_a_requeued_job_waits_from_its_requeue_not_from_its_creation(settings, make_job):
    """A job that trained for days and lost its worker has waited seconds, not days: an alert on the
    oldest wait would fire at every requeue."""
    job_id = make_job(states.RUNNING, attempt=1, created_at=utcnow() - timedelta(days=3))
    with session_scope(settings.database_url) as session:
        assert repository.transition(session, job_id, states.QUEUED, attempt=1, worker=None)
    assert health(settings).oldest_wait_s < 60


def test_a_worker_says_it_is_up_until_it_stops(settings):
    """WorkerBeat, as a worker's main process runs it: its row at once and at every beat; gone at stop."""
    up = WorkerBeat(settings.database_url, "host:gpu3", "gpu-default", interval_s=0.2)
    up.start()
    try:
        deadline = time.monotonic() + 10
        while health(settings).workers_alive == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        first = health(settings).last_seen
        assert first is not None and first.name == "host:gpu3"
        # Its next beats: awaited (a fixed 0.5 s, two and a half intervals, missed them when the thread or the
        # database waited for a core), then the row must be the same worker's, seen later.
        deadline = time.monotonic() + 10
        while (again := health(settings).last_seen) is not None and again.seen_at == first.seen_at:
            assert time.monotonic() < deadline, "no beat after the first"
            time.sleep(0.05)
        assert again is not None and again.seen_at > first.seen_at and again.started_at == first.started_at
    finally:
        up.stop()
    assert not up.is_alive()
    gone = health(settings)
    assert (gone.workers_alive, gone.last_seen) == (0, None)


def test_a_worker_silent_for_a_week_is_forgotten_by_the_reapers_pass(settings, tmp_path):
    """A worker retired, renamed or moved to another GPU class was listed (and its old queue kept in
    /metrics) for ever; one silent for a day still tells when it was last heard from."""
    say_up(settings, "retired:gpu0", queue="gpu-old", ago_s=WORKER_FORGOTTEN_AFTER_S + 60)
    say_up(settings, "down-for-a-day:gpu0", ago_s=24 * 3600)
    say_up(settings, "host:gpu0")
    counts = housekeeping(settings, LocalStorage(tmp_path / "objects"))
    assert counts["workers_forgotten"] == 1
    with session_scope(settings.database_url) as session:
        queues = {q.queue: q for q in queue_health(session, settings)}
    assert "gpu-old" not in queues
    assert (queues["gpu-default"].workers_alive, queues["gpu-default"].last_seen.name) == (1, "host:gpu0")
    with session_scope(settings.database_url) as session:
        assert {w.name for w in session.scalars(select(Worker))} == {"down-for-a-day:gpu0", "host:gpu0"}


def test_two_workers_of_one_name_are_told_and_one_stopping_leaves_the_others_row(settings, caplog):
    """Two workers started without --name on one host (both `host:cpu`) share a row: each beat overwrote
    the other's without a word, and the first to stop deleted the row of the one still up, which then
    counted as gone until its next beat."""
    first = WorkerBeat(settings.database_url, "host:cpu", "gpu-default", interval_s=0.1)
    second = WorkerBeat(settings.database_url, "host:cpu", "gpu-default", interval_s=0.1)
    first.start()
    second.start()
    try:
        deadline = time.monotonic() + 10
        while "another worker named host:cpu is up" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "give each its own name (qlora worker --name)" in caplog.text
    finally:
        first.stopped.set()
        second.stopped.set()
        first.join(5)
        second.join(5)
    with session_scope(settings.database_url) as session:
        beat(session, "host:cpu", "gpu-default", first.started_at)
        beat(session, "host:cpu", "gpu-default", second.started_at)  # the second wrote last
    with session_scope(settings.database_url) as session:
        forget(session, "host:cpu", first.started_at)  # the first stops cleanly
    assert health(settings).workers_alive == 1


def test_a_restarted_worker_is_not_taken_for_a_second_one(settings, caplog):
    """A worker killed outright and started again under its name finds its predecessor's row, still
    fresh: that is no twin."""
    say_up(settings, "host:gpu0", ago_s=5)  # the killed one's last beat
    up = WorkerBeat(settings.database_url, "host:gpu0", "gpu-default", interval_s=0.1)
    up.start()
    try:
        seen = set()  # its own beats; the warning would come at its second
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            row = health(settings).last_seen
            if row is not None and row.started_at == up.started_at:
                seen.add(row.seen_at)
            time.sleep(0.02)
        assert len(seen) == 3
    finally:
        up.stop()
    assert "another worker named" not in caplog.text
