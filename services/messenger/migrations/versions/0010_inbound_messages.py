"""inbound_messages: the inbound SMS/WhatsApp messages already applied, by Twilio's MessageSid,
so that a delivery retried or replayed (Twilio's signature has no time) changes nothing twice.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 04:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inbound_messages",
        sa.Column("sid", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sid"),
    )
    op.create_index("ix_inbound_messages_received_at", "inbound_messages", ["received_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_inbound_messages_received_at", table_name="inbound_messages")
    op.drop_table("inbound_messages")
