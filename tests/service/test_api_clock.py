"""What an API process writes and shows of a job's times is on the database's clock, as the workers' claims,
heartbeats and ends are: on real Postgres (SQLite's clock is its one host's), with the API in a process of its own
whose clock runs two hours ahead (QLORA_FAULT_CLOCK_SKEW_S, app/db.py). Read against its own clock, a running
attempt claimed a moment ago showed two hours of GPU time in GET /usage, GET /quota and the admin's team list; a
cancel dated the job's end two hours on; a preempted job requeued by a worker waited from its host's clock; and
/metrics moved its mark of tallied finished jobs past the jobs finishing, leaving them out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from app.db import FAULT_CLOCK_SKEW, database_now, session_scope
from app.idempotency import service as idempotency
from app.jobs import repository, states
from app.jobs.tables import Job
from app.operations.lease import acquire_or_renew, current_holder, release
from app.operations.service import SETTLE_S
from app.operations.tables import Lease
from app.teams.service import create_team
from app.usage import ledger
from tests.deployment import stored_spec, wait_until

ROOT = Path(__file__).resolve().parents[2]
SKEW_S = 2 * SETTLE_S  # past /metrics' settling too: its mark is SETTLE_S behind the clock it reads

# Run in an API process whose clock is SKEW_S ahead: what /usage, /quota, GET /admin/teams, POST /jobs/{id}/cancel
# and /metrics do, and a worker's requeue of a preempted job.
API = """
import json, re, sys
from sqlalchemy import update
from app.config import Settings
from app.db import database_now, session_scope
from app.jobs import runs, service as jobs, states
from app.jobs.tables import Job
from app.operations.service import FinishedJobs, prometheus_text
from app.quotas.service import show_own
from app.teams.admin import list_teams
from app.teams.service import Caller
from app.usage.service import report
url, home, team_id, running_id, queued_id, preempted_id, finishing_id = sys.argv[1:]
settings = Settings(home=home, database_url=url, storage_url=f"file://{home}/storage", broker_url="")
caller = Caller(team_id=team_id, team_name="skewed", key_id="k", is_admin=True)
out = {}
with session_scope(url) as s:
    out["usage_s"] = report(s, caller, None, None).teams[0].gpu_seconds
    out["quota_h"] = show_own(s, settings, team_id).use.gpu_hours_this_month
    out["admin_h"] = [t.gpu_hours_this_month for t in list_teams(s) if t.id == team_id][0]
with session_scope(url) as s:
    jobs.cancel(s, caller, queued_id)
with session_scope(url) as s:
    assert runs.requeue_if_preempted(s, preempted_id, 1)
finished = FinishedJobs()
with session_scope(url) as s:
    prometheus_text(s, finished, settings)  # the first scrape sets the mark
with session_scope(url) as s:  # a worker ends a job, on the database's clock (runs.finish)
    s.execute(update(Job).where(Job.id == finishing_id).values(status=states.SUCCEEDED, finished_at=database_now(s)))
with session_scope(url) as s:
    text = prometheus_text(s, finished, settings)
out["succeeded"] = int(re.search(r'^qlora_jobs\\{status="succeeded"\\} (\\d+)', text, re.M).group(1))
print(json.dumps(out))
"""


def test_an_api_host_whose_clock_runs_ahead_charges_and_dates_on_the_databases_clock(database_url, tmp_path):
    with session_scope(database_url) as session:
        team = create_team(session, "skewed")
        spec = stored_spec()
        running, queued, finishing = (Job(team_id=team.id, status=states.QUEUED, base_model="tiny", queue="gpu-default",
                                          spec=spec) for _ in range(3))
        preempted = Job(team_id=team.id, status=states.PAUSED, preempting=True, attempt=1, base_model="tiny",
                        queue="gpu-default", spec=spec)
        session.add_all([running, queued, finishing, preempted])
        session.flush()
        for job in (running, finishing):
            assert repository.claim(session, job.id, "w1", database_now(session)) == 1
        session.refresh(running)
        ledger.start(session, running, running.claimed_at)  # as runs.claim opens the attempt
        ids = [team.id, running.id, queued.id, preempted.id, finishing.id]

    env = {**os.environ, FAULT_CLOCK_SKEW: str(SKEW_S), "QLORA_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", API, database_url, str(tmp_path), *ids],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    with session_scope(database_url) as session:
        now = database_now(session)
        times = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids[1:])))}
        cancelled, requeued = times[ids[2]], times[ids[3]]
        ages = {"finished_at": (now - cancelled.finished_at).total_seconds(),
                "queued_at": (now - requeued.queued_at).total_seconds()}
    report = json.dumps({**seen, **ages})
    # The attempt has run the subprocess's start, seconds: not the two hours the API's clock is ahead.
    assert 0 <= seen["usage_s"] < 600, report
    assert seen["quota_h"] < 600 / 3600 and seen["admin_h"] < 600 / 3600, report
    assert cancelled.status == states.CANCELLED and 0 <= ages["finished_at"] < 600, report
    assert requeued.status == states.QUEUED and 0 <= ages["queued_at"] < 600, report
    assert seen["succeeded"] == 1, report


# An API process whose clock runs a day and an hour ahead (past idempotency's KEPT): the key another API host bound a
# moment ago, by the database's clock, is still bound for it, and one it binds is dated by the database's clock.
KEYS = """
import json, sys
from app.db import database_now, session_scope
from app.idempotency import repository, service
url, team_id, job_id = sys.argv[1:]
with session_scope(url) as s:
    earlier = service.earlier(s, team_id, service.requested("bound-elsewhere", "POST /jobs", {"a": 1}))
with session_scope(url) as s:
    service.bind(s, team_id, service.requested("bound-here", "POST /jobs", {"b": 2}), job_id=job_id)
with session_scope(url) as s:
    age_s = (database_now(s) - repository.get(s, team_id, "POST /jobs", "bound-here").created_at).total_seconds()
print(json.dumps({"earlier": None if earlier is None else earlier.job_id, "age_s": age_s}))
"""


def test_an_api_host_a_day_ahead_still_finds_an_idempotency_key_bound_a_moment_ago(database_url, tmp_path):
    with session_scope(database_url) as session:
        team = create_team(session, "keyed")
        team_id = team.id
        job = Job(team_id=team_id, status=states.QUEUED, base_model="tiny", queue="gpu-default", spec=stored_spec())
        session.add(job)
        session.flush()
        job_id = job.id
        idempotency.bind(session, team_id, idempotency.requested("bound-elsewhere", "POST /jobs", {"a": 1}),
                         job_id=job_id)

    skew_s = (idempotency.KEPT + timedelta(hours=1)).total_seconds()
    env = {**os.environ, FAULT_CLOCK_SKEW: str(skew_s), "QLORA_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", KEYS, database_url, team_id, job_id],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Read on its own clock, the key had expired: a retried POST /jobs would have made a second job.
    assert seen["earlier"] == job_id, seen
    assert 0 <= seen["age_s"] < 600, seen


# A process whose clock runs SKEW_S ahead tries lease "role" for ttl_s (argv), and leaves without releasing it, as
# one that dies does.
LEASE_TRY = """
import sys
from app.db import session_scope
from app.operations.lease import acquire_or_renew
url, holder, ttl_s = sys.argv[1:]
with session_scope(url) as s:
    print("held" if acquire_or_renew(s, "role", holder, float(ttl_s)) else "refused")
"""


def try_lease_ahead(database_url: str, home: Path, holder: str, ttl_s: float) -> str:
    env = {**os.environ, FAULT_CLOCK_SKEW: str(SKEW_S), "QLORA_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", LEASE_TRY, database_url, holder, str(ttl_s)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_lease_is_judged_on_the_databases_clock_whatever_the_hosts_read(database_url, tmp_path):
    """Judged on its own clock, a host ahead took the lease from a live holder; and when it died holding it, the
    role stayed unplayed on the other hosts for as long as its clock was ahead."""
    with session_scope(database_url) as session:
        assert acquire_or_renew(session, "role", "here", 60)
    assert try_lease_ahead(database_url, tmp_path, "ahead", 60) == "refused"  # "here" renews it well within 60 s

    with session_scope(database_url) as session:
        assert release(session, "role", "here")
    assert try_lease_ahead(database_url, tmp_path, "ahead", 1) == "held"  # and it dies holding it, for 1 s
    with session_scope(database_url) as session:
        taken_at = session.get(Lease, "role").acquired_at
    wait_until(lambda: after(database_url, taken_at, 1.5), 60, "the database's clock passed the dead holder's TTL")
    with session_scope(database_url) as session:
        assert current_holder(session, "role") is None
        assert acquire_or_renew(session, "role", "here", 60)


def after(database_url: str, moment, seconds: float) -> bool:
    with session_scope(database_url) as session:
        return (database_now(session) - moment).total_seconds() > seconds
