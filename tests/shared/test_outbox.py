"""The outbox relay: sent after commit, in commit order, rows deleted once acknowledged,
nothing lost when Kafka is away or the process dies — on SQLite and PostgreSQL, with a
producer that records what the broker acknowledged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import pytest
from sqlalchemy import MetaData, Table, event, func, select

from shared.db import Database
from shared.kafka.producer import BrokerUnavailableError, OutboundRecord, Producer
from shared.outbox import OutboxRelay, enqueue, outbox_table

pytestmark = pytest.mark.integration


class FakeBroker(Producer):
    """Acknowledges (and keeps) what it is sent, unless told to be away or to be slow."""

    def __init__(self) -> None:
        super().__init__("unused:9092", client_id="test")
        self.acked: list[bytes] = []
        self.away = False
        self.delay_s = 0.0

    async def send_all(self, records: Sequence[OutboundRecord]) -> None:
        await asyncio.sleep(self.delay_s)
        if self.away:
            raise BrokerUnavailableError("away")
        self.acked += [r.value for r in records]


def records(*values: str) -> list[OutboundRecord]:
    return [OutboundRecord("t", b"k", v.encode()) for v in values]


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[tuple[Database, Table]]:
    metadata = MetaData()
    table = outbox_table(metadata)
    database = Database(database_url, inline_sqlite=True)  # as the workers run it
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield database, table
    await database.dispose()


async def rows_left(database: Database, table: Table) -> int:
    async with database.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def commit(relay: OutboxRelay, database: Database, *values: str) -> None:
    async with database.transaction() as session:
        staged = await relay.stage(session, records(*values))
    await relay.after_commit(staged)


async def test_staged_records_go_out_in_commit_order_and_their_rows_go(db: tuple[Database, Table]) -> None:
    database, table = db
    broker = FakeBroker()
    relay = OutboxRelay(database, table, broker, batch=3)
    for i in range(0, 20, 4):
        await commit(relay, database, *(f"m{j}" for j in range(i, i + 4)))
    await relay.drain()
    assert broker.acked == [f"m{j}".encode() for j in range(20)]
    assert relay.published == 20
    assert await rows_left(database, table) == 0
    assert not relay.sending


async def test_rows_sent_are_deleted_by_the_next_transaction(db: tuple[Database, Table]) -> None:
    database, table = db
    broker = FakeBroker()
    relay = OutboxRelay(database, table, broker)
    await commit(relay, database, "a", "b")
    while relay.sending:
        await asyncio.sleep(0.01)
    assert await rows_left(database, table) == 2  # acknowledged, not deleted yet
    await commit(relay, database, "c")
    assert await rows_left(database, table) == 1  # the next stage deleted a and b
    await relay.drain()
    assert await rows_left(database, table) == 0
    assert broker.acked == [b"a", b"b", b"c"]


async def test_a_rolled_back_transaction_sends_nothing_and_deletes_nothing(
    db: tuple[Database, Table],
) -> None:
    database, table = db
    broker = FakeBroker()
    relay = OutboxRelay(database, table, broker)
    await commit(relay, database, "a")
    while relay.sending:
        await asyncio.sleep(0.01)

    async def stage_and_fail() -> None:
        async with database.transaction() as session:
            await relay.stage(session, records("lost"))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await stage_and_fail()
    assert await rows_left(database, table) == 1  # a is still there: its delete rolled back
    await commit(relay, database, "b")
    await relay.drain()
    assert broker.acked == [b"a", b"b"]
    assert await rows_left(database, table) == 0


async def test_rows_an_earlier_process_left_go_out_first(db: tuple[Database, Table]) -> None:
    database, table = db
    async with database.transaction() as session:  # committed, then the process died
        await enqueue(session, table, records("old1", "old2"))
    broker = FakeBroker()
    relay = OutboxRelay(database, table, broker)
    await commit(relay, database, "new1")
    await commit(relay, database, "new2")
    await relay.drain()
    assert broker.acked == [b"old1", b"old2", b"new1", b"new2"]
    assert await rows_left(database, table) == 0


async def test_rows_an_earlier_process_left_go_out_first_after_a_failed_send_too(
    db: tuple[Database, Table],
) -> None:
    database, table = db
    async with database.transaction() as session:  # committed, then the process died
        await enqueue(session, table, records("old1", "old2"))
    broker = FakeBroker()
    broker.away = True
    relay = OutboxRelay(database, table, broker)
    await commit(relay, database, "new1")
    with pytest.raises(BrokerUnavailableError):
        await relay.drain()
    broker.away = False
    await relay.drain()
    assert broker.acked == [b"old1", b"old2", b"new1"]
    assert await rows_left(database, table) == 0


async def test_kafka_away_loses_nothing_and_holds_the_caller_back(db: tuple[Database, Table]) -> None:
    database, table = db
    broker = FakeBroker()
    broker.away = True
    relay = OutboxRelay(database, table, broker, batch=2, max_pending=4)
    await commit(relay, database, "a", "b")  # returns at once: the sender fails on its own
    await commit(relay, database, "c", "d")
    with pytest.raises(BrokerUnavailableError):
        await commit(relay, database, "e")  # too much waiting: the caller waits, and hears why
    with pytest.raises(BrokerUnavailableError):
        await relay.drain()
    assert broker.acked == []
    assert await rows_left(database, table) == 5
    broker.away = False
    await relay.drain()
    assert broker.acked == [b"a", b"b", b"c", b"d", b"e"]
    assert await rows_left(database, table) == 0


async def test_the_caller_does_not_wait_for_acks(db: tuple[Database, Table]) -> None:
    database, table = db
    broker = FakeBroker()
    broker.delay_s = 0.5
    relay = OutboxRelay(database, table, broker)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await commit(relay, database, "a")
    await commit(relay, database, "b")
    assert loop.time() - started < 0.5
    assert relay.sending
    await relay.drain()
    assert broker.acked == [b"a", b"b"]


async def test_flush_sends_what_enqueue_wrote(db: tuple[Database, Table]) -> None:
    database, table = db
    broker = FakeBroker()
    relay = OutboxRelay(database, table, broker, batch=2)
    async with database.transaction() as session:
        ids = await enqueue(session, table, records("x", "y", "z"))
    assert len(set(ids)) == 3
    assert await relay.flush() == 3
    assert broker.acked == [b"x", b"y", b"z"]
    assert await relay.pending() == 0


async def test_flush_reads_the_table_again_only_after_a_full_read(db: tuple[Database, Table]) -> None:
    """A read that came back short emptied the table: asking again, after every batch of the
    messenger's, was a query that could only find rows committed meanwhile (the next flush's)."""
    database, table = db
    broker = FakeBroker()
    relay = OutboxRelay(database, table, broker, batch=3)
    reads: list[str] = []

    def count_reads(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            reads.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", count_reads)
    async with database.transaction() as session:
        await enqueue(session, table, records("a", "b"))
    assert await relay.flush() == 2
    assert len(reads) == 1
    reads.clear()
    async with database.transaction() as session:
        await enqueue(session, table, records(*"cdefgh"))  # two full reads, then one that finds none
    assert await relay.flush() == 6
    assert len(reads) == 3
    assert broker.acked == [v.encode() for v in "abcdefgh"]
    assert await relay.pending() == 0


async def test_another_relays_flush_leaves_staged_rows_to_their_relay_until_the_lease_ends(
    db: tuple[Database, Table],
) -> None:
    """Two processes on one database (the messenger's consumer and its sender): a flush of one
    that read the rows the other was still sending sent them twice."""
    database, table = db
    slow = FakeBroker()
    slow.delay_s = 0.3
    staging = OutboxRelay(database, table, slow)
    other_broker = FakeBroker()
    other = OutboxRelay(database, table, other_broker)
    assert await other.flush() == 0  # its first look, which takes leased rows too (see below)
    await commit(staging, database, "first")  # past its start-up's look at the table
    await staging.drain()
    async with database.transaction() as session:
        await enqueue(session, table, records("anyone's"))  # e.g. the API's: no relay of its own
    await commit(staging, database, "staged")
    assert staging.sending
    assert await other.flush() == 1  # the enqueued row, not the one still on its way
    assert other_broker.acked == [b"anyone's"]
    await staging.drain()
    assert slow.acked == [b"first", b"staged"]
    assert await rows_left(database, table) == 0

    # A relay that dies after its commit: its rows wait out the lease, then any flush takes them.
    dying = OutboxRelay(database, table, FakeBroker(), lease=timedelta(seconds=0.5))
    async with database.transaction() as session:
        await dying.stage(session, records("orphan"))
    assert await other.flush() == 0
    await asyncio.sleep(0.6)
    assert await other.flush() == 1
    assert other_broker.acked == [b"anyone's", b"orphan"]


async def test_a_restarted_relay_sends_the_rows_its_predecessor_leased_before_its_own(
    db: tuple[Database, Table],
) -> None:
    database, table = db
    predecessor = OutboxRelay(database, table, FakeBroker())
    async with database.transaction() as session:
        await predecessor.stage(session, records("old"))  # committed, leased, then a SIGKILL
    broker = FakeBroker()
    relay = OutboxRelay(database, table, broker)
    await commit(relay, database, "new")
    await relay.drain()
    assert broker.acked == [b"old", b"new"]  # the restart's first send takes it first
    assert await rows_left(database, table) == 0

    # The same when the restarted process flushes before it stages anything (the messenger's
    # consumer ticks before its first batch).
    async with database.transaction() as session:
        await predecessor.stage(session, records("old2"))
    restarted_broker = FakeBroker()
    restarted = OutboxRelay(database, table, restarted_broker)
    assert await restarted.flush() == 1
    assert restarted_broker.acked == [b"old2"]
    async with database.transaction() as session:
        await predecessor.stage(session, records("old3"))
    assert await restarted.flush() == 0  # after its first look, a lease holds
