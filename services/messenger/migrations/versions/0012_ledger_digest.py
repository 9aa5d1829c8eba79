"""applied_events.digest: what each event id named (shared.codec.event_digest), so that a
backend event sent straight to Kafka under an id already applied for another event is
dead-lettered (reason event_id_reused), not dropped as a duplicate. The messenger reads only
our own topics, whose ids leave it null: the column is here for the ledger's one shape
(shared.db.applied_events_table).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28 09:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column with no default: a change of the catalogue only, on both backends.
    op.add_column("applied_events", sa.Column("digest", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("applied_events", schema=None) as batch_op:
        batch_op.drop_column("digest")
