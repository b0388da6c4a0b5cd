"""psychometrics (issue 12): coverage per trait instead of a per-assessment alpha; framing and
label-text scores per response

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 21:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('trait_scores', schema=None) as batch_op:
        batch_op.drop_column('alpha')  # runs of one persona are not respondents: it measured nothing
        batch_op.add_column(sa.Column('coverage', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('n_answered', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('n_asked', sa.Integer(), nullable=True))
    with op.batch_alter_table('item_responses', schema=None) as batch_op:
        batch_op.add_column(sa.Column('option_variant', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('option_logprobs', _json(), nullable=True))
        batch_op.add_column(sa.Column('option_probs_norm', _json(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('item_responses', schema=None) as batch_op:
        batch_op.drop_column('option_probs_norm')
        batch_op.drop_column('option_logprobs')
        batch_op.drop_column('option_variant')
    with op.batch_alter_table('trait_scores', schema=None) as batch_op:
        batch_op.drop_column('n_asked')
        batch_op.drop_column('n_answered')
        batch_op.drop_column('coverage')
        batch_op.add_column(sa.Column('alpha', sa.Float(), nullable=True))
