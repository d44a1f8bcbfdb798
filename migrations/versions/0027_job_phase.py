"""a job's phase: what its running attempt is doing (preparing, training, evaluating, saving, merging, reporting,
uploading)

A running job's status and step said nothing past its last step: it sat at "step 160/160" through the final
evaluation, the adapter's save, the merge, the eval report and the uploads, minutes to hours on a real model, and
"is it done?" had no answer. The worker reports each phase as it starts (an event of type "phase"); the job keeps
the newest, which its answer shows while it runs. Null for jobs never claimed since this revision.

Revision ID: 0027
Revises: 0026
"""
import sqlalchemy as sa
from alembic import op

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('phase', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('phase')
