"""drop ix_purchases_customer_time: the primary key (customer_id, order_id) already finds a
customer's orders, and every order written paid for the third B-tree

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 23:40:00.000000

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_index("ix_purchases_customer_time")


def downgrade() -> None:
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.create_index("ix_purchases_customer_time", ["customer_id", "occurred_at"], unique=False)
