"""A ticket is its customer's: tickets and stale_tickets are keyed by (customer_id, ticket_id),
and support_events' ticket index leads with customer_id. Two customers whose help desks (or
brands) number tickets alike had their steps merged into one ticket (the first reply to one
answering the other); the segmenter keeps them apart.

Only such merged tickets are derived again: their rows are left out of the new table and each
customer's ticket under that id is marked stale (as is every ticket that was stale already),
so the next rollup derives them and redoes the response-time days they open on; readers derive
them meanwhile. Every other ticket keeps its row.

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

_TICKET_COLUMNS = (
    "customer_id",
    "ticket_id",
    "category",
    "priority",
    "is_complaint",
    "opened_at",
    "opened_inferred",
    "first_response_at",
    "first_response_s",
    "resolved_at",
    "resolution_s",
    "reopened",
)


def _create_tickets(name: str, key: Sequence[str]) -> None:
    op.create_table(
        name,
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


def _create_stale(name: str, key: Sequence[str]) -> None:
    op.create_table(
        name,
        *(sa.Column(column, sa.String(length=128), nullable=False) for column in key),
        sa.Column("marks", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(*key),
    )


def _table(name: str, *columns: str) -> sa.TableClause:
    return sa.table(name, *(sa.column(c) for c in columns))


def upgrade() -> None:
    key = ("customer_id", "ticket_id")
    support = _table("support_events", "customer_id", "ticket_id")
    old_tickets = _table("tickets", *_TICKET_COLUMNS)
    old_stale = _table("stale_tickets", "ticket_id", "marks")
    # Ticket ids that more than one customer's steps carry: their one row is a merge.
    shared_ids = (
        sa.select(support.c.ticket_id)
        .group_by(support.c.ticket_id)
        .having(sa.func.count(sa.distinct(support.c.customer_id)) > 1)
    )
    _create_tickets("tickets_by_customer", key)
    kept = sa.select(*(old_tickets.c[c] for c in _TICKET_COLUMNS)).where(
        old_tickets.c.ticket_id.not_in(shared_ids)
    )
    op.execute(_table("tickets_by_customer", *_TICKET_COLUMNS).insert().from_select(_TICKET_COLUMNS, kept))
    _create_stale("stale_by_customer", key)
    marked = (
        sa.select(support.c.customer_id, support.c.ticket_id, sa.literal(1))
        .where(
            sa.or_(
                support.c.ticket_id.in_(shared_ids),
                support.c.ticket_id.in_(sa.select(old_stale.c.ticket_id)),
            )
        )
        .distinct()
    )
    op.execute(
        _table("stale_by_customer", "customer_id", "ticket_id", "marks")
        .insert()
        .from_select(["customer_id", "ticket_id", "marks"], marked)
    )
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_index("ix_tickets_open")
        batch_op.drop_index("ix_tickets_opened_at")
    op.drop_table("tickets")
    op.drop_table("stale_tickets")
    op.rename_table("tickets_by_customer", "tickets")
    op.rename_table("stale_by_customer", "stale_tickets")
    if op.get_bind().dialect.name == "postgresql":  # the keys' names follow the tables'
        op.execute("ALTER TABLE tickets RENAME CONSTRAINT tickets_by_customer_pkey TO tickets_pkey")
        op.execute("ALTER TABLE stale_tickets RENAME CONSTRAINT stale_by_customer_pkey TO stale_tickets_pkey")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.create_index("ix_tickets_open", ["resolved_at"], unique=False)
        batch_op.create_index("ix_tickets_opened_at", ["opened_at"], unique=False)
    with op.batch_alter_table("support_events", schema=None) as batch_op:
        batch_op.drop_index("ix_support_events_ticket")
        batch_op.create_index("ix_support_events_ticket", list(key), unique=False)


def downgrade() -> None:
    # Keyed by ticket_id alone again: every ticket is derived anew (the merge is the old way).
    support = _table("support_events", "ticket_id")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_index("ix_tickets_open")
        batch_op.drop_index("ix_tickets_opened_at")
    op.drop_table("tickets")
    op.drop_table("stale_tickets")
    _create_tickets("tickets", ("ticket_id",))
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.create_index("ix_tickets_open", ["resolved_at"], unique=False)
        batch_op.create_index("ix_tickets_opened_at", ["opened_at"], unique=False)
    _create_stale("stale_tickets", ("ticket_id",))
    every = sa.select(support.c.ticket_id, sa.literal(1)).distinct()
    op.execute(
        _table("stale_tickets", "ticket_id", "marks").insert().from_select(["ticket_id", "marks"], every)
    )
    with op.batch_alter_table("support_events", schema=None) as batch_op:
        batch_op.drop_index("ix_support_events_ticket")
        batch_op.create_index("ix_support_events_ticket", ["ticket_id"], unique=False)
