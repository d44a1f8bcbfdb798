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
    # When an entry stored before this release was last loaded is not known. Its creation says nothing of it (the
    # base every job uses may have been quantized months ago): taken as the last use, the reaper's first pass after
    # the upgrade would prune every entry older than QLORA_QUANTIZED_CACHE_KEEP_DAYS, those jobs loaded yesterday
    # too, and their next jobs would all quantize afresh. The upgrade counts as a use instead: an entry no job
    # loads goes that many days later.
    quantized_bases = sa.table('quantized_bases', sa.column('last_used_at', app.db.UTCDateTime(timezone=True)))
    op.execute(quantized_bases.update().values(last_used_at=app.db.utcnow()))
    with op.batch_alter_table('quantized_bases', schema=None) as batch_op:
        batch_op.alter_column('last_used_at', existing_type=app.db.UTCDateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('quantized_bases', schema=None) as batch_op:
        batch_op.drop_column('last_used_at')
