"""rollup_state.taken_from: a rollup takes its dirty day (dirty_from back to none) when it
starts, and clears what it took when it is done, so that what batches mark while it runs is
theirs, for the next run. It cleared dirty_from at the end if the day was still the one read:
with two kpi workers, a batch of the other's that wrote facts on a day at or after it (lowering
nothing) was cleared with it, and the Grafana tables went without those facts until something
marked the day again. A run that fails or dies leaves what it took for the next.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-28 15:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rollup_state", sa.Column("taken_from", sa.Date(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollup_state", schema=None) as batch_op:
        batch_op.drop_column("taken_from")
