"""A ticket of the category 'Complaint' (any case) is a complaint (shared.events.
complaint_category). Tickets derived before were stored with is_complaint false: each is marked
stale, so the next rollup derives it again and redoes the response-time days it opens on
(readers derive stale tickets meanwhile). The Grafana tables are recomputed whole by the
definitions' version (services.kpi.service.DEFINITIONS_VERSION 4).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 13:20:00.000000

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "INSERT INTO stale_tickets (customer_id, ticket_id, marks) "
        "SELECT t.customer_id, t.ticket_id, 1 FROM tickets t "
        "WHERE lower(t.category) = 'complaint' AND NOT t.is_complaint "
        "AND NOT EXISTS (SELECT 1 FROM stale_tickets s "
        "WHERE s.customer_id = t.customer_id AND s.ticket_id = t.ticket_id)"
    )


def downgrade() -> None:
    pass  # the marks are work to do, not schema: the rebuild clears them
