"""An attempt a worker ends itself (lost, or out of memory and continued smaller) is charged its GPU time on the
database's clock, as its claim was: on real Postgres (SQLite's clock is its one host's), with the worker in a
process of its own whose clock runs an hour ahead (QLORA_FAULT_CLOCK_SKEW_S, app/db.py). Its end was dated by the
worker's clock while its claimed_at is the database's, so an attempt of a second was charged an hour of the
team's GPU time (fair share, the monthly budget, GET /usage), and one on a clock behind was charged nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db import FAULT_CLOCK_SKEW, database_now, session_scope
from app.jobs import repository, runs, states
from app.jobs import service as jobs
from app.jobs.tables import Job, JobAttempt, JobEvent, JobMetric
from app.teams.service import Caller, create_team
from app.teams.tables import Team
from app.usage import ledger
from tests.deployment import stored_spec
from worker.training.protocol import Event, TrainPoint

ROOT = Path(__file__).resolve().parents[2]

# Run in the worker's process: the attempt ends (lost, or out of memory) the way JobRun.run hands it on.
END_ATTEMPT = """
import json, sys
from app.config import Settings
from app.db import utcnow
from app.jobs.runs import ClaimedJob, ObjectRef
from worker.supervisor import JobRun
url, home, job_id, team_id, how = sys.argv[1:]
settings = Settings(home=home, database_url=url, storage_url=f"file://{home}/storage", broker_url="")
job = ClaimedJob(id=job_id, team_id=team_id, queue="gpu-default", attempt=1, spec={}, base_model={},
                 train=ObjectRef("d", "k", "s", 0), validation=None)
run = JobRun(settings, job_id, "w1")
if how == "lost":
    run._lose(job, "the training process was killed", utcnow(), outside_the_job=False)
else:
    run._continue_smaller(job, {"per_device_batch_size": 1, "gradient_accumulation_steps": 8}, utcnow())
"""


@pytest.mark.parametrize("how", ["lost", "out_of_memory"])
def test_an_attempt_a_worker_ends_is_charged_on_the_databases_clock(database_url, tmp_path, how):
    with session_scope(database_url) as session:
        team = create_team(session, "skewed")
        job = Job(team_id=team.id, status=states.QUEUED, base_model="tiny", queue="gpu-default",
                  spec=stored_spec(raw={"base_model": "tiny",
                                        "training": {"max_steps": 4, "per_device_batch_size": 2,
                                                     "gradient_accumulation_steps": 4}}))
        session.add(job)
        session.flush()
        assert repository.claim(session, job.id, "w1", database_now(session)) == 1
        session.refresh(job)
        ledger.start(session, job, job.claimed_at)  # as runs.claim opens the attempt
        job_id, team_id = job.id, team.id

    env = {**os.environ, FAULT_CLOCK_SKEW: "3600", "QLORA_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", END_ATTEMPT, database_url, str(tmp_path), job_id, team_id, how],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    with session_scope(database_url) as session:
        assert session.get(Job, job_id).status == states.QUEUED  # the attempt's end was written
        attempt = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)).one()
        charged = (attempt.ended_at - attempt.claimed_at).total_seconds()
        usage = session.get(Team, team_id).fair_share_usage_s
    # It lasted the subprocess's start, a few seconds at most: not the hour its worker's clock is ahead.
    assert 0 <= charged < 600, json.dumps({"charged_s": charged, "fair_share_usage_s": usage})
    assert usage < 600


# Run in an API process's scheduler: one pass, which may preempt.
SCHEDULE = """
import sys
from app.config import Settings
from app.db import session_scope
from app.scheduling.service import schedule
url, home = sys.argv[1:]
settings = Settings(home=home, database_url=url, storage_url=f"file://{home}/storage", broker_url="",
                    min_runtime_before_preempt_s=600, preempt_after_wait_s=30)
with session_scope(url) as session:
    print(schedule(session, settings)["preempted"])
"""


def test_a_job_claimed_a_moment_ago_is_not_preempted_by_a_scheduler_whose_clock_runs_ahead(database_url, tmp_path):
    """QLORA_MIN_RUNTIME_BEFORE_PREEMPT_S (600 s here) is reckoned from the job's claimed_at, the database's clock:
    a scheduler on a host an hour ahead took a job claimed a second ago for one that had run an hour, and paused it
    for another team's job."""
    with session_scope(database_url) as session:
        busy, waiting = create_team(session, "busy"), create_team(session, "waiting")
        spec = stored_spec()
        running = [Job(team_id=busy.id, status=states.QUEUED, base_model="tiny", queue="gpu-default", spec=spec)
                   for _ in range(2)]
        session.add_all(running)
        session.flush()
        for job in running:
            assert repository.claim(session, job.id, "w1", database_now(session)) == 1
            session.refresh(job)
            ledger.start(session, job, job.claimed_at)
        # The other team's job waited a minute with its message in the broker: every GPU is busy.
        minute_ago = database_now(session) - timedelta(seconds=60)
        session.add(Job(team_id=waiting.id, status=states.QUEUED, base_model="tiny", queue="gpu-default", spec=spec,
                        created_at=minute_ago, dispatched_at=minute_ago))

    env = {**os.environ, FAULT_CLOCK_SKEW: "3600", "QLORA_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SCHEDULE, database_url, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]
    with session_scope(database_url) as session:
        assert {job.status for job in session.scalars(select(Job).where(Job.team_id == busy.id))} == {states.RUNNING}


# Run in the worker's process: two reports of the training process's records, a supervise interval apart (two
# transactions), the first with a step logged again after a resume and an event.
REPORT = """
import sys
from app.db import session_scope
from app.jobs import runs
from worker.training.protocol import Event, Progress, TrainPoint
url, job_id = sys.argv[1:]
with session_scope(url) as s:
    runs.report(s, job_id, 1, [TrainPoint(step=1, epoch=0.1, train_loss=2.0), Event(type="started", message="go")],
                Progress(step=1, total_steps=10))
with session_scope(url) as s:
    runs.report(s, job_id, 1, [TrainPoint(step=2, epoch=0.2, train_loss=1.5)], Progress(step=2, total_steps=10))
"""


def test_points_and_events_a_worker_behind_reports_are_dated_on_the_databases_clock(database_url, tmp_path):
    """A job's pace in its current attempt (estimated_finish, the monthly budget's projection) is read from the train
    points logged since its claimed_at, the database's clock; the /v1 events feed orders points and events together.
    Dated by a worker's clock two hours behind, every point of the attempt looked logged before its claim: no
    estimate for two hours. A step logged again kept the time of the attempt that first logged it."""
    with session_scope(database_url) as session:
        team = create_team(session, "behind")
        job = Job(team_id=team.id, status=states.QUEUED, base_model="tiny", queue="gpu-default", spec=stored_spec())
        session.add(job)
        session.flush()
        # Step 1 as an earlier attempt logged it, hours ago.
        session.add(JobMetric(job_id=job.id, kind="train", step=1, train_loss=3.0,
                              created_at=database_now(session) - timedelta(hours=3)))
        assert repository.claim(session, job.id, "w1", database_now(session)) == 1
        job_id, caller = job.id, Caller(team_id=team.id, team_name="behind", key_id="k", is_admin=False)

    env = {**os.environ, FAULT_CLOCK_SKEW: "-7200", "QLORA_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", REPORT, database_url, job_id],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    with session_scope(database_url) as session:
        now, job = database_now(session), session.get(Job, job_id)
        dated = [*session.scalars(select(JobMetric.created_at).where(JobMetric.job_id == job_id)),
                 *session.scalars(select(JobEvent.created_at).where(JobEvent.job_id == job_id))]
        ages = [(now - at).total_seconds() for at in dated]
        assert len(ages) == 3 and all(at >= job.claimed_at for at in dated), ages
        assert all(0 <= age < 600 for age in ages), ages  # seconds old: not two hours (nor three) before the claim
        assert jobs.estimated_finish(session, caller, job) is not None, ages


def test_a_reports_events_sit_among_its_points_in_the_v1_feed_as_they_were_logged(database_url):
    """A report's points and events are all dated at its heartbeat; the /v1 events feed puts an event after the points
    of its moment, so each event of a batch read as newer than every point of it (a checkpoint saved at step 1 above
    steps 2 and 3). In the order the training process logged them, as when each row took its own time."""
    with session_scope(database_url) as session:
        team = create_team(session, "feed")
        job = Job(team_id=team.id, status=states.QUEUED, base_model="tiny", queue="gpu-default", spec=stored_spec())
        session.add(job)
        session.flush()
        assert repository.claim(session, job.id, "w1", database_now(session)) == 1
        job_id, caller = job.id, Caller(team_id=team.id, team_name="feed", key_id="k", is_admin=False)
    with session_scope(database_url) as session:
        runs.report(session, job_id, 1, [TrainPoint(step=1, epoch=0, train_loss=3.0),
                                         Event(type="checkpoint_saved", message="saved", step=1),
                                         TrainPoint(step=2, epoch=0, train_loss=2.9),
                                         TrainPoint(step=3, epoch=0, train_loss=2.8)], None)
    with session_scope(database_url) as session:
        feed = jobs.feed_newest_first(session, caller, job_id, None, 10).data
        assert [row.type if isinstance(row, JobEvent) else row.step for row in feed] == [3, 2, "checkpoint_saved", 1]
