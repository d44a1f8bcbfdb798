"""job created datasets, and job metadata without NUL: jobs.created_dataset_id and created_validation_dataset_id keep
the ids a job was created with once the dataset is deleted (dataset_id turns null), so the OpenAI API still answers
the training_file the client sent; backfilled from the datasets the rows still reference (a job whose dataset was
deleted before this release has lost it). And a NUL in a job's metadata, which releases before its refusal stored,
becomes U+FFFD (the replacement character), in keys and values: Postgres cannot read such a pair out of the JSON
as text, and one such job failed every metadata filter of its team with a 500

Revision ID: 0024
Revises: 0023
"""
import json

import sqlalchemy as sa
from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None

REPLACEMENT = "\ufffd"


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_dataset_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('created_validation_dataset_id', sa.String(length=32), nullable=True))
    op.execute("UPDATE jobs SET created_dataset_id = dataset_id, created_validation_dataset_id = validation_dataset_id")
    _replace_nul_in_metadata()


def _replace_nul_in_metadata() -> None:
    """Read as text (Postgres fails to turn such a JSON value into text fields, not to hand the document
    over), decoded and written back here. The stored JSON spells NUL as the escape \\u0000: the LIKE only
    narrows the rows down (an escaped backslash before "u0000" matches too), the decoded pairs decide."""
    conn = op.get_bind()
    jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('metadata', sa.JSON))
    text = sa.cast(jobs.c.metadata, sa.Text)
    found = conn.execute(sa.select(jobs.c.id, text).where(text.like('%\\u0000%', escape='!'))).all()
    for job_id, stored in found:
        metadata = json.loads(stored)
        if not isinstance(metadata, dict):
            continue
        cleaned = {str(key).replace("\x00", REPLACEMENT): value.replace("\x00", REPLACEMENT) if isinstance(value, str)
                   else value for key, value in metadata.items()}
        if cleaned != metadata:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(metadata=cleaned))


def downgrade() -> None:
    # The metadata stays without NUL: what replaced it cannot be told from a caller's own U+FFFD.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('created_validation_dataset_id')
        batch_op.drop_column('created_dataset_id')
