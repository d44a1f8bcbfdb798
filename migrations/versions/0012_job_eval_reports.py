"""the eval report of a job

A job that succeeded keeps its eval report (worker/training/report.py: base and tuned answers side by
side, with exact match, F1, loss and perplexity) on its row, so GET /jobs/{id}/report serves it without
a trip to object storage; the same JSON is stored as the job's "report" artifact. Jobs that finished
before this migration have none.

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('report', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('report')
