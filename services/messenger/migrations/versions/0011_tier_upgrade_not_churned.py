"""The stored tier_upgrade journey gets the default's entry condition, lifecycle_stage not
churned, when it has none: journeys are stored at the first start and read from then on, so a
deployment made before the default changed kept congratulating customers who had cancelled
(a rule change, or a late purchase, raising their tier). A journey given an entry condition of
its own keeps it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 07:30:00.000000

"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from shared.db import UtcDateTime, json_type

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOT_CHURNED = {"not": {"field": "lifecycle_stage", "op": "eq", "value": "churned"}}

settings = sa.table(
    "messenger_settings",
    sa.column("name", sa.String()),
    sa.column("value", json_type()),
    sa.column("updated_at", UtcDateTime()),
    sa.column("updated_by", sa.String()),
)


def upgrade() -> None:
    bind = op.get_bind()
    found = bind.execute(sa.select(settings.c.value).where(settings.c.name == "journeys")).first()
    if found is None:  # a new database: the defaults, with the condition, are stored at start
        return
    journeys: list[dict[str, Any]] = found.value
    changed = False
    for journey in journeys:
        if journey.get("name") == "tier_upgrade" and not journey.get("entry"):
            journey["entry"] = NOT_CHURNED
            changed = True
    if changed:
        bind.execute(
            settings.update()
            .where(settings.c.name == "journeys")
            .values(value=journeys, updated_at=datetime.now(UTC), updated_by="migration 0011")
        )


def downgrade() -> None:
    # The condition is what the journey means now; one added by hand is not told apart.
    pass
