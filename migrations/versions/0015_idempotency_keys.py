"""idempotency keys: a creation sent again with the same Idempotency-Key answers with what it made

Revision ID: 0015
Revises: 0014
"""
import sqlalchemy as sa
from alembic import op

import app.db

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'idempotency_keys',
        sa.Column('team_id', sa.String(length=32), nullable=False),
        sa.Column('scope', sa.String(length=50), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('request_sha256', sa.String(length=64), nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=True),
        sa.Column('dataset_id', sa.String(length=32), nullable=True),
        sa.Column('created_at', app.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['team_id'], ['teams.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('team_id', 'scope', 'key'),
    )
    op.create_index('ix_idempotency_keys_team_created', 'idempotency_keys', ['team_id', 'created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_idempotency_keys_team_created', table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
