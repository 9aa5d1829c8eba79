"""survey_answers.created_at of the answers 0006 copied from their messages, on SQLite: its
strftime wrote them to the millisecond ('…:05.123'), where every other time is stored to the
microsecond ('…:05.123000'). Compared as text, such a row is before its own time as a cursor
gives it back, so GET /v1/surveys listed it again on the next page, and a since/until edge
fell a row off. Padded to six digits (the copy had no finer digits to give). PostgreSQL stores
instants: nothing to do.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-28 15:40:00.000000

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # 'YYYY-MM-DD HH:MM:SS.fff' is 23 characters.
        op.execute("UPDATE survey_answers SET created_at = created_at || '000' WHERE length(created_at) = 23")


def downgrade() -> None:
    """Six digits are what the code writes: nothing to undo."""
