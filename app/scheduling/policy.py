"""Who runs next, and whom to preempt: the rules alone, on plain values, with no database and no clock.

The service feeds them what the database says (app/scheduling/service.py); bench/scheduler_sim.py feeds
them a simulated pool on a simulated clock. Both call these functions, so the benchmark measures the
code that schedules, not a copy of it.

The vocabulary is Kueue's and Slurm's:

- A team's **weight** is its share of the pool against the other teams'.
- Its **share** is the GPU time it used recently, per unit of weight: its past GPU time decayed with a
  half-life (Slurm's PriorityDecayHalfLife), the running attempts' time so far included, expressed as an
  average number of GPUs; each job it runs now also counts for RUNNING_COUNTS_S of GPU time to come.
  The lower a team's share, the sooner its jobs run: a team that used little gets the next free GPU,
  and over time every busy team's GPU time tends to its weight, even a team whose slice of the pool is
  less than one GPU (it takes turns holding one).
- Within a team, a job's **priority** (low, normal, high), then its age, decides.
- **Preemption**: when a job waits and its class has no free GPU, the newest job of the team furthest
  above its share is paused at a checkpoint for it, but only once that job has run its minimum runtime,
  and only if the victim's team, without that job, would still be above the waiting team with it, by a
  margin (Kueue's LessThanOrEqualToFinalShare, with hysteresis): two equal teams never swap, and teams
  that are nearly even do not trade GPUs back and forth.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

PRIORITIES = {"low": 0, "normal": 1, "high": 2}
PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}

# What a queued job waits for (GET /jobs/{id}'s waiting_for): a GPU of its class, its team's quota, or (its team
# disabled by an admin) the team to be enabled again (qlora admin enable-team).
FOR_GPU, FOR_MAX_RUNNING, FOR_BUDGET = "gpu", "max_running", "gpu_hours_per_month"
FOR_TEAM_DISABLED = "team_disabled"
# What a job waits for that the rules here do not decide: no worker of its class is up at all (the service reads the
# workers table, app/scheduling/service.standings). Said instead of "gpu", which a person read as "soon".
FOR_NO_WORKER = "no_worker"
# A job that needs only a free worker, of a class whose workers train on the CPU (no GPU on their machine: a laptop
# running the embedded default): said instead of "gpu", which named a GPU the machine does not have.
FOR_CPU = "cpu"

LN2 = math.log(2)

# A job running now counts in its team's share as this much GPU time still to come, on top of what it
# has used. It makes the claims of one instant (a new deployment, where no team has a past yet) go to
# the teams in turn rather than all to one, and it is part of preemption's hysteresis (below). It is
# kept under the minimum runtime before preemption (QLORA_MIN_RUNTIME_BEFORE_PREEMPT_S, 10 minutes by
# default), so that in a new pool a team that holds nothing takes a GPU from one that holds it as soon
# as that job has run its minimum runtime. Against a busy team's past it is small (one GPU for a day is
# 86,400 s), so within hours the order is decided by GPU time actually used, and GPU time follows the
# weights, even for a team whose slice of the pool is under one GPU (it takes turns holding one).
# (Counting a running job as a whole GPU for the whole decay window dwarfs that past instead: a team
# whose slice is half a GPU then gets one whenever it asks, twice its weight.) The share keeps this fixed
# count, not a running job's projected time (to_come_s, what the budget counts): a projection of hours is the
# same mistake on a smaller scale, it would make a team running one long job look busier than one running
# several short ones, and move with every metric point, so that preemption (PREEMPT_MARGIN, tuned on this
# count) traded GPUs over a job's changing pace. The share orders teams by time used; the budget, which must
# not be overrun, counts the time still to come. Each running job counts at least this for the budget too.
RUNNING_COUNTS_S = 300.0
# A job is preempted only for a team whose share, with the GPU, would still be this much lower (3 %)
# than the victim team's without it. Teams that are nearly even (every busy team, once the shares have
# settled) would otherwise trade GPUs back and forth at every small drift, each time costing a pause;
# a team that used little (most of all one that holds nothing) is far more than 3 % below, and gets in.
# The margin also bounds how far busy teams drift apart before preemption evens them out, so it stays
# well under the 5 % the issue allows. bench/scheduler_sim.py (16 GPUs, 2,000 jobs) measured 160
# preemptions and shares within 1.4 % of the weights at 3 %; 1,698 preemptions with no margin.
PREEMPT_MARGIN = 0.03
# QLORA_FAIR_SHARE_HALF_LIFE_S's default, for a TeamShare made by hand rather than by TeamShare.at.
DEFAULT_HALF_LIFE_S = 7 * 24 * 3600.0
# QLORA_JOB_TIME_LIMIT_S's default, for a TeamShare made by hand: what a job started counts for its team's budget
# until its pace is known (TeamShare.job_time_limit_s).
DEFAULT_JOB_TIME_LIMIT_S = 72 * 3600.0


def decayed(value_s: float, elapsed_s: float, half_life_s: float) -> float:
    """Usage recorded elapsed_s ago, as it counts now."""
    return value_s * 2.0 ** (-max(elapsed_s, 0.0) / half_life_s)


def used_between(start: float, end: float, now: float, half_life_s: float) -> float:
    """The decayed GPU-seconds of one GPU busy from start to end (seconds on one clock), as of now:
    the integral of 2^-(now - t)/half_life over [start, end]."""
    if end <= start:
        return 0.0
    scale = half_life_s / LN2
    return scale * (2.0 ** (-(now - end) / half_life_s) - 2.0 ** (-(now - start) / half_life_s))


def average_gpus(usage_s: float, half_life_s: float) -> float:
    """Decayed GPU-seconds as GPUs held on average: a team that held n GPUs forever has usage_s equal
    to n * half_life / ln 2, so this gives n, in the unit of `running`."""
    return usage_s * LN2 / half_life_s


def fold(usage_s: float, usage_at: float | None, claimed_at: float, ended_at: float,
         half_life_s: float) -> tuple[float, float]:
    """A team's decayed usage (usage_s as of usage_at) with one ended attempt added: (usage, as of when).
    What the ledger writes when an attempt ends (app/usage/ledger.py)."""
    then = ended_at if usage_at is None else usage_at
    now = max(then, ended_at)
    return decayed(usage_s, now - then, half_life_s) + used_between(claimed_at, ended_at, now, half_life_s), now


@dataclass(frozen=True)
class TeamShare:
    """One team as the scheduler sees it at one moment. Its share, the lower the sooner its jobs run, is
    (recent_gpus + what its running jobs count for, RUNNING_COUNTS_S each, in the same unit) / weight."""

    team_id: str
    weight: float
    running: int = 0  # its jobs holding a GPU now, of every class
    recent_gpus: float = 0.0  # average_gpus() of its decayed usage, finished and running attempts
    max_running: int | None = None
    budget_left_s: float | None = None  # GPU-seconds left in its monthly budget; None: no budget
    half_life_s: float = DEFAULT_HALF_LIFE_S  # the decay recent_gpus was computed with
    disabled: bool = False  # by an admin: none of its jobs starts, whatever its quota
    # GPU-seconds its running jobs will still use, each as projection() projects it; None: RUNNING_COUNTS_S each.
    to_come_s: float | None = None
    # Its running jobs whose pace is not known yet (to_come_s counts them for all their time limit leaves), for a
    # person (service.budget_said).
    unpaced: int = 0
    # What a job it starts counts for its budget until its pace is known: all of its time limit (projection()).
    job_time_limit_s: float = DEFAULT_JOB_TIME_LIMIT_S
    # Its jobs queued again mid-run (Waiting.continuing), or being preempted to be: the budget does not hold them
    # back, so they will run again past it. Each counts for a time limit (what its next attempt may use, as a job
    # started counts until its pace shows). Read for a team with a budget only (service.team_shares).
    resuming: int = 0

    @property
    def still_to_come_s(self) -> float:
        """What the budget holds back for the jobs running now and those that will resume (blocked_by)."""
        return self._running_to_come_s + self.resuming * self.job_time_limit_s

    @property
    def _running_to_come_s(self) -> float:
        return self.running * RUNNING_COUNTS_S if self.to_come_s is None else self.to_come_s

    @property
    def share(self) -> float:
        return self.share_if(0)

    def share_if(self, more_running: int, more_used_s: float = 0.0) -> float:
        """The share with more_running more jobs running (fewer if negative) and more_used_s more GPU time used."""
        to_come = (self.running + more_running) * RUNNING_COUNTS_S + more_used_s
        return (self.recent_gpus + average_gpus(to_come, self.half_life_s)) / self.weight

    def blocked_by(self, continuing: bool = False) -> str | None:
        """What keeps this team from starting another job now, if anything: its being disabled, else a quota.
        `continuing`: for a job the service queued again mid-run (Waiting.continuing), which the monthly budget
        does not hold back: it holds back starts, and such a job started with budget left, to run to its end.

        The budget counts each job running now for the GPU time it still has to come (still_to_come_s: at its
        pace, projection(), RUNNING_COUNTS_S at least; where its pace is not known yet, all that its time limit
        leaves it): a job starts only while what is left exceeds that. Counting only what they had used so far, a
        team with seconds left started a job on every free GPU at once (each start had "budget left"); counting
        RUNNING_COUNTS_S for each, a team with an hour left started 12 jobs that each ran for hours, and ran past its
        month by as many GPU-hours, first one after another, then (once a running job counted its pace) all 12 in
        one moment, before any had a pace. Now a job running with 3 hours to go holds back a team with 1 hour left,
        one with 10 minutes to go does not, and one that has just started holds it back until its pace shows.

        A job queued again mid-run (`resuming`) counts for a time limit too: counting nothing while it waited (5
        minutes while it paused), a team with an hour left whose one job with 3 hours to go was preempted started a
        new job at once, and the preempted one then resumed past the budget as well: two jobs over, not one."""
        if self.disabled:
            return FOR_TEAM_DISABLED
        if self.budget_left_s is not None and not continuing and \
                self.budget_left_s - self.still_to_come_s <= 0:
            return FOR_BUDGET
        if self.max_running is not None and self.running >= self.max_running:
            return FOR_MAX_RUNNING
        return None

    def with_running(self, delta: int, continuing: bool = False) -> TeamShare:
        """The team once it starts delta more jobs (a claim: 1; `continuing`: jobs it had to resume), or stops -delta
        (a preemption: -1). A job started has no pace yet: it counts all of its time limit (projection()), as it will
        once the claim reads it running. A job preempted gives back RUNNING_COUNTS_S, not its projection, and is one
        more to resume: it is queued again mid-run and goes on past the budget (Waiting.continuing)."""
        if delta > 0:
            return replace(self, running=self.running + delta, unpaced=self.unpaced + delta,
                           to_come_s=self._running_to_come_s + delta * self.job_time_limit_s,
                           resuming=max(self.resuming - delta, 0) if continuing else self.resuming)
        to_come = None if self.to_come_s is None else max(self.to_come_s + delta * RUNNING_COUNTS_S, 0.0)
        return replace(self, running=self.running + delta, to_come_s=to_come, resuming=self.resuming - delta)

    def expecting(self, continuing: int) -> TeamShare:
        """The team counting at least `continuing` jobs to resume: those queued in the class being scheduled, where
        a budgeted team's share was read without them (one made by hand)."""
        if self.budget_left_s is None or continuing <= self.resuming:
            return self
        return replace(self, resuming=continuing)

    @classmethod
    def at(cls, team_id: str, now: float, half_life_s: float, *, weight: float, usage_s: float,
           usage_at: float | None, running_since: Iterable[float], max_running: int | None = None,
           budget_left_s: float | None = None, disabled: bool = False,
           to_come_s: Iterable[float] | None = None, unpaced: int = 0,
           job_time_limit_s: float = DEFAULT_JOB_TIME_LIMIT_S, resuming: int = 0) -> TeamShare:
        """The team at `now`: its folded usage (as of usage_at) decayed to now, plus the attempts still
        running (claimed at running_since), which count up to now; `to_come_s`, the GPU-seconds each running job
        still has to come (projection(); None: RUNNING_COUNTS_S each), `unpaced` of them with no pace yet; `resuming`, its
        jobs queued again mid-run or being preempted to be."""
        claims = list(running_since)
        usage = decayed(usage_s, now - usage_at, half_life_s) if usage_at is not None else 0.0
        usage += sum(used_between(claimed, now, now, half_life_s) for claimed in claims)
        return cls(team_id=team_id, weight=weight, running=len(claims), recent_gpus=average_gpus(usage, half_life_s),
                   max_running=max_running, budget_left_s=budget_left_s, half_life_s=half_life_s, disabled=disabled,
                   to_come_s=None if to_come_s is None else sum(to_come_s), unpaced=unpaced,
                   job_time_limit_s=job_time_limit_s, resuming=resuming)


def projection(now: float, claimed_at: float, finish_at: float | None, time_limit_s: float, *,
               stopping: bool = False) -> tuple[float, bool]:
    """(to come, unpaced): the GPU-seconds a running job will still use, as the budget counts it: until its last step at its current
    pace (`finish_at`, jobs.pace.finish_s), RUNNING_COUNTS_S at least (merging and the eval report come after the last
    step), and never past what its attempt's time limit (QLORA_JOB_TIME_LIMIT_S from its claim) leaves it: the worker
    ends it there. A job still running at its time limit counts RUNNING_COUNTS_S too: it holds its GPU until its
    worker stops it.

    A job whose pace is not known yet (finish_at None: loading its model, fewer than two train points since its claim,
    or no total counted yet) counts all that its time limit leaves: the most it can use, as Slurm's safe limits count
    a job's time limit before they start it. Counted as RUNNING_COUNTS_S, a team with an hour left started 12 jobs in
    one moment (12 x 5 minutes), each of which then ran for hours. So a team whose budget left is under one time limit
    starts one job, then the next once the first shows a pace that leaves room for it; one with more starts as many as
    their time limits fit in it, and never overruns it for want of a pace. `stopping` (pausing or cancelling, which
    have no pace): it ends after its current step, RUNNING_COUNTS_S.

    `unpaced`: whether it counts for what its time limit leaves for want of a pace (service.budget_said says so). Not a
    job past its time limit, which counts RUNNING_COUNTS_S: said to count "the rest of its time limit", it read as
    hours to come where there are minutes."""
    left_s = claimed_at + time_limit_s - now
    if finish_at is None:
        return (RUNNING_COUNTS_S, False) if stopping or left_s <= RUNNING_COUNTS_S else (left_s, True)
    return min(max(finish_at - now, RUNNING_COUNTS_S), max(left_s, RUNNING_COUNTS_S)), False


@dataclass(frozen=True)
class Waiting:
    """A queued job."""

    job_id: str
    team_id: str
    priority: int  # PRIORITIES
    created_at: float  # seconds; a preempted job keeps its place in its team
    # Queued again by the service mid-run (preempted, handed back, its worker lost, out of memory): the monthly
    # budget does not hold it back. Before, a job preempted once its team had spent its budget waited, a GPU idle,
    # until the next month, cut off midway, where a job that was not preempted ran to its end.
    continuing: bool = False

    def team_order(self) -> tuple:
        return (-self.priority, self.created_at, self.job_id)


@dataclass(frozen=True)
class Running:
    """A job holding a GPU of the class being scheduled."""

    job_id: str
    team_id: str
    priority: int
    claimed_at: float  # the current attempt's claim, in seconds


@dataclass(frozen=True)
class Preemption:
    victim: Running
    for_job: Waiting


def claim_order(waiting: Iterable[Waiting], teams: Mapping[str, TeamShare]) -> list[tuple[Waiting, str | None]]:
    """Every waiting job, in the order the claims of one GPU class take them if no job ends meanwhile,
    each with what it waits for beyond a free GPU (None: a free GPU is all it needs; else the quota that
    holds it back). The next claim takes the first job whose reason is None.

    Each job given a GPU raises its team's share before the next is chosen, so a team gets GPUs in
    turn with the others rather than all at once. Teams of equal share go by their next job's age (_turn).
    Jobs held back by a quota come last, then a disabled team's.
    """
    by_team: dict[str, list[Waiting]] = {}
    for job in waiting:
        by_team.setdefault(job.team_id, []).append(job)
    teams = _expecting(teams, (job for jobs in by_team.values() for job in jobs))
    held: list[tuple[float, tuple, Waiting, str]] = []
    for team_id, jobs in by_team.items():
        jobs.sort(key=Waiting.team_order, reverse=True)  # each team's next job at the end: pop()
        team = teams[team_id]
        if team.blocked_by() == FOR_BUDGET:  # its jobs under way go on (Waiting.continuing); the others wait
            held += [(team.share, job.team_order(), job, FOR_BUDGET) for job in reversed(jobs) if not job.continuing]
            jobs[:] = [job for job in jobs if job.continuing]
    state = {team_id: teams[team_id] for team_id, jobs in by_team.items() if jobs}
    heap = [_turn(state[team_id], by_team[team_id][-1]) for team_id in state]
    heapq.heapify(heap)
    order: list[tuple[Waiting, str | None]] = []
    while heap:
        *_, team_id = heapq.heappop(heap)
        team, jobs = state[team_id], by_team[team_id]
        reason = team.blocked_by(continuing=jobs[-1].continuing)
        if reason == FOR_BUDGET:  # spent by the jobs given a GPU before: its starts wait, its continuing jobs go on
            held += [(team.share, job.team_order(), job, FOR_BUDGET) for job in reversed(jobs) if not job.continuing]
            jobs[:] = [job for job in jobs if job.continuing]
        elif reason is not None:
            held += [(team.share, job.team_order(), job, reason) for job in reversed(jobs)]
            continue
        else:
            started = jobs.pop()
            order.append((started, None))
            state[team_id] = team.with_running(1, started.continuing)
        if jobs:
            heapq.heappush(heap, _turn(state[team_id], jobs[-1]))
    # A disabled team's last of all: it waits for an admin, not for its quota to allow one more.
    held.sort(key=lambda item: (item[3] == FOR_TEAM_DISABLED, item[0], item[1]))
    return order + [(job, reason) for _, _, job, reason in held]


def next_to_claim(waiting: Iterable[Waiting], teams: Mapping[str, TeamShare]) -> Waiting | None:
    """The job the next claim takes: claim_order's first, found without ordering the rest (a worker
    asks this on every claim, and a busy class has thousands of jobs queued)."""
    waiting = list(waiting)
    teams = _expecting(teams, waiting)
    best: dict[str, Waiting] = {}
    for job in waiting:
        if teams[job.team_id].blocked_by(job.continuing) is not None:
            continue
        mine = best.get(job.team_id)
        if mine is None or job.team_order() < mine.team_order():
            best[job.team_id] = job
    return best[min(_turn(teams[team_id], job) for team_id, job in best.items())[-1]] if best else None


def _expecting(teams: Mapping[str, TeamShare], waiting: Iterable[Waiting]) -> Mapping[str, TeamShare]:
    """`teams`, each counting its continuing jobs in `waiting` as to resume (TeamShare.expecting)."""
    continuing = Counter(job.team_id for job in waiting if job.continuing)
    if not continuing:
        return teams
    return {**teams, **{team_id: teams[team_id].expecting(count) for team_id, count in continuing.items()}}


def _turn(team: TeamShare, next_job: Waiting) -> tuple[float, float, str, str]:
    """Which team's turn comes first: the lower share, and between equal shares (teams with no past and as many
    jobs running, as in a new pool) the team whose next job has waited longer: fair share, then age, as for the
    jobs of one team. Ties went by team id before, a random hex string: a team that queued one job waited
    behind a thousand queued after it by a team whose id sorted first."""
    return (team.share, next_job.created_at, next_job.job_id, team.team_id)


def plan_preemptions(waiting: Iterable[Waiting], running: Iterable[Running], teams: Mapping[str, TeamShare],
                     now: float, min_runtime_s: float, freeing: int = 0, *,
                     teams_after: dict[str, TeamShare] | None = None) -> list[Preemption]:
    """For one GPU class with no free GPU: which running jobs to pause, for which waiting jobs.

    `running` are the class's jobs that may be preempted (running, their worker alive); `freeing` counts
    GPUs of the class already being freed, by a job pausing (preempted, paused by its team or its team
    disabled) or cancelling whose worker is alive: the first waiting jobs will get those, so no second
    job is paused for them. Each preemption moves one GPU from the team furthest above its
    share to the next job in claim order, and only while the victim's team, without that job, stays
    PREEMPT_MARGIN above the waiting team with it: the plan stops when a swap would not make the shares
    clearly fairer.

    `teams_after`, when given, is updated to the teams as they will stand once the plan is carried out: each
    team whose job gets a GPU (freed or preempted) with one more job running, each victim's with one fewer. The
    service plans one GPU class after another with it, so that a team waiting in two classes is not given a GPU
    in each when its max_running or its budget lets it start only one: planned on the shares read before the
    pass, a team at max_running - 1 had a job of another team paused in every class it waited in, and the
    GPUs it could not take went back to the jobs just paused, each pause (a checkpoint saved and loaded)
    charged to their team for nothing.
    """
    teams = dict(teams)
    pending = sorted(waiting, key=lambda job: job.team_order())
    candidates = [job for job in running if now - job.claimed_at >= min_runtime_s]
    plan: list[Preemption] = []
    while pending:
        first = next_to_claim(pending, teams)
        if first is None:
            break
        pending.remove(first)
        claimant = teams[first.team_id]
        if freeing:  # a GPU already being freed goes to this job
            freeing -= 1
            teams[first.team_id] = claimant.with_running(1, first.continuing)
            continue
        # The waiting team as it would stand with the GPU: its new job counts for what it will surely use,
        # its minimum runtime (RUNNING_COUNTS_S at most, like any running job).
        with_gpu = claimant.share_if(0, min(min_runtime_s, RUNNING_COUNTS_S))
        victim = _victim(candidates, teams, first.team_id, with_gpu * (1 + PREEMPT_MARGIN))
        if victim is None:
            break
        candidates.remove(victim)
        teams[first.team_id] = claimant.with_running(1, first.continuing)
        teams[victim.team_id] = teams[victim.team_id].with_running(-1)
        plan.append(Preemption(victim=victim, for_job=first))
    if teams_after is not None:
        teams_after.update(teams)
    return plan


def _victim(candidates: list[Running], teams: Mapping[str, TeamShare], claimant: str,
            claimant_share: float) -> Running | None:
    """The lowest-priority, newest job of the team with the highest share, among the teams whose share
    without that job stays above claimant_share (Kueue's LessThanOrEqualToFinalShare, strict, with a
    margin): two teams that used the same never swap."""
    best: tuple | None = None
    for job in candidates:
        team = teams[job.team_id]
        if job.team_id == claimant or team.share_if(-1) <= claimant_share:
            continue
        key = (team.share, -job.priority, job.claimed_at, job.job_id)
        if best is None or key > best[0]:
            best = (key, job)
    return best[1] if best else None
