"""survey_answers.followed_up_at, followed_up_by, follow_up_note, follow_up_history: support's
follow-up of an answer (PUT /v1/surveys/{message_id}/follow-up).

The answers given over a day before this migration are marked as answered before follow-ups
were recorded, by "migration-0007" with a note saying so: otherwise every unhappy answer ever
given would wait for a follow-up and RetainUnhappyCustomersWaiting would fire at the deploy.
The answers of the last day stay open, within the day the alert allows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 02:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BY = "migration-0007"
NOTE = "Answered before follow-ups were recorded in Retain (messenger migration 0007)."


def upgrade() -> None:
    with op.batch_alter_table("survey_answers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("followed_up_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("followed_up_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("follow_up_note", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "follow_up_history",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.create_index(
            "ix_survey_answers_waiting", ["followed_up_at", "score", "created_at"], unique=False
        )
    # The time as UtcDateTime stores it (timestamptz on PostgreSQL, UTC text on SQLite), and
    # in the history as the service writes it (ISO 8601 with its offset).
    if op.get_bind().dialect.name == "postgresql":
        now, day_ago = "now()", "now() - interval '1 day'"
        iso = """to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""
        entry = f"jsonb_build_object('action', 'followed_up', 'at', {iso}, 'by', :by, 'note', :note)"
        history = f"jsonb_build_array({entry})"
    else:
        text = "strftime('%Y-%m-%d %H:%M:%f', 'now'{})"
        now, day_ago = text.format(""), text.format(", '-1 day'")
        iso = "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')"
        entry = f"json_object('action', 'followed_up', 'at', {iso}, 'by', :by, 'note', :note)"
        history = f"json_array({entry})"
    op.execute(
        sa.text(
            f"UPDATE survey_answers SET followed_up_at = {now}, followed_up_by = :by, "  # noqa: S608 - fixed expressions
            f"follow_up_note = :note, follow_up_history = {history} WHERE created_at < {day_ago}"
        ).bindparams(by=BY, note=NOTE)
    )


def downgrade() -> None:
    with op.batch_alter_table("survey_answers", schema=None) as batch_op:
        batch_op.drop_index("ix_survey_answers_waiting")
        batch_op.drop_column("follow_up_history")
        batch_op.drop_column("follow_up_note")
        batch_op.drop_column("followed_up_by")
        batch_op.drop_column("followed_up_at")
