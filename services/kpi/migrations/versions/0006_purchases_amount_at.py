"""purchases.amount_at: the time of the event whose amount and currency stand. An order now
keeps the date of its first event (occurred_at) and takes the amount of its newest, as the
segmenter does; a correction used to move the order to the correction's date. Rows written
before take amount_at = occurred_at; an order a correction re-dated before this keeps that date
(its first date was not kept).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 21:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("amount_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE purchases SET amount_at = occurred_at")
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.alter_column("amount_at", existing_type=sa.DateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_column("amount_at")
