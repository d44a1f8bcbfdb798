"""The worker's claim (worker/supervisor.JobRun._claim) on Postgres, when the claim itself is ended by the database:
a deadlock it is the victim of, or its connection dropped, is tried again, and the worker still claims a job. Before,
only an error whose text held "locked" was tried again (SQLite's "database is locked"; Postgres's "deadlock detected"
only by chance, its detail reads "blocked by process"): a dropped connection failed the Celery task with its message
spent, and the GPU stood idle while the job waited for the scheduler to send its message again
(QLORA_REDISPATCH_AFTER_S, 300 s)."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import text, update
from sqlalchemy.engine import make_url

from app.db import session_scope, sessionmaker_for
from app.jobs import states
from app.jobs.tables import Job
from app.quotas.service import lock_team
from tests.deployment import wait_for_a_lock_wait
from tests.service.test_scheduling_races import pool_of
from worker.supervisor import JobRun


def claim_in_a_thread(settings, job_id: str, outcome: dict[str, object]) -> threading.Thread:
    """The worker's claim for the message of `job_id`, as its Celery task makes it; what it claimed lands in outcome."""
    def claim() -> None:
        try:
            claimed = JobRun(settings, job_id, "worker-1")._claim()
            outcome["claimed"] = claimed.id if claimed else None
        except Exception as exc:  # noqa: BLE001 - the test reports what failed
            outcome["claimed"] = exc

    thread = threading.Thread(target=claim)
    thread.start()
    return thread


def test_a_claim_ended_by_a_deadlock_is_tried_again_and_the_worker_claims_a_job(database_url, tmp_path, caplog):
    settings, team_ids, job_ids = pool_of(database_url, tmp_path, {"first": 1, "second": 1})
    doomed, second_job = job_ids["first"][0], job_ids["second"][0]
    with session_scope(database_url) as session:
        # first's job comes first (the older), and cannot start: its base model was unregistered since it was queued.
        # The claim fails it while it holds first's row, then goes on to second's, as a claim does.
        session.execute(update(Job).where(Job.id == doomed).values(base_model="retired-model"))
        # The claim's connections find a deadlock this long after they start waiting: time enough for the other
        # transaction below to close the cycle first, however loaded the machine.
        session.execute(text(f'ALTER DATABASE "{make_url(database_url).database}" SET deadlock_timeout = \'5s\''))

    # Another transaction (a claim or a submission of team second, say) holds second's row...
    other = sessionmaker_for(database_url)()
    other.execute(text("SET LOCAL deadlock_timeout = '10min'"))  # ...and never finds the deadlock itself: the claim does
    lock_team(other, team_ids["second"])

    outcome: dict[str, object] = {}
    caplog.set_level(logging.WARNING, logger="worker.supervisor")
    thread = claim_in_a_thread(settings, doomed, outcome)
    try:
        wait_for_a_lock_wait(database_url, "the claim, on second's row,")  # holding first's row
        lock_team(other, team_ids["first"])  # the other way round: Postgres ends the claim ("deadlock detected")
        other.commit()
    finally:
        other.close()
        thread.join(60)
    assert outcome == {"claimed": second_job}
    assert any("deadlock detected" in record.getMessage() for record in caplog.records)  # the race took place
    with sessionmaker_for(database_url)() as session:
        failed = session.get(Job, doomed)
        assert failed is not None
        assert (failed.status, failed.error) == (
            states.FAILED, "cannot start: base model 'retired-model' is no longer registered")
        assert session.get(Job, second_job).worker == "worker-1"


def test_a_claim_whose_connection_drops_is_tried_again_and_the_worker_claims_the_job(database_url, tmp_path):
    settings, team_ids, job_ids = pool_of(database_url, tmp_path, {"only": 1})
    other = sessionmaker_for(database_url)()  # holds the team's row, so that the claim waits on it...
    lock_team(other, team_ids["only"])
    outcome: dict[str, object] = {}
    thread = claim_in_a_thread(settings, job_ids["only"][0], outcome)
    try:
        wait_for_a_lock_wait(database_url, "the claim, on the team's row,")
        # ...and its connection is ended there, as a database restart or a failover ends it.
        ended = other.scalar(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND wait_event_type = 'Lock'"))
        assert ended == 1
        other.commit()
    finally:
        other.close()
        thread.join(60)
    assert outcome == {"claimed": job_ids["only"][0]}
    with sessionmaker_for(database_url)() as session:
        claimed = session.get(Job, job_ids["only"][0])
        assert claimed is not None and (claimed.status, claimed.worker, claimed.attempt) == (states.RUNNING,
                                                                                            "worker-1", 1)
