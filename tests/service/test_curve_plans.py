"""The thinned view's queries (app/jobs/repository.py) cost what the points they are for cost, whatever Postgres's
statistics say: a running job logs past its table's last analyze, and with statistics older than its points the
planner estimated one row and joined every point to every bucket (1 s of a poll at 20,000 points, quadratic). Work
is counted in the database's own terms (rows each plan node handled, rows read), never timed."""

from __future__ import annotations

import asyncio
import functools
import json

import pytest
from sqlalchemy import event, insert, text

from app.db import engine_for, new_id, read_only, session_scope
from app.jobs import repository, states
from app.jobs.tables import Job, JobMetric
from app.migrate import upgrade
from bench.curve_bench import joined_buckets
from worker.training.spec import JobSpec
from worker.training.tiny import demo_spec


def new_curve(url: str, steps: range, every_eval: int = 100) -> tuple[str, str]:
    """A team and a job with train points at `steps` (some losses missing, some tied, a gap) and an eval every
    `every_eval`; (team id, job id)."""
    from app.teams import service as teams_service

    with session_scope(url) as session:
        team = teams_service.create_team(session, f"plans-{new_id()[:8]}")
        job_id = new_id()
        session.execute(insert(Job), [{
            "id": job_id, "team_id": team.id, "name": "curve", "status": states.RUNNING,
            "spec": JobSpec.parse(demo_spec("tiny")).model_dump(mode="json"), "base_model": "tiny",
            "queue": "gpu-default", "total_steps": steps.stop, "step": steps.stop}])
        kept = [s for s in steps if not 1_200 <= s < 1_500]  # a gap of whole buckets
        session.execute(insert(JobMetric), [
            {"job_id": job_id, "kind": "train", "step": s,
             "train_loss": None if s % 37 == 0 else 2.0 + (s * 7919 % 1000) // 25 / 40} for s in kept])  # ties
        session.execute(insert(JobMetric), [{"job_id": job_id, "kind": "eval", "step": s, "eval_loss": 1.0 + 1 / s}
                                            for s in kept if s % every_eval == 0])
        return team.id, job_id


@pytest.fixture(params=["postgres", "sqlite"])
def any_database(request, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'qlora.db'}"
        upgrade(url)
        yield url
        engine_for(url).dispose()
    else:
        yield request.getfixturevalue("database_url")


def test_each_buckets_sums_are_those_of_the_points_joined_to_their_bucket(any_database):
    url = any_database
    team_id, job_id = new_curve(url, range(5, 3_005), every_eval=50)
    with session_scope(url) as session:
        for kind, loss in (("train", "train_loss"), ("eval", "eval_loss")):
            for first, width, through in ((5, 12, 3_004), (5, 97, 3_004), (5, 1, 400), (3, 250, 2_900)):
                whole = repository.metric_buckets(session, team_id, job_id, kind, loss, first, width, through)
                assert whole == joined_buckets(session, team_id, job_id, kind, loss, first, width, through)
                assert whole and any(low is None for _, _, low, _, _, _ in whole) == (kind == "train" and width == 1)
                from_step = first + width * (len(range(first, through + 1, width)) - 3)
                assert (repository.metric_buckets(session, team_id, job_id, kind, loss, first, width, through, from_step)
                        == joined_buckets(session, team_id, job_id, kind, loss, first, width, through, from_step))
        assert repository.metric_buckets(session, "another-team", job_id, "train", "train_loss", 5, 12, 3_004) == []


def plan_work(plan: dict) -> float:
    """The rows every node of an EXPLAIN ANALYZE plan handled: those it passed on and those its filters dropped."""
    rows = plan["Actual Rows"] + sum(plan.get(f"Rows Removed by {what}", 0) for what in ("Filter", "Join Filter"))
    return rows * plan["Actual Loops"] + sum(plan_work(child) for child in plan.get("Plans", []))


def rows_read(session) -> int:
    """The job_metrics rows and index entries this transaction has read so far (as test_curve_pages.py counts)."""
    return session.execute(text(
        "SELECT sum(pg_stat_get_xact_tuples_returned(oid)) FROM pg_class WHERE oid = 'job_metrics'::regclass "
        "OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'job_metrics'::regclass)")).scalar_one()


def test_a_curve_logged_since_the_last_analyze_is_read_in_work_linear_in_its_points(database_url):
    with session_scope(database_url) as session:  # what autovacuum would do meanwhile: statistics stay stale
        session.execute(text("ALTER TABLE job_metrics SET (autovacuum_enabled = false)"))
    points = 4_000
    team_id, job_id = new_curve(database_url, range(1, points + 1))
    width = (points - 1) // 250 + 1
    with session_scope(database_url) as session:
        assert session.execute(text("SELECT reltuples < 0 FROM pg_class WHERE relname = 'job_metrics'")).scalar_one()
        statements: list[tuple[str, dict]] = []
        connection = session.connection()
        event.listen(connection, "before_cursor_execute",
                     lambda conn, cursor, statement, parameters, *_: statements.append((statement, parameters)))
        buckets = repository.metric_buckets(session, team_id, job_id, "train", "train_loss", 1, width, points)
        assert len(buckets) == 250 - 300 // width
        (statement, parameters), = [(s, p) for s, p in statements if "job_metrics" in s]
        cursor = connection.connection.dbapi_connection.cursor()
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
        plan = cursor.fetchone()[0]
        plan = json.loads(plan) if isinstance(plan, str) else plan
        # A few passes over the points; joined to every bucket each, a point was handled 250 times.
        assert plan_work(plan[0]["Plan"]) < 10 * points, json.dumps(plan, indent=1)

        # What a poll past its completed buckets reads besides them: the curve's ends and its newest points.
        before = rows_read(session)
        changes = repository.curve_changes(session, team_id, job_id, 10**9, [("train", points)])
        assert changes.ends["train"] == (1, points) and changes.earliest_new_step is None
        assert rows_read(session) - before < 50
        before = rows_read(session)
        kept = repository.metrics_at(session, team_id, job_id, "train", ("step",), [points - 40, points - 2, points])
        assert [row.step for row in kept] == [points - 40, points - 2, points]
        assert rows_read(session) - before < 100


def test_a_bucket_query_that_fails_raises_its_own_error_not_the_jit_settings(database_url):
    """JIT is turned off for the statement and put back after it. Put back in a `finally`, a statement that failed
    (its statement timeout, say, which the API answers 503) raised "current transaction is aborted" from the
    setting's statement instead of its own error. A width of 0 makes the statement fail in the database."""
    from sqlalchemy.exc import DataError

    team_id, job_id = new_curve(database_url, range(5, 50), every_eval=10)
    with session_scope(database_url) as session, pytest.raises(DataError, match="division by zero"):
        repository.metric_buckets(session, team_id, job_id, "train", "train_loss", 5, 0, 49)


def test_the_thinned_routes_bucket_query_runs_without_jit_and_leaves_the_pooled_connection_as_it_was(database_url):
    """The thinned route reads on app.db.read_only, where each statement is its own transaction (autocommit): JIT
    turned off for the transaction was back on before the bucket query ran, which compiled (200 ms a poll at 20,000
    points) as before. Off for that query, and back after it on the connection, which goes back to the pool, whether
    the query succeeded or failed (a width of 0 fails it in the database)."""
    from sqlalchemy.exc import DataError

    team_id, job_id = new_curve(database_url, range(5, 50), every_eval=10)

    def read(session, width: int) -> tuple[bool, list[str], str, str]:
        connection = session.connection()
        before = connection.execute(text("SHOW jit")).scalar_one()
        seen: list[str] = []

        def look(conn, cursor, statement, *_) -> None:
            if "GROUP BY" in statement:  # the bucket query, as it is sent
                probe = conn.connection.dbapi_connection.cursor()
                probe.execute("SHOW jit")
                seen.append(probe.fetchone()[0])
        event.listen(connection, "before_cursor_execute", look)
        try:
            read_ok = bool(repository.metric_buckets(session, team_id, job_id, "train", "train_loss", 5, width, 49))
        except DataError:
            read_ok = False
        finally:
            event.remove(connection, "before_cursor_execute", look)
        return read_ok, seen, before, connection.execute(text("SHOW jit")).scalar_one()

    for width, succeeds in ((4, True), (0, False)):
        read_ok, seen, before, after = asyncio.run(read_only(database_url, functools.partial(read, width=width)))
        assert (read_ok, seen, after) == (succeeds, ["off"], before)
