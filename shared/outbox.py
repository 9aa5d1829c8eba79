"""Publish after commit: messages are written to an outbox table in the same transaction as
the state they describe, and relayed to Kafka afterwards.

A crash after the commit and before the relay loses nothing (the rows wait for the next
flush); a crash after sending and before deleting re-sends rows with the same event ids,
which consumers drop as duplicates.

Two ways to relay:

- ``enqueue`` in the transaction, ``flush()`` after it: reads the table and sends what it
  holds, oldest first. Simple, and all a service that writes a few rows now and then needs.
- ``stage`` in the transaction, ``after_commit`` after it: the caller has the records it
  committed, so nothing is read back. A background task sends them, in commit order, while
  the caller goes on with its next transaction; the rows it has sent are deleted in the
  caller's next ``stage`` (no transaction of the relay's own competing for SQLite's one
  writer), or by ``drain()``, which waits until everything handed over is sent and deleted.
  Rows a previous process committed and never sent go out before anything of this one, so
  the order per key holds across a restart.

A staged row is leased to the relay that staged it: its ``visible_at`` lies ``lease`` ahead,
and a flush (of this process or another on the same database: the messenger's sender flushes
after every pass) takes only rows visible by now. Read by a flush while its relay was still
sending it, a row went out twice; now only when the relay took longer than the lease, or
died (then its rows go out once the lease ends, or at once when it starts again).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import Database, RowsWrite, UtcDateTime, in_list, rows_insert
from shared.kafka.producer import OutboundRecord, Producer
from shared.logs import get_logger

log = get_logger(__name__)


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        # 64-bit on PostgreSQL; on SQLite an INTEGER, the rowid's alias (a BIGINT would not be).
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("topic", String(255), nullable=False),
        Column("key", LargeBinary, nullable=False),
        Column("value", LargeBinary, nullable=False),
        # When a flush may take the row: its commit for an enqueued row, the end of the staging
        # relay's lease for a staged one.
        Column("visible_at", UtcDateTime(), nullable=False),
    )


async def enqueue(
    session: AsyncSession, table: Table, records: Sequence[OutboundRecord], visible_at: datetime | None = None
) -> list[int]:
    """Insert ``records`` in the caller's transaction, for a flush to take from ``visible_at``
    (default: now); return the new rows' ids (in no particular order: asking for the records'
    order makes SQLite insert row by row)."""
    if not records:
        return []
    at = visible_at or datetime.now(UTC)
    rows = [{"topic": r.topic, "key": r.key, "value": r.value, "visible_at": at} for r in records]
    result = await _insert(session.get_bind().dialect.name, table).execute(session, rows)
    return [row[0] for row in result]


async def stage_or_enqueue(
    relay: OutboxRelay | None, session: AsyncSession, table: Table, records: Sequence[OutboundRecord]
) -> Staged:
    """``relay.stage`` the records; in a process without a relay (an API with no producer),
    ``enqueue`` them, visible at once, for a consumer's flush to send. Hand the result to the
    relay's ``after_commit``, if there is one, once the transaction has committed."""
    if relay is None:
        return Staged(await enqueue(session, table, records), list(records))
    return await relay.stage(session, records)


@functools.cache
def _insert(dialect: str, table: Table) -> RowsWrite:
    return rows_insert(
        dialect, table, lambda ins: ins.returning(table.c.id), columns=("topic", "key", "value", "visible_at")
    )


@dataclass(frozen=True, slots=True)
class _Statements:
    delete: Any  # the rows of the ids in ``ids``
    oldest: Any  # the oldest ``limit`` rows, leased or not
    oldest_visible: Any  # the oldest ``limit`` rows visible at ``now``
    oldest_below: Any  # the oldest ``limit`` rows with an id below ``below``, leased or not


@functools.cache
def _statements(dialect: str, table: Table) -> _Statements:
    # Built once per table: a consumer stages and deletes after every batch, and building a
    # statement and its cache key cost more than SQLite took to run it.
    t = table.c
    oldest = select(t.id, t.topic, t.key, t.value).order_by(t.id).limit(bindparam("limit"))
    return _Statements(
        delete=delete(table).where(in_list(dialect, t.id)),
        oldest=oldest,
        oldest_visible=oldest.where(t.visible_at <= bindparam("now", type_=UtcDateTime())),
        oldest_below=oldest.where(t.id < bindparam("below")),
    )


@dataclass(frozen=True, slots=True)
class Staged:
    """What ``OutboxRelay.stage`` did in a transaction, for ``after_commit`` once it commits."""

    ids: list[int]  # the rows holding ``records``
    records: list[OutboundRecord]
    deleted: list[int] = field(default_factory=list)  # rows sent earlier, deleted in it


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        table: Table,
        producer: Producer,
        batch: int = 1000,
        max_pending: int = 10_000,
        lease: timedelta = timedelta(seconds=30),
    ) -> None:
        self._db = db
        self._table = table
        self._producer = producer
        self._batch = batch  # rows per read of the table (flush); what is in memory goes in one call
        # Records handed over and not yet acknowledged: past this, after_commit waits (Kafka
        # slower than the caller, or away) instead of holding an ever longer queue in memory.
        self._max_pending = max_pending
        # Longer than a send takes, Kafka's retries included (the producer gives up on a
        # record after its ack timeout); what a relay that died left waits this long for
        # another process, or less for its own restart.
        self._lease = lease
        self._pending: deque[Staged] = deque()  # one entry per committed transaction
        self._pending_records = 0
        self._sent: set[int] = set()  # rows whose records Kafka acknowledged, not yet deleted
        self._sender: asyncio.Task[None] | None = None
        self._leftovers_sent = False
        self.published = 0

    # --- from memory, in the background ---------------------------------------------------

    async def stage(self, session: AsyncSession, records: Sequence[OutboundRecord]) -> Staged:
        """In the caller's transaction: write ``records`` to the outbox, and delete the rows
        sent since the last call. Hand the result to ``after_commit`` once it has committed."""
        deleted = list(self._sent)
        if deleted:
            await session.execute(_statements(self._db.dialect, self._table).delete, {"ids": deleted})
        ids = await enqueue(session, self._table, records, datetime.now(UTC) + self._lease)
        return Staged(ids, list(records), deleted)

    async def after_commit(self, staged: Staged) -> None:
        """Relay what a committed transaction staged. Returns at once unless too much is
        waiting; then it waits, and raises if Kafka is unreachable."""
        self._sent.difference_update(staged.deleted)
        if staged.records:
            self._pending.append(staged)
            self._pending_records += len(staged.records)
            self._start_sender()
        if self._pending_records > self._max_pending:
            await self.drain()

    @property
    def sending(self) -> bool:
        """Whether records handed over are still on their way."""
        return bool(self._pending)

    async def drain(self) -> None:
        """Wait until every record handed over is acknowledged, and delete its row. Raises
        what stopped the sender (the records stay queued; the next call tries again)."""
        while self._pending:
            self._start_sender()
            sender = self._sender
            assert sender is not None  # noqa: S101 - just started
            try:
                await asyncio.shield(sender)
            finally:
                if sender.done():
                    self._sender = None
        if self._sent:
            ids = list(self._sent)
            async with self._db.transaction() as session:
                await session.execute(_statements(self._db.dialect, self._table).delete, {"ids": ids})
            self._sent.difference_update(ids)

    async def delete_sent(self) -> None:
        """For a caller between batches when none comes: delete the rows sent, in a transaction
        of its own, unless records are still on their way (the next ``stage`` deletes them
        then, or this at the caller's next call). Raises as ``drain``."""
        if not self.sending:
            await self.drain()

    def _start_sender(self) -> None:
        if self._sender is not None and self._sender.done():
            if not self._sender.cancelled() and self._sender.exception() is not None:
                log.warning(
                    "outbox relay failed; retrying",
                    error=type(self._sender.exception()).__name__,
                    waiting=self._pending_records,
                )
            self._sender = None
        if self._sender is None and self._pending:
            self._sender = asyncio.get_running_loop().create_task(self._send_pending())

    async def _send_pending(self) -> None:
        if not self._leftovers_sent and self._pending:
            # What an earlier process committed and never sent is older than anything here;
            # marked sent only once it is, so that a failed send tries them first again.
            statements = _statements(self._db.dialect, self._table)
            await self._send_table(statements.oldest_below, {"below": min(self._pending[0].ids)})
            self._leftovers_sent = True
        while self._pending:
            # Everything handed over so far, in one call: the records are in memory already,
            # and each call waits a round trip for its acks. This task only runs when the
            # caller's loop lets it (not at all during a SQLite transaction, which runs inline),
            # so in chunks it fell behind a consumer and made it wait (a tenth of the
            # segmenter's time in make bench). Whole transactions only, so a row is deleted
            # only once every record of its transaction is acknowledged.
            taken = list(self._pending)
            records = [r for staged in taken for r in staged.records]
            await self._producer.send_all(records)
            for staged in taken:
                self._pending.popleft()
                self._pending_records -= len(staged.records)
                self._sent.update(staged.ids)
            self.published += len(records)

    # --- from the table -------------------------------------------------------------------------

    async def flush(self) -> int:
        """Send everything handed over, then what the table holds for anyone to send (see
        ``send_waiting``); return how many rows of the table went out."""
        await self.drain()
        return await self.send_waiting()

    async def send_waiting(self) -> int:
        """Send the rows of the table a flush may take, oldest first (so per-customer order
        holds): enqueued ones, and staged ones whose lease ran out. Not what this relay has in
        hand: that goes out from memory. Return how many went out.

        The first look of a relay that has sent nothing yet takes every row, leased or not:
        what a relay that died before this process started left goes out at once, and before
        anything of this one (as in ``_send_pending``), not once its lease ends. A relay of
        another process still sending some of them sends those twice, with the same ids."""
        statements = _statements(self._db.dialect, self._table)
        if not self._leftovers_sent and self._sender is None and not self._pending:
            self._leftovers_sent = True
            return await self._send_table(statements.oldest, {})
        return await self._send_table(statements.oldest_visible, {"now": datetime.now(UTC)})

    async def _send_table(self, query: Any, params: dict[str, Any]) -> int:
        sent = 0
        statements = _statements(self._db.dialect, self._table)
        params = {**params, "limit": self._batch}
        while True:
            async with self._db.sessions() as session:
                rows = (await session.execute(query, params)).all()
            if not rows:
                return sent
            await self._producer.send_all([OutboundRecord(r.topic, r.key, r.value) for r in rows])
            async with self._db.transaction() as session:
                await session.execute(statements.delete, {"ids": [r.id for r in rows]})
            sent += len(rows)
            self.published += len(rows)
            if len(rows) < self._batch:
                # A short read took every row there was to take: only rows committed (or
                # whose lease ended) since could be found, and the next flush sends those.
                # Reading again to find that out was a second query after every batch.
                return sent

    async def pending(self) -> int:
        async with self._db.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(self._table)) or 0)
