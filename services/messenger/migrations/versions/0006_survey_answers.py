"""survey_answers: the feedback survey's answers, one per message, for GET /v1/surveys; the
answers given before, kept in their messages' details (details.survey), are copied in.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 23:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "survey_answers",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("journey", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=True),
        sa.Column("locale", sa.String(length=35), nullable=True),
        sa.Column("tier", sa.String(length=64), nullable=True),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("survey_answers", schema=None) as batch_op:
        batch_op.create_index("ix_survey_answers_created", ["created_at", "id"], unique=False)
        batch_op.create_index("ix_survey_answers_customer", ["customer_id", "created_at"], unique=False)
    # The answers so far, from their messages. The time as UtcDateTime stores it: timestamptz on
    # PostgreSQL, UTC text on SQLite (whose strftime reads the ISO form with its offset).
    if op.get_bind().dialect.name == "postgresql":
        survey = "details -> 'survey'"
        score, comment = f"({survey} ->> 'score')::int", f"{survey} ->> 'comment'"
        answered = f"({survey} ->> 'at')::timestamptz"
    else:
        score, comment = (
            "json_extract(details, '$.survey.score')",
            "json_extract(details, '$.survey.comment')",
        )
        answered = "strftime('%Y-%m-%d %H:%M:%f', json_extract(details, '$.survey.at'))"
    columns = "id, customer_id, journey, channel, locale, tier, score, comment, created_at"
    copied = f"id, customer_id, journey, channel, locale, tier, {score}, {comment}, {answered}"
    copy = f"INSERT INTO survey_answers ({columns}) SELECT {copied} FROM messages WHERE {score} IS NOT NULL"  # noqa: S608
    op.execute(copy)  # fixed expressions, no input


def downgrade() -> None:
    with op.batch_alter_table("survey_answers", schema=None) as batch_op:
        batch_op.drop_index("ix_survey_answers_customer")
        batch_op.drop_index("ix_survey_answers_created")
    op.drop_table("survey_answers")
