"""One linear history that runs on Postgres and SQLite (batch mode rewrites tables where SQLite cannot ALTER)."""

from alembic import context
from sqlalchemy import create_engine, pool

import app.datasets.tables  # noqa: F401  (each domain's tables register on Base.metadata)
import app.idempotency.tables  # noqa: F401
import app.jobs.tables  # noqa: F401
import app.models.tables  # noqa: F401
import app.operations.tables  # noqa: F401
import app.teams.tables  # noqa: F401
from app.config import get_settings
from app.db import Base

config = context.config


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
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
