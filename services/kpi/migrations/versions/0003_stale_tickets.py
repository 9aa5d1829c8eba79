"""stale_tickets: the tickets whose steps arrived since they were last derived; the consumer marks
them in its batch transaction and the periodic rollup rebuilds them (readers derive them meanwhile).
Drop ix_cancellations_customer: no query looks cancellations up by customer.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 00:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stale_tickets",
        sa.Column("ticket_id", sa.String(length=128), nullable=False),
        sa.Column("marks", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("ticket_id"),
    )
    # Tickets derived before this revision are up to date: nothing to mark.
    with op.batch_alter_table("cancellations", schema=None) as batch_op:
        batch_op.drop_index("ix_cancellations_customer")


def downgrade() -> None:
    with op.batch_alter_table("cancellations", schema=None) as batch_op:
        batch_op.create_index("ix_cancellations_customer", ["customer_id"], unique=False)
    op.drop_table("stale_tickets")
