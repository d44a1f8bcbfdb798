"""preference tuning: a job's starting job, and the DPO rewards in the loss curve

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

REWARDS = ('reward_accuracy', 'reward_chosen', 'reward_rejected', 'reward_margin')


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('initial_job_id', sa.String(length=32), nullable=True))
    with op.batch_alter_table('job_metrics', schema=None) as batch_op:
        for name in REWARDS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_metrics', schema=None) as batch_op:
        for name in REWARDS:
            batch_op.drop_column(name)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('initial_job_id')
