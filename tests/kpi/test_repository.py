"""The kpi's reads on SQLite that the rollups make: what they return, and that they read the
recent rows by index rather than the whole table."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from services.kpi.consumer import MIGRATIONS
from services.kpi.repository import KpiRepository
from services.kpi.tables import message_events
from shared.db import Database
from tests.support.sqlite import migrated, plans

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with migrated(tmp_path / "kpi.db", MIGRATIONS) as database:
        yield database


def status(message_id: str, n: int, at: datetime) -> dict[str, Any]:
    return {
        "event_id": f"{message_id}-{n}",
        "message_id": message_id,
        "customer_id": "c1",
        "status": "sent",
        "occurred_at": at,
        "journey": "welcome",
        "kind": "welcome",
        "holdout": False,
    }


async def test_the_first_status_of_the_messages_touched_since(db: Database) -> None:
    """A message with a status event since the cut counts from its first status event, even
    one before the cut; a message untouched since does not count."""
    rows = [
        status("old", 1, T0),  # nothing since: not counted
        status("m1", 1, T0 + timedelta(days=2)),
        status("m1", 2, T0 + timedelta(days=9)),
        status("m2", 1, T0 + timedelta(days=8)),
    ]
    async with db.transaction() as session:
        await session.execute(message_events.insert(), rows)
    found: list[datetime | None] = []

    async def read(session: AsyncSession) -> None:
        found.append(await KpiRepository().first_time_of_messages_since(session, T0 + timedelta(days=7)))

    [plan] = await plans(db, read)
    assert found == [T0 + timedelta(days=2)]
    # The recent statuses by their time's index (with DISTINCT: a scan of the whole table).
    assert "USING INDEX ix_message_events_occurred_at" in plan, plan
    assert "SCAN message_events" not in plan, plan
