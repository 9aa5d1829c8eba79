"""replies.media: what came with a reply (a photo of the broken item, a screenshot), as
Twilio's media URLs and content types. A reply of a picture alone was kept as an empty text.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-28 19:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("replies") as batch_op:
        batch_op.add_column(
            sa.Column(
                "media",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("replies") as batch_op:
        batch_op.drop_column("media")
