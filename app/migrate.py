"""Bring a database to the newest schema (`qlora migrate`, and the embedded server at start)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    return config


class NewerSchema(Exception):
    """The database is at a revision this release lacks: a newer release migrated it (a rollback after an upgrade)."""


def upgrade(database_url: str) -> None:
    """Raises NewerSchema, saying what to do, where a newer release migrated the database: Alembic's own error
    there was a page of traceback ending in "Can't locate revision identified by ..."."""
    with one_migration_at_a_time(database_url):
        current, _, known = _revisions(database_url)
        if current is not None and current not in known:
            raise NewerSchema(_newer(current))
        command.upgrade(alembic_config(database_url), "head")


@contextmanager
def one_migration_at_a_time(database_url: str) -> Iterator[None]:
    """For a SQLite file, an exclusive lock on `<file>.lock` beside it while the block runs: two processes that
    migrated a fresh file at once (`qlora migrate` and a first `qlora serve` started together, or two `qlora
    migrate`) each read "no schema" and ran the same CREATE TABLEs, which SQLite commits one by one (Alembic runs
    no DDL transaction there), and one failed with "table base_models already exists". The second now waits for
    the first, then finds the schema made. Postgres has its advisory lock instead (migrations/env.py). The lock
    is the kernel's (flock): it goes with the process however that ends, and the empty file left is harmless."""
    url = make_url(database_url)
    path = Path(url.database) if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") else None
    if path is None or not path.parent.is_dir():  # in memory, or a directory SQLite will say is missing
        yield
        return
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks until the other migration ends
        yield
    finally:
        os.close(lock)  # and with it the lock


def schema_problem(database_url: str) -> str | None:
    """None when the database is at this release's newest schema; else what is wrong, saying what to run.
    An API on a database `qlora migrate` has not made answered /health and failed every other request."""
    current, head, known = _revisions(database_url)
    if current == head:
        return None
    if current is None:
        return "the database has no schema yet: run `qlora migrate` first (with the same QLORA_DATABASE_URL)"
    if current not in known:
        return _newer(current)
    return f"the database is at schema {current}, this release needs {head}: run `qlora migrate` first"


def _newer(current: str) -> str:
    return (f"the database is at schema {current}, which this release does not know (a newer release "
            "migrated it): run that release, or restore the database")


def _revisions(database_url: str) -> tuple[str | None, str | None, set[str]]:
    """The database's revision (None: no schema yet), this release's head, and every revision it has."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from app.db import make_engine

    scripts = ScriptDirectory.from_config(alembic_config(database_url))
    engine = make_engine(database_url)  # asked once, by a process that serves nothing itself: no pool kept
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    return current, scripts.get_current_head(), {script.revision for script in scripts.walk_revisions()}
