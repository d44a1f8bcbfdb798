"""Claims racing on Postgres, with no worker: several workers' claims at once, a claim that passes over a
team while another transaction holds the next team's row, and the accounts of a job preempted between claims.

- Claims at once never take one job twice, and each takes the next job in fair-share order: the team that
  queued one job is not behind the team that queued a thousand.
- A claim that passes over a team (its job taken or locked by another transaction, the team at max_running or
  disabled) gives the team's row back before it waits for the next team's: held to its commit, two claims that
  took teams in different orders waited for each other, and Postgres failed one with "deadlock detected"."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from app.config import Settings
from app.datasets.tables import Dataset
from app.db import database_now, session_scope, sessionmaker_for, utcnow
from app.jobs import repository as jobs
from app.jobs import runs, states
from app.jobs.tables import Job, JobAttempt, JobMetric
from app.models.tables import RegisteredModel
from app.quotas.service import lock_team
from app.scheduling import service as scheduling
from app.scheduling.policy import fold
from app.teams.service import create_team
from app.teams.tables import Team
from app.usage.repository import gpu_seconds_by_team, month_start
from tests.deployment import wait_for_a_lock_wait
from tests.fast.conftest import job_spec
from tests.fast.test_scheduling_service import QUEUE
from worker.training.protocol import CheckpointStored, Progress


def pool_of(database_url: str, tmp_path, queued: dict[str, int]) -> tuple[Settings, dict[str, str], dict[str, list[str]]]:
    """Teams named in `queued`, each with that many queued jobs (oldest first, in the order of `queued`)."""
    settings = Settings(home=tmp_path, database_url=database_url, storage_url=f"file://{tmp_path}/s", broker_url="")
    team_ids: dict[str, str] = {}
    job_ids: dict[str, list[str]] = {}
    now = utcnow()
    with session_scope(database_url) as session:
        session.add(RegisteredModel(name="llama-3-8b", path="/models/llama"))
        for rank, (name, count) in enumerate(queued.items()):
            team = create_team(session, name)
            session.add(Dataset(id=f"data-{name}", team_id=team.id, filename="d.jsonl", storage_key=name, bytes=10,
                                sha256="0" * 64, status="ready"))
            session.flush()
            rows = [Job(team_id=team.id, status=states.QUEUED, base_model="llama-3-8b", queue=QUEUE,
                        dataset_id=f"data-{name}", spec=job_spec().model_dump(mode="json"), priority=1,
                        created_at=now - timedelta(hours=len(queued) - rank, seconds=-i)) for i in range(count)]
            session.add_all(rows)
            session.flush()
            team_ids[name], job_ids[name] = team.id, [row.id for row in rows]
    return settings, team_ids, job_ids


def claimed_at_once(database_url: str, settings: Settings, messages: list[str]) -> list[str | None]:
    """A worker for each message claims at the same moment (its message names one job): the job each claimed."""
    barrier = threading.Barrier(len(messages))

    def claim(i: int) -> str | None:
        barrier.wait()
        with session_scope(database_url) as session:
            claimed = scheduling.claim_next(session, settings, messages[i], f"worker-{i}")
            return claimed.id if claimed else None

    with ThreadPoolExecutor(len(messages)) as pool:
        return list(pool.map(claim, range(len(messages))))


def test_eight_claims_at_once_take_eight_jobs_and_the_team_with_one_job_is_not_behind_a_thousand(database_url,
                                                                                                  tmp_path):
    settings, team_ids, job_ids = pool_of(database_url, tmp_path, {"sweeps": 1000, "one-off": 1})
    # Each message names one of the big team's jobs, as the broker's oldest messages do.
    claimed = claimed_at_once(database_url, settings, job_ids["sweeps"][:8])
    assert None not in claimed and len(set(claimed)) == 8, claimed
    assert job_ids["one-off"][0] in claimed
    # The rest are the big team's oldest seven, in order: each claim took the next job, none skipped one.
    assert sorted(set(claimed) - set(job_ids["one-off"])) == sorted(job_ids["sweeps"][:7])
    with sessionmaker_for(database_url)() as session:
        running = session.query(Job).filter(Job.status == states.RUNNING).count()
    assert running == 8


def test_a_claim_gives_back_the_row_of_a_team_it_passes_over_before_it_waits_for_the_next(database_url, tmp_path):
    settings, team_ids, job_ids = pool_of(database_url, tmp_path, {"first": 1, "second": 1})
    with session_scope(database_url) as session:  # "second" used a GPU-hour lately: "first" comes first
        second = lock_team(session, team_ids["second"])
        second.fair_share_usage_s, second.fair_share_at = 3600.0, utcnow()
    first_job, second_job = job_ids["first"][0], job_ids["second"][0]

    # A cancel of first's job under way: its row is taken, so the claim passes it over (SKIP LOCKED).
    cancel = sessionmaker_for(database_url)()
    assert jobs.transition(cancel, first_job, states.CANCELLED, finished_at=utcnow())
    # Another worker's claim under way on second's job: it holds second's row.
    other = sessionmaker_for(database_url)()
    lock_team(other, team_ids["second"])

    outcome: dict[str, object] = {}

    def claim() -> None:
        try:
            with session_scope(database_url) as session:
                claimed = scheduling.claim_next(session, settings, first_job, "worker-1")
                outcome["claimed"] = claimed.id if claimed else None
        except Exception as exc:  # noqa: BLE001 - the test reports what failed
            outcome["claimed"] = exc

    thread = threading.Thread(target=claim)
    thread.start()
    wait_for_a_lock_wait(database_url, "the claim, on second's row,")  # it passed first over
    # The other claim passes over second (its job taken meanwhile, say) and goes on to first's row, as a claim
    # that read the shares a moment apart does. The first claim must not hold first's row any more: it did, and
    # each waited for the other until Postgres failed one ("deadlock detected").
    try:
        lock_team(other, team_ids["first"])
        other.rollback()
    finally:
        other.close()
        cancel.commit()
        cancel.close()
        thread.join(30)
    assert outcome == {"claimed": second_job}


def test_a_job_preempted_for_a_team_that_comes_back_is_charged_once_and_resumes_where_it_paused(database_url,
                                                                                                 tmp_path):
    """Team "borrower" runs on a pool "owner" left idle; owner comes back with a job. The borrower's job is paused
    at a checkpoint for it, then resumes from that checkpoint: its two attempts do not overlap, its team's
    decayed usage is exactly the two attempts folded (nothing counted twice, the queued time between not at
    all), and the tokens of the attempts add up to the job's, none twice."""
    settings, team_ids, job_ids = pool_of(database_url, tmp_path, {"borrower": 1, "owner": 0})
    settings = settings.model_copy(update={"min_runtime_before_preempt_s": 0, "preempt_after_wait_s": 0})
    borrowed = job_ids["borrower"][0]

    def report(attempt: int, step: int, tokens: int, checkpoint: bool = False) -> str:
        with session_scope(database_url) as session:
            saved = [CheckpointStored(step=step, key=f"ckpt-{step}", size=1, sha256="0" * 64, tokens_seen=tokens)]
            return runs.report(session, borrowed, attempt, saved if checkpoint else [],
                               Progress(step=step, total_steps=20, tokens_seen=tokens))[0]

    with session_scope(database_url) as session:
        assert scheduling.claim_next(session, settings, borrowed, "worker-1").attempt == 1
    report(1, 10, 1000, checkpoint=True)
    report(1, 12, 1200)
    with session_scope(database_url) as session:  # the owner's job, its message in the broker
        owner_job = Job(team_id=team_ids["owner"], status=states.QUEUED, base_model="llama-3-8b", queue=QUEUE,
                        dataset_id="data-owner", spec=job_spec().model_dump(mode="json"), priority=1,
                        dispatched_at=utcnow() - timedelta(seconds=60))
        session.add(owner_job)
    with session_scope(database_url) as session:
        assert scheduling.schedule(session, settings)["preempted"] == 1
    assert report(1, 12, 1200, checkpoint=True) == states.PAUSING  # the worker saves at its step and stops
    with session_scope(database_url) as session:
        assert runs.finish(session, borrowed, 1, states.PAUSED, half_life_s=settings.fair_share_half_life_s)
    with session_scope(database_url) as session:  # the freed GPU goes to the owner, whatever message it took
        assert scheduling.claim_next(session, settings, borrowed, "worker-1").id == owner_job.id
    with session_scope(database_url) as session:
        resumed = scheduling.claim_next(session, settings, borrowed, "worker-2")
        assert (resumed.id, resumed.attempt, resumed.resume_step) == (borrowed, 2, 12)
    report(2, 20, 2000)
    with session_scope(database_url) as session:
        assert runs.finish(session, borrowed, 2, states.SUCCEEDED, half_life_s=settings.fair_share_half_life_s)

    with sessionmaker_for(database_url)() as session:
        first, second = session.query(JobAttempt).filter_by(job_id=borrowed).order_by(JobAttempt.attempt)
        assert (first.outcome, second.outcome) == (states.PAUSED, states.SUCCEEDED)
        assert first.ended_at <= second.claimed_at
        assert (first.trained_tokens, second.trained_tokens) == (1200, 800)
        usage, at = 0.0, None
        for attempt in (first, second):
            usage, at = fold(usage, at, attempt.claimed_at.timestamp(), attempt.ended_at.timestamp(),
                             settings.fair_share_half_life_s)
        borrower = session.get(Team, team_ids["borrower"])
        assert borrower.fair_share_usage_s == pytest.approx(usage, rel=1e-9)
        charged = sum((a.ended_at - a.claimed_at).total_seconds() for a in (first, second))
        now = utcnow()
        assert gpu_seconds_by_team(session, now - timedelta(days=1), now, now, [borrower.id]) == \
            {borrower.id: pytest.approx(charged)}


def test_claims_at_once_on_every_gpu_class_start_no_more_of_a_team_than_its_last_gpu_minutes_of_budget_cover(
        database_url, tmp_path):
    """A team with a minute of its monthly budget left and a job queued in each of four GPU classes; a free GPU in
    each class claims at once. One of its jobs starts; the other three GPUs take another team's jobs. Before, the
    budget was read once, before the claim locked the team, and counted only what running jobs had used so far:
    each class's claim saw a minute left and started the team's job, four jobs on a minute of budget."""
    classes = [f"gpu-{name}" for name in ("a100", "h100", "l4", "t4")]
    settings, team_ids, _ = pool_of(database_url, tmp_path, {"budgeted": 0, "other": 0})
    now = utcnow()
    jobs_of: dict[str, list[str]] = {"budgeted": [], "other": []}
    with session_scope(database_url) as session:
        for rank, name in enumerate(("budgeted", "other")):  # budgeted's jobs are the older: first in each class
            for queue in classes:
                row = Job(team_id=team_ids[name], status=states.QUEUED, base_model="llama-3-8b", queue=queue,
                          dataset_id=f"data-{name}", spec=job_spec().model_dump(mode="json"), priority=1,
                          created_at=now - timedelta(hours=2 - rank))
                session.add(row)
                session.flush()
                jobs_of[name].append(row.id)
        # An hour trained this month by a job of budgeted's that finished (or as much of it as this month holds).
        done = Job(team_id=team_ids["budgeted"], status=states.SUCCEEDED, base_model="llama-3-8b", queue=classes[0],
                   dataset_id="data-budgeted", spec=job_spec().model_dump(mode="json"), priority=1, attempt=1)
        session.add(done)
        session.flush()
        session.add(JobAttempt(job_id=done.id, team_id=team_ids["budgeted"], attempt=1, queue=classes[0],
                               claimed_at=max(now - timedelta(hours=1), month_start(now)), ended_at=now,
                               outcome=states.SUCCEEDED))
        session.flush()
        used = gpu_seconds_by_team(session, month_start(now), now, now, [team_ids["budgeted"]])[team_ids["budgeted"]]
        budgeted = session.get(Team, team_ids["budgeted"])
        assert budgeted is not None
        budgeted.gpu_hours_per_month = (used + 60) / 3600  # a minute left

    claimed = claimed_at_once(database_url, settings, jobs_of["budgeted"][:len(classes)])
    started = {name: [job_id for job_id in ids if job_id in claimed] for name, ids in jobs_of.items()}
    assert len(started["budgeted"]) == 1 and len(started["other"]) == len(classes) - 1, started
    # The budgeted team's other jobs wait, saying why; a GPU of their class went to the other team meanwhile.
    with session_scope(database_url) as session:
        for job_id in set(jobs_of["budgeted"]) - set(started["budgeted"]):
            queue = session.get(Job, job_id).queue
            assert scheduling.standings(session, settings, queue)[job_id].waiting_for == "gpu_hours_per_month"


def test_a_budget_counts_a_running_job_for_what_it_still_needs_at_its_pace_on_postgres(database_url, tmp_path):
    """The scheduler's one statement for every running job's pace (scheduling.repository.running_claims: its first
    and newest train points since its claim) on Postgres: a team with an hour left, running a job 3.3 hours from its
    end at 12 s a step, starts nothing more and says why; 10 minutes from its end, the next job starts."""
    settings, team_ids, job_ids = pool_of(database_url, tmp_path, {"b": 2})
    with session_scope(database_url) as session:
        session.get(Team, team_ids["b"]).gpu_hours_per_month = 1.0
    running, waiting = job_ids["b"]
    with session_scope(database_url) as session:
        claimed = scheduling.claim_next(session, settings, running, "w1")
        assert claimed is not None and claimed.id == running
    with session_scope(database_url) as session:
        job = session.get(Job, running)
        job.total_steps = 1000
        session.add_all([JobMetric(job_id=running, kind="train", step=step, train_loss=1.0,
                                   created_at=job.claimed_at + timedelta(seconds=1 + 12 * (step - 1)))
                         for step in (1, 2)])
    with session_scope(database_url) as session:
        standing = scheduling.standings(session, settings, QUEUE)[waiting]
        assert standing.waiting_for == "gpu_hours_per_month"
        assert standing.detail is not None and "3.3 GPU-h still to come on 1 running job" in standing.detail
        assert scheduling.claim_next(session, settings, waiting, "w2") is None
    with session_scope(database_url) as session:
        session.get(Job, running).total_steps = 50  # 48 steps to go: 10 minutes
    with session_scope(database_url) as session:
        claimed = scheduling.claim_next(session, settings, waiting, "w2")
        assert claimed is not None and claimed.id == waiting


@pytest.mark.parametrize("budget_h", [1.0, None])
def test_a_team_with_an_hour_of_budget_left_starts_one_job_on_eight_free_gpus_not_eight(database_url, tmp_path,
                                                                                         budget_h):
    """Eight free GPUs claim at once for a team with an hour of its monthly budget left and eight long jobs queued.
    One starts: until its first training steps show its pace, it counts for the rest of its time limit, and the
    others wait, saying so. Before, a job without a pace counted 5 GPU-minutes: all eight started (8 x 5 minutes
    fit in the hour), each to run for hours, and the team ended its month many GPU-hours over. Once the job shows a
    pace 10 minutes from its end, the next one starts. A team without a budget starts all eight at once, as before."""
    settings, team_ids, job_ids = pool_of(database_url, tmp_path, {"b": 8})
    with session_scope(database_url) as session:
        session.get(Team, team_ids["b"]).gpu_hours_per_month = budget_h
    started = [job_id for job_id in claimed_at_once(database_url, settings, job_ids["b"]) if job_id]
    if budget_h is None:
        assert sorted(started) == sorted(job_ids["b"])
        return
    assert started == [job_ids["b"][0]], started  # the oldest
    first, second = job_ids["b"][:2]
    with session_scope(database_url) as session:
        standing = scheduling.standings(session, settings, QUEUE)[second]
    assert (standing.position, standing.waiting_for) == (1, "gpu_hours_per_month")
    assert standing.detail is not None and standing.detail.startswith(
        "budget: 1.0 GPU-h left, 72.0 GPU-h still to come on 1 running job (it has no pace yet: until its first "
        "training steps show one, a job counts for the rest of its 72 h time limit);"), standing.detail
    with session_scope(database_url) as session:  # its pace: 12 s a step, 48 steps to go
        job = session.get(Job, first)
        job.total_steps = 50
        session.add_all([JobMetric(job_id=first, kind="train", step=step, train_loss=1.0,
                                   created_at=job.claimed_at + timedelta(seconds=1 + 12 * (step - 1)))
                         for step in (1, 2)])
    started = [job_id for job_id in claimed_at_once(database_url, settings, job_ids["b"]) if job_id]
    assert started == [second], started


@pytest.mark.parametrize("quota", ["max_running", "gpu_hours_per_month"])
def test_a_team_that_may_start_one_more_job_has_one_job_preempted_for_it_not_one_in_every_class_it_waits_in(
        database_url, tmp_path, quota):
    """Team "capped" may start one more job (max_running 1, or a minute of budget left: less than a running job
    counts for) and waits in two GPU classes, each held for hours by team "hog". A scheduler pass pauses one of
    hog's jobs for it, and the next pass (that job still saving its checkpoint) none. Before, each class was planned
    on the shares read before the pass: a job of hog's was paused in both, capped could start only one, and the
    other GPU went back to the job just paused, its pause and reload charged to hog for nothing."""
    settings, team_ids, _ = pool_of(database_url, tmp_path, {"hog": 0, "capped": 0})
    settings = settings.model_copy(update={"min_runtime_before_preempt_s": 600, "preempt_after_wait_s": 30})
    now = utcnow()
    hogs: list[str] = []
    with session_scope(database_url) as session:
        capped = session.get(Team, team_ids["capped"])
        assert capped is not None
        if quota == "max_running":
            capped.max_running = 1
        else:
            capped.gpu_hours_per_month = 60 / 3600
        for queue in ("gpu-a100", "gpu-h100"):
            hog = Job(team_id=team_ids["hog"], status=states.QUEUED, base_model="llama-3-8b", queue=queue,
                      dataset_id="data-hog", spec=job_spec().model_dump(mode="json"), priority=1,
                      created_at=now - timedelta(hours=3))
            session.add(hog)
            session.flush()
            assert scheduling.claim_next(session, settings, hog.id, f"worker-{queue}").id == hog.id
            session.query(Job).filter_by(id=hog.id).update({"claimed_at": now - timedelta(hours=2)})
            session.query(JobAttempt).filter_by(job_id=hog.id).update({"claimed_at": now - timedelta(hours=2)})
            hogs.append(hog.id)
            session.add(Job(team_id=team_ids["capped"], status=states.QUEUED, base_model="llama-3-8b", queue=queue,
                            dataset_id="data-capped", spec=job_spec().model_dump(mode="json"), priority=1,
                            created_at=now - timedelta(minutes=5), dispatched_at=now - timedelta(minutes=5)))

    def statuses() -> list[str]:
        with sessionmaker_for(database_url)() as session:
            return sorted(session.get(Job, job_id).status for job_id in hogs)

    with session_scope(database_url) as session:
        assert scheduling.schedule(session, settings)["preempted"] == 1
    assert statuses() == [states.PAUSING, states.RUNNING]
    with session_scope(database_url) as session:  # the paused job's GPU is capped's already
        assert scheduling.schedule(session, settings)["preempted"] == 0
    assert statuses() == [states.PAUSING, states.RUNNING]


def test_a_claim_whose_transaction_began_before_the_last_attempt_ended_does_not_charge_its_seconds_twice(
        database_url, tmp_path):
    """A worker's claim began (its first reads) a moment before another worker ended a job's attempt at a
    checkpoint (preempted, queued again at once), then took that job: a claim reads the queue after its first
    reads, and on a busy host those take a fraction of a second (measured: up to 0.3 s with nine claimers on two
    cores). The new attempt's GPU time starts where the claim took the job, after the last one ended. Before, it
    started at the claim transaction's start (Postgres' now()), before the end of the attempt it followed: the
    seconds between were charged twice, to usage, the monthly budget and fair share."""
    settings, _, job_ids = pool_of(database_url, tmp_path, {"team": 1})
    job_id = job_ids["team"][0]
    with session_scope(database_url) as session:
        assert scheduling.claim_next(session, settings, job_id, "worker-1").attempt == 1
    claiming = sessionmaker_for(database_url)()
    try:
        database_now(claiming)  # the second worker's claim has begun: its transaction's clock is set
        with session_scope(database_url) as session:  # the first worker's attempt ends, the job queued again
            assert jobs.preempt(session, job_id, 1, counted=False)
        with session_scope(database_url) as session:
            assert runs.finish(session, job_id, 1, states.PAUSED, half_life_s=settings.fair_share_half_life_s)
        claimed = scheduling.claim_next(claiming, settings, job_id, "worker-2")
        assert claimed is not None and claimed.attempt == 2
        claiming.commit()
    finally:
        claiming.close()
    with sessionmaker_for(database_url)() as session:
        first, second = session.query(JobAttempt).filter_by(job_id=job_id).order_by(JobAttempt.attempt)
        assert first.ended_at <= second.claimed_at, (first.ended_at, second.claimed_at)


def test_the_reaper_leaves_a_job_its_worker_back_from_silence_is_ending_and_reaps_the_others(database_url, tmp_path):
    """Two jobs of one team, their workers silent past the deadline; one worker comes back and records its job's
    success (its job's row, then its team's, for the usage ledger) just as the reaper passes. The reaper leaves that
    job to its worker, without waiting on its row, and queues the other again; the worker's end then goes through.
    Before, the reaper took the other job's row and then the team's (its attempt's end), then waited for the
    returning worker's job while that worker waited for the team's row: Postgres ended one of them with "deadlock
    detected". And a reaper that waited on a row would wait on one a frozen host's transaction held, reaping
    nothing meanwhile."""
    from app.jobs import reaper
    from app.usage import ledger

    settings, _, job_ids = pool_of(database_url, tmp_path, {"team": 2})
    for job_id in job_ids["team"]:
        with session_scope(database_url) as session:
            assert scheduling.claim_next(session, settings, job_id, f"worker-{job_id}").id == job_id
    with session_scope(database_url) as session:
        session.query(Job).update({"heartbeat_at": utcnow() - timedelta(minutes=10)})
    back = job_ids["team"][1]  # the one a scan of the table comes to second, as the reaper's did
    worker = sessionmaker_for(database_url)()
    outcome: dict[str, object] = {}

    def reap() -> None:
        try:
            with session_scope(database_url) as session:
                outcome["reaped"] = reaper.reap(session, settings)
        except Exception as exc:  # noqa: BLE001 - the test reports what failed
            outcome["reaped"] = exc

    try:
        assert jobs.transition(worker, back, states.SUCCEEDED, attempt=1, only_from=[states.RUNNING],
                               finished_at=utcnow())
        thread = threading.Thread(target=reap)
        thread.start()
        thread.join(30)  # it passes over the row the worker holds
        assert outcome == {"reaped": {"requeued": 1, "failed": 0, "cancelled": 0, "paused": 0}}
        ledger.end(worker, back, 1, utcnow(), states.SUCCEEDED, settings.fair_share_half_life_s)
        worker.commit()
    finally:
        worker.close()
        thread.join(30)
    with sessionmaker_for(database_url)() as session:
        assert {job_id: session.get(Job, job_id).status for job_id in job_ids["team"]} == {
            job_id: states.SUCCEEDED if job_id == back else states.QUEUED for job_id in job_ids["team"]}
        assert session.query(JobAttempt).filter(JobAttempt.ended_at.is_(None)).count() == 0
