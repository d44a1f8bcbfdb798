"""Fair-share scheduling rules (app/scheduling/policy.py) as a user of a shared pool notices them: who
gets the next GPU, why a job waits, whose job is paused for whom, and the decay behind it all."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from app.config import Settings
from app.jobs import pace, states
from app.scheduling.policy import (
    DEFAULT_JOB_TIME_LIMIT_S,
    FOR_BUDGET,
    FOR_MAX_RUNNING,
    FOR_TEAM_DISABLED,
    PRIORITIES,
    RUNNING_COUNTS_S,
    Running,
    TeamShare,
    Waiting,
    average_gpus,
    claim_order,
    decayed,
    fold,
    next_to_claim,
    plan_preemptions,
    projection,
    used_between,
)

HOUR = 3600.0
HALF_LIFE = 7 * 24 * HOUR  # QLORA_FAIR_SHARE_HALF_LIFE_S's default
NOW = 1_000_000_000.0
MIN_RUNTIME = 600.0
LOW, NORMAL, HIGH = PRIORITIES["low"], PRIORITIES["normal"], PRIORITIES["high"]


def to_come_s(now: float, claimed_at: float, finish_at: float | None, time_limit_s: float, *,
              stopping: bool = False) -> float:
    """projection()'s GPU-seconds: what a running job counts for its team's budget."""
    return projection(now, claimed_at, finish_at, time_limit_s, stopping=stopping)[0]


def team(name: str, *, weight: float = 1.0, used_h: float = 0.0, running_for_h: tuple[float, ...] = (),
         max_running: int | None = None, budget_left_s: float | None = None) -> TeamShare:
    """A team as the service reads it now: used_h GPU-hours folded in just now, and one job running for
    each entry of running_for_h (for that many hours so far)."""
    return TeamShare.at(name, NOW, HALF_LIFE, weight=weight, usage_s=used_h * HOUR, usage_at=NOW if used_h else None,
                        running_since=[NOW - hours * HOUR for hours in running_for_h], max_running=max_running,
                        budget_left_s=budget_left_s)


def job(job_id: str, team_id: str, *, priority: int = NORMAL, age_h: float = 1.0) -> Waiting:
    return Waiting(job_id, team_id, priority, created_at=NOW - age_h * HOUR)


def running(job_id: str, team_id: str, *, for_h: float, priority: int = NORMAL) -> Running:
    return Running(job_id, team_id, priority, claimed_at=NOW - for_h * HOUR)


def ids(order) -> list[str]:
    return [waiting.job_id for waiting, _ in order]


def teams_of(*shares: TeamShare) -> dict[str, TeamShare]:
    return {share.team_id: share for share in shares}


# ---------------------------------------------------------------- who runs next


def test_the_team_that_used_less_goes_first_even_with_an_older_or_higher_priority_job_elsewhere():
    teams = teams_of(team("heavy", used_h=50), team("light", used_h=2))
    waiting = [job("heavy-1", "heavy", priority=HIGH, age_h=48), job("light-1", "light", priority=LOW, age_h=0.1)]

    assert next_to_claim(waiting, teams).job_id == "light-1"
    assert ids(claim_order(waiting, teams)) == ["light-1", "heavy-1"]


def test_gpu_time_used_decides_not_the_gpus_a_team_happens_to_hold_this_instant():
    # big (weight 3) holds a GPU now but used 25 GPU-hours, 8.3 per weight; small (weight 1) holds none but
    # used 12. big goes first: otherwise a team whose slice is under one GPU would get one whenever it
    # asked, far more than its weight.
    teams = teams_of(team("big", weight=3, used_h=24, running_for_h=(1,)), team("small", weight=1, used_h=12))

    assert next_to_claim([job("s", "small", age_h=10), job("b", "big", age_h=1)], teams).job_id == "b"


def test_weights_divide_use_a_team_of_weight_two_may_use_twice_as_much():
    waiting = [job("a", "double"), job("b", "single")]
    # 30 GPU-hours at weight 2 is 15 per unit of weight: less than 20 at weight 1.
    assert next_to_claim(waiting, teams_of(team("double", weight=2, used_h=30), team("single", used_h=20))).job_id == "a"
    # 50 at weight 2 is 25 per unit: more than 20.
    assert next_to_claim(waiting, teams_of(team("double", weight=2, used_h=50), team("single", used_h=20))).job_id == "b"


def test_a_new_pool_hands_out_gpus_in_turn_in_proportion_to_weights():
    teams = teams_of(team("three", weight=3), team("one", weight=1))
    waiting = [job(f"three-{i}", "three", age_h=i) for i in range(8)] + [job(f"one-{i}", "one", age_h=i) for i in range(8)]

    first_eight = [w.team_id for w, _ in claim_order(waiting, teams)[:8]]
    assert first_eight.count("three") == 6 and first_eight.count("one") == 2
    assert first_eight[:4] != ["three"] * 4  # interleaved, not one team's jobs back to back


def test_two_equal_teams_take_gpus_in_turn_rather_than_one_taking_them_all():
    teams = teams_of(team("a"), team("b"))
    waiting = [job(f"a-{i}", "a", age_h=10 - i) for i in range(4)] + [job(f"b-{i}", "b", age_h=10 - i) for i in range(4)]

    order = [w.team_id for w, reason in claim_order(waiting, teams)]
    assert order in (["a", "b"] * 4, ["b", "a"] * 4)
    assert all(reason is None for _, reason in claim_order(waiting, teams))


def test_between_teams_of_equal_share_the_job_that_waited_longer_goes_first_whatever_the_team_ids():
    # A new pool: no team has a past, none runs anything. "zz-one-off" queued one job an hour before "aa-sweeps"
    # queued a thousand; the shares tie at 0. The tie went by team id (random hex in the service), so
    # the one-off job waited behind the sweep whenever the sweep's team id sorted first.
    teams = teams_of(team("aa-sweeps"), team("zz-one-off"))
    waiting = [job(f"sweep-{i}", "aa-sweeps", age_h=1 - i / 10_000) for i in range(1000)]
    waiting.append(job("one-off", "zz-one-off", age_h=2))

    assert next_to_claim(waiting, teams).job_id == "one-off"
    assert ids(claim_order(waiting, teams))[:3] == ["one-off", "sweep-0", "sweep-1"]
    # Held to the same rule, the first claim after it goes to the sweep: the one-off team now runs a job.
    assert next_to_claim(waiting[:-1], teams_of(team("aa-sweeps"), team("zz-one-off").with_running(1))).job_id \
        == "sweep-0"


def test_within_a_team_priority_decides_then_age():
    teams = teams_of(team("t"))
    waiting = [job("old-low", "t", priority=LOW, age_h=30), job("new-normal", "t", age_h=1),
               job("old-normal", "t", age_h=5), job("new-high", "t", priority=HIGH, age_h=0.1)]

    assert ids(claim_order(waiting, teams)) == ["new-high", "old-normal", "new-normal", "old-low"]


def test_a_high_priority_job_does_not_jump_ahead_of_another_team():
    teams = teams_of(team("behind", used_h=1), team("ahead", used_h=40))
    waiting = [job("ahead-high", "ahead", priority=HIGH, age_h=5), job("behind-low", "behind", priority=LOW, age_h=1)]

    assert next_to_claim(waiting, teams).job_id == "behind-low"


def test_max_running_holds_a_teams_further_jobs_back_with_that_reason_and_after_every_other_job():
    teams = teams_of(team("capped", max_running=2, running_for_h=(1,)), team("other", used_h=30))
    waiting = [job(f"capped-{i}", "capped", age_h=10 - i) for i in range(3)] + [job("other-1", "other")]

    order = claim_order(waiting, teams)
    assert [(w.job_id, reason) for w, reason in order] == [
        ("capped-0", None), ("other-1", None), ("capped-1", FOR_MAX_RUNNING), ("capped-2", FOR_MAX_RUNNING)]


def test_a_spent_budget_holds_every_job_of_the_team_and_nothing_is_claimed_for_it():
    teams = teams_of(team("spent", budget_left_s=0), team("other", used_h=100))
    waiting = [job("spent-1", "spent", priority=HIGH, age_h=10), job("spent-2", "spent"), job("other-1", "other")]

    assert [(w.job_id, reason) for w, reason in claim_order(waiting, teams)] == [
        ("other-1", None), ("spent-1", FOR_BUDGET), ("spent-2", FOR_BUDGET)]
    assert next_to_claim(waiting[:2], teams) is None  # only held jobs: a free GPU stays free for them
    # A budget left and max_running at once: the budget is the reason shown.
    both = teams_of(team("t", budget_left_s=-5, max_running=0))
    assert claim_order([job("x", "t")], both)[0][1] == FOR_BUDGET


def test_a_spent_budget_holds_back_starts_not_the_jobs_the_service_queued_again_mid_run():
    # A job preempted for another team's (or handed back by a stopping worker, or whose worker was lost) after its
    # team spent its budget started with budget left: it goes on to its end, as a job never preempted does.
    teams = teams_of(team("spent", budget_left_s=0), team("other", used_h=100))
    waiting = [job("spent-new", "spent", priority=HIGH, age_h=10), job("other-1", "other"),
               replace(job("spent-preempted", "spent", priority=LOW), continuing=True)]

    assert [(w.job_id, reason) for w, reason in claim_order(waiting, teams)] == [
        ("spent-preempted", None), ("other-1", None), ("spent-new", FOR_BUDGET)]
    assert next_to_claim([waiting[0], waiting[2]], teams).job_id == "spent-preempted"
    # max_running still holds it back, with that reason.
    capped = teams_of(team("spent", budget_left_s=0, max_running=1, running_for_h=(1.0,)))
    assert [(w.job_id, reason) for w, reason in claim_order([waiting[0], waiting[2]], capped)] == [
        ("spent-new", FOR_BUDGET), ("spent-preempted", FOR_MAX_RUNNING)]
    assert next_to_claim([waiting[2]], capped) is None


def test_a_budget_lets_start_only_as_many_jobs_as_their_time_limits_fit_in_what_is_left():
    """A job started counts all of its time limit against the budget until its pace is known: with a minute, or an
    hour, left one job starts, not one per free GPU (counted as RUNNING_COUNTS_S each, an hour started 12 jobs in one
    moment, each of which then ran for hours); with two and a half time limits left, three start (0, 1 and 2 running
    leave 2.5, 1.5 and 0.5 of them), then the rest wait. A team without a budget starts them all."""
    limit = DEFAULT_JOB_TIME_LIMIT_S
    assert limit == Settings.model_fields["job_time_limit_s"].default  # QLORA_JOB_TIME_LIMIT_S's
    waiting = [job(f"b-{i}", "b", age_h=10 - i) for i in range(12)] + [job("other-1", "other")]
    one = teams_of(team("b", budget_left_s=60), team("other", used_h=100))
    assert [(w.job_id, reason) for w, reason in claim_order(waiting, one)] == [
        ("b-0", None), ("other-1", None)] + [(f"b-{i}", FOR_BUDGET) for i in range(1, 12)]
    assert next_to_claim(waiting[:12], teams_of(team("b", budget_left_s=60, running_for_h=(0.0,)))) is None
    hour = teams_of(team("b", budget_left_s=HOUR), team("other", used_h=100))
    assert [reason for _, reason in claim_order(waiting[:12], hour)] == [None] + [FOR_BUDGET] * 11
    assert hour["b"].with_running(1).blocked_by() == FOR_BUDGET  # what a second claim, under the lock, reads
    three = teams_of(team("b", budget_left_s=2.5 * limit), team("other", used_h=100))
    assert [reason for _, reason in claim_order(waiting[:5], three)] == [None, None, None, FOR_BUDGET, FOR_BUDGET]
    unbudgeted = teams_of(team("b"), team("other", used_h=100))
    assert [reason for _, reason in claim_order(waiting, unbudgeted)] == [None] * 13
    # A job the service queued again mid-run goes on past it, as before, and the team's new jobs wait behind it: it
    # will use what is left (b-0 started ahead of it, and both ran past the budget).
    continuing = replace(job("b-resumed", "b", priority=LOW), continuing=True)
    assert [(w.job_id, r) for w, r in claim_order([waiting[0], waiting[1], continuing], one)] == [
        ("b-resumed", None), ("b-0", FOR_BUDGET), ("b-1", FOR_BUDGET)]
    assert RUNNING_COUNTS_S == 300  # the 5 GPU-minutes the README and docs/scheduling.md name


def test_a_job_stopped_midway_holds_back_its_teams_new_jobs_as_much_as_a_running_one():
    """Team b has an hour left and b-1 running with 3 hours to go: its new jobs wait. b-1 is preempted (or its worker
    stops or is lost): it counted 5 GPU-minutes while pausing and nothing queued, so b-2 started, counting 72 hours,
    and b-1 then resumed past the budget (Waiting.continuing): two jobs over the month, not one. A job stopped midway
    counts for a time limit, what its next attempt may use, until it resumes and its pace shows; it goes first."""
    limit = DEFAULT_JOB_TIME_LIMIT_S
    fresh = job("b-2", "b", priority=HIGH, age_h=5)
    resumed = replace(job("b-1", "b", priority=LOW), continuing=True)
    for b in (team("b", budget_left_s=HOUR),  # made by hand: the queued job is counted
              TeamShare.at("b", NOW, HALF_LIFE, weight=1.0, usage_s=0.0, usage_at=None, running_since=[],
                           budget_left_s=HOUR, to_come_s=[], resuming=1)):  # as the service reads it
        teams = teams_of(b, team("other", used_h=100))
        assert [(w.job_id, r) for w, r in claim_order([fresh, resumed], teams)] == [("b-1", None), ("b-2", FOR_BUDGET)]
        assert next_to_claim([fresh, resumed], teams) == resumed
    # Pausing (or queued in another GPU class) it holds them back too; once it runs again it counts as a job started.
    pausing = TeamShare.at("b", NOW, HALF_LIFE, weight=1.0, usage_s=0.0, usage_at=None, running_since=[NOW - HOUR],
                           budget_left_s=HOUR, to_come_s=[RUNNING_COUNTS_S], resuming=1)
    assert pausing.still_to_come_s == RUNNING_COUNTS_S + limit and pausing.blocked_by() == FOR_BUDGET
    assert next_to_claim([fresh], {"b": pausing}) is None
    assert pausing.blocked_by(continuing=True) is None
    assert pausing.with_running(1, continuing=True).still_to_come_s == RUNNING_COUNTS_S + limit
    # A team without a budget is not held back by it.
    assert claim_order([fresh, resumed], teams_of(team("b"))) == [(fresh, None), (resumed, None)]


def test_the_budget_counts_a_running_job_for_the_time_it_has_still_to_come_at_its_pace():
    """A team with an hour left and a job running that will need 3 more hours at its pace starts nothing: counted as 5
    GPU-minutes, it started 12 jobs with that hour, each running for hours, and overran its month by as many
    GPU-hours. A job 10 minutes from its end leaves 50 minutes: the next one starts."""
    limit = 72 * HOUR  # QLORA_JOB_TIME_LIMIT_S's default
    claimed = NOW - HOUR

    def with_one_running(finish_in_s: float | None) -> dict[str, TeamShare]:
        finish = None if finish_in_s is None else NOW + finish_in_s
        share = TeamShare.at("b", NOW, HALF_LIFE, weight=1.0, usage_s=0.0, usage_at=None, running_since=[claimed],
                             budget_left_s=HOUR, to_come_s=[to_come_s(NOW, claimed, finish, limit)])
        return teams_of(share, team("other", used_h=100))

    waiting = [job("b-1", "b"), job("other-1", "other")]
    long_one = with_one_running(3 * HOUR)
    assert long_one["b"].blocked_by() == FOR_BUDGET
    assert claim_order(waiting, long_one) == [(waiting[1], None), (waiting[0], FOR_BUDGET)]
    assert next_to_claim(waiting[:1], long_one) is None
    short_one = with_one_running(10 * 60)
    assert short_one["b"].blocked_by() is None and next_to_claim(waiting[:1], short_one) == waiting[0]
    # A job whose pace is not known yet (model loading, fewer than two points) counts all its time limit leaves: it
    # counted 5 GPU-minutes, and a team with an hour left started 12 jobs in one moment. One about to end counts 5
    # GPU-minutes (merging and the eval report come after its last step), and so does one pausing or cancelling,
    # which has no pace: it stops after its current step.
    assert to_come_s(NOW, claimed, None, limit) == limit - HOUR
    assert to_come_s(NOW, claimed, NOW + 10, limit) == to_come_s(NOW, claimed, None, limit, stopping=True) \
        == RUNNING_COUNTS_S
    # Never past what its time limit leaves: the worker ends the attempt there.
    assert to_come_s(NOW, NOW - 71 * HOUR, NOW + 10 * HOUR, limit) == HOUR
    # One still running at its limit holds its GPU until its worker stops it: 5 GPU-minutes, not none.
    assert to_come_s(NOW, NOW - 73 * HOUR, NOW + 10 * HOUR, limit) == RUNNING_COUNTS_S
    # Only a job that counts the rest of its limit for want of a pace is said to (budget_said): not one past its limit.
    assert projection(NOW, claimed, None, limit) == (limit - HOUR, True)
    assert projection(NOW, NOW - 73 * HOUR, None, limit) == projection(NOW, claimed, None, limit, stopping=True) \
        == (RUNNING_COUNTS_S, False)
    # A pace that ends past any calendar (a worker's clock that jumped a day between two points, millions of steps
    # left) is no estimate to show, and all that the time limit leaves to count (it counted 5 GPU-minutes).
    jumped = [(1, datetime(2026, 1, 1, tzinfo=UTC)), (2, datetime(2026, 1, 2, tzinfo=UTC))]
    assert pace.finish_at(states.RUNNING, 10_000_000, jumped) is None
    assert to_come_s(NOW, claimed, pace.finish_s(states.RUNNING, 10_000_000, jumped), limit) == limit - HOUR
    # A job it starts counts its time limit more (no pace yet); a job preempted from it 5 GPU-minutes less, and a time
    # limit more: it will resume past the budget, and its next attempt may use that much.
    assert long_one["b"].with_running(1).still_to_come_s == 3 * HOUR + limit
    assert long_one["b"].with_running(-1).still_to_come_s == 3 * HOUR - RUNNING_COUNTS_S + limit
    # The share is not moved by the projection: it orders teams by the GPU time they used (policy.RUNNING_COUNTS_S).
    assert long_one["b"].share == short_one["b"].share


def test_next_to_claim_is_always_the_first_job_claim_order_would_start():
    rng = random.Random(7)
    for _ in range(300):
        teams = teams_of(*(team(f"t{i}", weight=rng.choice([1, 2, 5]), used_h=rng.uniform(0, 30),
                                running_for_h=tuple(rng.uniform(0, 3) for _ in range(rng.randint(0, 3))),
                                max_running=rng.choice([None, None, 1, 2]),
                                budget_left_s=rng.choice([None, None, 0.0, 100.0]))
                           for i in range(4)))
        waiting = [replace(job(f"j{n}", f"t{rng.randrange(4)}", priority=rng.randrange(3), age_h=rng.choice([1, 2, 3])),
                           continuing=rng.random() < 0.3)
                   for n in range(rng.randint(0, 12))]
        ready = [w for w, reason in claim_order(waiting, teams) if reason is None]
        assert next_to_claim(waiting, teams) == (ready[0] if ready else None)


# ---------------------------------------------------------------- preemption


def test_the_lowest_priority_newest_job_of_the_team_furthest_above_its_share_is_paused_for_a_light_team():
    teams = teams_of(team("heavy", used_h=60, running_for_h=(5, 2, 1, 3)), team("middle", used_h=30, running_for_h=(4,)),
                     team("light"))
    candidates = [running("heavy-old-low", "heavy", for_h=5, priority=LOW), running("heavy-high", "heavy", for_h=1, priority=HIGH),
                  running("heavy-new-low", "heavy", for_h=2, priority=LOW), running("heavy-normal", "heavy", for_h=3),
                  running("middle-1", "middle", for_h=4, priority=LOW)]
    light_job = job("light-1", "light")

    plan = plan_preemptions([light_job], candidates, teams, NOW, MIN_RUNTIME)

    assert [(p.victim.job_id, p.for_job.job_id) for p in plan] == [("heavy-new-low", "light-1")]


def test_a_job_is_never_preempted_before_its_minimum_runtime():
    teams = teams_of(team("heavy", used_h=60, running_for_h=(0.1, 0.05)), team("light"))
    young = [running("h1", "heavy", for_h=0.1), running("h2", "heavy", for_h=0.05)]  # 6 and 3 minutes

    assert plan_preemptions([job("l", "light")], young, teams, NOW, MIN_RUNTIME) == []
    # Past it, the same job is fair game.
    assert [p.victim.job_id for p in plan_preemptions([job("l", "light")], young, teams, NOW, 300)] == ["h1"]


def test_a_disabled_teams_waiting_job_takes_no_gpu_and_preempts_nobody():
    """An admin disabled the light team: its job, which would take the next GPU and preempt the heavy team's,
    waits last, saying why, and nothing is paused for it."""
    light = TeamShare.at("light", NOW, HALF_LIFE, weight=1.0, usage_s=0.0, usage_at=None, running_since=[], disabled=True)
    teams = teams_of(team("heavy", used_h=60, running_for_h=(5,)), light)
    waiting = [job("light-1", "light", age_h=3), job("heavy-2", "heavy")]

    assert claim_order(waiting, teams) == [(waiting[1], None), (waiting[0], FOR_TEAM_DISABLED)]
    assert next_to_claim(waiting[:1], teams) is None
    assert plan_preemptions(waiting[:1], [running("heavy-1", "heavy", for_h=5)], teams, NOW, MIN_RUNTIME) == []
    enabled = {**teams, "light": replace(light, disabled=False)}
    assert len(plan_preemptions(waiting[:1], [running("heavy-1", "heavy", for_h=5)], enabled, NOW, MIN_RUNTIME)) == 1


def test_a_disabled_teams_jobs_wait_after_those_another_teams_quota_holds():
    """As the README says: a disabled team's queued jobs are listed after every job of another team, the
    ones a quota holds back included, whatever the disabled team's share (here none used)."""
    disabled = TeamShare.at("gone", NOW, HALF_LIFE, weight=1.0, usage_s=0.0, usage_at=None, running_since=[],
                            disabled=True)
    teams = teams_of(disabled, team("broke", used_h=50, budget_left_s=0))
    waiting = [job("gone-1", "gone", age_h=3), job("broke-1", "broke")]
    assert [(w.job_id, reason) for w, reason in claim_order(waiting, teams)] == [
        ("broke-1", FOR_BUDGET), ("gone-1", FOR_TEAM_DISABLED)]


def test_two_equal_teams_never_swap():
    for used_h in (0.0, 10.0, 500.0):
        teams = teams_of(team("a", used_h=used_h, running_for_h=(2,)), team("b", used_h=used_h + 2))
        assert plan_preemptions([job("b-1", "b")], [running("a-1", "a", for_h=2)], teams, NOW, MIN_RUNTIME) == []


def test_teams_that_are_nearly_even_do_not_trade_gpus():
    # b is 1.5 % behind a: a swap would only trade places at the next small drift, at a pause each time.
    # Nothing moves; b gets the next GPU that frees.
    teams = teams_of(team("a", used_h=100, running_for_h=(2,)), team("b", used_h=100.5))
    assert plan_preemptions([job("b-1", "b")], [running("a-1", "a", for_h=2)], teams, NOW, MIN_RUNTIME) == []
    assert next_to_claim([job("b-1", "b")], teams).job_id == "b-1"
    # 10 % behind is clearly unfair: b takes the GPU.
    behind = teams_of(team("a", used_h=100, running_for_h=(2,)), team("b", used_h=92))
    assert len(plan_preemptions([job("b-1", "b")], [running("a-1", "a", for_h=2)], behind, NOW, MIN_RUNTIME)) == 1


def test_in_a_new_pool_a_team_holding_nothing_gets_a_gpu_once_the_other_teams_job_has_run_its_minimum_runtime():
    just_past = MIN_RUNTIME / HOUR + 5 / HOUR  # the first scheduler pass after it: 5 s later
    teams = teams_of(team("first", running_for_h=(just_past,)), team("second"))
    plan = plan_preemptions([job("second-1", "second")], [running("first-1", "first", for_h=just_past)], teams, NOW,
                            MIN_RUNTIME)
    assert [(p.victim.job_id, p.for_job.job_id) for p in plan] == [("first-1", "second-1")]
    # With no minimum runtime, a job that has run a few seconds is already fair game.
    seconds = teams_of(team("first", running_for_h=(3 / HOUR,)), team("second"))
    assert len(plan_preemptions([job("second-1", "second")], [running("first-1", "first", for_h=3 / HOUR)], seconds,
                                NOW, 0)) == 1


def test_each_preemption_serves_the_next_job_in_claim_order_and_stops_once_shares_are_even():
    teams = teams_of(team("hog", used_h=100, running_for_h=(3, 3, 3, 3)), team("x"), team("y"))
    hog_jobs = [running(f"hog-{i}", "hog", for_h=3 - i / 10) for i in range(4)]
    waiting = [job("x-1", "x"), job("y-1", "y")]

    plan = plan_preemptions(waiting, hog_jobs, teams, NOW, MIN_RUNTIME)

    assert sorted(p.for_job.job_id for p in plan) == ["x-1", "y-1"]  # one GPU each, no more: nobody else waits
    assert [p.victim.job_id for p in plan] == ["hog-3", "hog-2"]  # the newest first


def test_gpus_already_being_freed_go_to_the_first_waiting_jobs_before_anything_else_is_paused():
    teams = teams_of(team("hog", used_h=100, running_for_h=(3, 3, 3)), team("x"), team("y"))
    hog_jobs = [running("hog-0", "hog", for_h=3), running("hog-1", "hog", for_h=2.9)]
    waiting = [job("x-1", "x"), job("y-1", "y")]

    assert len(plan_preemptions(waiting, hog_jobs, teams, NOW, MIN_RUNTIME, freeing=0)) == 2
    one_more = plan_preemptions(waiting, hog_jobs, teams, NOW, MIN_RUNTIME, freeing=1)
    assert len(one_more) == 1  # one GPU is on its way already: one job waits for it
    assert plan_preemptions(waiting, hog_jobs, teams, NOW, MIN_RUNTIME, freeing=2) == []


def test_a_job_of_the_waiting_team_itself_is_never_paused_for_it():
    teams = teams_of(team("t", running_for_h=(5,)), team("other", running_for_h=(0.01,)))
    assert plan_preemptions([job("t-2", "t")], [running("t-1", "t", for_h=5)], teams, NOW, MIN_RUNTIME) == []


# ---------------------------------------------------------------- decay


def test_usage_halves_every_half_life():
    assert decayed(100.0, HALF_LIFE, HALF_LIFE) == pytest.approx(50.0)
    assert decayed(100.0, 3 * HALF_LIFE, HALF_LIFE) == pytest.approx(12.5)
    assert decayed(100.0, -5.0, HALF_LIFE) == 100.0  # a clock behind the record does not inflate it


def test_used_between_is_the_integral_of_the_decayed_gpu_time():
    start, end, now, half_life = 1000.0, 1000.0 + 5 * HOUR, 1000.0 + 30 * HOUR, 10 * HOUR
    steps = 20_000
    width = (end - start) / steps
    numeric = sum(2 ** (-(now - (start + (i + 0.5) * width)) / half_life) * width for i in range(steps))

    assert used_between(start, end, now, half_life) == pytest.approx(numeric, rel=1e-6)
    assert used_between(start, end, end, 1e12) == pytest.approx(end - start)  # no decay: plain GPU-seconds
    assert used_between(end, start, now, half_life) == 0.0


def test_folding_attempts_one_by_one_equals_the_decayed_sum_of_all_of_them():
    attempts = [(0.0, 2 * HOUR), (HOUR, 9 * HOUR), (20 * HOUR, 21 * HOUR), (21 * HOUR, 40 * HOUR)]
    usage, at = 0.0, None
    for claimed, ended in sorted(attempts, key=lambda a: a[1]):  # folded as they end
        usage, at = fold(usage, at, claimed, ended, HALF_LIFE)

    assert at == 40 * HOUR
    assert usage == pytest.approx(sum(used_between(c, e, at, HALF_LIFE) for c, e in attempts))
    # An attempt that ended before the last fold (a lost worker noticed late) still counts, decayed.
    late, late_at = fold(usage, at, 30 * HOUR, 35 * HOUR, HALF_LIFE)
    assert late_at == at
    assert late == pytest.approx(usage + used_between(30 * HOUR, 35 * HOUR, at, HALF_LIFE))


def test_a_team_that_held_n_gpus_forever_holds_n_on_average():
    for n in (1, 3):
        forever = n * used_between(NOW - 200 * HALF_LIFE, NOW, NOW, HALF_LIFE)
        assert average_gpus(forever, HALF_LIFE) == pytest.approx(n)
        # The same through TeamShare.at, with the n jobs still running since long ago.
        share = TeamShare.at("t", NOW, HALF_LIFE, weight=1.0, usage_s=0.0, usage_at=None,
                             running_since=[NOW - 200 * HALF_LIFE] * n)
        assert share.recent_gpus == pytest.approx(n)
        assert share.running == n


def test_a_running_attempt_counts_up_to_now_and_a_claim_a_little_ahead():
    share = TeamShare.at("t", NOW, HALF_LIFE, weight=2.0, usage_s=0.0, usage_at=None, running_since=[NOW - HOUR])
    assert share.recent_gpus == pytest.approx(average_gpus(used_between(NOW - HOUR, NOW, NOW, HALF_LIFE), HALF_LIFE))
    assert share.share == pytest.approx((share.recent_gpus + average_gpus(RUNNING_COUNTS_S, HALF_LIFE)) / 2)
    assert share.with_running(1).share > share.share > share.with_running(-1).share
