"""The ledger's Kafka offsets and the outbox's ids in 64 bits on PostgreSQL, where they were
int4 (SQLite's integers are 64-bit already). A Kafka offset is 64-bit: past 2,147,483,647 on a
partition (about 25 days at 1,000 events a second on it) PostgreSQL refused every ledger row, an
error not transient, and each batch was split and every record of it dead-lettered. The outbox
id's sequence (SERIAL) ran out at the same number of rows ever written.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 15:10:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column(
        "applied_events", "offset", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False
    )
    op.alter_column(
        "outbox", "id", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False
    )
    op.execute("ALTER SEQUENCE outbox_id_seq AS bigint")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER SEQUENCE outbox_id_seq AS integer")
    op.alter_column(
        "outbox", "id", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False
    )
    op.alter_column(
        "applied_events", "offset", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False
    )
