"""fair share: team quotas, job priority and preemption, the attempts ledger

Quotas and the decayed usage of fair share live on the team; priority, the current attempt's claim
and the preemption flag on the job; every attempt's GPU time in job_attempts (app/scheduling/,
app/quotas/, app/usage/). Jobs claimed before this migration have no attempt rows: their usage starts now.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

import app.db

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('teams') as batch:
        batch.add_column(sa.Column('weight', sa.Float(), nullable=True))
        batch.add_column(sa.Column('max_running', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('max_queued', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('gpu_hours_per_month', sa.Float(), nullable=True))
        batch.add_column(sa.Column('storage_gib', sa.Float(), nullable=True))
        batch.add_column(sa.Column('fair_share_usage_s', sa.Float(), server_default='0', nullable=False))
        batch.add_column(sa.Column('fair_share_at', app.db.UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('priority', sa.Integer(), server_default='1', nullable=False))
        batch.add_column(sa.Column('claimed_at', app.db.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('preempting', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column('preemptions', sa.Integer(), server_default='0', nullable=False))
    op.create_table('job_attempts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('team_id', sa.String(length=32), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('queue', sa.String(length=100), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('claimed_at', app.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('ended_at', app.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('trained_tokens', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('tokens_at_claim', sa.BigInteger(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_attempts_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_job_attempts_team_id_teams'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_attempts')),
    sa.UniqueConstraint('job_id', 'attempt', name='uq_job_attempts_job_attempt')
    )
    op.create_index('ix_job_attempts_team_claimed', 'job_attempts', ['team_id', 'claimed_at'], unique=False)
    op.create_index('ix_job_attempts_ended', 'job_attempts', ['ended_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_job_attempts_ended', table_name='job_attempts')
    op.drop_index('ix_job_attempts_team_claimed', table_name='job_attempts')
    op.drop_table('job_attempts')
    with op.batch_alter_table('jobs') as batch:
        for column in ('preemptions', 'preempting', 'claimed_at', 'priority'):
            batch.drop_column(column)
    with op.batch_alter_table('teams') as batch:
        for column in ('fair_share_at', 'fair_share_usage_s', 'storage_gib', 'gpu_hours_per_month', 'max_queued',
                       'max_running', 'weight'):
            batch.drop_column(column)
