"""The loss curve read incrementally: a poller asks for the points past the last step it holds."""

from __future__ import annotations

import pytest

from app.errors import Invalid, NotFound
from app.jobs import repository, service
from app.teams.service import Caller, create_key, create_team


def log_curve(session, job_id: str, steps: range, eval_every: int) -> None:
    for step in steps:
        repository.upsert_metric(session, job_id, {"kind": "train", "step": step, "epoch": step / 100,
                                                   "train_loss": 1.0 / step})
        if step % eval_every == 0:
            repository.upsert_metric(session, job_id, {"kind": "eval", "step": step, "epoch": step / 100,
                                                       "eval_loss": 2.0 / step})
    session.commit()


def steps(curve: dict) -> tuple[list[int], list[int]]:
    return [p["step"] for p in curve["train"]], [p["step"] for p in curve["eval"]]


def test_after_step_returns_only_the_points_past_it(session, caller, make_job):
    job_id = make_job("running")
    log_curve(session, job_id, range(1, 31), eval_every=10)

    assert steps(service.metrics(session, caller, job_id)) == (list(range(1, 31)), [10, 20, 30])
    assert steps(service.metrics(session, caller, job_id, after_step=20)) == (list(range(21, 31)), [30])
    assert steps(service.metrics(session, caller, job_id, after_step=30)) == ([], [])
    # Read piece by piece, the curve is the whole curve, each point once.
    held: list[int] = []
    for _ in range(4):
        held += steps(service.metrics(session, caller, job_id, after_step=max(held, default=None)))[0]
        log_curve(session, job_id, range(len(held) + 1, len(held) + 6), eval_every=10)
    assert held == sorted(set(held)) and held == list(range(1, held[-1] + 1))


def test_another_teams_curve_is_not_found_with_or_without_after_step(session, caller, make_job):
    job_id = make_job("running")
    log_curve(session, job_id, range(1, 11), eval_every=5)
    other = Caller.of(create_team(session, "team-b"), create_key(session, "team-b")[0])
    session.commit()
    for after_step in (None, 0, 5):
        with pytest.raises(NotFound):
            service.metrics(session, other, job_id, after_step)
        assert repository.metrics(session, other.team_id, job_id, "train", ("step",),
                                  -1 if after_step is None else after_step, 100) == []


def test_after_eval_step_reads_an_evaluation_that_landed_after_its_steps_train_point(session, caller, make_job):
    """A poller held train points to step 10 before step 10's evaluation was recorded: after_step alone
    would skip that evaluation; after_eval_step (what it holds of the eval series) reads it."""
    job_id = make_job("running")
    repository.upsert_metric(session, job_id, {"kind": "train", "step": 10, "train_loss": 0.5})
    session.commit()
    assert steps(service.metrics(session, caller, job_id)) == ([10], [])
    log_curve(session, job_id, range(10, 21), eval_every=10)  # step 10's evaluation lands, then steps 11-20
    assert steps(service.metrics(session, caller, job_id, after_step=10)) == (list(range(11, 21)), [20])
    assert steps(service.metrics(session, caller, job_id, after_step=10, after_eval_step=0)) == (
        list(range(11, 21)), [10, 20])
    assert steps(service.metrics(session, caller, job_id, after_step=20, after_eval_step=10)) == ([], [20])
    assert steps(service.metrics(session, caller, job_id, after_eval_step=10)) == (list(range(10, 21)), [20])


def test_a_thinned_view_on_the_embedded_database_keeps_each_buckets_extremes(session, caller, make_job):
    """The thinned view's buckets are summed up in SQL that SQLite (the embedded default) runs as Postgres does."""
    job_id = make_job("running")
    log_curve(session, job_id, range(1, 1001), eval_every=100)
    repository.upsert_metric(session, job_id, {"kind": "train", "step": 333, "train_loss": 9.0})  # a spike
    repository.upsert_metric(session, job_id, {"kind": "train", "step": 334, "train_loss": None})
    session.commit()
    view = service.thinned_metrics(session, caller, job_id, 80)
    assert view["thinned"] is True and view["bucket_steps"] == 999 // 10 + 1 and view["curve_points"] == 1010
    assert len(view["train"]) + len(view["eval"]) <= 80
    shown = {p["step"]: p["train_loss"] for p in view["train"]}
    assert shown[333] == 9.0 and shown[1] == 1.0 and shown[1000] == 1 / 1000
    for bucket in range(10):  # each bucket's first, last and lowest (losses fall: the last but for the spike)
        steps = [s for s in range(1, 1001) if (s - 1) // view["bucket_steps"] == bucket]
        assert {steps[0], steps[-1]} <= set(shown)
    assert [p["step"] for p in view["eval"]] == list(range(100, 1001, 100))
    with pytest.raises(Invalid, match="points: must be between 8 and 5000, got 5001"):
        service.thinned_metrics(session, caller, job_id, 5001)


def test_a_thinned_view_on_the_embedded_database_is_computed_whole_on_each_poll(session, caller, make_job):
    """On Postgres a poll of the thinned view reads only the buckets past the completed ones kept from the poll
    before (tests/service/test_curve_pages.py). SQLite gives a new row the largest id + 1, so after a resume of
    the same attempt from an older checkpoint deleted the newest points, the points logged again took back their
    ids, and kept buckets would have been checked as unchanged: there the view is computed whole each time."""
    from app.jobs import thinned

    job_id = make_job("running")
    completed = thinned.CompletedBuckets()

    def log(steps: range, loss: float) -> None:
        for step in steps:
            repository.upsert_metric(session, job_id, {"kind": "train", "step": step, "train_loss": loss + (step * 37 % 101) / 100})
        session.commit()

    def polled() -> dict:
        view = service.thinned_metrics(session, caller, job_id, 80, completed=completed)
        assert view == service.thinned_metrics(session, caller, job_id, 80, completed=None)
        assert len(completed) == 0
        return view

    log(range(1, 1001), 1.0)
    before = polled()
    repository.delete_metrics_after(session, job_id, 300)  # the same attempt, from an older checkpoint ...
    session.commit()
    log(range(301, 1001), 3.0)  # ... logs the steps again, with other losses, under the same ids
    after = polled()
    assert after["bucket_steps"] == before["bucket_steps"] and after["train"] != before["train"]


def test_the_kept_buckets_are_bounded_in_points_least_recently_used_first():
    from app.jobs import thinned

    def entry(points: int) -> thinned.Completed:
        kept = thinned.Kept(tuple((step, 1.0) for step in range(points)), points * 10, (points, 1))
        return thinned.Completed(0, 1, 10, 5, 100, {"train": kept, "eval": thinned.Kept((), 0, None)})

    completed = thinned.CompletedBuckets(max_points=100)
    for job in ("a", "b", "c"):
        completed.put((job, 80), entry(40))
        assert completed.kept_points() <= 100
    assert len(completed) == 2 and completed.get(("a", 80)) is None and completed.kept_points() == 80
    assert completed.get(("b", 80)) is not None  # b used last: c goes first now
    completed.put(("d", 80), entry(40))
    assert completed.get(("c", 80)) is None and completed.get(("b", 80)) is not None
    completed.put(("b", 80), entry(10))  # replaced, not added
    assert completed.kept_points() == 50 and len(completed) == 2
    completed.put(("e", 80), entry(101))  # one view's more than the whole bound: not kept
    assert completed.get(("e", 80)) is None and completed.kept_points() == 50
    completed.drop(("b", 80))
    assert completed.kept_points() == 40 and len(completed) == 1


def test_a_view_with_no_completed_bucket_is_not_kept():
    """A thinned view of 8 to 15 points is one bucket, never complete: its entry held no point, counted nothing
    toward the bound, and so was never dropped (one per job and `points`, for the life of the process)."""
    from app.jobs import thinned

    completed = thinned.CompletedBuckets(max_points=100)
    nothing = thinned.Kept((), 0, None)
    for job in range(1000):
        completed.put((f"job-{job}", 8), thinned.Completed(0, 1, 1000, 0, 100, {"train": nothing, "eval": nothing}))
    assert len(completed) == 0


def test_a_streams_point_writes_a_float_json_cannot_hold_as_a_curve_page_does():
    """A stream's `metric` message encodes its point as a curve page does (schemas.points_json): inf and nan as
    null, as a model writes them. Encoded without, the message held `Infinity`, which is no JSON (a browser's
    JSON.parse throws on it), where GET /jobs/{id}/metrics showed null."""
    import json

    from app.jobs import stream
    from app.jobs.schemas import curve_json

    def refuse(constant: str):
        raise ValueError(f"{constant} is no JSON")

    row = dict.fromkeys(stream._POINT_COLUMNS)
    row.update(step=1, train_loss=float("inf"))
    message = stream._metric_message("train", tuple(row.values()))
    point = json.loads(message.split("data: ", 1)[1], parse_constant=refuse)
    assert point["train_loss"] is None
    assert json.loads(curve_json({"train": [point]}), parse_constant=refuse)["train"] == [point]
