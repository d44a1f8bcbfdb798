"""team offboarding: teams.disabled_at, set while an admin has disabled the team (its keys refused, its jobs
held or paused); a team is never deleted, so its usage rows stay for accounting

Revision ID: 0018
Revises: 0017
"""
import sqlalchemy as sa
from alembic import op

import app.db

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every team that exists is enabled: null.
    with op.batch_alter_table('teams', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled_at', app.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('teams', schema=None) as batch_op:
        batch_op.drop_column('disabled_at')
