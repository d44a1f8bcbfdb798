"""One linear history that runs on Postgres and SQLite (batch mode rewrites tables where SQLite cannot ALTER)."""

from alembic import context
from sqlalchemy import create_engine, pool, text

import app.datasets.tables  # noqa: F401  (each domain's tables register on Base.metadata)
import app.idempotency.tables  # noqa: F401
import app.jobs.tables  # noqa: F401
import app.models.tables  # noqa: F401
import app.operations.tables  # noqa: F401
import app.teams.tables  # noqa: F401
from app.config import get_settings
from app.db import Base

config = context.config
# The advisory lock that lets one `qlora migrate` at a time change a Postgres database (any constant works: it
# only needs to be the same in every process that migrates).
MIGRATION_LOCK = 0x716C6F7261  # "qlora"


def database_url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Several `qlora migrate` at once (an init step per API replica): the first migrates, the
                # others wait here until it commits, then read its revision and find nothing to do. Without
                # it each ran the same DDL and all but one failed (duplicate key in pg_type, or a column
                # that already exists). Held until this transaction ends; SQLite serializes writers itself.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
