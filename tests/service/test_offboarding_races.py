"""Disabling a team on Postgres while a worker claims or ends one of its jobs.

- Its end takes the job's row, then the team's (usage.ledger folds the attempt's GPU time under lock_team);
  disabling must not take them the other way round, or Postgres breaks the deadlock by failing one of the two.
- A claim holds the team's row (lock_team) until it commits, and the disable waits for that row: the job the
  claim started must be paused like every other job of the team on a GPU, not left to train to its end."""

from __future__ import annotations

import threading

from app.config import Settings
from app.datasets.tables import Dataset
from app.db import session_scope, sessionmaker_for
from app.jobs import runs, states
from app.jobs.tables import Job
from app.models.tables import RegisteredModel
from app.scheduling import service as scheduling
from app.teams import admin
from app.teams.service import Caller, create_key, create_team, revoke_key, still_authenticated
from app.usage import ledger
from tests.deployment import wait_for_a_lock_wait
from tests.fast.conftest import job_spec
from tests.fast.test_scheduling_service import QUEUE


def leaving_team_with_a_queued_job(database_url: str, tmp_path) -> tuple[Settings, str]:
    """Team "leaving" with one queued job, and team "staying" with an admin key (the last way in stays)."""
    settings = Settings(home=tmp_path, database_url=database_url, storage_url=f"file://{tmp_path}/s", broker_url="")
    with session_scope(database_url) as session:
        session.add(RegisteredModel(name="llama-3-8b", path="/models/llama"))
        team = create_team(session, "leaving")
        create_team(session, "staying")
        create_key(session, "staying", admin=True)
        session.add(Dataset(id="data", team_id=team.id, filename="d.jsonl", storage_key="k", bytes=10, sha256="0" * 64,
                            status="ready"))
        session.flush()
        job = Job(team_id=team.id, status=states.QUEUED, base_model="llama-3-8b", queue=QUEUE, dataset_id="data",
                  spec=job_spec().model_dump(mode="json"), priority=1)
        session.add(job)
        session.flush()
        return settings, job.id


def test_disabling_a_team_while_its_job_records_its_end_deadlocks_neither(database_url, tmp_path, monkeypatch):
    settings, job_id = leaving_team_with_a_queued_job(database_url, tmp_path)
    with session_scope(database_url) as session:
        claimed = scheduling.claim_next(session, settings, job_id, "w1")
        assert claimed is not None and claimed.id == job_id

    # The worker's end: its job row taken (the transition), then, once the disable waits for that row while
    # holding the team's, the ledger's fold asks for the team's row. Each step awaits the one before it (fixed
    # sleeps ordered them: on a loaded machine the disable could start before the transition, or the fold
    # before the disable waited, and the test then proved nothing, or failed for a race it did not set up).
    job_row_taken = threading.Event()
    real_end = ledger.end

    def end_once_the_disable_waits(*args, **kwargs):
        job_row_taken.set()
        wait_for_a_lock_wait(database_url, "the disable, on the job's row,")
        return real_end(*args, **kwargs)
    monkeypatch.setattr(runs.ledger, "end", end_once_the_disable_waits)

    outcomes: dict[str, object] = {}

    def finish() -> None:
        try:
            with session_scope(database_url) as session:
                outcomes["finish"] = runs.finish(session, job_id, claimed.attempt, states.SUCCEEDED)
        except Exception as exc:  # noqa: BLE001 - the test reports what failed
            outcomes["finish"] = exc

    def disable() -> None:
        try:
            assert job_row_taken.wait(30), "the worker's end never took the job's row"
            with session_scope(database_url) as session:
                outcomes["disable"] = admin.disable_team(session, "leaving").disabled
        except Exception as exc:  # noqa: BLE001
            outcomes["disable"] = exc

    threads = [threading.Thread(target=finish), threading.Thread(target=disable)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes == {"finish": True, "disable": True}
    with sessionmaker_for(database_url)() as session:
        assert session.get(Job, job_id).status == states.SUCCEEDED


def test_a_job_claimed_while_its_team_is_disabled_is_paused(database_url, tmp_path):
    settings, job_id = leaving_team_with_a_queued_job(database_url, tmp_path)
    outcome: dict[str, object] = {}

    def disable() -> None:
        try:
            with session_scope(database_url) as session:
                outcome["disable"] = admin.disable_team(session, "leaving")
        except Exception as exc:  # noqa: BLE001 - the test reports what failed
            outcome["disable"] = exc

    # The worker's claim: the team's row taken and the job claimed, not yet committed.
    claim = sessionmaker_for(database_url)()
    claimed = scheduling.claim_next(claim, settings, job_id, "w1")
    assert claimed is not None and claimed.id == job_id
    thread = threading.Thread(target=disable)
    thread.start()
    wait_for_a_lock_wait(database_url, "the disable, on the team's row,")  # it has read the team's jobs on a GPU
    claim.commit()
    claim.close()
    thread.join(30)

    disabled = outcome["disable"]
    assert not isinstance(disabled, Exception), disabled
    with sessionmaker_for(database_url)() as session:
        status = session.get(Job, job_id).status
    assert (status, disabled.pausing) == (states.PAUSING, [job_id])


def test_a_key_revoked_while_a_request_records_under_it_answers_once_the_record_is_in(database_url):
    """An upload or a job creation checks its key again just before it writes (still_authenticated). Read unlocked,
    a revoke between that check and the commit answered "revoked" first, and the file or job was recorded under the
    revoked key after it. The check holds the key's row shared: the revoke waits for the record, then revokes."""
    with session_scope(database_url) as session:
        team = create_team(session, "team-a")
        key, _secret = create_key(session, "team-a")
        caller = Caller(team_id=team.id, team_name="team-a", key_id=key.id, is_admin=False)
    recording = sessionmaker_for(database_url)()
    revoked: list[str] = []

    def revoke() -> None:
        with session_scope(database_url) as session:
            revoke_key(session, caller.key_id)
        revoked.append("answered")

    try:
        still_authenticated(recording, caller)
        revoker = threading.Thread(target=revoke)
        revoker.start()
        wait_for_a_lock_wait(database_url, "the revoke, on the key's row,")
        assert revoked == []  # not answered while the request's record is still to commit
        recording.commit()
        revoker.join(30)
    finally:
        recording.close()
    assert revoked == ["answered"]
