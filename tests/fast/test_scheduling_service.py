"""The scheduler against a database (SQLite here; Postgres in tests/service/test_scheduling.py): a
claim takes the best job of its class rather than the one its message named, quotas hold jobs back
with their reason, the messages they lost are sent again once they may start, preemption pauses the
right job and queues it again, and every attempt's GPU time lands in the ledger and its team's usage."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest

from app.broker import RUN_JOB_TASK
from app.db import session_scope, utcnow
from app.jobs import runs, states
from app.jobs import service as jobs_service
from app.jobs.tables import Job, JobAttempt, JobEvent, JobMetric
from app.operations.tables import Worker
from app.recent import Recent
from app.scheduling import service
from app.teams.tables import Team
from tests.fast.conftest import job_spec, make_settings, received
from tests.services import in_a_thread_of_its_own

QUEUE = "gpu-default"


@pytest.fixture
def settings(settings):
    return make_settings(settings.home, min_runtime_before_preempt_s=600, preempt_after_wait_s=30)


def add_job(session, team: Team, *, status=states.QUEUED, age_s: float = 0, priority: int = 1, **values) -> str:
    now = utcnow()
    job = Job(team_id=team.id, status=status, base_model="llama-3-8b", spec=job_spec().model_dump(mode="json"),
              queue=QUEUE, dataset_id=f"data-{team.name}", priority=priority, created_at=now - timedelta(seconds=age_s),
              **values)
    session.add(job)
    session.commit()
    return job.id


def standing(settings, row) -> tuple[int, str] | None:
    """Where GET /jobs/{id} says the job stands (queue_position, waiting_for), the class's order read afresh."""
    found = in_a_thread_of_its_own(lambda: asyncio.run(jobs_service.standing(settings, Recent(0), row)))
    return (found.position, found.waiting_for) if found else None


def detail(settings, row) -> str:
    """What GET /jobs/{id} says a held-back job waits for, in words (waiting_detail)."""
    found = in_a_thread_of_its_own(lambda: asyncio.run(jobs_service.standing(settings, Recent(0), row)))
    assert found is not None and found.detail is not None, found
    return found.detail


def claim(settings, named: str, worker: str = "w1"):
    with session_scope(settings.database_url) as s:
        return service.claim_next(s, settings, named, worker)


def test_a_claim_takes_the_job_of_the_team_that_used_less_not_the_one_its_message_named(session, settings, world):
    team_a, team_b = world["team-a"][0], world["team-b"][0]
    first_a = add_job(session, team_a, age_s=30)
    claimed = claim(settings, first_a)
    assert claimed is not None and claimed.id == first_a  # alone in the queue
    second_a = add_job(session, team_a, age_s=20)
    only_b = add_job(session, team_b, age_s=10)  # younger, but team B holds nothing
    claimed = claim(settings, second_a, "w2")
    assert claimed is not None and claimed.id == only_b
    assert session.get(Job, second_a).status == states.QUEUED
    session.expire_all()
    attempt = session.query(JobAttempt).filter_by(job_id=only_b).one()
    assert attempt.attempt == 1 and attempt.ended_at is None and attempt.team_id == team_b.id


def test_priority_orders_a_teams_own_jobs_then_age(session, settings, world):
    team_a = world["team-a"][0]
    old_low = add_job(session, team_a, age_s=30, priority=0)
    new_high = add_job(session, team_a, age_s=1, priority=2)
    add_job(session, team_a, age_s=20, priority=1)
    claimed = claim(settings, old_low)
    assert claimed is not None and claimed.id == new_high


def test_max_running_holds_jobs_back_and_their_message_is_sent_once_they_may_start(session, settings, world):
    team_a, caller_a = world["team-a"]
    team_a.max_running = 1
    session.commit()
    running = add_job(session, team_a, age_s=60)
    assert claim(settings, running).id == running
    waiting = add_job(session, team_a, age_s=50, dispatched_at=utcnow())

    assert standing(settings, jobs_service.view(session, caller_a, waiting)) == (1, "max_running")
    assert claim(settings, waiting) is None  # its message found nothing it may start...
    session.expire_all()
    assert session.get(Job, waiting).dispatched_at is None  # ...so the job is marked unsent
    received(settings, QUEUE)  # empty the broker
    with session_scope(settings.database_url) as s:
        assert service.schedule(s, settings)["sent"] == 0  # still held back: no message for nothing

    with session_scope(settings.database_url) as s:
        assert runs.finish(s, running, 1, states.SUCCEEDED)
    with session_scope(settings.database_url) as s:
        assert service.schedule(s, settings)["sent"] == 1
    assert received(settings, QUEUE) == [(RUN_JOB_TASK, [waiting])]


def test_a_spent_monthly_budget_holds_jobs_back_with_the_reason(session, settings, world):
    team_b, caller_b = world["team-b"]
    spend_budget(session, team_b)
    waiting = add_job(session, team_b)
    assert standing(settings, jobs_service.view(session, caller_b, waiting)) == (1, "gpu_hours_per_month")
    assert claim(settings, waiting) is None
    team_b.gpu_hours_per_month = 2.0
    session.commit()
    assert standing(settings, jobs_service.view(session, caller_b, waiting)) == (1, "no_worker")  # no quota holds it: no worker here


def test_a_job_whose_class_has_no_worker_up_says_so_and_since_when_instead_of_gpu(session, settings, world):
    """It said "gpu" at position 1 for as long as no worker of its class was up, and its team took it for "soon"."""
    team_a, caller_a = world["team-a"]
    job_id = add_job(session, team_a, age_s=60)

    def said() -> tuple[str, str | None]:
        found = in_a_thread_of_its_own(lambda: asyncio.run(
            jobs_service.standing(settings, Recent(0), jobs_service.view(session, caller_a, job_id))))
        assert found is not None and found.position == 1
        return found.waiting_for, found.detail

    start = "the job starts once one is up (an operator starts one: qlora worker --gpu-class default)"  # queue gpu-default
    assert said() == ("no_worker", f"no worker of GPU class default is up (every one stopped, or none was started); {start}")
    now = utcnow()
    # A worker of another class does not count; one of its class last heard from 12 minutes ago is named.
    session.add(Worker(name="w-elsewhere", queue="gpu-other", started_at=now, seen_at=now))
    session.add(Worker(name="gpu-host-3", queue=QUEUE, started_at=now - timedelta(hours=5),
                       seen_at=now - timedelta(minutes=12, seconds=30)))
    session.add(Worker(name="gpu-host-1", queue=QUEUE, started_at=now - timedelta(hours=5),
                       seen_at=now - timedelta(hours=3)))
    session.commit()
    assert said() == ("no_worker", f"no worker of GPU class default has been seen for 12 minutes (the last, gpu-host-3, "
                                   f"stopped without a word or was cut off from the database); {start}")
    # One of its class is up, busy or idle: the job waits for a free GPU of it.
    session.add(Worker(name="gpu-host-2", queue=QUEUE, started_at=now, seen_at=utcnow()))
    session.commit()
    assert said() == ("gpu", None)
    # The quotas say the same as before, worker or none: it is its team's limit that holds the job.
    team_a.max_running = 0
    session.commit()
    assert said() == ("max_running", None)


def test_a_message_sent_long_ago_is_sent_again_only_while_a_worker_of_its_class_is_idle(session, settings, world):
    # Found probing with a real worker and Redis: with the one worker busy, ten queued jobs' messages in the broker
    # went 10, 13, 23, 33 ... 73 in 70 s (QLORA_REDISPATCH_AFTER_S=10): one more per job per deadline, never lost.
    team_a, team_b = world["team-a"][0], world["team-b"][0]
    long_ago = utcnow() - timedelta(seconds=settings.redispatch_after_s + 60)
    running = add_job(session, team_a, age_s=900)
    assert claim(settings, running, "w1").id == running
    waiting = add_job(session, team_b, age_s=900, dispatched_at=long_ago)
    received(settings, QUEUE)  # empty the broker
    assert schedule(settings)["sent"] == 0  # no worker of the class is up: a message would wait as the first does
    session.add(Worker(name="w1", queue=QUEUE, started_at=long_ago, seen_at=utcnow()))
    session.add(Worker(name="w-elsewhere", queue="gpu-other", started_at=long_ago, seen_at=utcnow()))
    session.add(Worker(name="w-silent", queue=QUEUE, started_at=long_ago, seen_at=long_ago))
    session.commit()
    assert schedule(settings)["sent"] == 0  # its one live worker is busy: the message waits for it, not lost
    assert received(settings, QUEUE) == []

    session.add(Worker(name="w2", queue=QUEUE, started_at=long_ago, seen_at=utcnow()))
    session.commit()
    # An idle worker of the class and a job whose message is long unclaimed: that message may be lost.
    assert schedule(settings)["sent"] == 1
    assert received(settings, QUEUE) == [(RUN_JOB_TASK, [waiting])]
    assert schedule(settings)["sent"] == 0  # sent now: not again before the deadline


def spend_budget(session, team: Team) -> None:
    """The team's monthly budget (1 GPU-hour) spent by a job that ran for an hour and a minute."""
    team.gpu_hours_per_month = 1.0
    now = utcnow()
    done = add_job(session, team, status=states.SUCCEEDED, attempt=1)
    session.add(JobAttempt(job_id=done, team_id=team.id, attempt=1, queue=QUEUE, claimed_at=now - timedelta(hours=1, minutes=1),
                           ended_at=now - timedelta(seconds=1), outcome=states.SUCCEEDED))
    session.commit()


@pytest.mark.parametrize("queued_again_by", ["preemption", "the reaper", "out of memory"])
def test_a_job_started_with_budget_left_and_queued_again_mid_run_goes_on_past_the_budget(
        session, settings, world, queued_again_by):
    # Found probing with a real worker: a job preempted for another team's job after its team had spent its budget
    # waited "gpu_hours_per_month", its GPU idle, until the next month; the budget holds back starts only.
    team_a, caller_a = world["team-a"]
    job_id = add_job(session, team_a, age_s=100)
    assert claim(settings, job_id).id == job_id  # started with budget left
    spend_budget(session, team_a)
    with session_scope(settings.database_url) as s:
        if queued_again_by == "preemption":
            from app.jobs import repository

            assert repository.preempt(s, job_id, 1) and runs.finish(s, job_id, 1, states.PAUSED)
        elif queued_again_by == "the reaper":
            assert runs.attempt_lost(s, s.get(Job, job_id), "worker gone", 3, utcnow(), settings.fair_share_half_life_s,
                                     outside_the_job=True) == "requeued"
        else:
            assert runs.continue_smaller(s, job_id, 1, {"per_device_batch_size": 1, "gradient_accumulation_steps": 8},
                                         utcnow(), settings.fair_share_half_life_s) == "requeued"
    new_job = add_job(session, team_a, age_s=200, priority=2)  # older, higher priority: but a start
    assert standing(settings, jobs_service.view(session, caller_a, job_id)) == (1, "no_worker")  # no quota holds it; no worker is up here
    assert standing(settings, jobs_service.view(session, caller_a, new_job)) == (2, "gpu_hours_per_month")
    claimed = claim(settings, new_job)
    assert claimed is not None and (claimed.id, claimed.attempt) == (job_id, 2)
    assert claim(settings, new_job) is None  # nothing else of the team starts


def test_a_job_preempted_midway_holds_back_its_teams_new_job_until_it_has_resumed(session, settings, world):
    """A team with an hour left, its job running with about 3.3 hours to go: its new job waits. That job is preempted:
    pausing it counted 5 GPU-minutes and, queued again, nothing, so the new job started (counting 72 hours) and the
    preempted one then resumed past the budget: two jobs over the month. Stopped midway, it counts for a time limit."""
    team_a, caller_a = world["team-a"]
    team_a.gpu_hours_per_month = 1.0
    session.commit()
    first = add_job(session, team_a, age_s=100)
    assert claim(settings, first).id == first
    job = session.get(Job, first)
    job.total_steps = 1000
    session.add_all([JobMetric(job_id=first, kind="train", step=step, train_loss=1.0,
                               created_at=job.claimed_at + timedelta(seconds=1 + 12 * (step - 1))) for step in (1, 2)])
    session.commit()
    new_job = add_job(session, team_a, age_s=200, priority=2, dispatched_at=utcnow())
    assert standing(settings, jobs_service.view(session, caller_a, new_job)) == (1, "gpu_hours_per_month")
    from app.jobs import repository

    with session_scope(settings.database_url) as s:
        assert repository.preempt(s, first, 1)
    assert standing(settings, jobs_service.view(session, caller_a, new_job)) == (1, "gpu_hours_per_month")
    assert claim(settings, new_job, "w2") is None
    with session_scope(settings.database_url) as s:
        assert runs.finish(s, first, 1, states.PAUSED)  # queued again, continuing
    assert standing(settings, jobs_service.view(session, caller_a, new_job)) == (2, "gpu_hours_per_month")
    assert "1 job stopped midway to resume" in detail(settings, jobs_service.view(session, caller_a, new_job))
    claimed = claim(settings, new_job, "w2")
    assert claimed is not None and (claimed.id, claimed.attempt) == (first, 2)
    assert claim(settings, new_job, "w3") is None


def test_a_job_past_its_time_limit_is_not_said_to_count_the_rest_of_it():
    """A job running past its time limit counts 5 GPU-minutes, but was said to have "no pace yet: ... counts for the
    rest of its 72 h time limit"; and a limit of 100,000 s read "27.7778 h"."""
    from app.scheduling.policy import RUNNING_COUNTS_S, TeamShare

    rest = ("; a job starts while what is left exceeds what is still to come, and a job that started runs to its end "
            "(README, Quotas)")
    over = TeamShare("t", 1.0, running=1, unpaced=0, budget_left_s=0, to_come_s=RUNNING_COUNTS_S,
                     job_time_limit_s=100_000)
    assert service.budget_said(over) == "budget: 0.0 GPU-h left, 0.1 GPU-h still to come on 1 running job" + rest
    assert service.budget_said(replace(over, unpaced=1)) == (
        "budget: 0.0 GPU-h left, 0.1 GPU-h still to come on 1 running job (it has no pace yet: until its first training "
        "steps show one, a job counts for the rest of its 27.8 h time limit)" + rest)


def test_team_shares_counts_a_job_past_its_time_limit_as_paced(session, settings, world):
    team_a = world["team-a"][0]
    team_a.gpu_hours_per_month = 1.0
    session.commit()
    over = add_job(session, team_a, age_s=100)
    assert claim(settings, over).id == over
    session.get(Job, over).claimed_at = utcnow() - timedelta(seconds=settings.job_time_limit_s + 3600)
    session.commit()
    with session_scope(settings.database_url) as s:
        a = service.team_shares(s, settings, utcnow())[team_a.id]
    assert (a.running, a.unpaced) == (1, 0)


def test_a_budget_holds_back_starts_for_the_time_its_running_job_still_needs_at_its_pace(session, settings, world):
    """A team with an hour left and a job running that needs about 3.3 more hours at the pace of its train points
    starts nothing more, and its queued job says why; counted as 5 GPU-minutes, it started one job after another
    with that hour. Once the running job is 10 minutes from its end (a smaller total), the next one may start."""
    team_a, caller_a = world["team-a"]
    team_a.gpu_hours_per_month = 1.0
    session.commit()
    running = add_job(session, team_a, age_s=100)
    assert claim(settings, running).id == running
    waiting = add_job(session, team_a, age_s=50, dispatched_at=utcnow())
    # Just started, no pace yet: it counts for the rest of its time limit, and the queued job says so.
    assert detail(settings, jobs_service.view(session, caller_a, waiting)).startswith(
        "budget: 1.0 GPU-h left, 72.0 GPU-h still to come on 1 running job (it has no pace yet: until its first "
        "training steps show one, a job counts for the rest of its 72 h time limit);")
    assert claim(settings, waiting, "w2") is None
    job = session.get(Job, running)
    job.total_steps = 1000
    # 12 s a step in this attempt: 998 steps to go, 3.3 GPU-hours, as GET /jobs/{id}'s estimated_finish says.
    session.add_all([JobMetric(job_id=running, kind="train", step=step, train_loss=1.0,
                               created_at=job.claimed_at + timedelta(seconds=1 + 12 * (step - 1))) for step in (1, 2)])
    session.commit()

    assert standing(settings, jobs_service.view(session, caller_a, waiting)) == (1, "gpu_hours_per_month")
    assert detail(settings, jobs_service.view(session, caller_a, waiting)).startswith(
        "budget: 1.0 GPU-h left, 3.3 GPU-h still to come on 1 running job;")
    assert claim(settings, waiting, "w2") is None

    job.total_steps = 50  # 48 steps to go: 10 minutes
    session.commit()
    assert standing(settings, jobs_service.view(session, caller_a, waiting)) == (1, "no_worker")  # no quota holds it
    claimed = claim(settings, waiting, "w2")
    assert claimed is not None and claimed.id == waiting


def test_the_budget_says_which_running_jobs_have_no_pace_yet_and_what_jobs_ahead_will_count_for():
    """waiting_detail's words for the budget, where a running job has no pace yet or the team's jobs ahead will start
    first: a job held back by one that had just started read "71.9 GPU-h still to come" with no word of why."""
    from app.scheduling.policy import TeamShare

    rest = ("; a job starts while what is left exceeds what is still to come, and a job that started runs to its end "
            "(README, Quotas)")
    two = TeamShare("t", 1.0, running=3, unpaced=2, budget_left_s=3600, to_come_s=147 * 3600)
    assert service.budget_said(two) == (
        "budget: 1.0 GPU-h left, 147.0 GPU-h still to come on 3 running jobs (2 of them have no pace yet: until its "
        "first training steps show one, a job counts for the rest of its 72 h time limit)" + rest)
    ahead = TeamShare("t", 1.0, budget_left_s=3600, to_come_s=0.0, job_time_limit_s=86400)
    assert service.budget_said(ahead) == (
        "budget: 1.0 GPU-h left, 0.0 GPU-h still to come on 0 running jobs, and each of the team's jobs that start "
        "before this one will count for up to 24 h until its pace shows" + rest)


def test_a_job_its_team_paused_and_resumes_past_the_budget_is_a_start_and_waits(session, settings, world):
    team_a, caller_a = world["team-a"]
    job_id = add_job(session, team_a, age_s=100)
    assert claim(settings, job_id).id == job_id
    assert jobs_service.pause(session, caller_a, job_id).status == states.PAUSING
    session.commit()
    with session_scope(settings.database_url) as s:
        assert runs.finish(s, job_id, 1, states.PAUSED)
    spend_budget(session, team_a)
    assert jobs_service.resume(session, settings, caller_a, job_id).status == states.QUEUED
    session.commit()
    assert standing(settings, jobs_service.view(session, caller_a, job_id)) == (1, "gpu_hours_per_month")
    assert claim(settings, job_id) is None


def test_preemption_pauses_the_newest_job_of_the_team_above_its_share_and_queues_it_again(session, settings, world):
    team_a, team_b = world["team-a"][0], world["team-b"][0]
    now = utcnow()
    old, new = (add_job(session, team_a, age_s=age) for age in (7200, 3600))
    for job_id, claimed_ago in ((old, 7000), (new, 3000)):
        assert claim(settings, job_id).id == job_id
        session.query(Job).filter_by(id=job_id).update({"claimed_at": now - timedelta(seconds=claimed_ago)})
        session.query(JobAttempt).filter_by(job_id=job_id).update({"claimed_at": now - timedelta(seconds=claimed_ago)})
        session.commit()
    fresh_b = add_job(session, team_b, age_s=10, dispatched_at=now - timedelta(seconds=10))
    with session_scope(settings.database_url) as s:
        assert service.schedule(s, settings)["preempted"] == 0  # B has not waited QLORA_PREEMPT_AFTER_WAIT_S yet
    session.query(Job).filter_by(id=fresh_b).update({"dispatched_at": now - timedelta(seconds=60),
                                                      "created_at": now - timedelta(seconds=60)})
    session.commit()
    with session_scope(settings.database_url) as s:
        assert service.schedule(s, settings)["preempted"] == 1
    with session_scope(settings.database_url) as s:
        assert service.schedule(s, settings)["preempted"] == 0  # one GPU is being freed for B already
    session.expire_all()
    assert (session.get(Job, new).status, session.get(Job, new).preempting) == (states.PAUSING, True)
    assert session.get(Job, old).status == states.RUNNING
    assert [e.type for e in session.query(JobEvent).filter_by(job_id=new)][-1] == "preempted"

    # The worker saw pausing, saved a checkpoint and stopped: the job is queued again, not paused.
    with session_scope(settings.database_url) as s:
        assert runs.finish(s, new, 1, states.PAUSED)
    session.expire_all()
    job = session.get(Job, new)
    assert (job.status, job.preempting, job.preemptions, job.dispatched_at) == (states.QUEUED, False, 1, None)
    attempt = session.query(JobAttempt).filter_by(job_id=new).one()
    assert attempt.outcome == states.PAUSED and (attempt.ended_at - attempt.claimed_at).total_seconds() >= 3000
    assert session.get(Team, team_a.id).fair_share_usage_s > 2900  # its GPU time counts against its share
    # B goes first: it holds nothing, A holds a GPU and used more.
    assert claim(settings, new, "w3").id == fresh_b


def test_without_preemption_nothing_is_paused(session, settings, world):
    settings = make_settings(settings.home, preemption=False, min_runtime_before_preempt_s=0, preempt_after_wait_s=0)
    team_a, team_b = world["team-a"][0], world["team-b"][0]
    running = add_job(session, team_a, age_s=100)
    assert claim(settings, running).id == running
    add_job(session, team_b, age_s=100, dispatched_at=utcnow() - timedelta(seconds=100))
    with session_scope(settings.database_url) as s:
        assert service.schedule(s, settings)["preempted"] == 0
    session.expire_all()
    assert session.get(Job, running).status == states.RUNNING


def test_a_teams_own_pause_of_a_preempted_job_keeps_it_paused(session, settings, world):
    team_a, caller_a = world["team-a"]
    job_id = add_job(session, team_a, age_s=100)
    assert claim(settings, job_id).id == job_id
    with session_scope(settings.database_url) as s:
        from app.jobs import repository

        assert repository.preempt(s, job_id, 1)
    assert jobs_service.pause(session, caller_a, job_id).status == states.PAUSING
    session.commit()
    with session_scope(settings.database_url) as s:
        assert runs.finish(s, job_id, 1, states.PAUSED)
    session.expire_all()
    assert session.get(Job, job_id).status == states.PAUSED


def busy_pool(session, settings, world) -> tuple[str, str, str]:
    """Teams A and C hold a GPU each, claimed long ago (A's longer: A is furthest above its share);
    team B, holding nothing, has a job that has waited with its message in the broker: every GPU is busy.
    Returns (A's job, C's job, B's job)."""
    from app.datasets.tables import Dataset
    from app.teams.service import create_team

    team_c = create_team(session, "team-c")
    session.add(Dataset(id="data-team-c", team_id=team_c.id, filename="d.jsonl", storage_key="team-c/d", bytes=10,
                        sha256="0" * 64, status="ready"))
    session.commit()
    now = utcnow()
    held = []
    for team, claimed_ago in ((world["team-a"][0], 3000), (team_c, 2000)):
        job_id = add_job(session, team, age_s=claimed_ago + 100)
        assert claim(settings, job_id).id == job_id
        session.query(Job).filter_by(id=job_id).update({"claimed_at": now - timedelta(seconds=claimed_ago)})
        session.query(JobAttempt).filter_by(job_id=job_id).update({"claimed_at": now - timedelta(seconds=claimed_ago)})
        session.commit()
        held.append(job_id)
    waiting = add_job(session, world["team-b"][0], age_s=60, dispatched_at=now - timedelta(seconds=60))
    return held[0], held[1], waiting


def schedule(settings) -> dict[str, int]:
    with session_scope(settings.database_url) as s:
        return service.schedule(s, settings)


def status(session, job_id: str) -> tuple[str, bool]:
    session.expire_all()
    job = session.get(Job, job_id)
    return job.status, job.preempting


@pytest.mark.parametrize("stopped_by", ["its team's pause", "an admin disabling its team"])
def test_a_preempted_job_paused_by_its_team_or_an_admin_still_frees_its_gpu_for_the_waiting_job(
        session, settings, world, stopped_by):
    """The GPU of a job being preempted is freed whatever else asks it to pause: the waiting job gets it,
    so no second job (of yet another team) is preempted for it. Before, the pause cleared `preempting`
    (the job stays paused, not queued again), and the next pass preempted C's job too."""
    from app.teams import admin

    job_a, job_c, _ = busy_pool(session, settings, world)
    assert schedule(settings)["preempted"] == 1
    assert status(session, job_a) == (states.PAUSING, True)
    if stopped_by == "its team's pause":
        assert jobs_service.pause(session, world["team-a"][1], job_a).status == states.PAUSING
    else:
        assert admin.disable_team(session, "team-a").pausing == [job_a]
    session.commit()
    assert status(session, job_a) == (states.PAUSING, False)  # it stays paused once stopped

    assert schedule(settings)["preempted"] == 0
    assert status(session, job_c) == (states.RUNNING, False)


@pytest.mark.parametrize("request_", ["pause", "cancel"])
def test_a_job_its_team_pauses_or_cancels_frees_its_gpu_for_the_waiting_job(session, settings, world, request_):
    """A job pausing or cancelling at its team's request stops after its current step and frees its GPU,
    which the next claim gives to the waiting job: nothing is preempted for it meanwhile."""
    job_a, job_c, _ = busy_pool(session, settings, world)
    job = getattr(jobs_service, request_)(session, world["team-a"][1], job_a)
    assert job.status == (states.PAUSING if request_ == "pause" else states.CANCELLING)
    session.commit()

    assert schedule(settings)["preempted"] == 0
    assert status(session, job_c) == (states.RUNNING, False)


def test_a_job_whose_worker_went_silent_frees_no_gpu_and_is_not_preempted(session, settings, world):
    """A job whose worker has sent no heartbeat for QLORA_HEARTBEAT_DEADLINE_S is the reaper's: its worker
    is taken for lost, and its GPU with it. Pausing (preempted) it frees nothing for the waiting job,
    and preempting it would pause a job that no worker runs: the waiting job gets C's GPU instead."""
    job_a, job_c, _ = busy_pool(session, settings, world)
    silent_since = utcnow() - timedelta(seconds=settings.heartbeat_deadline_s + 30)
    session.query(Job).filter_by(id=job_a).update({"heartbeat_at": silent_since})
    session.commit()

    assert schedule(settings)["preempted"] == 1  # A's job is furthest above its share, but no worker runs it
    assert status(session, job_a) == (states.RUNNING, False)
    assert status(session, job_c) == (states.PAUSING, True)


def test_a_preempted_job_whose_worker_went_silent_frees_no_gpu(session, settings, world):
    """Its GPU went with its worker: the reaper pauses it (and queues it again), and the waiting job is
    still waiting. It does not count as a GPU being freed, so the waiting job gets C's."""
    job_a, job_c, _ = busy_pool(session, settings, world)
    assert schedule(settings)["preempted"] == 1
    assert status(session, job_a) == (states.PAUSING, True)
    silent_since = utcnow() - timedelta(seconds=settings.heartbeat_deadline_s + 30)
    session.query(Job).filter_by(id=job_a).update({"heartbeat_at": silent_since})
    session.commit()

    assert schedule(settings)["preempted"] == 1
    assert status(session, job_c) == (states.PAUSING, True)


def test_a_job_handed_back_past_training_succeeds_saying_so_and_is_not_left_preempting(session, settings, world):
    """A worker stopped as its job merged handed the job back (pause_requested: "queued again"), but a run past
    training cannot pause: it succeeded with `preempting` still set and an event that said it would run again."""
    from app.jobs.repository import events

    team_a, _caller = world["team-a"]
    job_id = add_job(session, team_a, age_s=60)
    assert claim(settings, job_id).id == job_id
    with session_scope(settings.database_url) as s:
        assert runs.hand_back(s, "gpu-3", job_id, 1)
    with session_scope(settings.database_url) as s:
        assert runs.finish(s, job_id, 1, states.SUCCEEDED)
    session.expire_all()
    job = session.get(Job, job_id)
    assert (job.status, job.preempting) == (states.SUCCEEDED, False)
    [succeeded] = [e for e in events(session, team_a.id, job_id, None, 100) if e.type == "succeeded"]
    assert "past training when it was asked to pause, so it finished instead of being queued again" in succeeded.message


def test_a_model_that_unfinished_jobs_name_cannot_be_removed_under_them(session, settings, world):
    """Removed under a queued job (204), the model was gone when a worker took the job after its wait: it failed
    "base model ... is no longer registered". A paused job, resumed on a model registered again under the name,
    trained its adapter on other weights."""
    from app.errors import Conflict
    from app.models import service as models

    team_a = world["team-a"][0]
    queued = add_job(session, team_a)
    add_job(session, team_a, status=states.PAUSED)
    with pytest.raises(Conflict, match=r"1 paused, 1 queued"):
        models.remove_model(session, "llama-3-8b")
    session.rollback()
    claimed = claim(settings, queued)
    assert claimed is not None and claimed.base_model["path"] == "/models/llama"
    session.query(Job).update({Job.status: states.CANCELLED})
    models.remove_model(session, "llama-3-8b")  # nothing unfinished names it now
    session.commit()
    assert models.list_models(session) == []


def test_an_admin_removes_a_model_by_force_and_the_jobs_on_it_are_cancelled_saying_why(session, settings, world):
    """Refused while a job named it, a model could not be removed at all where a job stayed paused (or queued for a
    disabled team): --force removes it, cancels the queued and paused jobs at once and stops the running one as a
    cancel does, each saying the admin removed its model."""
    from app.errors import Conflict
    from app.jobs.repository import events
    from app.models import service as models

    team_a, team_b = world["team-a"][0], world["team-b"][0]
    running = add_job(session, team_b, age_s=60)
    assert claim(settings, running).id == running
    queued, paused = add_job(session, team_a), add_job(session, team_a, status=states.PAUSED)
    with pytest.raises(Conflict, match=r"force=true \(qlora admin remove-model --force\)"):
        models.remove_model(session, "llama-3-8b")
    session.rollback()
    models.remove_model(session, "llama-3-8b", force=True)
    session.commit()
    assert models.list_models(session) == []
    why = "base model llama-3-8b was removed by an admin"
    for job_id, status, event in ((queued, states.CANCELLED, "cancelled"), (paused, states.CANCELLED, "cancelled"),
                                  (running, states.CANCELLING, "cancel_requested")):
        job = session.get(Job, job_id)
        assert (job.status, job.error) == (status, why)
        [said] = [e for e in events(session, job.team_id, job_id, None, 100) if e.type == event]
        assert why in said.message
    with session_scope(settings.database_url) as s:  # its worker, once the training process has stopped
        assert runs.finish(s, running, 1, states.CANCELLED)
    session.expire_all()
    assert (session.get(Job, running).status, session.get(Job, running).error) == (states.CANCELLED, why)
