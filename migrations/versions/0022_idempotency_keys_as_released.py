"""idempotency keys as released: a database migrated to 0015 by the releases that first shipped it (jobs'
keys only: job_id NOT NULL, no dataset_id) gets the table 0015 makes now, which uploads' keys need

0015 gained dataset_id after those releases had run it, and Alembic never runs a revision twice: on such a
database every upload sent with an Idempotency-Key failed (500) for want of the column. A database that ran
0015 as it is now already has both, and this does nothing to it.

Revision ID: 0022
Revises: 0021
"""
import sqlalchemy as sa
from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {c['name']: c for c in sa.inspect(op.get_bind()).get_columns('idempotency_keys')}
    if 'dataset_id' in columns and columns['job_id']['nullable']:
        return
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        if 'dataset_id' not in columns:
            batch_op.add_column(sa.Column('dataset_id', sa.String(length=32), nullable=True))
            batch_op.create_foreign_key('fk_idempotency_keys_dataset_id_datasets', 'datasets', ['dataset_id'], ['id'],
                                        ondelete='CASCADE')
        if not columns['job_id']['nullable']:
            batch_op.alter_column('job_id', existing_type=sa.String(length=32), nullable=True)


def downgrade() -> None:
    pass  # 0015's table, as it is now, is what this leaves: 0015's downgrade drops it
