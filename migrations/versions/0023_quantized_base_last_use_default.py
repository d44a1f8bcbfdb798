"""quantized base last use defaults to the time of the insert: a worker of a release before 0020, still running
against a migrated database (a rolling upgrade), stores a quantized base without last_used_at, and the NOT NULL
that 0020 added without a default failed its insert, and with it the job it had just trained

Revision ID: 0023
Revises: 0022
"""
import sqlalchemy as sa
from alembic import op

import app.db

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('quantized_bases', schema=None) as batch_op:
        batch_op.alter_column('last_used_at', existing_type=app.db.UTCDateTime(timezone=True), existing_nullable=False,
                              server_default=sa.text('CURRENT_TIMESTAMP'))


def downgrade() -> None:
    with op.batch_alter_table('quantized_bases', schema=None) as batch_op:
        batch_op.alter_column('last_used_at', existing_type=app.db.UTCDateTime(timezone=True), existing_nullable=False,
                              server_default=None)
