"""message_events: the messenger's opt-out events (status unsubscribed, message_id optout:…,
journey "-") are no message (services/kpi/facts.py no longer keeps them): the ones kept before
are deleted, and the conversion rollup is made to recompute every day (its settings fingerprint
cleared), so that Grafana's journey "-" goes from the past days too.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 04:00:00.000000

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM message_events WHERE status = 'unsubscribed'")
    op.execute("UPDATE rollup_state SET settings = NULL WHERE name = 'conversion'")


def downgrade() -> None:
    # The events are gone; a replay of retain.messages into an older kpi would bring them back.
    pass
