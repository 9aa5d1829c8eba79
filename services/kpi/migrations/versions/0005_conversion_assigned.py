"""kpi_conversion_daily: the intent-to-treat arm of the uplift (assigned, assigned_conversions,
assigned_rate). Existing rows get 0 / NULL until the rollup recomputes them, which the new
definitions version in its settings fingerprint makes it do at once (services/kpi/service.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 06:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("kpi_conversion_daily", schema=None) as batch_op:
        batch_op.add_column(sa.Column("assigned", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("assigned_conversions", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("assigned_rate", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("kpi_conversion_daily", schema=None) as batch_op:
        batch_op.drop_column("assigned_rate")
        batch_op.drop_column("assigned_conversions")
        batch_op.drop_column("assigned")
