"""The schema: what the migrations build is what the code declares, on SQLite and on Postgres; and the
polled reads of jobs walk their indexes, however many jobs a team has."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert, select, text
from sqlalchemy.dialects import postgresql

import app.bootstrap  # noqa: F401  (every table's module, as the running service has them)
import app.operations.tables  # noqa: F401  (the workers' table: the migrations below may run in other processes)
from app.datasets.tables import Dataset
from app.db import Base, UTCDateTime, engine_for, new_id, session_scope, utcnow
from app.idempotency import repository as idempotency
from app.jobs import repository, states
from app.jobs.tables import Artifact, Checkpoint, Job, JobEvent, JobMetric
from app.migrate import alembic_config, upgrade
from app.pagination import cursor_after, newest_first_values
from app.scheduling import repository as scheduling
from app.teams.service import create_team
from app.usage.repository import storage_bytes_by_team
from bench.api_load import analyze
from tests import services
from worker.training.spec import JobSpec
from worker.training.tiny import demo_spec


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_migrations_build_exactly_the_tables_the_code_declares(database, tmp_path, request):
    """A column, index or constraint added to (or dropped from) a table's class needs its migration,
    and the reverse: Alembic's own comparison finds nothing between the two, server defaults included."""
    url = f"sqlite:///{tmp_path / 'qlora.db'}" if database == "sqlite" else request.getfixturevalue("database_url")
    upgrade(url)
    with engine_for(url).connect() as conn:
        differences = schema_differences(conn)
    assert differences == []




def schema_differences(conn) -> list:
    """Alembic's autogenerate comparison of a database with the tables' classes: columns, types, nullability,
    server defaults, indexes, unique and foreign key constraints."""
    return compare_metadata(MigrationContext.configure(conn, opts={"compare_server_default": True}), Base.metadata)

@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_database_migrated_by_the_releases_that_first_shipped_0015_is_brought_to_the_same_schema(
        database, tmp_path, request):
    """Releases 284e0ff and c2cdd04 ran 0015 before it gained idempotency_keys.dataset_id (and let job_id be
    NULL): Alembic never runs a revision twice, so on their databases every upload sent with an Idempotency-Key
    failed with a 500 after an upgrade. The upgrade gives them the table a fresh database has, keeping the keys
    those releases recorded, and an upload's key is recorded."""
    url = f"sqlite:///{tmp_path / 'qlora.db'}" if database == "sqlite" else request.getfixturevalue("database_url")
    (command.upgrade if database == "sqlite" else command.downgrade)(alembic_config(url), "0014")
    as_released = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    as_released.reflect(engine_for(url), only=["teams", "jobs"])
    sa.Table("idempotency_keys", as_released,
             sa.Column("team_id", sa.String(32), sa.ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True),
             sa.Column("scope", sa.String(50), primary_key=True), sa.Column("key", sa.String(255), primary_key=True),
             sa.Column("request_sha256", sa.String(64), nullable=False),
             sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
             sa.Column("created_at", UTCDateTime(), nullable=False),
             sa.Index("ix_idempotency_keys_team_created", "team_id", "created_at"))
    now = utcnow()
    team_id = "t" * 32
    with engine_for(url).begin() as conn:  # what those releases wrote: a team, a job, the key it was made with
        as_released.create_all(conn, tables=[as_released.tables["idempotency_keys"]])
        conn.execute(as_released.tables["teams"].insert().values(id=team_id, name="keyed", created_at=now))
        conn.execute(as_released.tables["jobs"].insert().values(
            id="j" * 32, team_id=team_id, name="old", status=states.QUEUED, spec={}, base_model="tiny",
            queue="gpu-default", attempt=0, step=0, trained_tokens=0, created_at=now))
        conn.execute(as_released.tables["idempotency_keys"].insert().values(
            team_id=team_id, scope="POST /jobs", key="job-key", request_sha256="0" * 64, job_id="j" * 32,
            created_at=now))
    command.stamp(alembic_config(url), "0015")
    engine_for(url).dispose()

    upgrade(url)  # qlora migrate

    with engine_for(url).connect() as conn:
        assert schema_differences(conn) == []
    with session_scope(url) as session:
        assert idempotency.get(session, team_id, "POST /jobs", "job-key").job_id == "j" * 32
        session.add(Dataset(id="d" * 32, team_id=team_id, filename="train.jsonl", storage_key="k", bytes=1,
                            sha256="0" * 64, status="ready"))
        session.flush()
        idempotency.add(session, team_id, "POST /datasets", "upload-key", "1" * 64, now, dataset_id="d" * 32)
    with session_scope(url) as session:
        assert idempotency.get(session, team_id, "POST /datasets", "upload-key").dataset_id == "d" * 32
    engine_for(url).dispose()



@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_0024_keeps_the_datasets_jobs_were_created_with_and_takes_nul_out_of_their_metadata(database, tmp_path, request):
    """Rows of the releases before 0024: a job's datasets are kept apart from the references a delete turns
    null (backfilled from those), and the NUL that releases before its refusal stored in metadata becomes U+FFFD.
    Before, one such job failed every metadata filter of its team on Postgres with a 500 (\\u0000 cannot be
    converted to text)."""
    url = f"sqlite:///{tmp_path / 'qlora.db'}" if database == "sqlite" else request.getfixturevalue("database_url")
    (command.upgrade if database == "sqlite" else command.downgrade)(alembic_config(url), "0023")
    as_released = sa.MetaData()
    as_released.reflect(engine_for(url), only=["teams", "datasets", "jobs"])
    now = utcnow()
    team_id, train, validation = "t" * 32, "d" * 32, "v" * 32
    with engine_for(url).begin() as conn:
        conn.execute(as_released.tables["teams"].insert().values(id=team_id, name="old", created_at=now))
        for dataset_id in (train, validation):
            conn.execute(as_released.tables["datasets"].insert().values(
                id=dataset_id, team_id=team_id, filename="d.jsonl", storage_key=dataset_id, bytes=1, sha256="0" * 64,
                status="ready", rows=1, token_estimate=1, error_count=0, errors=[], created_at=now))
        for job_id, metadata, validation_id in (("a" * 32, {"run": "r", "bad\x00key": "x\x00y"}, validation),
                                                ("b" * 32, {"run": "r"}, None), ("c" * 32, None, None)):
            conn.execute(as_released.tables["jobs"].insert().values(
                id=job_id, team_id=team_id, name="old", status=states.CANCELLED, spec={}, base_model="tiny",
                queue="gpu-default", attempt=0, step=0, trained_tokens=0, created_at=now, metadata=metadata,
                dataset_id=train, validation_dataset_id=validation_id))
    engine_for(url).dispose()

    upgrade(url)  # qlora migrate

    with session_scope(url) as session:
        assert {job.id for job in repository.list_page(session, team_id, None, None, 10, {"run": "r"})} == {
            "a" * 32, "b" * 32}
        assert [job.id for job in repository.list_page(session, team_id, None, None, 10, {"bad\ufffdkey": "x\ufffdy"})] \
            == ["a" * 32]
        session.execute(sa.delete(Dataset).where(Dataset.team_id == team_id))
    with session_scope(url) as session:
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.team_id == team_id))}
        assert {job_id: (job.dataset_id, job.created_dataset_id, job.created_validation_dataset_id)
                for job_id, job in jobs.items()} == {
            "a" * 32: (None, train, validation), "b" * 32: (None, train, None), "c" * 32: (None, train, None)}
        assert jobs["a" * 32].user_metadata == {"run": "r", "bad\ufffdkey": "x\ufffdy"}
        assert jobs["c" * 32].user_metadata is None
    engine_for(url).dispose()


def test_two_migrations_started_at_once_on_a_fresh_postgres_both_succeed(tmp_path):
    """Several replicas each running `qlora migrate` as they start (an init step per API pod): each exits 0 and
    the schema is built once. Both are held at the same point (a table named alembic_version that this test
    creates and does not commit), so they race for certain when it rolls back. Before, the loser's CREATE
    TABLE failed with a duplicate key in pg_type and its replica did not start."""
    services.ensure_postgres()
    url = services.create_postgres_database()
    try:
        with engine_for(url).connect() as holder:
            holder.execute(text("CREATE TABLE alembic_version (version_num varchar(32))"))
            logs = [(tmp_path / f"migrate-{n}.log").open("w") for n in range(2)]
            migrations = [subprocess.Popen([sys.executable, "-c", f"from app.migrate import upgrade; upgrade({url!r})"],
                                           stdout=log, stderr=subprocess.STDOUT) for log in logs]
            wait_for_lock_waits(url, 2)
            holder.rollback()
        for migration, log in zip(migrations, logs, strict=True):
            migration.wait(timeout=120)
            log.close()
            assert migration.returncode == 0, Path(log.name).read_text()[-2000:]
        with engine_for(url).connect() as conn:
            assert schema_differences(conn) == []
    finally:
        engine_for(url).dispose()
        services.drop_postgres_database(url)


def test_two_migrations_started_at_once_on_a_fresh_sqlite_file_both_succeed(tmp_path):
    """The embedded default's first start: `qlora migrate` and `qlora serve` (or two `qlora migrate`) started at
    the same moment on a QLORA_HOME with no database yet. Each exits 0 and the schema is built once. Before, both
    read "no schema" and ran the same CREATE TABLEs, which SQLite commits one by one: one exited 1 with "table
    base_models already exists" (3 runs of 3 by hand)."""
    import os

    from tests.deployment import ROOT

    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}, "QLORA_HOME": str(home)}
    logs = [(tmp_path / f"migrate-{n}.log").open("w") for n in range(2)]
    migrations = [subprocess.Popen([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT) for log in logs]
    for migration, log in zip(migrations, logs, strict=True):
        migration.wait(timeout=300)
        log.close()
        assert migration.returncode == 0, Path(log.name).read_text()[-2000:]
    url = f"sqlite:///{home / 'qlora.db'}"
    try:
        with engine_for(url).connect() as conn:
            assert schema_differences(conn) == []
    finally:
        engine_for(url).dispose()


def wait_for_lock_waits(database_url: str, count: int) -> None:
    """Until `count` connections of this database wait on a lock (pg_stat_activity), after 60 s a failure."""
    deadline = time.monotonic() + 60
    with engine_for(database_url).connect() as conn:
        while conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event_type = 'Lock'")) < count:
            assert time.monotonic() < deadline, f"the {count} migrations never both waited"
            time.sleep(0.05)
            conn.rollback()  # a new snapshot of the statistics each look



def test_every_column_a_migration_adds_to_an_existing_table_takes_rows_written_without_it(tmp_path):
    """Processes of the release before a migration (a worker still finishing its job in a rolling upgrade)
    insert rows without the columns it added: each added column is nullable or has a server default. Before,
    0020's quantized_bases.last_used_at had neither, and such a worker's job failed as it stored its
    quantized base (`null value in column "last_used_at" ... violates not-null constraint`)."""
    url = f"sqlite:///{tmp_path / 'qlora.db'}"
    config = alembic_config(url)
    scripts = ScriptDirectory.from_config(config)
    added_to_existing: dict[tuple[str, str], str] = {}
    before: dict[str, set[str]] = {}
    for script in reversed(list(scripts.walk_revisions())):  # oldest first
        command.upgrade(config, script.revision)
        inspector = sa.inspect(engine_for(url))
        now = {table: {c["name"] for c in inspector.get_columns(table)} for table in inspector.get_table_names()}
        for table, columns in now.items():
            for column in columns - before.get(table, columns):
                added_to_existing[(table, column)] = script.revision
        before = now
        engine_for(url).dispose()
    inspector = sa.inspect(engine_for(url))
    refused = [f"{table}.{column['name']} (migration {added_to_existing[(table, column['name'])]})"
               for table in inspector.get_table_names() for column in inspector.get_columns(table)
               if (table, column["name"]) in added_to_existing and not column["nullable"] and column["default"] is None]
    engine_for(url).dispose()
    assert refused == []


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
    # A page after a cursor starts where the cursor is, not at the newest job: no filter over the rows before it.
    values = {"team_id": team_ids[0], **newest_first_values(cursor_after_any(database_url, team_ids[0]), 50)}
    [scan] = [n for n in nodes(plan(database_url, repository._view_page(by_status=False, after=True), values))
              if n["Node Type"] in SCANS]
    assert "Filter" not in scan and "ROW(created_at" in scan["Index Cond"], scan


SCANS = ("Index Scan", "Index Only Scan", "Seq Scan", "Sort", "Bitmap Heap Scan", "Bitmap Index Scan")


def cursor_after_any(database_url: str, team_id: str) -> str:
    """The cursor of a page ending in the middle of the team's jobs."""
    with session_scope(database_url) as session:
        row = session.execute(select(Job.created_at, Job.id).where(Job.team_id == team_id)
                              .order_by(Job.created_at.desc(), Job.id.desc()).offset(1_000).limit(1)).one()
    return cursor_after(row)


def test_a_page_of_the_openai_events_of_a_long_curve_reads_its_rows_from_an_index(database_url):
    """GET /v1/fine_tuning/jobs/{id}/events lists a job's events and points newest first by (created_at, id).
    Its read of the points, first page and a page deep in the curve, walks an index backwards from where the page
    starts: no sort of the job's points and no filter over the newer ones, so a page costs the same at 500,000
    points as at 50; its read of the events never scans the table. Before (no index in that order), every page
    sorted all of the job's points: 0.6 s a page for a job of 500,000 (bench/scale_bench.py)."""
    spec = JobSpec.parse(demo_spec("tiny")).model_dump(mode="json")
    start = utcnow() - timedelta(days=1)
    with session_scope(database_url) as session:
        team_id = create_team(session, "long-curves").id
        job_ids = [new_id() for _ in range(3)]
        session.execute(insert(Job), [{"id": job_id, "team_id": team_id, "name": "long", "status": states.RUNNING,
                                       "spec": spec, "base_model": "tiny", "queue": "gpu-default"} for job_id in job_ids])
        for job_id in job_ids:  # as a training process writes them: one point a step, an event now and then
            session.execute(insert(JobMetric), [{"job_id": job_id, "kind": "train", "step": step, "train_loss": 1.0,
                                                 "created_at": start + timedelta(seconds=step)} for step in range(1, 4001)])
            session.execute(insert(JobEvent), [{"job_id": job_id, "type": "progress", "level": "info", "attempt": 1,
                                                "created_at": start + timedelta(seconds=10 * n)} for n in range(400)])
        newest_page = [row.id for row in repository.feed_before(session, team_id, job_ids[0], JobMetric, None, 21)]
    analyze(database_url)
    with session_scope(database_url) as session:
        deep_point = session.scalar(select(JobMetric.id).where(JobMetric.job_id == job_ids[0], JobMetric.step == 100))
        deep_key = repository.feed_key(session, team_id, job_ids[0], JobMetric, deep_point)
    for key in (None, deep_key):
        for table in (JobMetric, JobEvent):
            [(statement, values)] = statements_of(database_url, lambda session, table=table, key=key: repository.feed_before(
                session, team_id, job_ids[0], table, key, 21))
            read = [n for n in nodes(plan_of_sql(database_url, statement, values)) if n["Node Type"] in SCANS]
            own = [n for n in read if n.get("Relation Name") == table.__tablename__]
            assert "Seq Scan" not in [n["Node Type"] for n in own], (table.__tablename__, key, read)
            if table is JobMetric:  # a job has a few events, which Postgres may sort; its points are the long list
                assert [n["Node Type"] for n in read if n["Node Type"] in ("Sort", "Incremental Sort")] == [], (key, read)
                assert [(n["Node Type"], n.get("Index Name"), n.get("Scan Direction"), "Filter" in n) for n in own] == [
                    ("Index Scan", "ix_job_metrics_job_created", "Backward", False)], (key, read)
    # jobs.retrieve()'s pace of a running job (estimated_finish): its first and newest points since its claim, each
    # a walk of the same index from one end, however long the curve.
    since = start + timedelta(seconds=1000)
    statements = statements_of(database_url, lambda session: repository.train_points_since(session, team_id, job_ids[0], since))
    assert len(statements) == 2
    for (statement, values), direction in zip(statements, ("Forward", "Backward"), strict=True):
        read = [n for n in nodes(plan_of_sql(database_url, statement, values)) if n["Node Type"] in SCANS]
        assert [(n["Node Type"], n.get("Index Name"), n.get("Scan Direction")) for n in read
                if n.get("Relation Name") == "job_metrics" or n["Node Type"] in ("Sort", "Incremental Sort")] == [
            ("Index Scan", "ix_job_metrics_job_created", direction)], read
    with session_scope(database_url) as session:
        assert [step for step, _ in repository.train_points_since(session, team_id, job_ids[0], since)] == [1000, 4000]
    # The scheduler reads the same pace of every running job (the budget counts what it still needs) in the statement
    # of the running claims: the same walks, as correlated subqueries, and no scan of the points.
    with session_scope(database_url) as session:
        session.get(Job, job_ids[0]).claimed_at = since
    [(statement, values)] = statements_of(database_url, lambda session: scheduling.running_claims(
        session, [team_id], paced=[team_id]))
    read = [n for n in nodes(plan_of_sql(database_url, statement, values)) if n.get("Relation Name") == "job_metrics"]
    assert len(read) == 4 and {(n["Node Type"], n.get("Index Name")) for n in read} == {
        ("Index Scan", "ix_job_metrics_job_created")}, read
    with session_scope(database_url) as session:
        paces = {(row.first_step, row.last_step) for row in scheduling.running_claims(session, [team_id], paced=[team_id])}
        assert paces == {(None, None), (1000, 4000)}, paces
        # A team without a budget needs no pace: none is read.
        assert {(row.first_step, row.last_at) for row in scheduling.running_claims(session, [team_id])} == {(None, None)}
    # the same rows as before: the newest first, and past the key exactly the older ones
    with session_scope(database_url) as session:
        assert newest_page == list(range(max(newest_page), max(newest_page) - 21, -1))
        older = repository.feed_before(session, team_id, job_ids[0], JobMetric, deep_key, 200)
        assert [row.step for row in older] == list(range(99, 0, -1))
        assert repository.feed_before(session, "another-team", job_ids[0], JobMetric, None, 21) == []


def test_a_teams_stored_bytes_are_summed_from_its_own_jobs_rows(database_url):
    """GET /quota, GET /usage and the storage_gib quota sum a team's checkpoints and artifacts: read from the
    (job_id, bytes) indexes of the team's own jobs, never a scan of every team's rows (0.25 s a read for one
    team among 237,000 checkpoints before: bench/scale_bench.py). And the sums are the team's own."""
    spec = JobSpec.parse(demo_spec("tiny")).model_dump(mode="json")
    with session_scope(database_url) as session:
        team_ids = [create_team(session, f"storage-{n}").id for n in range(40)]
        jobs = [{"id": new_id(), "team_id": team_id, "name": "done", "status": states.SUCCEEDED, "spec": spec,
                 "base_model": "tiny", "queue": "gpu-default"} for team_id in team_ids for _ in range(100)]
        session.execute(insert(Job), jobs)
        session.execute(insert(Checkpoint), [
            {"id": new_id(), "job_id": job["id"], "attempt": 1, "step": step, "storage_key": "k", "sha256": "0" * 64,
             "bytes": 1_000 * (n % 7 + 1) + step} for n, job in enumerate(jobs) for step in (10, 20, 30)])
        session.execute(insert(Artifact), [{"id": new_id(), "job_id": job["id"], "kind": kind, "storage_key": "k",
                                            "sha256": "0" * 64, "bytes": 5_000 + n} for n, job in enumerate(jobs)
                                           for kind in ("adapter", "merged", "report")])
    with engine_for(database_url).connect() as conn:  # the visibility map autovacuum keeps: index-only reads
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    team = team_ids[7]
    statements = statements_of(database_url, lambda session: storage_bytes_by_team(session, [team]))
    for statement, values in statements:
        scans = [(n["Node Type"], n.get("Relation Name")) for n in nodes(plan_of_sql(database_url, statement, values))
                 if n["Node Type"] in SCANS]
        assert ("Seq Scan", "checkpoints") not in scans and ("Seq Scan", "artifacts") not in scans, scans
    expected = sum(1_000 * (n % 7 + 1) + step for n, job in enumerate(jobs) if job["team_id"] == team
                   for step in (10, 20, 30)) + 3 * sum(5_000 + n for n, job in enumerate(jobs) if job["team_id"] == team)
    with session_scope(database_url) as session:
        assert storage_bytes_by_team(session, [team]) == {team: expected}


def statements_of(database_url: str, read) -> list[tuple[str, object]]:
    """The SQL and parameters read(session) sends, as the driver sends them."""
    sent: list[tuple[str, object]] = []

    def keep(conn, cursor, statement, parameters, context, executemany):
        sent.append((statement, parameters))

    engine = engine_for(database_url)
    sa.event.listen(engine, "before_cursor_execute", keep)
    try:
        with session_scope(database_url) as session:
            read(session)
    finally:
        sa.event.remove(engine, "before_cursor_execute", keep)
    return sent


def plan_of_sql(database_url: str, statement: str, values) -> dict:
    """plan() for a statement as the driver sent it, with the parameters it sent."""
    with engine_for(database_url).connect() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        return conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, values).scalar_one()[0]["Plan"]
