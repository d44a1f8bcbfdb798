"""a job's claim_token: the token of the worker's claim that took its current attempt

A worker tries its claim again when the database connection drops on the way; a claim whose commit landed
unheard must then be found again by that worker (app/jobs/runs.landed_claim), not claimed anew: the worker took a
second job while the first waited, claimed by nobody, for the reaper's deadline. Null for jobs never claimed, and
for attempts claimed before this revision (nothing looks for those).

Revision ID: 0026
Revises: 0025
"""
import sqlalchemy as sa
from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('claim_token', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('claim_token')
