"""The database plumbing on SQLite, with aiosqlite (the APIs) and inline (the workers): the
same transactions, errors and ledger either way."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import TypeAdapter
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    bindparam,
    event,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError

from shared.db import (
    Database,
    UtcDateTime,
    applied_events_table,
    claim_events,
    copy_new_rows,
    in_list,
    json_type,
    json_values,
    rows_insert,
    rows_update,
)
from shared.kafka.consumer import is_transient

metadata = MetaData()
items = Table("items", metadata, Column("id", Integer, primary_key=True), Column("name", String(50)))
ledger = applied_events_table(metadata)
facts = Table(
    "facts",
    metadata,
    Column("key", String(20), primary_key=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("amount", Numeric(18, 4), nullable=False),
    Column("flag", Boolean, nullable=False),
    Column("note", String(50), nullable=True),
    Column("doc", json_type(), nullable=False),
)


@pytest.fixture(params=[False, True], ids=["aiosqlite", "inline"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", inline_sqlite=request.param)
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield database
    await database.dispose()


@pytest.fixture
async def both(database_url: str) -> AsyncIterator[Database]:
    """A database of each dialect the services run on (``database_url``)."""
    database = Database(database_url, inline_sqlite=True)
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield database
    await database.dispose()


async def names(db: Database) -> list[str]:
    async with db.sessions() as session:
        return list((await session.execute(select(items.c.name).order_by(items.c.id))).scalars())


async def test_a_transaction_commits_on_success_and_rolls_back_on_error(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(items.insert(), [{"id": 1, "name": "kept"}])

    async def fails_midway() -> None:
        async with db.transaction() as session:
            await session.execute(items.insert(), [{"id": 2, "name": "rolled back"}])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await fails_midway()
    assert await names(db) == ["kept"]


async def test_constraint_violations_are_sqlalchemy_errors_and_undo_the_transaction(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(items.insert(), [{"id": 1, "name": "first"}])

    async def clashes() -> None:
        async with db.transaction() as session:
            await session.execute(items.insert(), [{"id": 2, "name": "second"}])
            await session.execute(items.insert(), [{"id": 1, "name": "clash"}])

    with pytest.raises(IntegrityError):
        await clashes()
    assert await names(db) == ["first"]


@dataclass(frozen=True)
class _Record:
    """A consumed record as the ledger sees it (Delivered's fields that it reads)."""

    value: Any
    topic: str = "t"
    partition: int = 0
    offset: int = 0
    digest: int | None = None


def _rec(event_id: str, offset: int = 0, digest: int | None = None, partition: int = 0) -> _Record:
    return _Record(SimpleNamespace(event_id=event_id), "t", partition, offset, digest)


async def test_the_ledger_claims_each_event_once(db: Database) -> None:
    a, b, a_again = _rec("a", 1, 10), _rec("b", 2, 20), _rec("a", 1, 10)
    b_again, c = _rec("b", 2, 20), _rec("c", 7, 30, partition=1)
    async with db.transaction() as session:
        first = await claim_events(session, ledger, [a, b, a_again])
    async with db.transaction() as session:
        second = await claim_events(session, ledger, [b_again, c])
    assert (first.fresh, first.reused, first.duplicates) == ([a, b], [], 1)
    assert (second.fresh, second.reused, second.duplicates) == ([c], [], 1)


async def test_the_ledger_claims_each_event_once_on_both_dialects(both: Database) -> None:
    async with both.transaction() as session:
        first = await claim_events(session, ledger, [_rec("a", 1, 10), _rec("b", 2, None), _rec("a", 1, 10)])
    async with both.transaction() as session:
        second = await claim_events(
            session, ledger, [_rec("b", 2, None), _rec("c", 7, -(2**63), partition=1)]
        )
    async with both.sessions() as session:
        rows = (await session.execute(select(ledger).order_by(ledger.c.event_id))).all()
    assert [d.value.event_id for d in first.fresh] == ["a", "b"]
    assert [d.value.event_id for d in second.fresh] == ["c"]
    assert [(r.event_id, r.topic, r.partition, r.offset, r.digest) for r in rows] == [
        ("a", "t", 0, 1, 10),
        ("b", "t", 0, 2, None),
        ("c", "t", 1, 7, -(2**63)),  # the whole signed 64-bit range of event_digest fits
    ]


def v1(n: int) -> int:
    """A digest of version 1 (its low byte: shared.codec.event_digest)."""
    return n << 8 | 1


async def test_an_id_applied_for_another_event_is_reused_not_a_duplicate(both: Database) -> None:
    """Against the ledger and within one batch: a record whose digest differs from the one its
    id was first applied with is reported, naming where that first one was read; the same
    digest, one not known on either side (our own topics, rows from before digests) or one of
    another version (the encoding may have changed between them) is a duplicate as before."""
    async with both.transaction() as session:
        await claim_events(
            session, ledger, [_rec("p-1", 5, v1(111)), _rec("old", 6, None), _rec("v", 7, v1(7))]
        )
    other_then_same = [_rec("p-1", 9, v1(222)), _rec("p-1", 10, v1(111))]
    within = [_rec("p-2", 11, v1(333)), _rec("p-2", 12, v1(444)), _rec("p-2", 13, v1(333))]
    unknown = [_rec("old", 14, v1(555)), _rec("p-3", 15, None), _rec("p-3", 16, v1(666))]
    other_version = [_rec("v", 17, 8 << 8 | 2)]
    async with both.transaction() as session:
        claimed = await claim_events(session, ledger, [*other_then_same, *within, *unknown, *other_version])
    assert claimed.fresh == [within[0], unknown[1]]
    assert [d for d, _ in claimed.reused] == [other_then_same[0], within[1]]
    assert claimed.duplicates == 5
    details = [why for _, why in claimed.reused]
    first_read = "(first read from t partition 0 offset 5)"
    assert details[0].startswith(f"event_id 'p-1' was applied for another event {first_read}")
    assert "(first read from t partition 0 offset 11)" in details[1]
    assert all("under an event_id of its own" in why for why in details)
    async with both.sessions() as session:
        digests = dict((await session.execute(select(ledger.c.event_id, ledger.c.digest))).all())
    assert digests == {
        "p-1": v1(111),
        "old": None,
        "v": v1(7),
        "p-2": v1(333),
        "p-3": None,
    }  # the first stands


def _statements(db: Database) -> list[bool]:
    """Whether each INSERT or UPDATE the engine runs from now on is an executemany."""
    seen: list[bool] = []

    @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def _seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.startswith(("INSERT", "UPDATE")):
            seen.append(many)

    return seen


async def test_a_batch_of_rows_is_one_statement_and_every_value_comes_back(both: Database) -> None:
    at = datetime(2026, 11, 26, 15, 0, 0, 123456, tzinfo=UTC)
    rows = [
        {
            "key": f"k{i}",
            "at": at + timedelta(minutes=i),
            "amount": Decimal(f"{i}.0125"),
            "flag": i % 2 == 0,
            "note": None if i % 3 else f"note {i}",
            # A JSON list is one value, not a sub-array; so is a list of lists.
            "doc": [["x", i]] if i % 2 else {"segments": ["a", "b"][: i % 3], "n": i},
        }
        for i in range(250)
    ]
    write = rows_insert(both.dialect, facts, lambda ins: ins.on_conflict_do_nothing())
    seen = _statements(both)
    async with both.transaction() as session:
        await write.execute(session, rows)
        await write.execute(session, rows[:10])  # conflicts, ignored
    # PostgreSQL: one statement per batch, the rows as arrays; SQLite: one executemany.
    assert seen == ([False, False] if both.dialect == "postgresql" else [True, True])
    async with both.sessions() as session:
        back = [dict(r._mapping) for r in await session.execute(select(facts).order_by(facts.c.at))]
    assert back == rows


async def test_an_update_of_a_batch_is_one_statement_and_touches_only_its_rows_and_columns(
    both: Database,
) -> None:
    at = datetime(2026, 11, 26, 15, 0, 0, 123456, tzinfo=UTC)
    rows = [
        {"key": f"k{i}", "at": at, "amount": Decimal(i), "flag": True, "note": "old", "doc": {"n": i}}
        for i in range(6)
    ]
    async with both.transaction() as session:
        await rows_insert(both.dialect, facts).execute(session, rows)
    update = rows_update(both.dialect, facts, "key", ["at", "note", "doc"])
    seen = _statements(both)
    later = at + timedelta(days=1)
    changes = [
        {"new_key": "k1", "new_at": later, "new_note": None, "new_doc": ["a", "b"]},
        {
            "new_key": "k4",
            "new_at": later + timedelta(microseconds=1),
            "new_note": "new",
            "new_doc": [["x", 1]],
        },
        {"new_key": "nobody", "new_at": later, "new_note": "x", "new_doc": {}},  # no such row: nothing
    ]
    async with both.transaction() as session:
        await update.execute(session, changes)
    assert seen == ([False] if both.dialect == "postgresql" else [True])
    async with both.sessions() as session:
        back = {r.key: dict(r._mapping) for r in await session.execute(select(facts))}
    want = {r["key"]: dict(r) for r in rows}
    want["k1"] |= {"at": later, "note": None, "doc": ["a", "b"]}
    want["k4"] |= {"at": later + timedelta(microseconds=1), "note": "new", "doc": [["x", 1]]}
    assert back == want  # amount and flag untouched, other rows untouched


async def test_in_list_is_one_statement_for_lists_of_any_length(both: Database) -> None:
    stmt = select(items.c.id, items.c.name).where(in_list(both.dialect, items.c.name)).order_by(items.c.id)
    async with both.transaction() as session:
        await session.execute(insert(items), [{"id": i, "name": f"n{i}"} for i in range(1, 8)])
    async with both.sessions() as session:
        found = {
            n: [r.id for r in await session.execute(stmt, {"ids": [f"n{i}" for i in range(n, 0, -2)]})]
            for n in (0, 1, 4, 7)
        }
        # The key of a text column is bound as text, with nothing to cast on either side.
        absent = (await session.execute(stmt, {"ids": ["n9", "N1", ""]})).all()
    assert found == {0: [], 1: [1], 4: [2, 4], 7: [1, 3, 5, 7]}
    assert absent == []
    if both.dialect == "postgresql":
        # One placeholder, whatever the length: one prepared statement, not one per length.
        assert str(stmt.compile(dialect=both.engine.dialect)).count("$") == 1


async def test_json_values_pick_keys_out_of_an_object_with_their_json_types(both: Database) -> None:
    doc = {
        "yes": True,
        "no": False,
        "n": 3,
        "x": 2.5,
        "s": "שלום",
        "at": "2026-11-26T10:00:00+00:00",
        "list": [1, "a"],
        "obj": {"k": [True, None]},
        "null": None,
    }
    at = datetime(2026, 11, 26, tzinfo=UTC)
    async with both.transaction() as session:
        await rows_insert(both.dialect, facts).execute(
            session,
            [{"key": "k", "at": at, "amount": Decimal(1), "flag": True, "note": None, "doc": doc}],
        )
    keys = ["yes", "no", "n", "x", "s", "at", "list", "obj", "null", "absent"]
    async with both.sessions() as session:
        picked = (await session.execute(select(json_values(both.dialect, facts.c.doc, keys)))).scalar_one()
        one = (await session.execute(select(json_values(both.dialect, facts.c.doc, ["yes"])))).scalar_one()
    # true stays true (not 1), and a key the object lacks reads as None.
    assert picked == [*(doc[k] for k in keys[:-1]), None]
    assert [type(v) for v in picked[:2]] == [bool, bool]
    assert one == [True]


def test_json_values_take_identifiers_only() -> None:
    with pytest.raises(ValueError, match="not an identifier"):
        json_values("sqlite", facts.c.doc, ["ok", "x') OR 1=1 --"])


async def test_an_upsert_of_a_batch_keeps_its_conflict_rule(both: Database) -> None:
    at = datetime(2026, 11, 26, tzinfo=UTC)

    def newer_wins(ins: Any) -> Any:
        return ins.on_conflict_do_update(
            index_elements=[facts.c.key],
            set_={"at": ins.excluded.at, "note": ins.excluded.note},
            where=or_(ins.excluded.at > facts.c.at),
        )

    write = rows_insert(both.dialect, facts, newer_wins)

    def row(key: str, minutes: int, note: str) -> dict[str, Any]:
        return {
            "key": key,
            "at": at + timedelta(minutes=minutes),
            "amount": Decimal(1),
            "flag": True,
            "note": note,
            "doc": [],
        }

    async with both.transaction() as session:
        await write.execute(session, [row("a", 5, "a first"), row("b", 5, "b first")])
        await write.execute(session, [row("a", 1, "a older"), row("b", 9, "b newer"), row("c", 0, "c")])
    async with both.sessions() as session:
        notes = dict((await session.execute(select(facts.c.key, facts.c.note))).all())
    assert notes == {"a": "a first", "b": "b newer", "c": "c"}


async def test_a_row_without_every_column_is_refused_and_writes_nothing(both: Database) -> None:
    write = rows_insert(both.dialect, facts)
    at = datetime(2026, 11, 26, tzinfo=UTC)
    good = {"key": "a", "at": at, "amount": Decimal(1), "flag": True, "note": None, "doc": {}}
    without_note = {k: v for k, v in good.items() if k != "note"}
    with pytest.raises((KeyError, StatementError)):
        async with both.transaction() as session:
            await write.execute(session, [good, {**without_note, "key": "b"}])
    async with both.sessions() as session:
        assert (await session.execute(select(facts))).all() == []


def _fact(i: int) -> dict[str, Any]:
    at = datetime(2026, 11, 26, 15, 0, 0, 123456, tzinfo=UTC)
    jerusalem = timezone(timedelta(hours=2))
    return {
        "key": f"k{i}",
        "at": (at + timedelta(minutes=i)).astimezone(jerusalem if i % 2 else UTC),
        "amount": Decimal(f"{i}.0125"),
        "flag": i % 2 == 0,
        "note": None if i % 3 else f"note {i}",
        "doc": [["x", i]] if i % 2 else {"segments": ["a", "b"][: i % 3], "n": i},
    }


async def _facts_back(db: Database) -> list[dict[str, Any]]:
    async with db.sessions() as session:
        return [dict(r._mapping) for r in await session.execute(select(facts).order_by(facts.c.at))]


async def _claim_and_copy(db: Database, event_id: str, rows: list[dict[str, Any]]) -> None:
    """A kpi-like batch: the ledger claim, then the facts of the new event."""
    async with db.transaction() as session:
        await claim_events(session, ledger, [_rec(event_id)])
        await copy_new_rows(session, facts, rows)


async def test_new_rows_are_copied_and_every_value_comes_back(both: Database) -> None:
    """After the ledger claim, as the kpi consumer writes its facts: PostgreSQL's binary COPY
    (no INSERT statement at all), SQLite's executemany; the same values back either way."""
    rows = [_fact(i) for i in range(250)]
    seen = _statements(both)
    async with both.transaction() as session:
        await claim_events(session, ledger, [_rec(f"e{i}", i) for i in range(250)])
        await copy_new_rows(session, facts, rows[:200])
        await copy_new_rows(session, facts, rows[200:])
        await copy_new_rows(session, facts, [])
    # The claim, then on PostgreSQL no INSERT through SQLAlchemy (two COPYs); on SQLite two executemanys.
    assert seen == ([False] if both.dialect == "postgresql" else [True, True, True])
    back = await _facts_back(both)
    assert back == rows
    assert all(r["at"].tzinfo is UTC for r in back)


async def test_a_copied_row_whose_key_exists_fails_the_whole_transaction(both: Database) -> None:
    """No conflict clause: a key already there is a broken invariant (a fact without its ledger
    row). The error is SQLAlchemy's, as an INSERT's would be, and the batch's claim and rows go
    back with it."""
    await _claim_and_copy(both, "e-first", [_fact(1)])
    with pytest.raises(IntegrityError):
        await _claim_and_copy(both, "e-second", [_fact(2), _fact(1), _fact(3)])
    assert [r["key"] for r in await _facts_back(both)] == ["k1"]
    async with both.sessions() as session:
        assert list((await session.execute(select(ledger.c.event_id))).scalars()) == ["e-first"]


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url)
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield database
    await database.dispose()


async def test_a_copy_on_a_lost_connection_is_a_transient_error_and_the_retry_goes_through(
    pg: Database,
) -> None:
    """PostgreSQL ends the session between the claim and the COPY (a restart, an admin): the
    consumer loop must see what it sees when an INSERT fails so, retry, and get a new connection."""

    async def cut_off_before_the_copy() -> None:
        async with pg.transaction() as session:
            await claim_events(session, ledger, [_rec("e1")])
            pid = await session.scalar(text("SELECT pg_backend_pid()"))
            async with pg.engine.connect() as other:
                await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await copy_new_rows(session, facts, [_fact(1)])

    with pytest.raises(DBAPIError) as raised:
        await cut_off_before_the_copy()
    assert raised.value.statement == "COPY facts"  # the COPY's own error, not the rollback's after it
    assert raised.value.connection_invalidated
    assert is_transient(raised.value)
    await _claim_and_copy(pg, "e1", [_fact(1)])
    assert [r["key"] for r in await _facts_back(pg)] == ["k1"]


async def test_a_copied_naive_datetime_is_refused_and_writes_nothing(both: Database) -> None:
    naive = {**_fact(2), "at": datetime(2026, 1, 1)}  # noqa: DTZ001 - the point
    with pytest.raises((StatementError, ValueError), match="naive datetime"):
        await _claim_and_copy(both, "e", [_fact(1), naive])
    assert await _facts_back(both) == []


async def test_a_copy_before_any_statement_of_the_transaction_is_refused_on_postgresql(
    both: Database,
) -> None:
    """asyncpg's transaction begins with the first statement SQLAlchemy sends; a COPY before it
    would commit on its own, outside the batch's transaction. SQLite has no such gap."""
    if both.dialect == "postgresql":
        with pytest.raises(RuntimeError, match="outside a begun transaction"):
            async with both.transaction() as session:
                await copy_new_rows(session, facts, [_fact(1)])
        assert await _facts_back(both) == []
    else:
        async with both.transaction() as session:
            await copy_new_rows(session, facts, [_fact(1)])
        assert [r["key"] for r in await _facts_back(both)] == ["k1"]


async def test_many_rows_and_concurrent_tasks_share_the_engine(db: Database) -> None:
    async def writer(start: int) -> None:
        for i in range(start, start + 50):
            async with db.transaction() as session:
                await session.execute(items.insert(), [{"id": i, "name": f"n{i:04d}"}])

    await asyncio.gather(*(writer(k * 1000) for k in range(4)))
    async with db.sessions() as session:
        count = (await session.execute(text("SELECT count(*) FROM items"))).scalar_one()
        streamed = [row.id async for row in await session.stream(select(items.c.id).order_by(items.c.id))]
    assert count == 200
    assert streamed == sorted(k * 1000 + i for k in range(4) for i in range(50))


async def test_a_write_lock_held_elsewhere_is_a_transient_error(tmp_path: Path) -> None:
    """Another process holding the write lock past busy_timeout: the worker gets an error its
    loop retries, not a hang and not a permanent failure (inline, the wait is 3 s)."""
    path = tmp_path / "locked.sqlite"
    db = Database(f"sqlite+aiosqlite:///{path}", inline_sqlite=True)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError) as caught:
            async with db.transaction() as session:
                await session.execute(items.insert(), [{"id": 1, "name": "waits"}])
        assert "locked" in str(caught.value)
        assert is_transient(caught.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    async with db.transaction() as session:
        await session.execute(items.insert(), [{"id": 1, "name": "after"}])
    assert await names(db) == ["after"]
    await db.dispose()


async def test_a_read_takes_no_write_lock_and_reads_one_snapshot(db: Database) -> None:
    """A read session open (an API's GET mid-query) while another process writes: the writer
    does not wait for it, and the read goes on seeing what it began with. A read that began
    IMMEDIATE held the write lock, and the writer here would fail after its 0.2 s."""
    async with db.transaction() as session:
        await session.execute(items.insert(), [{"id": 1, "name": "before"}])
    path = db.sqlite_file
    assert path is not None
    writer = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        async with db.sessions() as reading:
            first = list((await reading.execute(select(items.c.name))).scalars())
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO items (id, name) VALUES (2, 'after')")
            writer.execute("COMMIT")
            again = list((await reading.execute(select(items.c.name))).scalars())
    finally:
        writer.close()
    assert first == again == ["before"]
    assert await names(db) == ["before", "after"]


async def test_writes_still_queue_for_the_write_lock_up_front(db: Database) -> None:
    """Transactions begin IMMEDIATE: a second writer waits at BEGIN instead of failing later
    on upgrading a read lock (which SQLite cannot wait for)."""
    path = db.sqlite_file
    assert path is not None
    other = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        async with db.transaction() as session:
            await session.execute(select(items.c.name))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()


stamps = Table(
    "stamps", metadata, Column("id", Integer, primary_key=True), Column("at", UtcDateTime(), nullable=True)
)


async def test_utc_datetimes_of_any_offset_read_back_as_the_same_instant_in_utc(both: Database) -> None:
    """On either dialect, whatever the writer's offset or tzinfo class (pydantic's UTC is not
    datetime's): the instant is kept and read back with datetime's UTC."""
    parsed = TypeAdapter(datetime).validate_python("2026-11-26T08:30:00.000005Z")
    assert parsed.tzinfo is not UTC  # the case PostgreSQL's bind leaves to asyncpg
    written = {
        1: datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone(timedelta(hours=2))),
        2: parsed,
        3: datetime(2026, 11, 26, 3, 0, 0, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    }
    async with both.transaction() as session:
        await session.execute(insert(stamps), [{"id": i, "at": at} for i, at in written.items()])
    with pytest.raises(StatementError, match="naive"):
        async with both.transaction() as session:
            await session.execute(insert(stamps), [{"id": 9, "at": datetime(2026, 1, 1)}])  # noqa: DTZ001
    async with both.sessions() as session:
        rows = await session.execute(select(stamps.c.id, stamps.c.at).order_by(stamps.c.id))
        read: dict[int, datetime] = {i: at for i, at in rows}  # noqa: C416 - a Result is no mapping source
    assert read == written
    assert {at.tzinfo for at in read.values()} == {UTC}
    assert read[1] == datetime(2026, 11, 26, 8, 0, 0, tzinfo=UTC)


async def test_utc_datetimes_are_stored_as_sqlalchemy_stores_them_and_read_back_aware(db: Database) -> None:
    """The text in the file is SQLAlchemy's DATETIME format in UTC, so files written before
    read the same, text order is time order, and plain DateTime columns agree."""
    israel = timezone(timedelta(hours=2))
    written = [
        datetime(2026, 11, 26, 10, 0, 0, tzinfo=israel),  # 08:00 UTC
        datetime(2026, 11, 26, 8, 30, 0, 5, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC),
        None,
    ]
    async with db.transaction() as session:
        await session.execute(insert(stamps), [{"id": i, "at": at} for i, at in enumerate(written)])
        await session.execute(
            text("INSERT INTO stamps (id, at) VALUES (9, :at)").bindparams(bindparam("at", type_=DateTime())),
            {"at": datetime(2026, 1, 1, 12, 0)},  # noqa: DTZ001 - naive, through SQLAlchemy's own processor
        )
        # Text some other writer stored with an offset reads as the same instant in UTC.
        await session.execute(text("INSERT INTO stamps (id, at) VALUES (10, '2026-11-26 10:00:00+02:00')"))
    async with db.sessions() as session:
        raw = (await session.execute(text("SELECT at FROM stamps ORDER BY id"))).scalars().all()
        read = (await session.execute(select(stamps.c.at).order_by(stamps.c.id))).scalars().all()
        later = (
            (
                await session.execute(
                    select(stamps.c.id).where(
                        stamps.c.at > datetime(2026, 11, 26, 8, 15, tzinfo=UTC),
                        stamps.c.id != 10,  # its text does not order as its time: never written so
                    )
                )
            )
            .scalars()
            .all()
        )
    assert raw == [
        "2026-11-26 08:00:00.000000",
        "2026-11-26 08:30:00.000005",
        "0999-01-02 03:04:05.000000",
        None,
        "2026-01-01 12:00:00.000000",
        "2026-11-26 10:00:00+02:00",
    ]
    assert read[:4] == written
    assert all(r is None or r.tzinfo is UTC for r in read)
    assert read[4] == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert read[5] == datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    assert later == [1]


async def test_a_naive_datetime_is_refused(db: Database) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        async with db.transaction() as session:
            await session.execute(insert(stamps), [{"id": 1, "at": datetime(2026, 1, 1)}])  # noqa: DTZ001 - the point


blobs = Table("blobs", MetaData(), Column("id", Integer, primary_key=True), Column("body", String))


async def _write_blobs(db: Database, transactions: int) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(blobs.metadata.create_all)
    for t in range(transactions):
        async with db.transaction() as session:
            await session.execute(insert(blobs), [{"id": t * 10 + i, "body": "x" * 3000} for i in range(10)])


def _rows_in_the_file_alone(path: Path, copy: Path) -> int:
    """Rows in the database file without its write-ahead log: what checkpoints copied there."""
    copy.write_bytes(path.read_bytes())
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM blobs").fetchone()[0])
        except sqlite3.OperationalError:  # the table itself is still only in the log
            return 0


async def test_background_checkpoints_copy_the_log_into_the_file_while_commits_do_not(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    db = Database(f"sqlite+aiosqlite:///{path}", inline_sqlite=True, background_checkpoints=True)
    try:
        await _write_blobs(db, 30)  # ~250 pages: under SQLite's own limit of 1,000
        async with db.sessions() as session:
            # The commits' own checkpoint waits for a log ten times SQLite's default.
            assert await session.scalar(text("PRAGMA wal_autocheckpoint")) == 10_000
        async with asyncio.timeout(10):
            while _rows_in_the_file_alone(path, tmp_path / "copy.sqlite") < 300:
                await asyncio.sleep(0.1)
        assert db._checkpoints is not None
        assert db._checkpoints.checkpoints >= 1
    finally:
        await db.dispose()
    assert db._checkpoints._task is None  # stopped with the database


async def test_without_background_checkpoints_a_small_log_stays_uncopied(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    db = Database(f"sqlite+aiosqlite:///{path}", inline_sqlite=True)
    try:
        await _write_blobs(db, 30)
        await asyncio.sleep(0.6)  # two of the checkpointer's turns
        assert _rows_in_the_file_alone(path, tmp_path / "copy.sqlite") == 0
    finally:
        await db.dispose()
