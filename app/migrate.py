"""Bring a database to the newest schema (`qlora migrate`, and the embedded server at start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

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
    current, _, known = _revisions(database_url)
    if current is not None and current not in known:
        raise NewerSchema(_newer(current))
    command.upgrade(alembic_config(database_url), "head")


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
