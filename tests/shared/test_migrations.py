"""Each service's Alembic migrations build exactly the tables its code declares: a table, column
or index added to tables.py without a migration (or the reverse) fails here, not in production."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, text

from services.kpi import tables as kpi_tables
from services.messenger import tables as messenger_tables
from services.messenger.repository import MessengerRepository
from services.segmenter import tables as segmenter_tables
from shared.config import REPO_ROOT
from shared.db import Database, migrate

SERVICES: dict[str, MetaData] = {
    "segmenter": segmenter_tables.metadata,
    "messenger": messenger_tables.metadata,
    "kpi": kpi_tables.metadata,
}


async def _alembic(db: Database, service: str, step: Any, revision: str) -> None:
    """Alembic's ``step`` (command.upgrade or command.downgrade) of the service's migrations to
    ``revision``, on ``db``."""
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "services" / service / "migrations"))

    def run(sync_conn: Any) -> None:
        config.attributes["connection"] = sync_conn
        step(config, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def upgrade_to(db: Database, service: str, revision: str) -> None:
    """The service's migrations up to ``revision`` only: a database as an older release left it."""
    await _alembic(db, service, command.upgrade, revision)


async def _drift(db: Database, service: str) -> list[Any]:
    """How the database's tables differ from those the service's code declares."""
    async with db.engine.connect() as conn:

        def diff(sync_conn: Any) -> list[Any]:
            context = MigrationContext.configure(sync_conn, opts={"compare_type": False})
            return list(compare_metadata(context, SERVICES[service]))

        differences = await conn.run_sync(diff)
    # alembic_version is Alembic's own; anything else is drift.
    return [d for d in differences if "alembic_version" not in repr(d)]


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_migrations_match_the_declared_tables(service: str, tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    try:
        await migrate(db, REPO_ROOT / "services" / service / "migrations")
        drift = await _drift(db, service)
    finally:
        await db.dispose()
    assert drift == [], f"{service}: migrations and tables.py differ: {drift}"


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_every_migration_goes_down_and_up_again(service: str, database_url: str) -> None:
    """A release rolled back takes its migrations down with it: each downgrade must run on both
    dialects (PostgreSQL names its keys after their tables, SQLite rebuilds tables in batch
    mode), and the migrations must go up again from there to the declared tables."""
    db = Database(database_url)
    try:
        await _alembic(db, service, command.upgrade, "head")
        await _alembic(db, service, command.downgrade, "base")
        await _alembic(db, service, command.upgrade, "head")
        drift = await _drift(db, service)
    finally:
        await db.dispose()
    assert drift == [], f"{service}: after the round trip, migrations and tables.py differ: {drift}"


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_ledger_offsets_and_outbox_ids_go_past_32_bits(service: str, database_url: str) -> None:
    """A Kafka offset is 64-bit: past 2**31 on a partition, PostgreSQL's int4 refused every
    ledger row, and each batch was dead-lettered record by record. The outbox's ids, from a
    SERIAL, ran out at as many rows ever written. Both are 64-bit after the migrations."""
    from types import SimpleNamespace  # noqa: PLC0415

    from shared.db import claim_events  # noqa: PLC0415
    from shared.kafka.consumer import Delivered  # noqa: PLC0415
    from shared.kafka.producer import OutboundRecord  # noqa: PLC0415
    from shared.outbox import enqueue  # noqa: PLC0415

    metadata = SERVICES[service]
    ledger, outbox = metadata.tables["applied_events"], metadata.tables["outbox"]
    far = 2**40
    db = Database(database_url)
    try:
        await migrate(db, REPO_ROOT / "services" / service / "migrations")
        async with db.transaction() as session:
            if db.dialect == "postgresql":
                await session.execute(text("SELECT setval('outbox_id_seq', :at)"), {"at": 2**31 + 5})
            else:
                await session.execute(
                    outbox.insert().values(
                        id=2**31 + 5, topic="t", key=b"k", value=b"v", visible_at=datetime.now(UTC)
                    )
                )
            record = Delivered("retain.purchases", 3, far, b"c1", SimpleNamespace(event_id="e-far"), 0)
            claimed = await claim_events(session, ledger, [record])
            [new_id] = await enqueue(session, outbox, [OutboundRecord("t", b"k", b"v")])
        async with db.sessions() as session:
            offset = await session.scalar(
                text("SELECT \"offset\" FROM applied_events WHERE event_id = 'e-far'")
            )
    finally:
        await db.dispose()
    assert [d.offset for d in claimed.fresh] == [far]
    assert offset == far
    assert new_id == 2**31 + 6


async def test_the_messenger_s_address_columns_are_filled_from_the_stored_snapshots(tmp_path: Path) -> None:
    """Migration 0003 on a database that has customers: their addresses come from the JSON."""

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    try:
        await upgrade_to(db, "messenger", "0002")
        async with db.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO customers (customer_id, profile, profile_at, updated_at) VALUES"
                    " ('c1', :p1, '2026-11-01 10:00:00', '2026-11-01 10:00:00'),"
                    " ('c2', :p2, '2026-11-01 10:00:00', '2026-11-01 10:00:00')"
                ),
                {
                    "p1": '{"email": "noa@example.com", "phone": "+972521234567",'
                    ' "whatsapp": "+972521234567"}',
                    "p2": '{"lifecycle_stage": "new"}',
                },
            )
        await migrate(db, REPO_ROOT / "services" / "messenger" / "migrations")
        async with db.sessions() as session:
            rows = (
                await session.execute(
                    text("SELECT customer_id, email, phone, whatsapp FROM customers ORDER BY customer_id")
                )
            ).all()
    finally:
        await db.dispose()
    assert [tuple(r) for r in rows] == [
        ("c1", "noa@example.com", "+972521234567", "+972521234567"),
        ("c2", None, None, None),
    ]


async def test_the_messenger_s_survey_answers_are_copied_from_their_messages(database_url: str) -> None:
    """Migration 0006 on a database with answered surveys: the answers are listed, with their
    time (to the millisecond on SQLite, whose strftime keeps three digits; 0015 writes them in
    six, as every time is stored), score and comment.
    Then 0007: the one answered over a day before is marked as answered before follow-ups were
    recorded (RetainUnhappyCustomersWaiting would fire at the deploy); the recent one waits."""
    from sqlalchemy import insert, select  # noqa: PLC0415

    # In the migrations' own clock (the database's now): one answer two hours ago, one three days ago.
    answered = datetime.now(UTC).astimezone(timezone(timedelta(hours=2))) - timedelta(hours=2)
    long_ago = answered - timedelta(days=3)
    db = Database(database_url)
    m = messenger_tables.messages
    base = {
        "kind": "marketing", "status": "sent", "attempts": 1, "customer_id": "c1",
        "journey": "feedback_survey", "channel": "sms", "locale": "he-IL", "tier": "gold",
        "created_at": answered - timedelta(days=1), "updated_at": answered,
    }  # fmt: skip
    try:
        await upgrade_to(db, "messenger", "0005")
        async with db.engine.begin() as conn:
            survey = {"score": 2, "comment": "לקח שבוע", "at": answered.isoformat()}
            old = {"score": 1, "comment": None, "at": long_ago.isoformat()}
            await conn.execute(
                insert(m),
                [
                    {**base, "id": "m1", "idempotency_key": "k1", "details": {"survey": survey, "other": 1}},
                    {**base, "id": "m2", "idempotency_key": "k2", "details": {"reason": "no survey"}},
                    {**base, "id": "m3", "idempotency_key": "k3", "details": None},
                    {**base, "id": "m4", "idempotency_key": "k4", "details": {"survey": old}},
                ],
            )
        await migrate(db, REPO_ROOT / "services" / "messenger" / "migrations")
        async with db.sessions() as session:
            a = messenger_tables.survey_answers
            rows = (await session.execute(select(a).order_by(a.c.id))).all()
            # Paged one at a time, newest first, as GET /v1/surveys pages: each answer once (0015:
            # on SQLite the copied times had three digits, and a cursor's row came again after it).
            repo, paged, before = MessengerRepository(), [], None
            for _ in range(3):
                page = await repo.list_survey_answers(
                    session,
                    customer_id=None,
                    journey=None,
                    max_score=None,
                    since=None,
                    until=None,
                    followed_up=None,
                    before=before,
                    limit=1,
                )
                paged += [r.id for r in page]
                before = (page[-1].created_at, page[-1].id) if page else before
    finally:
        await db.dispose()
    assert paged == ["m1", "m4"]
    [row, old_row] = rows
    assert (row.id, row.customer_id, row.journey, row.channel, row.tier) == (
        "m1",
        "c1",
        "feedback_survey",
        "sms",
        "gold",
    )
    assert (row.score, row.comment) == (2, "לקח שבוע")
    assert abs(row.created_at - answered) < timedelta(milliseconds=1)
    assert (row.followed_up_at, row.followed_up_by, row.follow_up_note) == (None, None, None)
    assert (old_row.id, old_row.score, old_row.comment) == ("m4", 1, None)
    assert abs(old_row.created_at - long_ago) < timedelta(milliseconds=1)
    assert old_row.followed_up_by == "migration-0007"
    assert (
        old_row.follow_up_note
        == "Answered before follow-ups were recorded in Retain (messenger migration 0007)."
    )
    assert abs(old_row.followed_up_at - datetime.now(UTC)) < timedelta(minutes=5)
    # In the history too, as the API gives it.
    [marked] = old_row.follow_up_history
    assert (marked["action"], marked["by"], marked["note"]) == (
        "followed_up",
        "migration-0007",
        old_row.follow_up_note,
    )
    assert abs(datetime.fromisoformat(marked["at"]) - datetime.now(UTC)) < timedelta(minutes=5)


async def test_the_kpi_forgets_the_opt_out_events_it_kept_as_messages(database_url: str) -> None:
    """Migration 0008 of the kpi: the opt-out events kept before (journey "-") are deleted, the
    messages stay, and the conversion rollup will recompute every day (no fingerprint)."""
    from sqlalchemy import insert, select  # noqa: PLC0415

    db = Database(database_url)
    at = datetime(2026, 11, 20, 10, tzinfo=UTC)
    base = {"customer_id": "c1", "occurred_at": at, "kind": "marketing", "holdout": False}
    m, state = kpi_tables.message_events, kpi_tables.rollup_state
    try:
        await upgrade_to(db, "kpi", "0007")
        async with db.engine.begin() as conn:
            optout = {"event_id": "optout:c1:x", "message_id": "optout:c1", "status": "unsubscribed"}
            sent = {"event_id": "m1:sent", "message_id": "m1", "status": "sent"}
            await conn.execute(
                insert(m), [{**base, **optout, "journey": "-"}, {**base, **sent, "journey": "thank_you"}]
            )
            await conn.execute(
                insert(state),
                [{"name": "conversion", "settings": "abc"}, {"name": "churn", "settings": "def"}],
            )
        await migrate(db, REPO_ROOT / "services" / "kpi" / "migrations")
        async with db.sessions() as session:
            kept = (await session.execute(select(m.c.event_id))).scalars().all()
            fingerprints = dict((await session.execute(select(state.c.name, state.c.settings))).all())
    finally:
        await db.dispose()
    assert kept == ["m1:sent"]
    assert fingerprints == {"conversion": None, "churn": "def"}


def _open_ticket(**values: Any) -> dict[str, Any]:
    """A row of the kpi's tickets: opened on 20 November 2026, not answered yet."""
    return {
        "priority": None,
        "opened_at": datetime(2026, 11, 20, 10, tzinfo=UTC),
        "opened_inferred": False,
        "first_response_at": None,
        "first_response_s": None,
        "resolved_at": None,
        "resolution_s": None,
        "reopened": 0,
        **values,
    }


async def test_kpi_0010_keys_tickets_by_customer_and_rederives_only_merged_ones(database_url: str) -> None:
    """Migration 0010 of the kpi on a database where two customers' T1 were stored as one
    ticket: that row is dropped and each customer's T1 marked stale, for the next rollup to
    derive (readers derive them meanwhile); a ticket of one customer keeps its row, and one
    stale before stays stale."""
    from sqlalchemy import insert, select  # noqa: PLC0415

    db = Database(database_url)
    at = datetime(2026, 11, 20, 10, tzinfo=UTC)
    step = {"category": "billing", "priority": None, "is_complaint": False, "occurred_at": at}
    ticket = _open_ticket(category="billing", is_complaint=False)
    steps = [("s1", "ann", "T1", "opened"), ("s2", "ben", "T1", "opened"), ("s3", "ann", "T2", "opened")]
    steps.append(("s4", "cat", "T3", "opened"))
    try:
        await upgrade_to(db, "kpi", "0009")
        async with db.engine.begin() as conn:
            await conn.execute(
                insert(kpi_tables.support_events),
                [
                    {**step, "event_id": e, "customer_id": c, "ticket_id": t, "action": a}
                    for e, c, t, a in steps
                ],
            )
            await conn.execute(
                insert(kpi_tables.tickets),
                [{**ticket, "ticket_id": t, "customer_id": c} for c, t in (("ann", "T1"), ("ann", "T2"))],
            )
            await conn.execute(text("INSERT INTO stale_tickets (ticket_id, marks) VALUES ('T3', 2)"))
        await migrate(db, REPO_ROOT / "services" / "kpi" / "migrations")
        async with db.sessions() as session:
            s, t = kpi_tables.stale_tickets.c, kpi_tables.tickets.c
            stale = (await session.execute(select(s.customer_id, s.ticket_id, s.marks))).all()
            stored = (await session.execute(select(t.customer_id, t.ticket_id))).all()
    finally:
        await db.dispose()
    assert sorted(tuple(r) for r in stale) == [("ann", "T1", 1), ("ben", "T1", 1), ("cat", "T3", 1)]
    assert [tuple(r) for r in stored] == [("ann", "T2")]


@pytest.mark.parametrize("own_entry", [None, {"field": "tier", "op": "eq", "value": "platinum"}])
async def test_messenger_0011_gives_a_stored_tier_upgrade_the_default_entry(
    database_url: str, own_entry: dict[str, Any] | None
) -> None:
    """Journeys are stored at the first start: a deployment made before tier_upgrade got its
    entry condition (not churned) still congratulated customers who had cancelled. One given
    an entry of its own keeps it; other journeys are left as they are."""
    from sqlalchemy import insert, select  # noqa: PLC0415

    from services.messenger.journeys import default_journeys  # noqa: PLC0415

    stored = [j.model_dump(mode="json") for j in default_journeys()]
    by_name = {j["name"]: j for j in stored}
    assert by_name["tier_upgrade"]["entry"]  # the default has it now
    by_name["tier_upgrade"]["entry"] = own_entry  # as an older release stored it, or marketing wrote it
    copy = {**by_name["tier_upgrade"], "name": "vip_upgrade", "entry": None}  # another journey
    db = Database(database_url)
    s = messenger_tables.settings_table
    try:
        await upgrade_to(db, "messenger", "0010")
        async with db.engine.begin() as conn:
            row = {
                "name": "journeys",
                "value": [*stored, copy],
                "updated_at": datetime.now(UTC),
                "updated_by": "m",
            }
            await conn.execute(insert(s), [row])
        await migrate(db, REPO_ROOT / "services" / "messenger" / "migrations")
        async with db.sessions() as session:
            after_row = (await session.execute(select(s).where(s.c.name == "journeys"))).one()
    finally:
        await db.dispose()
    after = {j["name"]: j for j in after_row.value}
    not_churned = {"not": {"field": "lifecycle_stage", "op": "eq", "value": "churned"}}
    assert after["tier_upgrade"]["entry"] == (own_entry or not_churned)
    assert after["vip_upgrade"] == copy
    assert {k: v for k, v in after.items() if k not in ("tier_upgrade", "vip_upgrade")} == {
        k: v for k, v in by_name.items() if k != "tier_upgrade"
    }
    assert after_row.updated_by == ("m" if own_entry else "migration 0011")


async def test_kpi_0011_derives_again_the_tickets_of_a_complaint_category_in_another_case(
    database_url: str,
) -> None:
    """A ticket stored as not a complaint though its category is 'Complaint' is marked stale for
    the rollup to derive again; one of 'complaint' (flagged when derived) and one marked before
    are left as they were."""
    from sqlalchemy import insert, select  # noqa: PLC0415

    db = Database(database_url)
    ticket = _open_ticket()
    stored = [
        ("ann", "T1", "Complaint", False),
        ("ann", "T2", "complaint", True),
        ("ben", "T1", "COMPLAINT", False),
        ("ben", "T2", "billing", False),
        ("cat", "T1", "Complaint", False),
    ]
    try:
        await upgrade_to(db, "kpi", "0010")
        async with db.engine.begin() as conn:
            await conn.execute(
                insert(kpi_tables.tickets),
                [
                    {**ticket, "customer_id": c, "ticket_id": t, "category": k, "is_complaint": flagged}
                    for c, t, k, flagged in stored
                ],
            )
            await conn.execute(text("INSERT INTO stale_tickets VALUES ('cat', 'T1', 3)"))
        await migrate(db, REPO_ROOT / "services" / "kpi" / "migrations")
        async with db.sessions() as session:
            s = kpi_tables.stale_tickets.c
            stale = (await session.execute(select(s.customer_id, s.ticket_id, s.marks))).all()
    finally:
        await db.dispose()
    assert sorted(tuple(r) for r in stale) == [("ann", "T1", 1), ("ben", "T1", 1), ("cat", "T1", 3)]


async def test_segmenter_0004_checks_again_the_customers_with_a_complaint_category_in_another_case(
    database_url: str,
) -> None:
    """A customer whose stored ticket of 'Complaint' was not flagged is due for a check now (the
    sweep derives the facts again); others keep their next check."""
    from sqlalchemy import select  # noqa: PLC0415

    from services.segmenter.tables import customers  # noqa: PLC0415

    def state(category: str, flagged: bool) -> str:
        ticket = {"category": [category, "2026-11-20T10:00:00+00:00", "e1"], "priority": None}
        return json.dumps({"v": 1, "tickets": {"T1": {**ticket, "complaint": flagged, "steps": {}}}})

    later = datetime(2027, 1, 1, tzinfo=UTC)
    rows = {
        "written": (state("Complaint", False), None),
        "flagged": (state("Complaint", True), None),
        "lower": (state("complaint", False), later),
        "shouted": (state("COMPLAINT", False), later),
        "billing": (state("billing", False), None),
        # More than a page of customers with tickets before them (the migration pages by key).
        **{f"a{i:04}": (state("complaint", True), None) for i in range(600)},
    }
    db = Database(database_url)
    before = datetime.now(UTC)
    try:
        await upgrade_to(db, "segmenter", "0003")
        async with db.engine.begin() as conn:
            await conn.execute(
                customers.insert(),
                [
                    {
                        "customer_id": c,
                        "state": json.loads(s),
                        "facts": {},
                        "tier": "none",
                        "segments": [],
                        "lifecycle_stage": "active",
                        "rule_version": 1,
                        "next_check_at": check,
                        "updated_at": before,
                    }
                    for c, (s, check) in rows.items()
                ],
            )
        await migrate(db, REPO_ROOT / "services" / "segmenter" / "migrations")
        async with db.sessions() as session:
            found = dict(
                (await session.execute(select(customers.c.customer_id, customers.c.next_check_at))).all()
            )
    finally:
        await db.dispose()
    assert found["flagged"] is None
    assert found["billing"] is None
    assert all(found[f"a{i:04}"] is None for i in range(600))
    assert found["lower"] == later
    for due in ("written", "shouted"):
        assert before <= found[due] <= datetime.now(UTC), due
