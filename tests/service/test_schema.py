"""The schema: what the migrations build is what the code declares, on SQLite and on Postgres; and the
polled reads of jobs walk their indexes, however many jobs a team has."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert, select
from sqlalchemy.dialects import postgresql

import app.bootstrap  # noqa: F401  (every table's module, as the running service has them)
from app.db import Base, engine_for, new_id, session_scope, utcnow
from app.jobs import repository, states
from app.jobs.tables import Job
from app.migrate import upgrade
from app.pagination import cursor_after, newest_first_values
from app.teams.service import create_team
from bench.api_load import analyze
from worker.training.spec import JobSpec
from worker.training.tiny import demo_spec


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_migrations_build_exactly_the_tables_the_code_declares(database, tmp_path, request):
    """A column, index or constraint added to (or dropped from) a table's class needs its migration,
    and the reverse: Alembic's own comparison finds nothing between the two."""
    url = f"sqlite:///{tmp_path / 'qlora.db'}" if database == "sqlite" else request.getfixturevalue("database_url")
    upgrade(url)
    with engine_for(url).connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert differences == []


def plan(database_url: str, statement, values: dict) -> dict:
    """Postgres's plan for one of the service's statements, as the app's driver sends it. The generic
    plan: the driver prepares a statement run five times, and Postgres may then plan it once for
    any values."""
    sql = str(statement.compile(dialect=postgresql.psycopg.dialect()))
    with engine_for(database_url).connect() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        return conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, values).scalar_one()[0]["Plan"]


def nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def test_the_polled_reads_walk_their_indexes_whatever_the_teams_count_of_jobs(database_url):
    """GET /jobs/{id} and GET /jobs on a team with 2,000 jobs, in a table Postgres has statistics for
    (autovacuum analyzes a table within a minute of its first 50 changes): one job through the primary
    key, and the 51 newest through ix_jobs_team_created walked backwards, never a sort of the team's
    jobs, so neither read grows with the team's count of jobs."""
    spec = JobSpec.parse(demo_spec("tiny")).model_dump(mode="json")  # what POST /jobs stores
    now = utcnow()
    with session_scope(database_url) as session:
        team_ids = [create_team(session, name).id for name in ("many-jobs", "others")]
        session.execute(insert(Job), [
            {"id": new_id(), "team_id": team_ids[1] if i % 5 == 0 else team_ids[0], "name": f"job-{i}", "status": states.SUCCEEDED,
             "spec": spec, "base_model": "tiny", "queue": "gpu-default", "created_at": now - timedelta(seconds=i)}
            for i in range(2_500)])
        job_id = session.scalars(select(Job.id).where(Job.team_id == team_ids[0]).limit(1)).one()
    analyze(database_url)

    def scans(statement, values: dict) -> list[tuple]:
        return [(n["Node Type"], n.get("Index Name"), n.get("Scan Direction")) for n in nodes(plan(database_url, statement, values))
                if n["Node Type"] in SCANS]

    assert scans(repository._VIEW_BY_ID, {"team_id": team_ids[0], "job_id": job_id}) == [
        ("Index Scan", "pk_jobs", "Forward")]
    for status, cursor in [(None, None), (states.SUCCEEDED, None), (None, cursor_after_any(database_url, team_ids[0]))]:
        values = {"team_id": team_ids[0], **newest_first_values(cursor, 50), **({"status": status} if status else {})}
        assert scans(repository._view_page(by_status=bool(status), after=bool(cursor)), values) == [
            ("Index Scan", "ix_jobs_team_created", "Backward")], (status, cursor)


SCANS = ("Index Scan", "Index Only Scan", "Seq Scan", "Sort", "Bitmap Heap Scan", "Bitmap Index Scan")


def cursor_after_any(database_url: str, team_id: str) -> str:
    """The cursor of a page ending in the middle of the team's jobs."""
    with session_scope(database_url) as session:
        row = session.execute(select(Job.created_at, Job.id).where(Job.team_id == team_id)
                              .order_by(Job.created_at.desc(), Job.id.desc()).offset(1_000).limit(1)).one()
    return cursor_after(row)
