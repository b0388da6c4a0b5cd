"""reasoning (issue 14)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('reasoning_runs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('personas', JSON, nullable=False),
    sa.Column('tasks', JSON, nullable=False),
    sa.Column('item_limit', sa.Integer(), nullable=True),
    sa.Column('options', JSON, nullable=False),
    sa.Column('lm_eval_version', sa.String(length=32), nullable=False),
    sa.Column('progress', JSON, nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reasoning_runs', schema=None) as batch_op:
        batch_op.create_index('ix_reasoning_runs_state', ['state'], unique=False)

    op.create_table('reasoning_results',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=False),
    sa.Column('task', sa.String(length=64), nullable=False),
    sa.Column('lm_task', sa.String(length=128), nullable=False),
    sa.Column('persona_key', sa.String(length=256), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('resolved_persona', JSON, nullable=False),
    sa.Column('lm_eval_version', sa.String(length=32), nullable=False),
    sa.Column('task_config_hash', sa.String(length=64), nullable=False),
    sa.Column('task_config', JSON, nullable=False),
    sa.Column('metrics', JSON, nullable=False),
    sa.Column('n_items', sa.Integer(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['reasoning_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'task', 'persona_key', name='uq_reasoning_results_unit')
    )
    with op.batch_alter_table('reasoning_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reasoning_results_persona_key'), ['persona_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_reasoning_results_run_id'), ['run_id'], unique=False)

    op.create_table('reasoning_items',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('doc_index', sa.Integer(), nullable=False),
    sa.Column('item_id', sa.String(length=128), nullable=False),
    sa.Column('target', sa.Text(), nullable=False),
    sa.Column('loglikelihoods', JSON, nullable=True),
    sa.Column('greedy', JSON, nullable=True),
    sa.Column('generated', sa.Text(), nullable=True),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('correct', sa.Boolean(), nullable=False),
    sa.Column('metrics', JSON, nullable=False),
    sa.ForeignKeyConstraint(['result_id'], ['reasoning_results.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('result_id', 'doc_index', name='uq_reasoning_items_doc')
    )
    with op.batch_alter_table('reasoning_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reasoning_items_result_id'), ['result_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('reasoning_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reasoning_items_result_id'))
    op.drop_table('reasoning_items')
    with op.batch_alter_table('reasoning_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reasoning_results_run_id'))
        batch_op.drop_index(batch_op.f('ix_reasoning_results_persona_key'))
    op.drop_table('reasoning_results')
    with op.batch_alter_table('reasoning_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_reasoning_runs_state')
    op.drop_table('reasoning_runs')
