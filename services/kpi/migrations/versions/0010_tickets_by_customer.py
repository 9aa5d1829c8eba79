"""A ticket is its customer's: tickets and stale_tickets are keyed by (customer_id, ticket_id),
and support_events' ticket index leads with customer_id. Two customers whose help desks (or
brands) number tickets alike had their steps merged into one ticket (the first reply to one
answering the other); the segmenter keeps them apart. tickets is derived from support_events,
so it is made again, empty, with every ticket marked stale: the next rollup derives them all
and redoes the response-time days they open on, and readers derive them meanwhile.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 09:50:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tickets(key: Sequence[str]) -> None:
    op.create_table(
        "tickets",
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("ticket_id", sa.String(length=128), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=True),
        sa.Column("is_complaint", sa.Boolean(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_inferred", sa.Boolean(), nullable=False),
        sa.Column("first_response_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_response_s", sa.Float(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolution_s", sa.Float(), nullable=True),
        sa.Column("reopened", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(*key),
    )
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.create_index("ix_tickets_open", ["resolved_at"], unique=False)
        batch_op.create_index("ix_tickets_opened_at", ["opened_at"], unique=False)


def _stale(key: Sequence[str]) -> None:
    columns = [sa.Column(name, sa.String(length=128), nullable=False) for name in key]
    op.create_table(
        "stale_tickets",
        *columns,
        sa.Column("marks", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(*key),
    )


def _remake(key: Sequence[str]) -> None:
    op.drop_table("tickets")
    op.drop_table("stale_tickets")
    with op.batch_alter_table("support_events", schema=None) as batch_op:
        batch_op.drop_index("ix_support_events_ticket")
        batch_op.create_index("ix_support_events_ticket", list(key), unique=False)
    _tickets(key)
    _stale(key)
    stale = sa.table("stale_tickets", *(sa.column(name) for name in (*key, "marks")))
    support = sa.table("support_events", *(sa.column(name) for name in key))
    every = sa.select(*(support.c[name] for name in key), sa.literal(1)).distinct()
    op.execute(stale.insert().from_select([*key, "marks"], every))


def upgrade() -> None:
    _remake(("customer_id", "ticket_id"))


def downgrade() -> None:
    _remake(("ticket_id",))
