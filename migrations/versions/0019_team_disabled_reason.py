"""who disabled a team and why: teams.disabled_by, teams.disabled_reason (null for teams disabled before)

Revision ID: 0019
Revises: 0018
"""
import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('teams', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled_by', sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column('disabled_reason', sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('teams', schema=None) as batch_op:
        batch_op.drop_column('disabled_reason')
        batch_op.drop_column('disabled_by')
