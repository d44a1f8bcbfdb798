"""a worker's device: "cuda" where its machine has a GPU for its training processes, "cpu" where it has none

A job queued on a laptop with no GPU (the embedded default) said it was "waiting for a free GPU of its class": the
machine has none, and its one worker trains on the CPU. Each worker says in its beat what it trains on, and a queued
job's wait is worded for it (app/scheduling/service.free_worker_wait). Null for a worker of an older release.

Revision ID: 0028
Revises: 0027
"""
import sqlalchemy as sa
from alembic import op

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('device', sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('device')
