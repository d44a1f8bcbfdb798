"""index a job's points and events by (job_id, created_at, id), and its checkpoints and artifacts by (job_id, bytes)

Measured on a deployment's size (bench/scale_bench.py: 100,000 jobs, 21M points, 2M events):
- The OpenAI events list (GET /v1/fine_tuning/jobs/{id}/events) shows a job's events and points newest first by
  (created_at, id). With no index in that order, each page sorted all of the job's points: 0.6 s a page for a
  job with 500,000 points. With (job_id, created_at, id) a page reads its 21 rows, walking the index backwards.
- A team's stored bytes (GET /quota, GET /usage, the admins' views, the storage_gib quota) summed its jobs'
  checkpoints and artifacts through a hash join over a sequential scan of every team's rows (0.25 s for one
  team of 237,000 checkpoints). With (job_id, bytes) the sum reads only the team's rows, from the index alone.
The indexes on job_id alone are dropped: each of these tables has other indexes led by job_id (the unique
constraints, and (job_id, id)) that serve the foreign key's cascade and every lookup by job, so the points and
events written by each training step keep the same number of indexes to update.

On Postgres, CREATE INDEX holds writes to its table until it is built (about a minute for 20M points on two
cores); the migration runs in one transaction with the migration lock, so it cannot build them CONCURRENTLY.

Revision ID: 0025
Revises: 0024
"""
from alembic import op

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None

# (table, new index, its columns, the index on job_id alone it replaces)
INDEXES = [
    ('job_metrics', 'ix_job_metrics_job_created', ['job_id', 'created_at', 'id'], 'ix_job_metrics_job_id'),
    ('job_events', 'ix_job_events_job_created', ['job_id', 'created_at', 'id'], 'ix_job_events_job_id'),
    ('checkpoints', 'ix_checkpoints_job_bytes', ['job_id', 'bytes'], 'ix_checkpoints_job_id'),
    ('artifacts', 'ix_artifacts_job_bytes', ['job_id', 'bytes'], 'ix_artifacts_job_id'),
]


def upgrade() -> None:
    for table, name, columns, replaced in INDEXES:
        op.create_index(name, table, columns)
        op.drop_index(replaced, table_name=table)


def downgrade() -> None:
    for table, name, _, replaced in reversed(INDEXES):
        op.create_index(replaced, table, ['job_id'])
        op.drop_index(name, table_name=table)
