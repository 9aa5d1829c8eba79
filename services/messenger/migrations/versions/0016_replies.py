"""replies: what customers wrote back by SMS or WhatsApp (a reply, or a HELP), kept for support
to read through GET /v1/replies, with support's follow-up as a survey answer has it (0007).
Only that it came was kept before: the text was dropped.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-28 18:10:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "replies",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=True),
        sa.Column("journey", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("followed_up_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("followed_up_by", sa.String(length=64), nullable=True),
        sa.Column("follow_up_note", sa.Text(), nullable=True),
        sa.Column(
            "follow_up_history",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_replies_created", "replies", ["created_at", "id"], unique=False)
    op.create_index("ix_replies_customer", "replies", ["customer_id", "created_at"], unique=False)
    op.create_index("ix_replies_waiting", "replies", ["followed_up_at", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_replies_waiting", table_name="replies")
    op.drop_index("ix_replies_customer", table_name="replies")
    op.drop_index("ix_replies_created", table_name="replies")
    op.drop_table("replies")
