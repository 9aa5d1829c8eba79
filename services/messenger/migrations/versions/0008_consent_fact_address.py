"""consent_facts.address: the address an opt-out or opt-in was about (a STOP from a number, a
bounce of an email), so that it stops counting once the customer's address on the channel
changes (consent rule 6). Null for the facts so far and for unsubscribe links: the channel's,
whatever the address.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 03:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("consent_facts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("address", sa.String(length=320), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("consent_facts", schema=None) as batch_op:
        batch_op.drop_column("address")
