"""messages.idempotency_key: 512 characters. The key is journey:customer:entry[#attempt]; a
customer id may have 128 characters and an event id 128, so a welcome for a 122-character
customer id, or a thank-you whose ids are long, went past 255: PostgreSQL refused the row
(SQLite does not enforce a VARCHAR's length) and the customer update was dead-lettered, every
message it decided lost.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-28 12:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # On PostgreSQL a change of the catalogue (a longer varchar is binary-compatible: no rewrite,
    # the unique index kept). SQLite keeps no length to change.
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "messages",
            "idempotency_key",
            type_=sa.String(512),
            existing_type=sa.String(255),
            existing_nullable=False,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "messages",
            "idempotency_key",
            type_=sa.String(255),
            existing_type=sa.String(512),
            existing_nullable=False,
        )
