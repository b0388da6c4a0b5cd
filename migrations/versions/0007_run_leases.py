"""assessments and reasoning_runs get the training jobs' lease (lease_owner, lease_expires_at; issue 26)

The evaluator's runs kept their owner and an application-clock heartbeat inside ``progress``; they now hold
a lease on the database's clock like the training jobs (``big5core.lease``). A live row from before has no
lease and counts as expired: the next startup sweep fails it (its process ran the old code).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ('assessments', 'reasoning_runs')


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column('lease_owner', sa.String(length=128), nullable=True))
        op.add_column(table, sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column('lease_expires_at')
            batch.drop_column('lease_owner')
