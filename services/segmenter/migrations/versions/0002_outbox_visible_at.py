"""outbox.created_at → outbox.visible_at: a staged row is leased to the relay that staged it,
and a flush takes a row only from this instant (shared/outbox.py). Rows already there keep
their commit time, so they stay visible at once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 23:30:00.000000

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.alter_column("created_at", new_column_name="visible_at")


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.alter_column("visible_at", new_column_name="created_at")
