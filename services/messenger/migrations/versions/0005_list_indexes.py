"""messages and journey_waits: an index on (created_at, id), the order of GET /v1/messages and
GET /v1/waits. Without it a page of either, unfiltered or filtered by journey or status, sorted
the whole table for its fifty rows; with it the newest rows are read in order and the read stops
at the page's end (and a keyset cursor seeks straight to its place).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 12:00:00.000000

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_messages_created", "messages", ["created_at", "id"], unique=False)
    op.create_index("ix_journey_waits_created", "journey_waits", ["created_at", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_journey_waits_created", table_name="journey_waits")
    op.drop_index("ix_messages_created", table_name="messages")
