"""rollup_state.marks: counts the batches that marked a rollup dirty, so that a rollup clears
its mark only if no batch marked it while it ran. The check compared the dirty day alone: with
two kpi workers, a batch of the other's that wrote facts on a day at or after the one the rollup
had read (so it lowered nothing) was cleared with it, and the Grafana tables went without those
facts until something marked the day again.

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
    op.add_column("rollup_state", sa.Column("marks", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("rollup_state", schema=None) as batch_op:
        batch_op.drop_column("marks")
