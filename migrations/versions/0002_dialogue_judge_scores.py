"""dialogue assessment: the trait judge's scores per reply (issue 11)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 21:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        'item_responses',
        sa.Column('judge_scores', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    )


def downgrade() -> None:
    with op.batch_alter_table('item_responses') as batch:
        batch.drop_column('judge_scores')
