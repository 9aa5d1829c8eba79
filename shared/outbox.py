"""Publish after commit: messages are written to an outbox table in the same transaction as
the state they describe, and relayed to Kafka afterwards.

A crash after the commit and before the relay loses nothing (the rows wait for the next
flush); a crash after sending and before deleting re-sends rows with the same event ids,
which consumers drop as duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import Database, UtcDateTime
from shared.kafka.producer import OutboundRecord, Producer


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("topic", String(255), nullable=False),
        Column("key", LargeBinary, nullable=False),
        Column("value", LargeBinary, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
    )


async def enqueue(session: AsyncSession, table: Table, records: Sequence[OutboundRecord]) -> None:
    if records:
        now = datetime.now(UTC)
        await session.execute(
            insert(table),
            [{"topic": r.topic, "key": r.key, "value": r.value, "created_at": now} for r in records],
        )


class OutboxRelay:
    def __init__(self, db: Database, table: Table, producer: Producer, batch: int = 1000) -> None:
        self._db = db
        self._table = table
        self._producer = producer
        self._batch = batch
        self.published = 0

    async def flush(self) -> int:
        """Send everything waiting, oldest first (so per-customer order holds); return count."""
        sent = 0
        t = self._table
        while True:
            async with self._db.sessions() as session:
                rows = (
                    await session.execute(
                        select(t.c.id, t.c.topic, t.c.key, t.c.value).order_by(t.c.id).limit(self._batch)
                    )
                ).all()
            if not rows:
                return sent
            await self._producer.send_all([OutboundRecord(r.topic, r.key, r.value) for r in rows])
            async with self._db.transaction() as session:
                await session.execute(delete(t).where(t.c.id.in_([r.id for r in rows])))
            sent += len(rows)
            self.published += len(rows)

    async def pending(self) -> int:
        from sqlalchemy import func  # noqa: PLC0415

        async with self._db.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(self._table)) or 0)
