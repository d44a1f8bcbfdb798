"""Fair-share scheduling on a simulated GPU pool: the real rules (app/scheduling/policy.py) on a simulated clock.

    .venv/bin/python bench/scheduler_sim.py [--jobs 2000] [--gpus 16] [--seed 0] [--no-preemption] [--out PATH]

A discrete-event simulation, no sleeping: ten teams of different weights and job sizes share one GPU
class. Nine "heavy" teams queue their whole backlog at the start and keep every GPU busy; one "light"
team submits a short job now and then, the first 20 minutes in. The simulation does what the service does
(app/scheduling/service.py, app/usage/ledger.py), calling the same functions:

- A free GPU's worker claims policy.next_to_claim(the class's queued jobs, every team's
  TeamShare.at(now, ...)) at once: as soon as a job ends, a pause ends, or a job is submitted. (Claims
  take no time here, so utilisation is only lost to pauses.)
- When an attempt ends (finished or paused), policy.fold adds its GPU time, claim to end, to its
  team's decayed usage; a team's state between folds is TeamShare.at(its folded usage, the claim
  times of its jobs holding a GPU: running or pausing).
- With preemption on, every QLORA_SCHEDULER_INTERVAL_S the scheduler passes the jobs that have waited
  QLORA_PREEMPT_AFTER_WAIT_S, the running jobs not already pausing, and the number pausing (`freeing`)
  to policy.plan_preemptions with QLORA_MIN_RUNTIME_BEFORE_PREEMPT_S, and asks each victim to pause.
  A victim holds its GPU for --pause-cost more seconds (it finishes its step and saves a checkpoint;
  that time counts as pausing, not as work done), then is queued again with the work it has left,
  keeping its created_at and so its place in its team.

Every setting defaults to the service's own (app/config.py). It runs the workload twice, with
preemption and without (--no-preemption: only without), and reports:

- each team's share of the GPU time while every heavy team is backlogged (from the start to the first
  moment one of them has no job waiting) against its target: its weight over the heavy teams' weights
  (the light team takes what it needs, which is less than its weight's share; under weighted max-min
  fairness the heavy teams split the rest by weight). Target: relative error |share - target| / target
  <= 5 % for every heavy team;
- the worst wait of a light team's job from submission to its first start. Target: with preemption,
  within the minimum runtime before preemption (or the wait before preempting, if longer) plus one
  scheduler tick plus one pause; without, within the longest job in the pool;
- preemptions, and GPU utilisation: GPU-time busy (training or pausing) over the GPU-time there was
  demand for (min(GPUs, jobs submitted and not finished) at each moment). Target: >= 97 %. The useful
  share (training only, pauses excluded) is reported beside it.

It prints the tables, writes the JSON (--out) and exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: app/ imports from this checkout

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from app.config import Settings  # noqa: E402
from app.scheduling import policy  # noqa: E402
from app.scheduling.policy import PRIORITIES, Running, TeamShare, Waiting  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "scheduler_sim.json"
console = Console(width=None if sys.stdout.isatty() else 120)


def service_default(name: str) -> float:
    """The service's own setting, so the simulation schedules as a deployment left at its defaults does."""
    return Settings.model_fields[name].default


SHARE_TOLERANCE = 0.05  # the "within 5 % of weights", as a relative error per team
UTILISATION_TARGET = 0.97
HOUR, MINUTE = 3600.0, 60.0

# (name, weight, typical job in minutes). Heavy teams: each queues work in proportion to its weight (times
# a random 1-1.5, so they run out at different times), in jobs around its typical size: sweeps of short
# jobs, runs of several hours. The light team, last, submits a short job every few hours.
TEAMS = [
    ("atlas", 8, 90), ("borealis", 6, 240), ("cobalt", 5, 45), ("delta", 4, 120), ("ember", 3, 20),
    ("fjord", 2, 180), ("granite", 2, 60), ("harbor", 1, 30), ("iris", 1, 300),
    ("juniper", 1, 15),
]
LIGHT = {"juniper"}
LIGHT_JOB_SHARE = 0.02  # of --jobs: 40 of 2,000
# The light team's first job comes when the heavy teams' first jobs have just passed their minimum
# runtime and no team has much of a past: the case where a new pool must still let it in.
FIRST_LIGHT_JOB_S = 20 * MINUTE
JOB_SPREAD = 0.6  # sigma of the log-normal job sizes around a team's typical one
SHORTEST_JOB_S, LONGEST_JOB_S = 5 * MINUTE, 10 * HOUR
PRIORITY_MIX = [("high", 0.1), ("normal", 0.7), ("low", 0.2)]


# ---------------------------------------------------------------- the workload


@dataclass(eq=False)
class Job:
    id: str
    team: str
    priority: int
    created_at: float
    work_s: float  # GPU-seconds of training it needs
    done_s: float = 0.0
    state: str = "future"  # future → queued → running (→ pausing → queued …) → done
    queued_at: float = 0.0  # when it was last queued (its message sent): the wait plan_preemptions asks for
    claimed_at: float = 0.0  # the current attempt's claim
    attempt: int = 0
    first_start: float | None = None
    preempted: int = 0

    def __post_init__(self) -> None:
        self.waiting = Waiting(self.id, self.team, self.priority, self.created_at)
        self.order = self.waiting.team_order()  # its place in its team's queue, kept across preemptions


def make_workload(jobs: int, gpus: int, seed: int) -> list[Job]:
    """Every job of the run, heavy teams' at time 0, the light team's spread over the busy period."""
    rng = random.Random(seed)
    light_jobs = max(3, round(jobs * LIGHT_JOB_SHARE))
    heavy = [(name, weight, minutes, rng.uniform(1.0, 1.5)) for name, weight, minutes in TEAMS if name not in LIGHT]
    # Job counts so that each team's work is its weight times its factor: count ∝ weight * factor / typical size.
    pull = [weight * factor / minutes for _, weight, minutes, factor in heavy]
    counts = _apportion(jobs - light_jobs, pull)
    out: list[Job] = []
    heavy_work = 0.0
    for (name, _weight, minutes, _factor), count in zip(heavy, counts, strict=True):
        sizes = [min(max(rng.lognormvariate(math.log(minutes * MINUTE), JOB_SPREAD), SHORTEST_JOB_S), LONGEST_JOB_S)
                 for _ in range(count)]
        scale = count * minutes * MINUTE / sum(sizes)  # the team's work exactly count x typical size
        for i, size in enumerate(sizes):
            # Queued at once (a script in a loop); equal ages are ordered by id, so ids keep the loop's order.
            out.append(Job(f"{name}-{i:04d}", name, _priority(rng), created_at=0.0, work_s=size * scale))
        heavy_work += count * minutes * MINUTE
    busy_for = heavy_work / gpus  # about how long the heavy teams keep the pool full
    for name, _weight, minutes in (t for t in TEAMS if t[0] in LIGHT):
        # The first soon after the start, when no team has much of a past; the others over the busy period.
        arrivals = [FIRST_LIGHT_JOB_S] + sorted(rng.uniform(0.02, 0.8) * busy_for for _ in range(light_jobs - 1))
        for i, at in enumerate(arrivals):
            size = min(max(rng.lognormvariate(math.log(minutes * MINUTE), JOB_SPREAD), SHORTEST_JOB_S), 2 * minutes * MINUTE)
            out.append(Job(f"{name}-{i:04d}", name, _priority(rng), created_at=at, work_s=size))
    return out


def _apportion(total: int, pull: list[float]) -> list[int]:
    """total split in proportion to pull, in whole numbers that add up to it (largest remainders)."""
    exact = [total * p / sum(pull) for p in pull]
    counts = [max(1, int(e)) for e in exact]
    for i in sorted(range(len(pull)), key=lambda i: exact[i] - int(exact[i]), reverse=True)[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _priority(rng: random.Random) -> int:
    name = rng.choices([n for n, _ in PRIORITY_MIX], [w for _, w in PRIORITY_MIX])[0]
    return PRIORITIES[name]


# ---------------------------------------------------------------- the simulation


@dataclass
class Config:
    gpus: int
    preemption: bool
    half_life_s: float
    interval_s: float
    min_runtime_s: float
    preempt_after_wait_s: float
    pause_cost_s: float


@dataclass(eq=False)
class Team:
    name: str
    weight: float
    light: bool
    usage_s: float = 0.0  # decayed GPU-seconds, as of usage_at (the teams table's fair_share_usage_s / _at)
    usage_at: float | None = None
    holding: dict[str, float] = field(default_factory=dict)  # job id → claim time, running or pausing
    queue: list[tuple[tuple, Job]] = field(default_factory=list)  # queued jobs in team order
    held_s: float = 0.0  # GPU-seconds held while every heavy team was backlogged


# At one instant: attempts end first (their GPUs are free), then submissions, then claims, then the tick.
END, PAUSED, SUBMIT = 0, 1, 2


class Simulation:
    def __init__(self, config: Config, jobs: list[Job]):
        self.c = config
        self.jobs = jobs
        self.teams = {name: Team(name, weight, name in LIGHT) for name, weight, _ in TEAMS}
        self.events: list[tuple[float, int, int, Job, int]] = []  # (time, kind, seq, job, attempt)
        self.seq = 0
        self.now = 0.0
        self.free = config.gpus
        self.pausing: set[Job] = set()
        self.running: dict[Job, Running] = {}  # holding a GPU and not pausing: what may be preempted
        self.unfinished = 0  # submitted and not done: the demand for GPUs
        self.preemptions = 0
        self.claims = 0
        # Integrals over time, in GPU-seconds.
        self.busy_s = self.pausing_s = self.demand_s = 0.0
        self.window_end: float | None = None  # the first moment a heavy team had no job waiting

    # ------------------------------------------------ the service's moves

    def shares(self) -> dict[str, TeamShare]:
        """Every team as the scheduler reads it from the database (service.team_shares)."""
        return {t.name: TeamShare.at(t.name, self.now, self.c.half_life_s, weight=t.weight, usage_s=t.usage_s,
                                     usage_at=t.usage_at, running_since=t.holding.values())
                for t in self.teams.values()}

    def heads(self, per_team: int, ready: bool = False) -> list[Waiting]:
        """Each team's first `per_team` queued jobs in its own order (priority, then age), of those that
        have waited QLORA_PREEMPT_AFTER_WAIT_S if `ready`. The rules take a team's jobs in that order, so
        k picks can only take from its first k: passing these instead of every queued job gives the same
        answer, faster."""
        out: list[Waiting] = []
        patience = self.c.preempt_after_wait_s
        for team in self.teams.values():
            taken = 0
            for _, job in team.queue:
                if taken == per_team:
                    break
                if ready and (self.now - job.queued_at < patience or self.now - job.created_at < patience):
                    continue
                out.append(job.waiting)
                taken += 1
        return out

    def claim_free_gpus(self) -> None:
        """Each free GPU's worker claims the best queued job now (service.claim_next)."""
        while self.free > 0:
            chosen = policy.next_to_claim(self.heads(1), self.shares())
            if chosen is None:
                return
            self.start(self.by_id[chosen.job_id])

    def start(self, job: Job) -> None:
        team = self.teams[job.team]
        team.queue.remove((job.order, job))
        self.note_backlog(team)
        job.state, job.claimed_at, job.attempt = "running", self.now, job.attempt + 1
        if job.first_start is None:
            job.first_start = self.now
        team.holding[job.id] = self.now
        self.running[job] = Running(job.id, job.team, job.priority, self.now)
        self.free -= 1
        self.claims += 1
        self.push(self.now + job.work_s - job.done_s, END, job)

    def end_attempt(self, job: Job) -> None:
        """The ledger closes the attempt (claim to now) and folds it into the team's usage (ledger.end)."""
        team = self.teams[job.team]
        team.usage_s, team.usage_at = policy.fold(team.usage_s, team.usage_at, job.claimed_at, self.now,
                                                  self.c.half_life_s)
        del team.holding[job.id]
        self.running.pop(job, None)
        self.pausing.discard(job)
        self.free += 1

    def finish(self, job: Job) -> None:
        self.end_attempt(job)
        job.state, job.done_s = "done", job.work_s
        self.unfinished -= 1

    def paused(self, job: Job) -> None:
        """A preempted job saved its checkpoint: the GPU is free and the job queued again (requeue_preempted)."""
        self.end_attempt(job)
        self.enqueue(job)

    def enqueue(self, job: Job) -> None:
        # Its message goes out now (the service sends a requeued job's at the scheduler's next pass, within
        # one interval: a few seconds more before it counts as waiting for preemption).
        job.state, job.queued_at = "queued", self.now
        bisect.insort(self.teams[job.team].queue, (job.order, job), key=lambda item: item[0])

    def tick(self) -> None:
        """One scheduler pass (service._preempt): pause the jobs plan_preemptions names."""
        candidates = list(self.running.values())
        if not any(self.now - r.claimed_at >= self.c.min_runtime_s for r in candidates):
            return  # nothing may be preempted yet: the plan would be empty
        freeing = len(self.pausing)
        shares = self.shares()
        # Without GPUs being freed, the plan starts with the first job in claim order, and one job per
        # team is enough to find it; only when it preempts can a team's later jobs matter.
        plan = policy.plan_preemptions(self.heads(1, ready=True), candidates, shares, self.now, self.c.min_runtime_s,
                                       freeing) if freeing == 0 else None
        if plan is None or plan:
            plan = policy.plan_preemptions(self.heads(freeing + len(candidates) + 1, ready=True), candidates, shares,
                                           self.now, self.c.min_runtime_s, freeing)
        for preemption in plan:
            self.preempt(self.by_id[preemption.victim.job_id])

    def preempt(self, job: Job) -> None:
        """Asked to pause: it keeps its GPU for the pause (a step and a checkpoint), then frees it. Its
        training up to the request is kept; the pause itself trains nothing."""
        job.state = "pausing"
        del self.running[job]
        self.pausing.add(job)
        self.preemptions += 1
        job.preempted += 1
        ends_at = job.claimed_at + job.work_s - job.done_s
        if ends_at <= self.now + self.c.pause_cost_s:
            return  # it finishes before its checkpoint would be saved: its END event stands
        job.done_s += self.now - job.claimed_at
        job.attempt += 1  # its END event is void
        self.push(self.now + self.c.pause_cost_s, PAUSED, job)

    # ------------------------------------------------ the clock

    def push(self, at: float, kind: int, job: Job) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, job, job.attempt))

    def note_backlog(self, team: Team) -> None:
        if self.window_end is None and not team.light and not team.queue:
            self.window_end = self.now

    def advance(self, to: float) -> None:
        """Integrate what the GPUs did from now to `to`, then move the clock."""
        dt = to - self.now
        if dt > 0:
            held = self.c.gpus - self.free
            self.busy_s += held * dt
            self.pausing_s += len(self.pausing) * dt
            self.demand_s += min(self.c.gpus, self.unfinished) * dt
            if self.window_end is None:
                for team in self.teams.values():
                    team.held_s += len(team.holding) * dt
        self.now = to

    def run(self) -> None:
        self.by_id = {job.id: job for job in self.jobs}
        for job in self.jobs:
            self.push(job.created_at, SUBMIT, job)
        next_tick = 0.0 if self.c.preemption else math.inf
        interval = self.c.interval_s if self.c.interval_s > 0 else 1.0
        while self.events:
            if next_tick < self.events[0][0]:
                self.advance(next_tick)
                if any(t.queue for t in self.teams.values()):
                    self.tick()
                next_tick += interval
                continue
            at, kind, _, job, attempt = heapq.heappop(self.events)
            self.advance(at)
            if kind == SUBMIT:
                self.unfinished += 1
                self.enqueue(job)
            elif attempt == job.attempt:  # else a void END of a preempted attempt
                self.finish(job) if kind == END else self.paused(job)
            if not self.events or self.events[0][0] > self.now:
                self.claim_free_gpus()  # once everything of this instant has happened
        if self.window_end is None:
            self.window_end = self.now


# ---------------------------------------------------------------- the report


def measure(sim: Simulation, workload: list[Job]) -> dict:
    c = sim.c
    heavy = [t for t in sim.teams.values() if not t.light]
    heavy_weight = sum(t.weight for t in heavy)
    heavy_held = sum(t.held_s for t in heavy)
    window_held = sum(t.held_s for t in sim.teams.values())
    teams: list[dict[str, Any]] = []
    for t in sim.teams.values():
        mine = [j for j in workload if j.team == t.name]
        # The light team takes what it needs, less than its weight's slice: the heavy teams split the rest.
        target = share = off_by_s = None
        if not t.light and heavy_held:
            target, share = t.weight / heavy_weight, t.held_s / heavy_held
            off_by_s = abs(share - target) * heavy_held
        longest_s = max(j.work_s for j in mine)
        teams.append({
            "team": t.name, "weight": t.weight, "light": t.light, "jobs": len(mine),
            "gpu_hours": sum(j.work_s for j in mine) / HOUR, "longest_job_s": longest_s,
            "window_gpu_hours": t.held_s / HOUR,
            "share_of_pool": t.held_s / window_held if window_held else 0.0,
            "target": target, "share": share,
            "relative_error": None if target is None or share is None else abs(share - target) / target,
            "off_by_gpu_hours": None if off_by_s is None else off_by_s / HOUR,
            # Without preemption a team gets GPU time in whole jobs: no closer than one of its jobs.
            "within_one_job": None if off_by_s is None else off_by_s <= longest_s,
            "preempted": sum(j.preempted for j in mine),
        })
    heavy_rows = [row for row in teams if row["relative_error"] is not None]
    worst: float = max(row["relative_error"] for row in heavy_rows)
    if c.preemption:
        shares_ok = worst <= SHARE_TOLERANCE
        shares_what = "largest relative error of a heavy team's share while all are backlogged"
    else:
        shares_ok = all(row["relative_error"] <= SHARE_TOLERANCE or row["within_one_job"] for row in heavy_rows)
        shares_what = ("largest relative error of a heavy team's share while all are backlogged; without preemption "
                       "a team may miss 5 % by less than one of its own jobs (it gets GPU time in whole jobs)")
    light_waits = [j.first_start - j.created_at for j in workload if j.team in LIGHT and j.first_start is not None]
    longest = max(j.work_s for j in workload)
    wait_bound = (max(c.min_runtime_s, c.preempt_after_wait_s) + c.interval_s + c.pause_cost_s if c.preemption
                  else longest)
    utilisation = sim.busy_s / sim.demand_s if sim.demand_s else 1.0
    useful = (sim.busy_s - sim.pausing_s) / sim.demand_s if sim.demand_s else 1.0
    checks = {
        "shares": {"value": worst, "target": SHARE_TOLERANCE, "ok": shares_ok, "what": shares_what},
        "light_wait": {"value": max(light_waits), "target": wait_bound, "ok": max(light_waits) <= wait_bound,
                       "what": "worst wait of a light team's job from submission to its first start, seconds"},
        "utilisation": {"value": utilisation, "target": UTILISATION_TARGET, "ok": utilisation >= UTILISATION_TARGET,
                        "what": "GPU-time busy (training or pausing) / GPU-time with demand"},
    }
    return {
        "preemption": c.preemption, "teams": teams,
        "window_s": sim.window_end, "makespan_s": sim.now,
        "light_jobs": len(light_waits), "light_worst_wait_s": max(light_waits),
        "light_mean_wait_s": sum(light_waits) / len(light_waits),
        "longest_job_s": longest, "preemptions": sim.preemptions, "claims": sim.claims,
        "utilisation": utilisation, "useful_utilisation": useful,
        "pausing_gpu_hours": sim.pausing_s / HOUR,
        "checks": checks, "ok": all(check["ok"] for check in checks.values()),
    }


def config_from(args: argparse.Namespace, preemption: bool) -> Config:
    return Config(gpus=args.gpus, preemption=preemption, half_life_s=args.half_life, interval_s=args.interval,
                  min_runtime_s=args.min_runtime, preempt_after_wait_s=args.preempt_after_wait,
                  pause_cost_s=args.pause_cost)


def simulate(args: argparse.Namespace, preemption: bool) -> dict:
    workload = make_workload(args.jobs, args.gpus, args.seed)
    sim = Simulation(config_from(args, preemption), workload)
    started = time.perf_counter()
    sim.run()
    result = measure(sim, workload)
    result["seconds_to_simulate"] = time.perf_counter() - started
    return result


def _duration(seconds: float) -> str:
    if seconds < 2 * MINUTE:
        return f"{seconds:.0f} s"
    if seconds < 2 * HOUR:
        return f"{seconds / MINUTE:.1f} min"
    if seconds < 48 * HOUR:
        return f"{seconds / HOUR:.1f} h"
    return f"{seconds / (24 * HOUR):.1f} d"


def print_report(results: dict) -> None:
    c, runs = results["config"], results["runs"]
    names = list(runs)
    first = runs[names[0]]
    table = Table(title=f"Fair share on {c['gpus']} GPUs, {c['jobs']:,} jobs, seed {c['seed']}: each team's share "
                        "of the GPU time while every heavy team is backlogged")
    for col in ("team", "weight", "jobs", "typical job", "target"):
        table.add_column(col, justify="left" if col == "team" else "right")
    for name in names:
        table.add_column(f"share ({name})", justify="right")
        table.add_column("error", justify="right")
    typical = {n: m for n, _, m in TEAMS}
    for i, row in enumerate(first["teams"]):
        cells = [row["team"] + (" (light)" if row["light"] else ""), f"{row['weight']:g}", str(row["jobs"]),
                 _duration(typical[row["team"]] * MINUTE),
                 "-" if row["target"] is None else f"{row['target']:.2%}"]
        for name in names:
            r = runs[name]["teams"][i]
            if r["share"] is None:
                cells += [f"({r['share_of_pool']:.2%} of pool)", "-"]
            else:
                note = " (< 1 job)" if r["relative_error"] > SHARE_TOLERANCE and r["within_one_job"] else ""
                cells += [f"{r['share']:.2%}", f"{r['relative_error']:.1%}{note}"]
        table.add_row(*cells)
    console.print(table)
    console.print("target: the team's weight over the heavy teams' weights; error: |share - target| / target. "
                  "(< 1 job): off by less than one of the team's own jobs, as close as whole jobs allow without "
                  "preemption.", soft_wrap=False)

    summary = Table(title="Targets")
    summary.add_column("", justify="left")
    for name in names:
        summary.add_column(name, justify="right")
    rows = [
        ("backlogged window / makespan", lambda r: f"{_duration(r['window_s'])} / {_duration(r['makespan_s'])}"),
        ("worst share error (<= 5 %)", lambda r: _mark(r, "shares", f"{r['checks']['shares']['value']:.1%}" + (
            " (< 1 job)" if r["checks"]["shares"]["value"] > SHARE_TOLERANCE and r["checks"]["shares"]["ok"] else ""))),
        ("light job: worst wait (target)", lambda r: _mark(r, "light_wait", f"{_duration(r['light_worst_wait_s'])} "
                                                              f"({_duration(r['checks']['light_wait']['target'])})")),
        ("light job: mean wait", lambda r: _duration(r["light_mean_wait_s"])),
        ("preemptions", lambda r: f"{r['preemptions']:,}"),
        ("utilisation (>= 97 %)", lambda r: _mark(r, "utilisation", f"{r['utilisation']:.2%}")),
        ("useful work (pauses excluded)", lambda r: f"{r['useful_utilisation']:.2%}"),
        ("simulated in", lambda r: f"{r['seconds_to_simulate']:.1f} s"),
    ]
    for label, cell in rows:
        summary.add_row(label, *(cell(runs[name]) for name in names))
    console.print(summary)


def _mark(run: dict, check: str, text: str) -> str:
    return text + ("" if run["checks"][check]["ok"] else "  MISSED")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2000, help="jobs in the workload (default 2000)")
    p.add_argument("--gpus", type=int, default=16, help="GPUs in the one class (default 16)")
    p.add_argument("--seed", type=int, default=0, help="the workload's random seed (default 0)")
    p.add_argument("--no-preemption", action="store_true", help="only the run without preemption (default: both)")
    p.add_argument("--half-life", type=float, default=service_default("fair_share_half_life_s"),
                   help="QLORA_FAIR_SHARE_HALF_LIFE_S (default: the service's)")
    p.add_argument("--interval", type=float, default=service_default("scheduler_interval_s"),
                   help="QLORA_SCHEDULER_INTERVAL_S (default: the service's)")
    p.add_argument("--min-runtime", type=float, default=service_default("min_runtime_before_preempt_s"),
                   help="QLORA_MIN_RUNTIME_BEFORE_PREEMPT_S (default: the service's)")
    p.add_argument("--preempt-after-wait", type=float, default=service_default("preempt_after_wait_s"),
                   help="QLORA_PREEMPT_AFTER_WAIT_S (default: the service's)")
    p.add_argument("--pause-cost", type=float, default=60.0,
                   help="seconds a preempted job holds its GPU to finish its step and save a checkpoint (default 60)")
    p.add_argument("--out", "--json", type=Path, default=DEFAULT_OUT,
                   help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = {"preemption off": simulate(args, preemption=False)} if args.no_preemption else {
        "preemption on": simulate(args, preemption=True), "preemption off": simulate(args, preemption=False)}
    config = {key: value for key, value in vars(args).items() if key != "out"}
    results = {"config": config, "runs": runs, "ok": all(run["ok"] for run in runs.values())}
    print_report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results written to {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
