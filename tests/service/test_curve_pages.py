"""GET /jobs/{id}/metrics answers a long curve a bounded page at a time (10,000 points by default and
at most): a curve of half a million points was one answer of 150 MB and up to a minute of an API
process. Following `next` joins the pages to the whole curve, as the database holds it, with no point
lost or read twice, after a resume redid steps past its checkpoint too; `qlora jobs watch` reads
every page."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import insert, select, text, update

from app.db import session_scope
from app.jobs import repository
from app.jobs.tables import JobMetric
from tests.deployment import lane, upload
from worker.training.tiny import demo_spec

LOGGED_STEPS = 12_000  # train points of the first attempt, one per step
EVAL_EVERY = 100
RESUMED_FROM = 11_500  # the checkpoint the second attempt resumes from
REDONE_TO = 12_300  # the second attempt logs 11,501..12,300 again, with other losses


def curve_in_the_database(database_url: str, job_id: str) -> dict[str, list[tuple[int, float]]]:
    with session_scope(database_url) as session:
        rows = session.execute(select(JobMetric.kind, JobMetric.step, JobMetric.train_loss, JobMetric.eval_loss)
                               .where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
    return {"train": [(r.step, r.train_loss) for r in rows if r.kind == "train"],
            "eval": [(r.step, r.eval_loss) for r in rows if r.kind == "eval"]}


def as_pairs(curve: dict) -> dict[str, list[tuple[int, float]]]:
    return {"train": [(p["step"], p["train_loss"]) for p in curve["train"]],
            "eval": [(p["step"], p["eval_loss"]) for p in curve["eval"]]}


def read_by_pages(client, job_id: str, params: dict) -> tuple[dict, list[dict]]:
    """The curve joined from pages, following each answer's `next` while it has_more; and the pages."""
    pages = [client.get(f"/jobs/{job_id}/metrics", params=params)]
    while True:
        assert pages[-1].status_code == 200, pages[-1].text
        answer = pages[-1].json()
        if not answer["has_more"]:
            break
        pages.append(client.get(f"/jobs/{job_id}/metrics", params={**params, **{
            name: value for name, value in answer["next"].items() if value is not None}}))
    answers = [page.json() for page in pages]
    joined = {"train": [p for a in answers for p in a["train"]], "eval": [p for a in answers for p in a["eval"]]}
    return joined, answers


def test_a_long_curve_comes_in_bounded_pages_that_join_to_the_whole_curve(deployment, team_a, team_b, demo_data):
    from app.cli.api_client import ApiClient

    url = deployment.settings.database_url
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    job_id = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                        **demo_spec("tiny")}).json()["id"]
    with session_scope(url) as session:  # the first attempt's curve, as the worker's upserts leave it
        session.execute(insert(JobMetric), [
            {"job_id": job_id, "kind": "train", "step": s, "train_loss": 3.0 - s / 10_000} for s in range(1, LOGGED_STEPS + 1)])
        session.execute(insert(JobMetric), [
            {"job_id": job_id, "kind": "eval", "step": s, "eval_loss": 3.5 - s / 10_000}
            for s in range(EVAL_EVERY, LOGGED_STEPS + 1, EVAL_EVERY)])
    with session_scope(url) as session:  # a second attempt resumes from a checkpoint and logs the steps past it again
        repository.delete_metrics_after(session, job_id, RESUMED_FROM)
        for s in range(RESUMED_FROM + 1, REDONE_TO + 1):
            repository.upsert_metric(session, job_id, {"kind": "train", "step": s, "train_loss": 1.0 + s / 100_000})
            if s % EVAL_EVERY == 0:
                repository.upsert_metric(session, job_id, {"kind": "eval", "step": s, "eval_loss": 1.5 + s / 100_000})
        repository.upsert_metric(session, job_id, {"kind": "train", "step": 700, "train_loss": 0.25})  # a step logged again
    whole = curve_in_the_database(url, job_id)
    assert len(whole["train"]) == REDONE_TO and len(whole["eval"]) == REDONE_TO // EVAL_EVERY

    # Asked with no parameter, as a client that does not page: the first 10,000 points, and where to go on.
    first = team_a.get(f"/jobs/{job_id}/metrics")
    assert first.status_code == 200
    page = first.json()
    assert page["has_more"] is True and len(page["train"]) + len(page["eval"]) == 10_000
    assert len(first.content) < 4_000_000
    assert page["next"] == {"after_step": page["train"][-1]["step"], "after_eval_step": page["eval"][-1]["step"]}

    # Every page size joins to the whole curve, in step order, no point lost or twice, the redone losses read.
    for params in ({}, {"limit": 997}, {"after_step": 11_990, "after_eval_step": 11_900, "limit": 1},
                   {"after_step": 5_000, "after_eval_step": 4_000, "limit": 1_000}):
        joined, answers = read_by_pages(team_a, job_id, params)
        limit = params.get("limit", 10_000)
        assert all(len(a["train"]) + len(a["eval"]) <= limit for a in answers)
        assert all(len(a["train"]) + len(a["eval"]) == limit for a in answers[:-1])
        train_after, eval_after = params.get("after_step", -1), params.get("after_eval_step", -1)
        assert as_pairs(joined) == {"train": [p for p in whole["train"] if p[0] > train_after],
                                    "eval": [p for p in whole["eval"] if p[0] > eval_after]}, params
    assert dict(whole["train"])[700] == 0.25 and dict(whole["train"])[12_000] == 1.0 + 12_000 / 100_000

    # A poller goes on from the last page's `next`: a train point, then the evaluation at its step landing after it.
    _, answers = read_by_pages(team_a, job_id, {})
    after = answers[-1]["next"]
    with session_scope(url) as session:
        repository.upsert_metric(session, job_id, {"kind": "train", "step": REDONE_TO + 1, "train_loss": 0.5})
    polled = team_a.get(f"/jobs/{job_id}/metrics", params=after).json()
    assert as_pairs(polled) == {"train": [(REDONE_TO + 1, 0.5)], "eval": []} and polled["has_more"] is False
    with session_scope(url) as session:
        repository.upsert_metric(session, job_id, {"kind": "eval", "step": REDONE_TO + 1, "eval_loss": 0.75})
    polled = team_a.get(f"/jobs/{job_id}/metrics", params=polled["next"]).json()
    assert as_pairs(polled) == {"train": [], "eval": [(REDONE_TO + 1, 0.75)]}

    # The CLI reads every page (what `qlora jobs watch` shows on its first poll).
    with ApiClient(deployment.url, deployment.team_key("team-a")) as api:
        assert as_pairs(api.job_curve(job_id)) == curve_in_the_database(url, job_id)

    # Another team's job is 404, whatever the page asked for.
    for params in ({}, {"limit": 5}, {"after_step": 10, "limit": 5}):
        assert team_b.get(f"/jobs/{job_id}/metrics", params=params).status_code == 404


def test_a_page_limit_out_of_range_is_a_422_naming_it(team_a, demo_data):
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    job_id = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                        **demo_spec("tiny")}).json()["id"]
    for limit in (0, -1, 10_001, 10**30):
        answer = team_a.get(f"/jobs/{job_id}/metrics", params={"limit": limit})
        assert answer.status_code == 422, (limit, answer.text)
        error = answer.json()["error"]
        assert error["message"] == f"limit: must be between 1 and 10000, got {limit}"
        assert error["details"] == [{"field": "limit", "message": "must be between 1 and 10000"}]
    answer = team_a.get(f"/jobs/{job_id}/metrics", params={"limit": "many"})
    assert answer.status_code == 422 and "limit" in answer.json()["error"]["message"]
    assert team_a.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["has_more"] is False


def page_as_the_models_wrote_it(database_url: str, job_id: str, after_step: int | None, after_eval_step: int | None,
                                limit: int) -> bytes:
    """A page as GET /jobs/{id}/metrics wrote it before it skipped the models: an ORM row per point, a
    MetricsOut (a TrainPoint or EvalPoint per point) validated from them, and its model_dump_json."""
    from app.jobs.schemas import MetricsOut

    train_after = -1 if after_step is None else after_step
    eval_after = train_after if after_eval_step is None else after_eval_step
    with session_scope(database_url) as session:
        rows = [row for kind, after in (("train", train_after), ("eval", eval_after))
                for row in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.kind == kind,
                                                                   JobMetric.step > after).order_by(JobMetric.step))]
        rows.sort(key=lambda row: (row.step, row.kind))
        page = rows[:limit]
        train, eval_ = [p for p in page if p.kind == "train"], [p for p in page if p.kind == "eval"]
        return MetricsOut.model_validate({
            "job_id": job_id, "train": train, "eval": eval_, "has_more": len(rows) > limit,
            "next": {"after_step": train[-1].step if train else (None if train_after < 0 else train_after),
                     "after_eval_step": eval_[-1].step if eval_ else max(eval_after, 0)}},
            from_attributes=True).model_dump_json().encode()


def test_a_page_is_byte_for_byte_the_json_its_models_wrote(deployment, team_a, demo_data):
    """The page is built from plain column tuples, not a pydantic model per point: its bytes (so its ETag)
    are what MetricsOut wrote, for floats of every shape, nulls, large integers and a dpo job's rewards."""
    url = deployment.settings.database_url
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    job_id = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                        **demo_spec("tiny")}).json()["id"]
    floats = [0.1 + 0.2, 1 / 3, 1e-7, 2e-4, 5e-324, 1.7976931348623157e308, 1e16, 1e22, 123456789.0, -0.0, 0.0, 2.0,
              -1.5e-10, float("inf"), float("-inf"), float("nan"), None]
    with session_scope(url) as session:
        session.execute(insert(JobMetric), [
            {"job_id": job_id, "kind": "train", "step": s, "epoch": floats[s % len(floats)],
             "train_loss": floats[(s * 7) % len(floats)], "learning_rate": floats[(s * 3) % len(floats)],
             "grad_norm": None if s % 5 else 1.25, "tokens_seen": s * 4096 + 2**40,
             "tokens_per_second": floats[(s * 11) % len(floats)], "peak_memory_bytes": 80 * 2**30 + s,
             "gpu_utilization": s / 1000, "reward_accuracy": floats[(s * 13) % len(floats)] if s % 2 else None,
             "reward_chosen": s / 7, "reward_rejected": -s / 9, "reward_margin": s / 7 + s / 9} for s in range(1, 701)])
        session.execute(insert(JobMetric), [
            {"job_id": job_id, "kind": "eval", "step": s, "epoch": s / 700, "eval_loss": floats[s % len(floats)],
             "reward_accuracy": 0.5 if s % 20 else None, "reward_margin": s / 3} for s in range(10, 701, 10)])
    for params in ({}, {"limit": 1}, {"limit": 333}, {"after_step": 100, "limit": 50},
                   {"after_step": 100, "after_eval_step": 0, "limit": 200}, {"after_step": 700}, {"after_eval_step": 695}):
        answer = team_a.get(f"/jobs/{job_id}/metrics", params=params)
        assert answer.status_code == 200, answer.text
        assert answer.content == page_as_the_models_wrote_it(url, job_id, params.get("after_step"),
                                                             params.get("after_eval_step"), params.get("limit", 10_000)), params


def test_a_thinned_view_keeps_the_shape_of_a_long_curve_in_a_bounded_count(deployment, team_a, team_b, demo_data):
    """GET /jobs/{id}/metrics?points=N: a chart's view of a curve of any length, in at most N points that keep
    each bucket's first and last point and its lowest and highest loss (a spike an even sample steps over
    stays), every evaluation of a job that evaluates rarely, and the end of the curve to poll on from."""
    import math
    import random

    url = deployment.settings.database_url
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    job_id = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                        **demo_spec("tiny")}).json()["id"]
    rng = random.Random(7)
    steps = 30_000
    losses = {s: 2.0 * math.exp(-s / 3000) + 0.3 + rng.random() * 0.05 for s in range(1, steps + 1)}
    losses[12_345], losses[20_001] = 50.0, -1.0  # a spike and a dip, one step each
    for s in range(5_000, 5_010):
        losses[s] = None  # a stretch where the loss diverged (stored as null)
    with session_scope(url) as session:
        session.execute(insert(JobMetric), [{"job_id": job_id, "kind": "train", "step": s, "train_loss": loss,
                                             "tokens_seen": s * 4096} for s, loss in losses.items()])
        session.execute(insert(JobMetric), [{"job_id": job_id, "kind": "eval", "step": s, "eval_loss": 1.0 + 1 / s}
                                            for s in range(1_000, steps + 1, 1_000)])
    whole = curve_in_the_database(url, job_id)

    answer = team_a.get(f"/jobs/{job_id}/metrics", params={"points": 2_000})
    assert answer.status_code == 200, answer.text
    view = answer.json()
    width = view["bucket_steps"]
    assert view["thinned"] is True and view["curve_points"] == steps + 30 and view["has_more"] is False
    assert len(view["train"]) + len(view["eval"]) <= 2_000 and len(view["train"]) > 500
    assert width == (steps - 1) // (2_000 // 8) + 1
    # Every point shown is the curve's own, in step order; each bucket's first, last, lowest and highest are there.
    shown = as_pairs(view)
    assert set(shown["train"]) <= set(whole["train"]) and [s for s, _ in shown["train"]] == sorted({s for s, _ in shown["train"]})
    buckets: dict[int, list[tuple[int, float]]] = {}
    for step, loss in whole["train"]:
        buckets.setdefault((step - 1) // width, []).append((step, loss))
    kept = {step for step, _ in shown["train"]}
    for points in buckets.values():
        valued = [p for p in points if p[1] is not None]
        assert points[0][0] in kept and points[-1][0] in kept
        assert min(p[1] for p in valued) in {loss for s, loss in shown["train"] if s in {q[0] for q in points}}
        assert max(p[1] for p in valued) in {loss for s, loss in shown["train"] if s in {q[0] for q in points}}
    assert (12_345, 50.0) in shown["train"] and (20_001, -1.0) in shown["train"]
    assert shown["eval"] == whole["eval"]  # one evaluation every 1,000 steps: all of them
    assert view["train"][0]["tokens_seen"] == 4096  # whole points, every field
    assert view["next"] == {"after_step": steps, "after_eval_step": steps}

    # However small N, however dense the evaluations: at most N.
    for points in (8, 9, 100, 4_999):
        view = team_a.get(f"/jobs/{job_id}/metrics", params={"points": points}).json()
        assert len(view["train"]) + len(view["eval"]) <= points and view["thinned"] is True, points
        assert (12_345, 50.0) in as_pairs(view)["train"] and (20_001, -1.0) in as_pairs(view)["train"]
    one_bucket = team_a.get(f"/jobs/{job_id}/metrics", params={"points": 8}).json()
    assert [p["step"] for p in one_bucket["train"]] == [1, 12_345, 20_001, steps]

    # A curve that fits comes whole, not thinned; a poller goes on from its `next`.
    view = team_a.get(f"/jobs/{job_id}/metrics", params={"points": 5_000}).json()
    short_job = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                           **demo_spec("tiny")}).json()["id"]
    with session_scope(url) as session:
        for s in range(1, 51):
            repository.upsert_metric(session, short_job, {"kind": "train", "step": s, "train_loss": 1 / s})
    view = team_a.get(f"/jobs/{short_job}/metrics", params={"points": 50}).json()
    assert view["thinned"] is False and view["bucket_steps"] is None and view["curve_points"] == 50
    assert as_pairs(view) == curve_in_the_database(url, short_job)
    with session_scope(url) as session:
        repository.upsert_metric(session, short_job, {"kind": "train", "step": 51, "train_loss": 0.01})
    polled = team_a.get(f"/jobs/{short_job}/metrics", params=view["next"]).json()
    assert as_pairs(polled) == {"train": [(51, 0.01)], "eval": []}
    empty_job = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                           **demo_spec("tiny")}).json()["id"]
    assert team_a.get(f"/jobs/{empty_job}/metrics", params={"points": 10}).json() == {
        "job_id": empty_job, "train": [], "eval": [], "has_more": False, "next": {"after_step": None, "after_eval_step": 0},
        "thinned": False, "bucket_steps": None, "curve_points": 0}

    # Another team's job is 404, as without `points`.
    assert team_b.get(f"/jobs/{job_id}/metrics", params={"points": 100}).status_code == 404


def test_a_thinned_view_out_of_range_or_with_paging_is_a_422_naming_points(team_a, demo_data):
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    job_id = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                        **demo_spec("tiny")}).json()["id"]
    for points in (0, -1, 7, 5_001, 10**30):
        answer = team_a.get(f"/jobs/{job_id}/metrics", params={"points": points})
        assert answer.status_code == 422, (points, answer.text)
        error = answer.json()["error"]
        assert error["message"] == f"points: must be between 8 and 5000, got {points}"
        assert error["details"] == [{"field": "points", "message": "must be between 8 and 5000"}]
    for paging in ({"after_step": 10}, {"after_eval_step": 0}, {"limit": 100}, {"after_step": 1, "limit": 5}):
        answer = team_a.get(f"/jobs/{job_id}/metrics", params={"points": 100, **paging})
        assert answer.status_code == 422, (paging, answer.text)
        error = answer.json()["error"]
        assert error["message"].startswith(f"points: cannot be combined with {' or '.join(paging)}: "), error
        assert error["details"] == [{"field": "points", "message": f"cannot be combined with {' or '.join(paging)}"}]
    answer = team_a.get(f"/jobs/{job_id}/metrics", params={"points": "many"})
    assert answer.status_code == 422 and "points" in answer.json()["error"]["message"]


def rows_read(session) -> int:
    """The job_metrics rows and index entries this session's transaction has read so far: Postgres's own
    per-transaction counters, so what a read costs the database, measured without a clock."""
    return session.execute(text(
        "SELECT sum(pg_stat_get_xact_tuples_returned(oid)) FROM pg_class WHERE oid = 'job_metrics'::regclass "
        "OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'job_metrics'::regclass)")).scalar_one()


def test_a_polled_thinned_view_reads_only_whats_past_its_completed_buckets_and_answers_as_computed_whole(
        deployment, team_a, demo_data):
    """GET /jobs/{id}/metrics?points=N summed up the whole curve in SQL on every poll (1.2 s of Postgres at
    510,000 points, every 30 s per open tab): a hundred people watching one long job saturated the database.
    A poll now reads only the buckets past the completed ones kept from the poll before, and the answer is,
    byte for byte, the one computed whole: as the curve grows, when its bucket width changes, after a resume
    deleted the points past its checkpoint and logged them again (with its new attempt, and without one: an
    unusable checkpoint makes the same attempt resume from an older one), after such a resume polled before it
    logged again (the same bucket width), and when a point lands late in a completed bucket."""
    from app.jobs import service
    from app.jobs.schemas import curve_json
    from app.jobs.tables import Job
    from app.teams.service import Caller

    url = deployment.settings.database_url
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    job_id = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                        **demo_spec("tiny")}).json()["id"]
    with session_scope(url) as session:
        caller = Caller(session.scalar(select(Job.team_id).where(Job.id == job_id)), "team-a", "", False)

    def log(steps: range, attempt: int) -> None:  # as an attempt's reports write them: train, and an eval every 100
        with session_scope(url) as session:
            session.execute(insert(JobMetric), [
                {"job_id": job_id, "kind": "train", "step": s, "train_loss": 2.0 + ((s * 7919 + attempt * 31) % 1000) / 997,
                 "tokens_seen": s * 4096} for s in steps])
            evals = [s for s in steps if s % 100 == 0]
            if evals:
                session.execute(insert(JobMetric), [{"job_id": job_id, "kind": "eval", "step": s,
                                                     "eval_loss": 1.0 + attempt + 1 / s} for s in evals])

    def resume(from_step: int, next_attempt: bool) -> None:  # runs._plan_resume, and a claim's new attempt
        with session_scope(url) as session:
            repository.delete_metrics_after(session, job_id, from_step)
            if next_attempt:
                session.execute(update(Job).where(Job.id == job_id).values(attempt=Job.attempt + 1))

    def whole(points: int) -> bytes:
        with session_scope(url) as session:
            return curve_json(service.thinned_curve(session, caller, job_id, points, (), completed=None).curve())

    def polled(points: int) -> int:
        """A poll in this process (with its completed buckets) and one of the API: each is the view computed
        whole, byte for byte. Returns the rows this process's poll read."""
        expected = whole(points)
        with session_scope(url) as session:
            before = rows_read(session)
            view = curve_json(service.thinned_curve(session, caller, job_id, points).curve())
            read = rows_read(session) - before
        assert view == expected
        answer = team_a.get(f"/jobs/{job_id}/metrics", params={"points": points})
        assert answer.status_code == 200 and answer.content == expected
        return read

    log(range(1, 20_101), attempt=0)
    whole_read = polled(2_000)  # the first poll: computed whole, ~2 reads of all 20,301 points
    assert whole_read > 40_000
    assert polled(2_000) < whole_read / 20  # nothing new: the last buckets only (81 steps each)
    width = json.loads(whole(2_000))["bucket_steps"]
    assert width == 20_099 // 250 + 1

    log(range(20_101, 20_201), attempt=0)  # the curve grows within the width
    assert polled(2_000) < whole_read / 20
    log(range(20_201, 20_401), attempt=0)  # past 20,250 steps: 82 a bucket, every bucket's bounds move
    assert json.loads(whole(2_000))["bucket_steps"] == width + 1
    polled(2_000)
    log(range(20_401, 20_421), attempt=0)
    assert polled(2_000) < whole_read / 20
    assert polled(4_000) > 40_000 and polled(4_000) < whole_read / 20  # each N its own buckets

    resume(15_000, next_attempt=True)  # points past the checkpoint deleted, then logged again with other losses
    polled(2_000)
    log(range(15_001, 20_421), attempt=1)  # the same length, so the same bucket width, as before the resume
    polled(2_000)
    polled(4_000)
    resume(10_000, next_attempt=False)  # the same attempt, from an older checkpoint (the newer one was unusable)
    log(range(10_001, 20_421), attempt=2)
    polled(2_000)
    polled(4_000)

    with session_scope(url) as session:  # a point lands in a completed bucket, long after its neighbours
        repository.upsert_metric(session, job_id, {"kind": "eval", "step": 5_050, "eval_loss": 0.125})
    polled(2_000)
    assert polled(2_000) < whole_read / 20
    polled(4_000)
    # The same attempt once more, from a checkpoint inside the completed buckets, polled before it logs again:
    # the same width, nothing written since; only the points gone tell.
    resume(20_340, next_attempt=False)
    assert json.loads(whole(2_000))["bucket_steps"] == width + 1
    polled(2_000)
    polled(4_000)


def test_a_watchs_poll_finds_its_new_points_without_reading_the_job(deployment, team_a, team_b, demo_data):
    """`qlora jobs watch` asks for the points past the last step it holds each time the job's step moves: two
    statements, one per series, each scoped to the team inside it; the job is read only when both are empty, to
    tell an empty page (200) from another team's job (404). It read the whole job first, every poll."""
    from sqlalchemy import event

    from app.db import engine_for
    from app.errors import NotFound
    from app.jobs import service
    from app.jobs.tables import Job
    from app.teams.service import Caller

    url = deployment.settings.database_url
    dataset_id = upload(team_a, demo_data["validation"]).json()["id"]
    job_id = team_a.post("/jobs", json={"dataset_id": dataset_id, "gpu_class": lane("nobody-listens"),
                                        **demo_spec("tiny")}).json()["id"]
    with session_scope(url) as session:
        session.execute(insert(JobMetric), [{"job_id": job_id, "kind": "train", "step": s, "train_loss": 2.0 / s}
                                            for s in range(1, 31)])
        team_id = session.scalar(select(Job.team_id).where(Job.id == job_id))
    owner, stranger = Caller(team_id, "a", "key-a", False), Caller("0" * 32, "b", "key-b", False)
    sent: list[str] = []

    def count(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append(statement)

    engine = engine_for(url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        with session_scope(url) as session:
            page = service.curve_page(session, owner, job_id, after_step=25, after_eval_step=0).curve()
            polled, sent[:] = len(sent), []
            empty = service.curve_page(session, owner, job_id, after_step=30, after_eval_step=0).curve()
            with pytest.raises(NotFound):
                service.curve_page(session, stranger, job_id, after_step=25, after_eval_step=0)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert [point["step"] for point in page["train"]] == [26, 27, 28, 29, 30] and page["eval"] == []
    assert polled == 2
    assert empty["train"] == empty["eval"] == [] and empty["next"] == {"after_step": 30, "after_eval_step": 0}
