"""customers.email, .phone, .whatsapp: the addresses of the profile snapshot in indexed
columns, so that an inbound message or a bounce finds its customer by index. Matching them
inside the JSON read every customer's profile: 56 ms a lookup at 100,000 customers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 14:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADDRESSES = ("email", "phone", "whatsapp")


def upgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        for name in ADDRESSES:
            batch_op.add_column(sa.Column(name, sa.Text(), nullable=True))
            batch_op.create_index(f"ix_customers_{name}", [name], unique=False)
    # The customers known so far, from their snapshots.
    if op.get_bind().dialect.name == "postgresql":
        values = ", ".join(f"{name} = profile ->> '{name}'" for name in ADDRESSES)
    else:
        values = ", ".join(f"{name} = json_extract(profile, '$.{name}')" for name in ADDRESSES)
    op.execute(f"UPDATE customers SET {values}")  # noqa: S608 - fixed column names, no input


def downgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        for name in ADDRESSES:
            batch_op.drop_index(f"ix_customers_{name}")
            batch_op.drop_column(name)
