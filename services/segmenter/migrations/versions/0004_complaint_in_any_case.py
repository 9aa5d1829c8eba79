"""A ticket of the category 'Complaint' (any case) is a complaint (shared.events.
complaint_category). A customer whose stored facts were derived before, with such a ticket not
flagged is_complaint, has complaints_90d and last_complaint_* as if it were none, until a new
event or a check; a lapsed customer has no check coming. Each one's next check is made now, so
the next sweep derives the facts again (and announces what changed).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 13:20:00.000000

"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _complaint_not_flagged(state: dict[str, Any]) -> bool:
    for ticket in (state.get("tickets") or {}).values():
        category = (ticket.get("category") or [""])[0]
        written_otherwise = isinstance(category, str) and category != "complaint"
        if written_otherwise and category.casefold() == "complaint" and not ticket.get("complaint"):
            return True
    return False


def upgrade() -> None:
    bind = op.get_bind()
    now = datetime.now(UTC)
    # UtcDateTime's forms: an instant on PostgreSQL, naive UTC text on SQLite.
    at: Any = now if bind.dialect.name == "postgresql" else now.isoformat(" ", "microseconds")[:-6]
    # Every stored ticket has a "complaint" key, so the text filter keeps each customer with a
    # ticket: read a page of them at a time (their states hold every order too), by key.
    after = ""
    while True:
        rows = bind.execute(
            sa.text(
                "SELECT customer_id, CAST(state AS TEXT) AS state FROM customers "
                "WHERE customer_id > :after AND lower(CAST(state AS TEXT)) LIKE '%complaint%' "
                "ORDER BY customer_id LIMIT 500"
            ),
            {"after": after},
        ).all()
        if not rows:
            return
        after = rows[-1].customer_id
        due = [r.customer_id for r in rows if _complaint_not_flagged(json.loads(r.state))]
        if due:
            bind.execute(
                sa.text(
                    "UPDATE customers SET next_check_at = :at "
                    "WHERE customer_id IN :ids AND (next_check_at IS NULL OR next_check_at > :at)"
                ).bindparams(sa.bindparam("ids", expanding=True)),
                {"at": at, "ids": due},
            )


def downgrade() -> None:
    pass  # a check made sooner is no schema
