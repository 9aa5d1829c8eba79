"""The messenger's per-batch reads on SQLite: what they return, and that they find the batch's
customers by the customer's index, so that their cost does not grow with the table."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.messenger.consumer import MIGRATIONS
from services.messenger.repository import COUNTED, MessengerRepository
from services.messenger.tables import journey_waits, messages
from shared.db import Database
from tests.support.sqlite import migrated, plans

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
STATUSES = (*COUNTED, "failed", "suppressed", "held_quiet_hours")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with migrated(tmp_path / "messenger.db", MIGRATIONS) as database:
        yield database


def message(customer_id: str, status: str, created_at: datetime) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "idempotency_key": str(uuid.uuid4()),
        "customer_id": customer_id,
        "journey": "welcome",
        "kind": "welcome",
        "channel": "email",
        "status": status,
        "created_at": created_at,
        "updated_at": created_at,
        "attempts": 0,
    }


def wait(customer_id: str, status: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "customer_id": customer_id,
        "journey": "re_engagement",
        "due_at": NOW + timedelta(days=1),
        "status": status,
        "data": {},
        "created_at": NOW,
    }


async def fill(db: Database, others: int) -> None:
    """Two customers with a message and a wait of every status, and ``others`` customers with
    a queued message and a waiting wait each: what the status indexes would find."""
    rows = [message(c, s, NOW - timedelta(hours=1)) for c in ("c1", "c2") for s in STATUSES]
    rows.append(message("c1", "sent", NOW - timedelta(days=40)))  # before the window
    rows += [message(f"other-{i}", "queued", NOW) for i in range(others)]
    waits = [wait(c, s) for c in ("c1", "c2") for s in ("waiting", "fired", "cancelled")]
    waits += [wait(f"other-{i}", "waiting") for i in range(others)]
    async with db.transaction() as session:
        await session.execute(messages.insert(), rows)
        await session.execute(journey_waits.insert(), waits)


async def test_histories_are_the_counted_messages_in_the_window(db: Database) -> None:
    await fill(db, others=10)
    async with db.sessions() as session:
        found = await MessengerRepository().histories(
            session, ["c1", "c2", "nobody"], NOW - timedelta(days=30)
        )
    assert sorted((r.customer_id, r.status) for r in found) == sorted(
        (c, s) for c in ("c1", "c2") for s in COUNTED
    )


async def test_waiting_of_is_the_waits_still_waiting(db: Database) -> None:
    await fill(db, others=10)
    async with db.sessions() as session:
        found = await MessengerRepository().waiting_of(session, ["c1", "c2", "nobody"])
    assert sorted((r.customer_id, r.status) for r in found) == [("c1", "waiting"), ("c2", "waiting")]


async def test_an_address_finds_its_customer_by_index(db: Database) -> None:
    """Inbound messages and bounces: the address columns, kept with the snapshot, indexed
    (matching inside the profile JSON read every customer's: 56 ms at 100,000)."""
    profile = {"lifecycle_stage": "active", "email": "noa@example.com", "phone": "+972521234567"}
    async with db.transaction() as session:
        await MessengerRepository().upsert_customers(
            session,
            [
                {
                    "customer_id": "c1",
                    "profile": profile,
                    "profile_at": NOW,
                    "updated_at": NOW,
                    "email": profile["email"],
                    "phone": profile["phone"],
                    "whatsapp": None,
                }
            ],
        )
    repo = MessengerRepository()
    async with db.sessions() as session:
        found = [
            await repo.customer_by_address(session, "email", "noa@example.com"),
            await repo.customer_by_address(session, "sms", "+972521234567"),
            await repo.customer_by_address(session, "whatsapp", "+972521234567"),
        ]
    assert found == ["c1", "c1", None]
    [by_email] = await plans(db, lambda s: repo.customer_by_address(s, "email", "x"))
    [by_phone] = await plans(db, lambda s: repo.customer_by_address(s, "sms", "x"))
    assert "USING INDEX ix_customers_email" in by_email
    assert "USING INDEX ix_customers_phone" in by_phone


async def test_batch_reads_search_by_the_customers_index(db: Database) -> None:
    """With the status in the query, SQLite chose the status index and read every queued
    message (or waiting wait) of everyone, once per batch: 6.3 ms a batch of 16 with 20,000
    messages in the table, against 28 µs now."""
    await fill(db, others=200)
    repo = MessengerRepository()
    ids = [f"c{i}" for i in range(16)]
    histories = await plans(db, lambda s: repo.histories(s, ids, NOW - timedelta(days=30)))
    waits = await plans(db, lambda s: repo.waiting_of(s, ids))
    assert histories
    assert all("USING INDEX ix_messages_customer" in p for p in histories), histories
    assert waits
    assert all("USING INDEX ix_journey_waits_customer" in p for p in waits), waits


async def test_due_messages_are_the_unscheduled_then_the_earliest_whose_time_has_come(db: Database) -> None:
    rows = [
        message("c1", "queued", NOW) | {"id": "now", "send_at": None},
        message("c2", "held_quiet_hours", NOW) | {"id": "held-past", "send_at": NOW - timedelta(hours=1)},
        message("c3", "queued", NOW) | {"id": "queued-past", "send_at": NOW - timedelta(hours=2)},
        message("c4", "held_quiet_hours", NOW) | {"id": "held-future", "send_at": NOW + timedelta(hours=1)},
        message("c5", "sent", NOW) | {"id": "sent", "send_at": NOW - timedelta(hours=3)},
    ]
    async with db.transaction() as session:
        await session.execute(messages.insert(), rows)
    repo = MessengerRepository()
    async with db.sessions() as session:
        everything = [r.id for r in await repo.due_messages(session, NOW, 10)]
        two = [r.id for r in await repo.due_messages(session, NOW, 2)]
        one = [r.id for r in await repo.due_messages(session, NOW, 1)]
    assert everything == ["now", "queued-past", "held-past"]
    assert two == ["now", "queued-past"]
    assert one == ["now"]


async def test_due_messages_read_ranges_of_the_due_index(db: Database) -> None:
    """Not every held message on each poll: the send time bounds the read."""
    async with db.transaction() as session:
        await session.execute(
            messages.insert(),
            [
                message(f"c{i}", "held_quiet_hours", NOW) | {"send_at": NOW + timedelta(hours=1)}
                for i in range(200)
            ],
        )
    repo = MessengerRepository()
    found = await plans(db, lambda s: repo.due_messages(s, NOW, 10))
    assert len(found) == 2
    assert "USING INDEX ix_messages_due (status=? AND send_at=?)" in found[0]
    assert "USING INDEX ix_messages_due (status=? AND send_at<?)" in found[1]


async def test_the_operators_lists_read_the_newest_rows_in_order(db: Database) -> None:
    """GET /v1/messages and /v1/waits, unfiltered or by journey, page by (created_at, id): the
    index of that order is read backwards from the page's place, with no sort of the table
    (200,000 messages on SQLite: 462 ms a page before the index, 1.4 ms with it)."""
    await fill(db, others=200)
    repo = MessengerRepository()
    before = (NOW, "m")
    reads = {
        "messages": lambda s: repo.list_messages(
            s, customer_id=None, journey=None, status=None, before=None, limit=50
        ),
        "messages after a cursor, of a journey": lambda s: repo.list_messages(
            s, customer_id=None, journey="welcome", status=None, before=before, limit=50
        ),
        "waits": lambda s: repo.list_waits(
            s, customer_id=None, journey=None, status=None, before=None, limit=50
        ),
        "waits after a cursor, of a journey": lambda s: repo.list_waits(
            s, customer_id=None, journey="re_engagement", status=None, before=before, limit=50
        ),
    }
    for label, read in reads.items():
        [plan] = await plans(db, read)
        index = "ix_messages_created" if label.startswith("messages") else "ix_journey_waits_created"
        assert f"USING INDEX {index}" in plan, (label, plan)
        assert "TEMP B-TREE" not in plan, (label, plan)
    # A customer's list seeks that customer's rows; a status (a rare one, 'failed', is what an
    # operator looks for) seeks its rows, as before the new index, rather than walking all of it.
    [by_customer] = await plans(
        db,
        lambda s: repo.list_messages(s, customer_id="c1", journey=None, status=None, before=None, limit=50),
    )
    [by_status] = await plans(
        db,
        lambda s: repo.list_messages(
            s, customer_id=None, journey=None, status="failed", before=None, limit=50
        ),
    )
    assert "USING INDEX ix_messages_customer (customer_id=?)" in by_customer, by_customer
    assert "USING INDEX ix_messages_due (status=?)" in by_status, by_status
    # And the pages are what the order says: the newest first, then after the cursor.
    async with db.sessions() as session:
        first = await repo.list_messages(
            session, customer_id=None, journey=None, status=None, before=None, limit=3
        )
        rest = await repo.list_messages(
            session,
            customer_id=None,
            journey=None,
            status=None,
            before=(first[-1].created_at, first[-1].id),
            limit=500,
        )
    every = sorted((*first, *rest), key=lambda r: (r.created_at, r.id), reverse=True)
    assert [r.id for r in (*first, *rest)] == [r.id for r in every]
    assert len(every) == len(STATUSES) * 2 + 1 + 200
