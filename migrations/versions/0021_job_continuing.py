"""job continuing: jobs.continuing, true while a job the service itself queued again mid-run (preempted for
another team's job, handed back by a worker shutting down, its worker lost, or out of memory) waits to go on:
the monthly GPU-hour budget holds back starts, not such a job (app/scheduling/policy.py)

Revision ID: 0021
Revises: 0020
"""
import sqlalchemy as sa
from alembic import op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A job queued again before this release is not known from a new one: false, as before.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('continuing', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('continuing')
