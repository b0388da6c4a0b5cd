"""assessments.owner_key: the API key (its id, a sha256 prefix) that created each assessment (issue 28)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows from before keep NULL: created without a key, they are visible to admins only once keys are set.
    op.add_column('assessments', sa.Column('owner_key', sa.String(length=64), nullable=True))
    op.create_index(op.f('ix_assessments_owner_key'), 'assessments', ['owner_key'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_assessments_owner_key'), table_name='assessments')
    with op.batch_alter_table('assessments') as batch:
        batch.drop_column('owner_key')
