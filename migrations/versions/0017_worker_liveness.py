"""worker liveness: the workers that are up (each upserts its row while it runs, idle or busy), and when each
queued job entered the queue, so operators see a GPU class with no worker while its jobs wait

Revision ID: 0017
Revises: 0016
"""
import sqlalchemy as sa
from alembic import op

import app.db

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('queue', sa.String(length=100), nullable=False),
    sa.Column('started_at', app.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('seen_at', app.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_workers'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queued_at', app.db.UTCDateTime(timezone=True), nullable=True))
    # Jobs queued before this release: when they entered the queue is not known; their creation is the
    # closest mark there is (the readers fall back to it as well).


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('queued_at')
    op.drop_table('workers')
