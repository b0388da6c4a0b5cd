"""dialogue assessment: reply quality per reply (issue 25): repetition, opening, relevance, perplexity

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        'item_responses',
        sa.Column('quality', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    )


def downgrade() -> None:
    with op.batch_alter_table('item_responses') as batch:
        batch.drop_column('quality')
