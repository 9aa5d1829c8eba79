"""customers.email lower-cased: the column is how a SendGrid event finds its customer, and
SendGrid or the CRM may write an address in another case than the profile (the profile keeps
its own).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 04:30:00.000000

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE customers SET email = lower(email) WHERE email IS NOT NULL")


def downgrade() -> None:
    # The profiles keep each address as it was given; the column is only the lookup.
    pass
