"""index jobs by finished_at

/metrics reads only the jobs that finished since its last scrape (app/operations/service.py,
FinishedJobs): this index finds them without reading every finished job.

Revision ID: 0008
Revises: 0007
"""
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_finished_at', 'jobs', ['finished_at'])


def downgrade() -> None:
    op.drop_index('ix_jobs_finished_at', table_name='jobs')
