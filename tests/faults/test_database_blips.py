"""The worker's database work through a short outage, wherever it meets one: as it claims (a commit that landed
unheard), as it prepares an attempt, as it hands an attempt back or retries one that ran out of memory, and against a
database that drops packets instead of refusing connections. The worker's database traffic goes through a TCP link
the test cuts (tests/faults/tcp_link.py); the API and the reaper keep their own way to the database."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from app.db import session_scope
from app.jobs.tables import Job
from tests.faults.conftest import events, job_body, lane, wait_until
from tests.faults.tcp_link import CuttableLink
from worker.supervisor import JobRun

FINISHED = ("succeeded", "failed", "cancelled")
OUTAGE_S = 1.5  # a Postgres restart's seconds, well inside the 5 s heartbeat deadline (as in test_lost_work.py)


@pytest.fixture
def link(faulty):
    url = make_url(faulty.settings.database_url)
    cuttable = CuttableLink((url.host or "127.0.0.1", url.port or 5432))
    yield cuttable
    cuttable.close()


def _through(faulty, link: CuttableLink) -> str:
    url = make_url(faulty.settings.database_url)
    return url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)


def _outage(link: CuttableLink, timers: list[threading.Timer]) -> None:
    link.cut()
    timers.append(threading.Timer(OUTAGE_S, link.restore))
    timers[-1].start()


def test_a_claim_whose_commit_landed_unheard_runs_the_job_it_took(faulty, tenant, dataset_id, link, fault_report):
    """The claim's COMMIT reached the database and its answer was lost with the connection: the worker claimed
    again, took a second job, and the first stayed running, claimed by a worker that never ran it, until the
    reaper's deadline. Now the claim tried again finds the job its token took, and runs that one."""
    gpu_class = lane(faulty, "claim-landed")
    first, second = (tenant.post("/jobs", json=job_body(dataset_id, max_steps=4, gpu_class=gpu_class)).json()
                     for _ in range(2))
    run = JobRun(faulty.settings.model_copy(update={"database_url": _through(faulty, link)}), first["id"], "landed")
    link.cut_at_answer(b"COMMIT\x00")  # the claim's commit: the first this link carries

    def restore_once_refused() -> None:  # the retry meets the outage at least once, then the database is back
        wait_until(lambda: link.refused, 60, "a try of the claim to meet the outage")
        link.restore()

    restorer = threading.Thread(target=restore_once_refused, daemon=True)
    restorer.start()
    try:
        claimed = run._claim()
        restorer.join(60)
        assert link.refused, "the claim's commit never met the cut"
        assert claimed is not None and claimed.id == first["id"] and claimed.attempt == 1
        with session_scope(faulty.settings.database_url) as session:
            rows = {row.id: row for row in session.scalars(select(Job).where(Job.id.in_([first["id"], second["id"]])))}
        assert rows[second["id"]].status == "queued" and rows[second["id"]].attempt == 0  # never claimed
        assert rows[first["id"]].attempt == 1 and rows[first["id"]].worker == "landed"
        assert [e["type"] for e in events(tenant, first["id"])].count("claimed") == 1
        fault_report.append({"fault": "the database dropped the connection as a claim's commit landed",
                             "injected": 1, "survived": 1, "steps_lost": 0})
    finally:
        for job in (first, second):
            tenant.post(f"/jobs/{job['id']}/cancel")
