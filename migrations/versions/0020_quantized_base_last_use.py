"""quantized base last use: quantized_bases.last_used_at, set when an entry is stored and whenever a job
loads from it, so that entries no job has used for QLORA_QUANTIZED_CACHE_KEEP_DAYS can be pruned (a library
upgrade or a changed or retired base model leaves its old entries unreachable, ~35 GB each for a 65B base)

Revision ID: 0020
Revises: 0019
"""
import sqlalchemy as sa
from alembic import op

import app.db

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('quantized_bases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_used_at', app.db.UTCDateTime(timezone=True), nullable=True))
    # When an entry stored before this release was last loaded is not known: its creation is the closest mark
    # there is, and counts as a use, so an upgrade does not prune at once what jobs loaded yesterday.
    op.execute("UPDATE quantized_bases SET last_used_at = created_at")
    with op.batch_alter_table('quantized_bases', schema=None) as batch_op:
        batch_op.alter_column('last_used_at', existing_type=app.db.UTCDateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('quantized_bases', schema=None) as batch_op:
        batch_op.drop_column('last_used_at')
