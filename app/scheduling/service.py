"""The database decides who runs next (DESIGN.md rule 8). Queue messages only say "a job of this GPU
class is waiting": the worker that takes one claims the best queued job of its class at that moment
(claim_next), by the rules in policy.py. One scheduler per deployment, the holder of the "scheduler"
lease (SchedulerThread), sends the messages a quota held back once the team may start a job, sends
again those that may have been lost, and preempts for fair share.

Messages stay about one per queued job: a claim spends one message however it chooses, a message that
finds no job it may start marks its class's jobs unsent, and the scheduler sends one for each unsent
job that may start. A stale message finds nothing and is a no-op.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit, database_now, session_scope
from app.jobs import pace, runs, states
from app.jobs import repository as jobs
from app.jobs.dispatch import send
from app.jobs.runs import ClaimedJob
from app.operations import workers
from app.operations.lease import LeasedLoop
from app.operations.workers import WORKER_ALIVE_S
from app.quotas.service import effective, lock_team
from app.scheduling import policy, repository
from app.scheduling.policy import FOR_BUDGET, FOR_CPU, FOR_GPU, FOR_NO_WORKER, Running, TeamShare, Waiting
from app.teams.tables import Team
from app.text import counted
from app.usage.repository import gpu_seconds_by_team, month_start

log = logging.getLogger(__name__)

LEASE = "scheduler"
# A job is sent to the broker right after the commit that created it; only if that failed (broker
# down) does the scheduler send it, once the job is older than this.
SEND_UNSENT_AFTER_S = 10


def team_shares(session: Session, settings: Settings, now: datetime, teams: list[Team] | None = None) -> dict[str, TeamShare]:
    """Every team (or those of `teams`, as these rows hold them) as the rules see it now: weight and quota in
    force, GPUs held, decayed usage, what is left of its monthly budget, and what its running jobs will still use
    of it (policy.projection, at the pace that GET /jobs/{id}'s estimated_finish shows: jobs.pace.finish_s; all that
    its time limit leaves, where that pace is not known yet), and which of its jobs will resume past it (TeamShare.resuming).
    A team without a budget costs no read more."""
    some = None if teams is None else [team.id for team in teams]
    teams = repository.teams(session) if teams is None else teams
    quotas = {team.id: effective(settings, team) for team in teams}
    budgeted = [team_id for team_id, quota in quotas.items() if quota.gpu_hours_per_month is not None]
    claims: dict[str, list[float]] = {}
    to_come: dict[str, list[float]] = {}
    unpaced: dict[str, int] = {}
    for team_id, claimed_at, status, total_steps, first_step, first_at, last_step, last_at \
            in repository.running_claims(session, some, paced=None if len(budgeted) == len(quotas) else budgeted):
        claimed = (claimed_at or now).timestamp()
        claims.setdefault(team_id, []).append(claimed)
        finish = pace.finish_s(status, total_steps, [] if first_at is None else [(first_step, first_at),
                                                                                 (last_step, last_at)])
        seconds, by_limit = policy.projection(now.timestamp(), claimed, finish, settings.job_time_limit_s,
                                              stopping=status != states.RUNNING)
        unpaced[team_id] = unpaced.get(team_id, 0) + by_limit
        to_come.setdefault(team_id, []).append(seconds)
    used = gpu_seconds_by_team(session, month_start(now), now, now, budgeted) if budgeted else {}
    resuming = repository.resuming(session, budgeted) if budgeted else {}
    shares = {}
    for team in teams:
        quota = quotas[team.id]
        budget = quota.gpu_hours_per_month
        shares[team.id] = TeamShare.at(
            team.id, now.timestamp(), settings.fair_share_half_life_s, weight=quota.weight,
            usage_s=team.fair_share_usage_s or 0.0,
            usage_at=team.fair_share_at.timestamp() if team.fair_share_at else None,
            running_since=claims.get(team.id, []), max_running=quota.max_running,
            budget_left_s=None if budget is None else budget * 3600 - used.get(team.id, 0.0),
            disabled=team.disabled_at is not None, to_come_s=to_come.get(team.id, []),
            unpaced=unpaced.get(team.id, 0), job_time_limit_s=settings.job_time_limit_s,
            resuming=resuming.get(team.id, 0))
    return shares


def _waiting(session: Session, queue: str, rows: list[Row] | None = None) -> list[Waiting]:
    return [Waiting(job_id, team_id, priority, created_at.timestamp(), continuing)
            for job_id, team_id, priority, created_at, _, continuing
            in (repository.waiting(session, queue) if rows is None else rows)]


def claim_next(session: Session, settings: Settings, named_job_id: str, worker: str,
               token: str | None = None) -> ClaimedJob | None:
    """A worker took the message of `named_job_id`: claim the best queued job of that job's GPU class
    now (maybe another), or None when none may start (its message is then marked unsent, and the
    scheduler sends it again once the job may start).

    Each candidate's team is locked, then read again (its quota, its running jobs, its month's GPU time), so
    workers claiming at once, of one GPU class or of several, never start more than max_running of one team,
    nor more than its monthly budget lets start (TeamShare.blocked_by); a job another claim holds is skipped
    (SKIP LOCKED), and the claim itself is the compare-and-set it always was. A candidate passed over gives its
    team's row back at once (repository.Candidate): a claim holds at most one team's row while it waits for another.
    The job claimed is marked with `token` (runs.landed_claim).
    """
    queue = repository.queue_of(session, named_job_id)
    if queue is None:
        return None  # deleted with its team
    now = database_now(session)  # running claims' clock (runs.claim), and the month's attempts'
    shares = team_shares(session, settings, now)
    refused: set[str] = set()  # teams that may start nothing now
    spent: set[str] = set()  # teams whose budget lets no job start now, only continuing ones go on
    for job, reason in policy.claim_order(_waiting(session, queue), shares):
        if reason is not None:
            break  # the rest are held back too
        if job.team_id in refused or (job.team_id in spent and not job.continuing):
            continue
        candidate = repository.Candidate(session)
        team = lock_team(session, job.team_id)
        # Disabled since the shares were read (disabling takes this row first), or other workers (of this class or
        # another) started its jobs meanwhile: its max_running reached, or its budget no longer covers one more.
        held_by = team_shares(session, settings, now, [team])[team.id].blocked_by(job.continuing)
        if held_by is not None:
            candidate.pass_over()
            (spent if held_by == FOR_BUDGET else refused).add(job.team_id)
            continue
        if not repository.take_if_free(session, job.job_id):
            candidate.pass_over()
            continue
        candidate.take()
        claimed = runs.claim(session, job.job_id, worker, token)
        if claimed is not None:
            if claimed.id != named_job_id:
                log.info("the message named job %s; claimed %s, first in fair-share order", named_job_id, claimed.id)
            return claimed
    repository.forget_messages(session, queue)
    return None


@dataclass(frozen=True)
class Standing:
    """Where a queued job stands: 1 is the next its class starts; why it waits, and (no_worker) since when, for a
    person."""

    position: int
    waiting_for: str
    detail: str | None = None


def standings(session: Session, settings: Settings, queue: str, now: datetime | None = None) -> dict[str, Standing]:
    """Each queued job of one class with its place in claim order, if no job ended meanwhile. A job that needs only
    a GPU waits for "no_worker" while no worker of its class is up: it said "gpu" at position 1 for as long as the
    class had no worker at all, and its team took that for "it starts in a moment"."""
    now = now or database_now(session)  # running claims' clock (runs.claim), and seen_at's
    shares = team_shares(session, settings, now)
    order = policy.claim_order(_waiting(session, queue), shares)
    # seen_at is the database's clock (app.operations.workers): judged by this host's, an API host whose clock ran
    # ahead of the database's saw a live worker as silent, and the jobs of its class said no_worker.
    last_seen = repository.last_worker_seen(session, queue)
    no_worker = no_worker_said(queue, last_seen, now)
    for_gpu = (FOR_NO_WORKER, no_worker) if no_worker is not None or last_seen is None else free_worker_wait(queue, last_seen)
    return {job.job_id: Standing(position, *((reason, budget_said(shares[job.team_id]) if reason == FOR_BUDGET else None)
                                             if reason else for_gpu))
            for position, (job, reason) in enumerate(order, 1)}


def budget_said(team: TeamShare) -> str:
    """Why the monthly budget holds a team's job back, for a person: what is left against what its running jobs will
    still use and its jobs stopped midway will use once they resume (TeamShare.blocked_by), and, where some of them
    have no pace yet, that they count for their time limit until it shows. Before, a job said only
    gpu_hours_per_month, and a team with budget left could not tell why its job waited; and a job held back by one
    without a pace read "71.9 GPU-h still to come" with no word of why."""
    left_h = (team.budget_left_s or 0.0) / 3600
    left = f"{left_h:.1f} GPU-h left" if left_h >= 0 else f"none left ({-left_h:.1f} GPU-h over)"
    limit_h = f"{team.job_time_limit_s / 3600:.1f}".removesuffix(".0") + " h"  # 72 h, 27.8 h: not 27.7778 h
    on = []
    if team.running or not team.resuming:
        on.append(counted(team.running, "running job"))
        if team.unpaced:
            just = "it has" if team.running == 1 else "1 of them has" if team.unpaced == 1 else \
                f"{team.unpaced} of them have"
            on[-1] += (f" ({just} no pace yet: until its first training steps show one, a job counts for the rest "
                       f"of its {limit_h} time limit)")
    if team.resuming:
        on.append(f"{counted(team.resuming, 'job')} stopped midway to resume (preempted, out of memory, or its worker stopped or "
                  f"lost: each resumes past the budget, and counts for a {limit_h} time limit until its pace shows)")
    said = f"budget: {left}, {team.still_to_come_s / 3600:.1f} GPU-h still to come on {' and '.join(on)}"
    if team.blocked_by() != FOR_BUDGET:  # held back by the team's jobs ahead of it, once they start
        said += (f", and each of the team's jobs that start before this one will count for up to {limit_h} until "
                 "its pace shows")
    return (said + "; a job starts while what is left exceeds what is still to come, and a job that started runs to "
            "its end (README, Quotas)")


def free_worker_wait(queue: str, last_seen: Row) -> tuple[str, str | None]:
    """(waiting_for, waiting_detail) of a job that needs only a free worker of its class, which has one up
    (`last_seen`: repository.last_worker_seen), worded for what that worker trains on: "gpu" (a free GPU of its
    class), or "cpu" where it has no GPU (a laptop running the embedded default), which said it waited for a GPU the
    machine does not have."""
    if last_seen.device != "cpu":  # a GPU, or a worker of an older release, which does not say
        return FOR_GPU, None
    gpu_class = queue.removeprefix("gpu-")  # Settings.queue_for
    return FOR_CPU, (f"the worker of GPU class {gpu_class} ({last_seen.name}) has no GPU and trains on the CPU, one job "
                     "at a time: the job starts when it is free (start a worker on a GPU machine, qlora worker "
                     f"--gpu-class {gpu_class}, to train faster)")


def no_worker_said(queue: str, last_seen: Row | None, now: datetime) -> str | None:
    """Why the jobs of `queue` cannot start whatever their place, for a person: no worker of the class said it
    was up within WORKER_ALIVE_S (`last_seen`: repository.last_worker_seen). None: one is up."""
    gpu_class = queue.removeprefix("gpu-")  # Settings.queue_for
    start = f"the job starts once one is up (an operator starts one: qlora worker --gpu-class {gpu_class})"
    if last_seen is None:
        return f"no worker of GPU class {gpu_class} is up (every one stopped, or none was started); {start}"
    silent_s = (now - last_seen.seen_at).total_seconds()
    if silent_s <= WORKER_ALIVE_S:
        return None
    minutes = int(silent_s // 60)
    silent = (f"{int(silent_s)} s" if not minutes else counted(minutes, "minute") if minutes < 120
              else counted(minutes // 60, "hour"))
    return (f"no worker of GPU class {gpu_class} has been seen for {silent} (the last, {last_seen.name}, stopped "
            f"without a word or was cut off from the database); {start}")


def schedule(session: Session, settings: Settings) -> dict[str, int]:
    """One scheduler pass over every class with queued jobs: send the messages due, then preempt."""
    # Every time of a job is on the database's clock: created_at, queued_at, dispatched_at (jobs.service.create,
    # jobs.dispatch), claimed_at (runs.claim), and so the usage of the jobs running and their runtime before a
    # preemption. Read against this host's, a host an hour ahead preempted a job claimed a second ago as one past
    # QLORA_MIN_RUNTIME_BEFORE_PREEMPT_S, and one behind never preempted anything.
    now = database_now(session)
    counts = {"sent": 0, "preempted": 0}
    shares = team_shares(session, settings, now)
    # The teams as they will stand once the GPUs this pass frees or preempts are claimed, class after class: a team
    # given one in a class is seen with it in the next (policy.plan_preemptions' teams_after). The classes go in one
    # order at every pass, so that a GPU planned for a team in one class, still being freed at the next pass, is
    # counted before the other classes again.
    planned = dict(shares)
    for queue in sorted(repository.queues_with_waiting(session)):
        rows = repository.waiting(session, queue)
        order = policy.claim_order(_waiting(session, queue, rows), shares)
        counts["sent"] += _send_due(session, settings, queue, order, now)
        if settings.preemption:
            counts["preempted"] += _preempt(session, settings, queue, now, planned, rows)
    return counts


def _send_due(session: Session, settings: Settings, queue: str, order: list[tuple[Waiting, str | None]],
              now: datetime) -> int:
    """Send "job X is ready" for each job that may start and has no message: never sent (the broker was
    down, a quota held it back, it was requeued), or sent so long ago (QLORA_REDISPATCH_AFTER_S) that
    its message may be lost. Held-back jobs get none: a message would only find nothing to start.

    A message sent long ago is taken for lost only while a worker of the class is idle: while every worker is
    busy (or none is up) it waits in the broker for one to free, and is not lost. Sent again regardless, every
    queued job behind busy workers got one more message each QLORA_REDISPATCH_AFTER_S: a team's 1,000 queued
    jobs piled up 288,000 messages a day in the broker, each a claim for a worker to make once one freed."""
    idle = repository.idle_workers(session, queue, workers.alive_since(session))
    unsent = repository.unsent(session, queue, before=now - timedelta(seconds=settings.redispatch_after_s) if idle else None)
    # Sent before and not taken, while a worker of the class is idle: a message lost, or one on a broker no worker of
    # the class listens to. The latter was silent: a worker host given another QLORA_BROKER_URL (or none: its own
    # local queue) beat as alive and idle, and the job waited for ever, "waiting_for": "gpu", nothing said why.
    stale = {job_id for job_id, sent in unsent.items() if sent}
    young = now - timedelta(seconds=SEND_UNSENT_AFTER_S)
    sent = resent = 0
    for job, reason in order:
        if reason is None and job.job_id in unsent and datetime.fromtimestamp(job.created_at, UTC) < young:
            after_commit(session, functools.partial(send, settings, job.job_id, queue))
            sent += 1
            resent += job.job_id in stale
    if resent:
        # Named only where a worker sat idle the whole time since those messages went: one that just finished a job
        # is about to take the next message, and one busy then was not there to take it.
        since = now - timedelta(seconds=settings.redispatch_after_s)
        idle_all_along = repository.idle_throughout(session, queue, workers.alive_since(session), since)
        if idle_all_along:
            log.warning("queue %s: no worker took the message of %s, sent %s s ago or more, though %s of this queue "
                        "(%s) sat idle all that time; sent again. The messages were lost (a broker restarted without "
                        "persistence), or those workers listen to another broker than this API: if this repeats, "
                        "compare their QLORA_BROKER_URL with the API's", queue, counted(resent, "job"),
                        f"{settings.redispatch_after_s:g}", counted(len(idle_all_along), "worker"),
                        ", ".join(idle_all_along[:5]))
    return sent


def _preempt(session: Session, settings: Settings, queue: str, now: datetime, shares: dict[str, TeamShare],
             waiting_rows: list[Row]) -> int:
    """Pause (at a checkpoint) the jobs plan_preemptions names, for jobs that have waited
    QLORA_PREEMPT_AFTER_WAIT_S with their message in the broker: no worker of the class was free to take it.
    `shares` are the teams as the classes planned before this one leave them, and are updated for the next."""
    patience = timedelta(seconds=settings.preempt_after_wait_s)
    waited = _waiting(session, queue, [row for row in waiting_rows if row.dispatched_at is not None
                                       and now - row.dispatched_at >= patience and now - row.created_at >= patience])
    if not waited:
        return 0
    # A job whose worker has been silent for QLORA_HEARTBEAT_DEADLINE_S is the reaper's (jobs.reaper): its worker
    # is taken for lost, and the GPU with it. Preempting it would free nothing, and if it is stopping already
    # its GPU is not coming back to this class's next claim.
    deadline = now - timedelta(seconds=settings.heartbeat_deadline_s)  # heartbeats' clock
    rows = [row for row in repository.running_in(session, queue) if row.heard_at is None or row.heard_at >= deadline]
    candidates = [Running(job_id, team_id, priority, claimed_at.timestamp())
                  for job_id, team_id, priority, claimed_at, _, status, _ in rows
                  if status == states.RUNNING and claimed_at is not None]
    attempts = {row[0]: row[4] for row in rows}
    # Every GPU-holding job that is not running is stopping after its current step: pausing (preempted, paused by
    # its team, or its team disabled by an admin) or cancelling. Each GPU it frees goes to the next claim, so
    # none is preempted for the first waiting jobs meanwhile. Counting only the scheduler's own preemptions
    # (`preempting`) missed a preempted job that its team or an admin then paused (that clears the flag, to
    # keep it paused), and the next pass preempted a second job, of yet another team, for the same waiting job.
    freeing = sum(1 for row in rows if row.status != states.RUNNING)
    plan = policy.plan_preemptions(waited, candidates, shares, now.timestamp(),  # claimed_at's clock
                                   settings.min_runtime_before_preempt_s, freeing, teams_after=shares)
    done = 0
    for preemption in plan:
        victim = preemption.victim
        if jobs.preempt(session, victim.job_id, attempts[victim.job_id]):
            jobs.add_event(session, victim.job_id, "preempted", "warning",
                           "preempted for fair share: a team below its share has a job waiting and every GPU of "
                           "this class is busy; the job saves a checkpoint after its current step, is queued "
                           "again, and resumes from that checkpoint with nothing lost", attempt=attempts[victim.job_id])
            done += 1
    return done


class SchedulerThread(LeasedLoop):
    """schedule() every QLORA_SCHEDULER_INTERVAL_S in each API process (and `qlora reaper`), worked by
    the holder of the "scheduler" lease only."""

    def __init__(self, settings: Settings):
        super().__init__(settings.database_url, LEASE, settings.scheduler_interval_s)
        self.settings = settings

    def work(self) -> dict[str, int]:
        with session_scope(self.settings.database_url) as session:
            return schedule(session, self.settings)
