"""Disabling a team while a worker claims one of its jobs: the claim holds the team's row (lock_team) until
it commits, and the disable waits for that row. The job the claim started must be paused like every other
job of the team on a GPU, not left to train to its end for a disabled team."""

from __future__ import annotations

import threading

from app.config import Settings
from app.datasets.tables import Dataset
from app.db import session_scope, sessionmaker_for
from app.jobs import states
from app.jobs.tables import Job
from app.models.tables import RegisteredModel
from app.scheduling import service as scheduling
from app.teams import admin
from app.teams.service import create_key, create_team
from tests.deployment import wait_for_a_lock_wait
from tests.fast.conftest import job_spec
from tests.fast.test_scheduling_service import QUEUE


def test_a_job_claimed_while_its_team_is_disabled_is_paused(database_url, tmp_path):
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
        job_id = job.id

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
