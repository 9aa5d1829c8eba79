"""survey_answers.followed_up_at, followed_up_by, follow_up_note: support's follow-up of an
answer (PUT /v1/surveys/{message_id}/follow-up); null for the answers so far (none taken up).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 02:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("survey_answers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("followed_up_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("followed_up_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("follow_up_note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("survey_answers", schema=None) as batch_op:
        batch_op.drop_column("follow_up_note")
        batch_op.drop_column("followed_up_by")
        batch_op.drop_column("followed_up_at")
