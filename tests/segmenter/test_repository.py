"""The segmenter's reads for a rule publish, on SQLite and PostgreSQL: a page of standings with
the stored facts whole or only some of them, and the movers' rows with only the consents and
attributes of the state."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from services.segmenter.consumer import MIGRATIONS
from services.segmenter.repository import CustomerRow, Reassignment, SegmenterRepository
from shared.db import Database, migrate
from tests.segmenter.factories import CUSTOMER
from tests.segmenter.test_updates import complained, run, stored


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, inline_sqlite=True)
    await migrate(database, MIGRATIONS)
    yield database
    await database.dispose()


def customers() -> list[CustomerRow]:
    row = stored(run(complained()))
    assert row.customer_id == CUSTOMER
    # Three customers in id order, one without the facts a later version added.
    bare = {k: v for k, v in row.facts.items() if k != "predicted_clv"}
    return [
        dataclasses.replace(row, customer_id="a"),
        dataclasses.replace(row, customer_id="b", facts=bare, tier="gold", rule_version=2),
        dataclasses.replace(row, customer_id="c", segments=[]),
    ]


async def test_a_page_of_standings_has_the_facts_asked_for(db: Database) -> None:
    repo, rows = SegmenterRepository(), customers()
    async with db.transaction() as session:
        await repo.save_customers(session, rows)
    picked = {"total_value", "last_complaint_resolved", "first_purchase_at", "predicted_clv"}
    async with db.sessions() as session:
        whole = await repo.standings_after(session, None, 10)
        some = await repo.standings_after(session, None, 10, picked)
        none = await repo.standings_after(session, None, 10, frozenset())
        after_a = await repo.standings_after(session, "a", 1, picked)

    assert [s.facts for s in whole] == [r.facts for r in rows]
    assert [(s.customer_id, s.tier, s.segments, s.next_check_at, s.rule_version) for s in whole] == [
        (r.customer_id, r.tier, r.segments, r.next_check_at, r.rule_version) for r in rows
    ]
    # The same values as the whole facts hold (JSON true stays True), None for an absent one.
    assert [s.facts for s in some] == [{k: r.facts.get(k) for k in picked} for r in rows]
    assert some[0].facts["last_complaint_resolved"] is rows[0].facts["last_complaint_resolved"]
    assert some[1].facts["predicted_clv"] is None
    assert [s.facts for s in none] == [{}, {}, {}]
    assert [(s.customer_id, s.tier) for s in none] == [(r.customer_id, r.tier) for r in rows]
    assert [s.customer_id for s in after_a] == ["b"]


async def test_movers_are_read_with_the_consents_and_attributes_of_their_state(db: Database) -> None:
    repo, rows = SegmenterRepository(), customers()
    async with db.transaction() as session:
        await repo.save_customers(session, rows)
    async with db.transaction() as session:
        movers = await repo.load_movers(session, ["a", "c", "nobody"])
        facts = await repo.stored_facts(session, ["b"])
        assert await repo.load_movers(session, []) == {}
    assert sorted(movers) == ["a", "c"]
    for cid in ("a", "c"):
        row = next(r for r in rows if r.customer_id == cid)
        m = movers[cid]
        assert (m.facts, m.tier, m.segments, m.next_check_at) == (
            row.facts,
            row.tier,
            row.segments,
            row.next_check_at,
        )
        assert (m.consents, m.attributes) == (row.state["consents"], row.state["attributes"])
        assert m.consents
        assert m.attributes
    assert facts == {"b": rows[1].facts}


async def test_a_reassignment_writes_the_tier_and_next_check_only_where_they_change(db: Database) -> None:
    repo, rows = SegmenterRepository(), customers()
    async with db.transaction() as session:
        await repo.save_customers(session, rows)
    a, b, c = rows
    later = a.updated_at + timedelta(days=1)
    check = later + timedelta(days=3)
    async with db.transaction() as session:
        await repo.reassign(
            session,
            [
                Reassignment(
                    "a", "silver", ["x"], 5, a.next_check_at, later, tier_changed=True, check_changed=False
                ),
                Reassignment("b", b.tier, ["y"], 5, check, later, tier_changed=False, check_changed=True),
                Reassignment(
                    "c", c.tier, ["z"], 5, c.next_check_at, later, tier_changed=False, check_changed=False
                ),
            ],
        )
    async with db.sessions() as session:
        after = await repo.load_customers(session, ["a", "b", "c"])
    got = {
        cid: (r.tier, r.segments, r.rule_version, r.next_check_at, r.updated_at) for cid, r in after.items()
    }
    assert got == {
        "a": ("silver", ["x"], 5, a.next_check_at, later),
        "b": (b.tier, ["y"], 5, check, later),
        "c": (c.tier, ["z"], 5, c.next_check_at, later),
    }
    assert {cid: (r.facts, r.state) for cid, r in after.items()} == {
        r.customer_id: (r.facts, r.state) for r in rows
    }
