"""All of the messenger's SQL. Callers own the transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.messenger.tables import (
    consent_facts,
    customers,
    journey_entries,
    journey_waits,
    messages,
    settings_table,
)
from shared.db import insert_ignoring_conflicts

# Statuses that count against frequency caps: decided to go, going, or gone.
COUNTED = ("queued", "sending", "sent", "delivered", "undelivered")
DUE = ("queued", "held_quiet_hours")


def _upsert(session: AsyncSession, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


class MessengerRepository:
    # --- customers ------------------------------------------------------------------------------

    async def lock_customer(self, session: AsyncSession, customer_id: str) -> Any:
        """The customer's row, locked until the transaction ends (PostgreSQL; SQLite's write
        lock already serialises writers). Every decision that counts caps takes it first, so
        two deciders for one customer never both see room under a cap."""
        stmt = select(customers).where(customers.c.customer_id == customer_id)
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return (await session.execute(stmt)).first()

    async def upsert_customer(
        self,
        session: AsyncSession,
        customer_id: str,
        profile: dict[str, Any],
        profile_at: datetime,
        now: datetime,
    ) -> None:
        ins = _upsert(session, customers).values(
            customer_id=customer_id, profile=profile, profile_at=profile_at, updated_at=now
        )
        # Updates of one customer arrive in order (one partition), but a replay must not move
        # the snapshot back: keep the newer one.
        stmt = ins.on_conflict_do_update(
            index_elements=[customers.c.customer_id],
            set_={"profile": ins.excluded.profile, "profile_at": ins.excluded.profile_at, "updated_at": now},
            where=customers.c.profile_at <= ins.excluded.profile_at,
        )
        await session.execute(stmt)

    async def set_whatsapp_inbound(self, session: AsyncSession, customer_id: str, at: datetime) -> None:
        await session.execute(
            update(customers)
            .where(
                customers.c.customer_id == customer_id,
                or_(customers.c.whatsapp_inbound_at.is_(None), customers.c.whatsapp_inbound_at < at),
            )
            .values(whatsapp_inbound_at=at)
        )

    async def customer_by_address(self, session: AsyncSession, channel: str, address: str) -> str | None:
        """Find a customer by phone/WhatsApp number or email (inbound messages, bounces)."""
        field = {"sms": "phone", "whatsapp": "whatsapp", "email": "email"}[channel]
        column = customers.c.profile[field]
        value = column.as_string()
        stmt = select(customers.c.customer_id).where(value == address).limit(1)
        return (await session.execute(stmt)).scalar()

    # --- consent facts ------------------------------------------------------------------------------

    async def consent_facts(self, session: AsyncSession, customer_id: str) -> list[Any]:
        stmt = (
            select(consent_facts)
            .where(consent_facts.c.customer_id == customer_id)
            .order_by(consent_facts.c.at)
        )
        return list((await session.execute(stmt)).all())

    async def add_consent_fact(
        self,
        session: AsyncSession,
        customer_id: str,
        channel: str,
        at: datetime,
        opt_in: bool,
        source: str,
        marketing_only: bool,
    ) -> None:
        await session.execute(
            consent_facts.insert().values(
                customer_id=customer_id,
                channel=channel,
                at=at,
                opt_in=opt_in,
                source=source,
                marketing_only=marketing_only,
            )
        )

    # --- the ledger ----------------------------------------------------------------------------

    async def message_by_key(self, session: AsyncSession, key: str) -> Any:
        return (await session.execute(select(messages).where(messages.c.idempotency_key == key))).first()

    async def message(self, session: AsyncSession, message_id: str, *, for_update: bool = False) -> Any:
        stmt = select(messages).where(messages.c.id == message_id)
        if for_update and session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return (await session.execute(stmt)).first()

    async def message_by_provider_id(self, session: AsyncSession, provider_id: str) -> Any:
        stmt = select(messages).where(messages.c.provider_message_id == provider_id)
        return (await session.execute(stmt)).first()

    async def insert_message(self, session: AsyncSession, values: dict[str, Any]) -> str:
        message_id = values.get("id") or str(uuid.uuid4())
        await session.execute(
            messages.insert().values(id=message_id, **{k: v for k, v in values.items() if k != "id"})
        )
        return message_id

    async def update_message(self, session: AsyncSession, message_id: str, **values: Any) -> None:
        await session.execute(update(messages).where(messages.c.id == message_id).values(**values))

    async def history(self, session: AsyncSession, customer_id: str, since: datetime) -> list[Any]:
        """What counts against caps: messages decided to go since ``since``."""
        stmt = select(
            messages.c.id,
            messages.c.channel,
            messages.c.journey,
            messages.c.kind,
            messages.c.created_at,
            messages.c.sent_at,
            messages.c.send_at,
        ).where(
            messages.c.customer_id == customer_id,
            messages.c.status.in_(COUNTED),
            func.coalesce(messages.c.sent_at, messages.c.send_at, messages.c.created_at) >= since,
        )
        return list((await session.execute(stmt)).all())

    async def due_messages(self, session: AsyncSession, now: datetime, limit: int) -> list[Any]:
        stmt = (
            select(messages.c.id, messages.c.customer_id)
            .where(messages.c.status.in_(DUE), or_(messages.c.send_at.is_(None), messages.c.send_at <= now))
            .order_by(messages.c.send_at)
            .limit(limit)
        )
        return list((await session.execute(stmt)).all())

    async def stuck_sending(self, session: AsyncSession, before: datetime, limit: int) -> list[Any]:
        stmt = (
            select(messages)
            .where(messages.c.status == "sending", messages.c.updated_at < before)
            .order_by(messages.c.updated_at)
            .limit(limit)
        )
        return list((await session.execute(stmt)).all())

    async def last_message_to(self, session: AsyncSession, customer_id: str, channel: str) -> Any:
        stmt = (
            select(messages)
            .where(
                messages.c.customer_id == customer_id,
                messages.c.channel == channel,
                messages.c.status.in_(("sent", "delivered")),
            )
            .order_by(messages.c.sent_at.desc())
            .limit(1)
        )
        return (await session.execute(stmt)).first()

    async def list_messages(
        self,
        session: AsyncSession,
        *,
        customer_id: str | None,
        journey: str | None,
        status: str | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Any]:
        stmt = select(messages).order_by(messages.c.created_at.desc(), messages.c.id.desc()).limit(limit)
        if customer_id is not None:
            stmt = stmt.where(messages.c.customer_id == customer_id)
        if journey is not None:
            stmt = stmt.where(messages.c.journey == journey)
        if status is not None:
            stmt = stmt.where(messages.c.status == status)
        if before is not None:
            at, mid = before
            stmt = stmt.where(
                or_(messages.c.created_at < at, and_(messages.c.created_at == at, messages.c.id < mid))
            )
        return list((await session.execute(stmt)).all())

    async def count_by(self, session: AsyncSession, journey: str) -> dict[str, int]:
        stmt = (
            select(messages.c.status, func.count())
            .where(messages.c.journey == journey)
            .group_by(messages.c.status)
        )
        return {s: int(n) for s, n in (await session.execute(stmt)).all()}

    async def count_by_status(self, session: AsyncSession) -> dict[str, int]:
        stmt = select(messages.c.status, func.count()).group_by(messages.c.status)
        return {s: int(n) for s, n in (await session.execute(stmt)).all()}

    async def oldest_held(self, session: AsyncSession) -> tuple[datetime | None, datetime | None]:
        """(earliest created_at, earliest send_at) of the messages held for quiet hours; min()
        keeps the column's type, so both come back timezone-aware."""
        stmt = select(func.min(messages.c.created_at), func.min(messages.c.send_at)).where(
            messages.c.status == "held_quiet_hours"
        )
        row = (await session.execute(stmt)).one()
        return row[0], row[1]

    # --- journeys ------------------------------------------------------------------------------

    async def last_entry(self, session: AsyncSession, customer_id: str, journey: str) -> Any:
        stmt = select(journey_entries).where(
            journey_entries.c.customer_id == customer_id, journey_entries.c.journey == journey
        )
        return (await session.execute(stmt)).first()

    async def entries(self, session: AsyncSession, customer_id: str) -> dict[str, datetime]:
        stmt = select(journey_entries.c.journey, journey_entries.c.entered_at).where(
            journey_entries.c.customer_id == customer_id
        )
        return {r.journey: r.entered_at for r in await session.execute(stmt)}

    async def record_entry(self, session: AsyncSession, customer_id: str, journey: str, at: datetime) -> None:
        ins = _upsert(session, journey_entries).values(
            customer_id=customer_id, journey=journey, entered_at=at, count=1
        )
        await session.execute(
            ins.on_conflict_do_update(
                index_elements=[journey_entries.c.customer_id, journey_entries.c.journey],
                set_={"entered_at": at, "count": journey_entries.c.count + 1},
            )
        )

    async def add_wait(self, session: AsyncSession, values: dict[str, Any]) -> str:
        wait_id = str(uuid.uuid4())
        await session.execute(journey_waits.insert().values(id=wait_id, **values))
        return wait_id

    async def waiting(self, session: AsyncSession, customer_id: str) -> list[Any]:
        stmt = select(journey_waits).where(
            journey_waits.c.customer_id == customer_id, journey_waits.c.status == "waiting"
        )
        return list((await session.execute(stmt)).all())

    async def due_waits(self, session: AsyncSession, now: datetime, limit: int) -> list[Any]:
        stmt = (
            select(journey_waits)
            .where(journey_waits.c.status == "waiting", journey_waits.c.due_at <= now)
            .order_by(journey_waits.c.due_at)
            .limit(limit)
        )
        return list((await session.execute(stmt)).all())

    async def close_wait(self, session: AsyncSession, wait_id: str, status: str, reason: str | None) -> None:
        await session.execute(
            update(journey_waits).where(journey_waits.c.id == wait_id).values(status=status, reason=reason)
        )

    async def count_waiting(self, session: AsyncSession, journey: str) -> int:
        stmt = select(func.count()).where(
            journey_waits.c.journey == journey, journey_waits.c.status == "waiting"
        )
        return int(await session.scalar(stmt) or 0)

    async def count_entries(self, session: AsyncSession, journey: str) -> int:
        stmt = select(func.coalesce(func.sum(journey_entries.c.count), 0)).where(
            journey_entries.c.journey == journey
        )
        return int(await session.scalar(stmt) or 0)

    # --- settings (caps, journeys, templates) -------------------------------------------------------

    async def setting(self, session: AsyncSession, name: str, *, for_update: bool = False) -> Any:
        """A setting; ``for_update`` locks it (PostgreSQL) so read-modify-write edits queue
        instead of overwriting each other (SQLite's write lock already serialises them)."""
        stmt = select(settings_table).where(settings_table.c.name == name)
        if for_update and session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return (await session.execute(stmt)).first()

    async def put_setting(
        self, session: AsyncSession, name: str, value: Any, actor: str, now: datetime
    ) -> None:
        ins = _upsert(session, settings_table).values(
            name=name, value=value, updated_at=now, updated_by=actor
        )
        await session.execute(
            ins.on_conflict_do_update(
                index_elements=[settings_table.c.name],
                set_={"value": ins.excluded.value, "updated_at": now, "updated_by": actor},
            )
        )

    async def insert_setting_if_absent(
        self, session: AsyncSession, name: str, value: Any, now: datetime
    ) -> None:
        await session.execute(
            insert_ignoring_conflicts(session, settings_table).values(
                name=name, value=value, updated_at=now, updated_by="system"
            )
        )


def rows_to_dicts(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in rows]
