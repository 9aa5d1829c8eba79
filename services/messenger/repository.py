"""All of the messenger's SQL. Callers own the transaction."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Select, Table, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.messenger.tables import (
    consent_facts,
    customers,
    inbound_messages,
    journey_entries,
    journey_waits,
    messages,
    replies,
    settings_table,
    survey_answers,
    webhook_receipts,
)
from shared.db import dialect_insert, in_chunks, in_list, insert_ignoring_conflicts
from shared.events import ADDRESS_FIELD, Channel


def lookup_form(channel: Channel, address: str | None) -> str | None:
    """An address as the customers' table keeps it for finding a customer by it: an email
    lower-cased, whatever case SendGrid or the CRM writes it in (the profile keeps its own)."""
    return address.lower() if address and channel is Channel.EMAIL else address


# Statuses that count against frequency caps: decided to go, going, or gone.
COUNTED = ("queued", "sending", "sent", "delivered", "undelivered")
DUE = ("queued", "held_quiet_hours")


def _upsert(session: AsyncSession, table: Any) -> Any:
    return dialect_insert(session.get_bind().dialect.name, table)


def _newest_first(
    stmt: Select[Any],
    table: Table,
    filters: Mapping[str, str | None],
    before: tuple[datetime, str] | None,
    limit: int,
) -> Select[Any]:
    """A page of ``table`` newest first (created_at, then id), with the given columns' equality
    filters (None: any) and after the keyset cursor ``before``, the last row of the page before."""
    c = table.c
    stmt = stmt.order_by(c.created_at.desc(), c.id.desc()).limit(limit)
    for name, value in filters.items():
        if value is not None:
            stmt = stmt.where(c[name] == value)
    if before is not None:
        at, row_id = before
        stmt = stmt.where(or_(c.created_at < at, and_(c.created_at == at, c.id < row_id)))
    return stmt


# An answer with its customer's latest profile (None when the messenger has none any more).
_ANSWERED = select(survey_answers, customers.c.profile.label("customer_profile")).select_from(
    survey_answers.outerjoin(customers, customers.c.customer_id == survey_answers.c.customer_id)
)

# A reply with its customer's latest profile, as an answer has it.
_REPLIED = select(replies, customers.c.profile.label("customer_profile")).select_from(
    replies.outerjoin(customers, customers.c.customer_id == replies.c.customer_id)
)


def _taken_up_between(
    stmt: Select[Any], table: Table, since: datetime | None, until: datetime | None, followed_up: bool | None
) -> Select[Any]:
    """What support follows up (survey answers, replies): come in within [since, until), and
    taken up or not (``followed_up``), each when given."""
    c = table.c
    if since is not None:
        stmt = stmt.where(c.created_at >= since)
    if until is not None:
        stmt = stmt.where(c.created_at < until)
    if followed_up is not None:
        stmt = stmt.where(c.followed_up_at.is_not(None) if followed_up else c.followed_up_at.is_(None))
    return stmt


async def _waiting(session: AsyncSession, table: Table, *where: Any) -> tuple[int, datetime | None]:
    """(how many, the earliest created_at) of ``table``'s rows nobody has followed up yet."""
    c = table.c
    stmt = select(func.count(), func.min(c.created_at)).where(c.followed_up_at.is_(None), *where)
    row = (await session.execute(stmt)).one()
    return row[0], row[1]


# The reads of a consumer batch, built once per dialect with the ids as one parameter
# (``in_list``) instead of per call: building a SELECT and its cache key took longer than
# SQLite took to run it (163 against 77 µs a statement), and every batch runs a dozen of them.
@dataclass(frozen=True, slots=True)
class _Reads:
    customers: Any
    customers_locked: Any  # PostgreSQL's row locks
    consent_facts: Any
    messages_by_keys: Any
    histories: Any
    entries: Any
    waits: Any
    claimable: Any  # the sender's claim
    claimable_locked: Any


@functools.cache
def _reads(dialect: str) -> _Reads:
    def ids_of(column: Any) -> Any:
        return in_list(dialect, column)

    customers_in = select(customers).where(ids_of(customers.c.customer_id)).order_by(customers.c.customer_id)
    claimable = (
        select(messages, customers.c.profile.label("customer_profile"), customers.c.whatsapp_inbound_at)
        .join(customers, customers.c.customer_id == messages.c.customer_id)
        .where(ids_of(messages.c.id), messages.c.status.in_(DUE))
        .order_by(messages.c.customer_id, messages.c.id)
    )
    return _Reads(
        customers=customers_in,
        customers_locked=customers_in.with_for_update(),
        consent_facts=select(consent_facts)
        .where(ids_of(consent_facts.c.customer_id))
        .order_by(consent_facts.c.customer_id, consent_facts.c.at),
        messages_by_keys=select(messages).where(ids_of(messages.c.idempotency_key)),
        # The customers' rows alone, status filtered here: with the status in the WHERE
        # clause SQLite chose the status index (ix_messages_due, ix_journey_waits_due) over
        # the customer's, and read every queued message or waiting wait of everyone for each
        # batch (EXPLAIN QUERY PLAN), a cost that grew with the table.
        histories=select(
            messages.c.id,
            messages.c.customer_id,
            messages.c.channel,
            messages.c.journey,
            messages.c.kind,
            messages.c.created_at,
            messages.c.sent_at,
            messages.c.send_at,
            messages.c.status,
            messages.c.updated_at,
        ).where(
            ids_of(messages.c.customer_id),
            or_(
                func.coalesce(messages.c.sent_at, messages.c.send_at, messages.c.created_at)
                >= bindparam("since"),
                # One being sent counts at its claim (service._went_at), which an outage may
                # have put days after its send time.
                and_(messages.c.status == "sending", messages.c.updated_at >= bindparam("since")),
            ),
        ),
        entries=select(
            journey_entries.c.customer_id, journey_entries.c.journey, journey_entries.c.entered_at
        ).where(ids_of(journey_entries.c.customer_id)),
        waits=select(journey_waits).where(ids_of(journey_waits.c.customer_id)),
        claimable=claimable,
        claimable_locked=claimable.with_for_update(),
    )


def _reads_of(session: AsyncSession) -> _Reads:
    return _reads(session.get_bind().dialect.name)


_SETTING = select(settings_table).where(settings_table.c.name == bindparam("name"))
_INSERT_MESSAGES = messages.insert()
_INSERT_WAITS = journey_waits.insert()
# And the sender's poll: two ranges of ix_messages_due (see ``due_messages``).
_DUE_COLUMNS = (messages.c.id, messages.c.customer_id, messages.c.channel)
_DUE_UNSCHEDULED = (
    select(*_DUE_COLUMNS)
    .where(messages.c.status.in_(DUE), messages.c.send_at.is_(None))
    .limit(bindparam("limit"))
)
_DUE_TIMED = (
    select(*_DUE_COLUMNS)
    .where(messages.c.status.in_(DUE), messages.c.send_at <= bindparam("now"))
    .order_by(messages.c.send_at)
    .limit(bindparam("limit"))
)


def _row_locks(session: AsyncSession) -> bool:
    """Whether a read that decides a write must lock its rows: on PostgreSQL; SQLite's write
    lock, taken at BEGIN, already serialises the writers."""
    return session.get_bind().dialect.name == "postgresql"


# Upserts built once per dialect: ``excluded`` makes a new column collection on every access.


@functools.cache
def _upsert_customers(dialect: str) -> Any:
    ins = dialect_insert(dialect, customers)
    # Updates of one customer arrive in order (one partition), but a replay must not move
    # the snapshot back: keep the newer one.
    return ins.on_conflict_do_update(
        index_elements=[customers.c.customer_id],
        set_={
            "profile": ins.excluded.profile,
            "profile_at": ins.excluded.profile_at,
            "updated_at": ins.excluded.updated_at,
            "email": ins.excluded.email,
            "phone": ins.excluded.phone,
            "whatsapp": ins.excluded.whatsapp,
        },
        where=customers.c.profile_at <= ins.excluded.profile_at,
    )


@functools.cache
def _record_entries(dialect: str) -> Any:
    ins = dialect_insert(dialect, journey_entries)
    return ins.on_conflict_do_update(
        index_elements=[journey_entries.c.customer_id, journey_entries.c.journey],
        set_={
            "entered_at": ins.excluded.entered_at,
            "count": journey_entries.c.count + ins.excluded.count,
        },
    )


class MessengerRepository:
    # --- customers ------------------------------------------------------------------------------

    async def lock_customer(self, session: AsyncSession, customer_id: str) -> Any:
        """The customer's row, locked until the transaction ends (PostgreSQL; SQLite's write
        lock already serialises writers). Every decision that counts caps takes it first, so
        two deciders for one customer never both see room under a cap."""
        stmt = select(customers).where(customers.c.customer_id == customer_id)
        if _row_locks(session):
            stmt = stmt.with_for_update()
        return (await session.execute(stmt)).first()

    async def upsert_customers(self, session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
        """The customers' latest snapshots, in one statement (customer_id, profile, profile_at,
        updated_at, and the profile's email, phone and whatsapp per row; one row per
        customer). Rows go in customer order, so two writers take the row locks in the same
        order and never deadlock."""
        if not rows:
            return
        stmt = _upsert_customers(session.get_bind().dialect.name)
        await session.execute(stmt, sorted(rows, key=lambda r: str(r["customer_id"])))

    async def lock_customers(self, session: AsyncSession, customer_ids: Collection[str]) -> dict[str, Any]:
        """``lock_customer`` for many customers: their rows by id, locked in id order (as
        ``upsert_customers`` locks them)."""
        found: dict[str, Any] = {}
        reads = _reads_of(session)
        stmt = reads.customers_locked if _row_locks(session) else reads.customers
        for ids in in_chunks(customer_ids):
            found.update((r.customer_id, r) for r in await session.execute(stmt, {"ids": ids}))
        return found

    async def set_whatsapp_inbound(self, session: AsyncSession, customer_id: str, at: datetime) -> None:
        await session.execute(
            update(customers)
            .where(
                customers.c.customer_id == customer_id,
                or_(customers.c.whatsapp_inbound_at.is_(None), customers.c.whatsapp_inbound_at < at),
            )
            .values(whatsapp_inbound_at=at)
        )

    async def claim_receipt(
        self, session: AsyncSession, digest: str, now: datetime, forget_before: datetime
    ) -> bool:
        """Record a signed delivery; False if it was recorded before (a replay). Receipts older
        than ``forget_before`` can no longer be replayed (their timestamp is refused): dropped."""
        return await _claim_once(session, webhook_receipts.c.digest, digest, now, forget_before)

    async def claim_inbound(
        self, session: AsyncSession, sid: str, now: datetime, forget_before: datetime
    ) -> bool:
        """Record an inbound message as applied; False if it was before (a retry or a replay).
        Sids received before ``forget_before`` are dropped (see INBOUND_KEPT)."""
        return await _claim_once(session, inbound_messages.c.sid, sid, now, forget_before)

    async def customer_by_address(self, session: AsyncSession, channel: str, address: str) -> str | None:
        """Find a customer by phone/WhatsApp number or email (inbound messages, bounces); an
        email whatever its case (the column keeps it lower-cased)."""
        column = customers.c[ADDRESS_FIELD[Channel(channel)]]
        stmt = (
            select(customers.c.customer_id).where(column == lookup_form(Channel(channel), address)).limit(1)
        )
        return (await session.execute(stmt)).scalar()

    # --- consent facts ------------------------------------------------------------------------------

    async def consent_facts(self, session: AsyncSession, customer_id: str) -> list[Any]:
        stmt = (
            select(consent_facts)
            .where(consent_facts.c.customer_id == customer_id)
            .order_by(consent_facts.c.at)
        )
        return list((await session.execute(stmt)).all())

    async def consent_facts_of(self, session: AsyncSession, customer_ids: Collection[str]) -> list[Any]:
        """The consent facts of many customers, each customer's in time order."""
        found: list[Any] = []
        for ids in in_chunks(customer_ids):
            found += (await session.execute(_reads_of(session).consent_facts, {"ids": ids})).all()
        return found

    async def add_consent_fact(
        self,
        session: AsyncSession,
        customer_id: str,
        channel: str,
        at: datetime,
        opt_in: bool,
        source: str,
        marketing_only: bool,
        address: str | None = None,
    ) -> None:
        await session.execute(
            consent_facts.insert().values(
                customer_id=customer_id,
                channel=channel,
                at=at,
                opt_in=opt_in,
                source=source,
                marketing_only=marketing_only,
                address=address,
            )
        )

    # --- the ledger ----------------------------------------------------------------------------

    async def messages_by_keys(self, session: AsyncSession, keys: Collection[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for chunk in in_chunks(keys):
            found.update(
                (r.idempotency_key, r)
                for r in await session.execute(_reads_of(session).messages_by_keys, {"ids": chunk})
            )
        return found

    async def claimable(self, session: AsyncSession, message_ids: Collection[str]) -> list[Any]:
        """Those of the messages still due (queued or held), with their customer's profile
        (``customer_profile``) and ``whatsapp_inbound_at``; on PostgreSQL both rows are locked
        until the transaction ends, customers in id order as the consumer locks them (SQLite's
        write lock serialises senders). Another sender that got here first has moved them on."""
        found: list[Any] = []
        reads = _reads_of(session)
        stmt = reads.claimable_locked if _row_locks(session) else reads.claimable
        for ids in in_chunks(message_ids):
            found += (await session.execute(stmt, {"ids": ids})).all()
        return found

    async def message(self, session: AsyncSession, message_id: str, *, for_update: bool = False) -> Any:
        stmt = select(messages).where(messages.c.id == message_id)
        if for_update and _row_locks(session):
            stmt = stmt.with_for_update()
        return (await session.execute(stmt)).first()

    async def message_by_provider_id(self, session: AsyncSession, provider_id: str) -> Any:
        """The message of a provider's id, locked (PostgreSQL): two callbacks at once (delivered,
        read) must not both pass the check that a status moves forwards."""
        stmt = select(messages).where(messages.c.provider_message_id == provider_id)
        if _row_locks(session):
            stmt = stmt.with_for_update()
        return (await session.execute(stmt)).first()

    async def statuses(
        self, session: AsyncSession, message_ids: Collection[str]
    ) -> dict[str, tuple[str, int]]:
        """The messages' (status, attempts) as stored now, their rows locked (PostgreSQL)."""
        found: dict[str, tuple[str, int]] = {}
        for ids in in_chunks(message_ids):
            stmt = (
                select(messages.c.id, messages.c.status, messages.c.attempts)
                .where(messages.c.id.in_(ids))
                .order_by(messages.c.id)
            )
            if _row_locks(session):
                stmt = stmt.with_for_update()
            found.update((r.id, (r.status, r.attempts)) for r in await session.execute(stmt))
        return found

    async def insert_messages(self, session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
        """Ledger rows with their ids, in one executemany (every row has the same keys)."""
        if rows:
            await session.execute(_INSERT_MESSAGES, list(rows))

    async def add_survey_answer(self, session: AsyncSession, **values: Any) -> None:
        await session.execute(survey_answers.insert().values(**values))

    async def list_survey_answers(
        self,
        session: AsyncSession,
        *,
        customer_id: str | None,
        journey: str | None,
        max_score: int | None,
        since: datetime | None,
        until: datetime | None,
        followed_up: bool | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Any]:
        """Survey answers newest first (at most ``max_score``, answered in [since, until), taken
        up or not by support (``followed_up``), when given), each with the customer's latest
        profile (``customer_profile``; None if unknown)."""
        filters = {"customer_id": customer_id, "journey": journey}
        stmt = _newest_first(_ANSWERED, survey_answers, filters, before, limit)
        if max_score is not None:
            stmt = stmt.where(survey_answers.c.score <= max_score)
        stmt = _taken_up_between(stmt, survey_answers, since, until, followed_up)
        return list((await session.execute(stmt)).all())

    async def add_reply(self, session: AsyncSession, row: Mapping[str, Any]) -> bool:
        """False if a reply of that id is kept already."""
        stmt = insert_ignoring_conflicts(session, replies).values(**row).returning(replies.c.id)
        return (await session.execute(stmt)).first() is not None

    async def list_replies(
        self,
        session: AsyncSession,
        *,
        customer_id: str | None,
        channel: str | None,
        since: datetime | None,
        until: datetime | None,
        followed_up: bool | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Any]:
        """Replies newest first (came in within [since, until), taken up or not by support
        (``followed_up``), when given), each with the customer's latest profile
        (``customer_profile``; None if unknown)."""
        stmt = _newest_first(
            _REPLIED, replies, {"customer_id": customer_id, "channel": channel}, before, limit
        )
        stmt = _taken_up_between(stmt, replies, since, until, followed_up)
        return list((await session.execute(stmt)).all())

    async def reply(self, session: AsyncSession, reply_id: str, *, for_update: bool = False) -> Any:
        """The reply as ``list_replies`` gives it, or None; ``for_update``: locked (PostgreSQL)."""
        stmt = _REPLIED.where(replies.c.id == reply_id)
        if for_update and _row_locks(session):
            stmt = stmt.with_for_update(of=replies)
        return (await session.execute(stmt)).first()

    async def update_reply(self, session: AsyncSession, reply_id: str, **values: Any) -> None:
        await session.execute(update(replies).where(replies.c.id == reply_id).values(**values))

    async def survey_answer(self, session: AsyncSession, message_id: str, *, for_update: bool = False) -> Any:
        """The answer to the survey of ``message_id`` as ``list_survey_answers`` gives it, or None;
        ``for_update``: its row locked on PostgreSQL until the transaction ends."""
        stmt = _ANSWERED.where(survey_answers.c.id == message_id)
        if for_update and _row_locks(session):
            stmt = stmt.with_for_update(of=survey_answers)
        return (await session.execute(stmt)).first()

    async def update_survey_answer(self, session: AsyncSession, message_id: str, **values: Any) -> None:
        stmt = update(survey_answers).where(survey_answers.c.id == message_id)
        await session.execute(stmt.values(**values))

    async def update_message(self, session: AsyncSession, message_id: str, **values: Any) -> None:
        await session.execute(update(messages).where(messages.c.id == message_id).values(**values))

    async def pending_messages(self, session: AsyncSession, customer_id: str, channel: str) -> list[Any]:
        """The customer's messages on ``channel`` not handed to a provider yet (queued or held)."""
        m = messages.c
        mine = (m.customer_id == customer_id, m.channel == channel, m.status.in_(DUE))
        stmt = select(m.id, m.details).where(*mine)
        return list((await session.execute(stmt)).all())

    async def update_messages(self, session: AsyncSession, changes: Sequence[Mapping[str, Any]]) -> None:
        """Many ``update_message``: each change is the row's ``id`` and the values to set; one
        executemany per set of columns changed."""
        await _update_by_id(session, messages, changes)

    async def histories(
        self, session: AsyncSession, customer_ids: Collection[str], since: datetime
    ) -> list[Any]:
        """``history`` of many customers (with customer_id)."""
        found: list[Any] = []
        for ids in in_chunks(customer_ids):
            rows = await session.execute(_reads_of(session).histories, {"ids": ids, "since": since})
            found += [r for r in rows if r.status in COUNTED]
        return found

    async def due_messages(self, session: AsyncSession, now: datetime, limit: int) -> list[Any]:
        """Up to ``limit`` messages to send now: those without a send time, then the earliest
        whose time has come. Two reads, each a range of ix_messages_due: with the two in one
        OR, SQLite read every queued and held message and sorted them on each poll (4.7 ms
        with 50,000 held for quiet hours, growing with them)."""
        found = list(await session.execute(_DUE_UNSCHEDULED, {"limit": limit}))
        if len(found) < limit:
            found += await session.execute(_DUE_TIMED, {"now": now, "limit": limit - len(found)})
        return found

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
        filters = {"customer_id": customer_id, "journey": journey, "status": status}
        return list(
            (await session.execute(_newest_first(select(messages), messages, filters, before, limit))).all()
        )

    async def list_waits(
        self,
        session: AsyncSession,
        *,
        customer_id: str | None,
        journey: str | None,
        status: str | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Any]:
        """Journey waits, newest first; ``data`` (the trigger's snapshot) stays inside."""
        w = journey_waits.c
        shown = select(
            w.id, w.customer_id, w.journey, w.status, w.due_at, w.reason, w.trigger_event_id, w.created_at
        )
        filters = {"customer_id": customer_id, "journey": journey, "status": status}
        return list(
            (await session.execute(_newest_first(shown, journey_waits, filters, before, limit))).all()
        )

    async def count_by(self, session: AsyncSession, journey: str) -> dict[str, int]:
        stmt = (
            select(messages.c.status, func.count())
            .where(messages.c.journey == journey)
            .group_by(messages.c.status)
        )
        return {s: int(n) for s, n in (await session.execute(stmt)).all()}

    async def held(self, session: AsyncSession) -> tuple[int, datetime | None, datetime | None]:
        """(how many, earliest created_at, earliest send_at) of the messages held for quiet
        hours: their range of ix_messages_due, however many were ever sent (a count by status
        of the whole table, every sender pass, grew with it). min() keeps the column's type, so
        both times come back timezone-aware."""
        stmt = select(func.count(), func.min(messages.c.created_at), func.min(messages.c.send_at)).where(
            messages.c.status == "held_quiet_hours"
        )
        row = (await session.execute(stmt)).one()
        return int(row[0]), row[1], row[2]

    async def unhappy_waiting(self, session: AsyncSession, max_score: int) -> tuple[int, datetime | None]:
        """(how many, the earliest answered_at) of the survey answers of at most ``max_score``
        that nobody has followed up yet."""
        return await _waiting(session, survey_answers, survey_answers.c.score <= max_score)

    async def replies_waiting(self, session: AsyncSession) -> tuple[int, datetime | None]:
        """(how many, the earliest created_at) of the replies nobody has followed up yet."""
        return await _waiting(session, replies)

    # --- journeys ------------------------------------------------------------------------------

    async def last_entry(self, session: AsyncSession, customer_id: str, journey: str) -> Any:
        stmt = select(journey_entries).where(
            journey_entries.c.customer_id == customer_id, journey_entries.c.journey == journey
        )
        return (await session.execute(stmt)).first()

    async def entries_of(
        self, session: AsyncSession, customer_ids: Collection[str]
    ) -> dict[str, dict[str, datetime]]:
        """``entries`` of many customers: customer → journey → last entered."""
        found: dict[str, dict[str, datetime]] = defaultdict(dict)
        for ids in in_chunks(customer_ids):
            for r in await session.execute(_reads_of(session).entries, {"ids": ids}):
                found[r.customer_id][r.journey] = r.entered_at
        return found

    async def record_entries(self, session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
        """Many ``record_entry``: (customer_id, journey, entered_at, count) per row, ``count``
        the entries this batch adds to the pair (one row per pair)."""
        if not rows:
            return
        await session.execute(_record_entries(session.get_bind().dialect.name), list(rows))

    async def add_waits(self, session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
        """Waits with their ids, in one executemany (every row has the same keys)."""
        if rows:
            await session.execute(_INSERT_WAITS, list(rows))

    async def waiting_of(self, session: AsyncSession, customer_ids: Collection[str]) -> list[Any]:
        found: list[Any] = []
        for ids in in_chunks(customer_ids):
            found += [
                r
                for r in await session.execute(_reads_of(session).waits, {"ids": ids})
                if r.status == "waiting"
            ]
        return found

    async def update_waits(self, session: AsyncSession, changes: Sequence[Mapping[str, Any]]) -> None:
        """Waits closed (status, reason) or moved (due_at): the id and the columns per change."""
        await _update_by_id(session, journey_waits, changes)

    async def due_waits(self, session: AsyncSession, now: datetime, limit: int) -> list[Any]:
        stmt = (
            select(journey_waits)
            .where(journey_waits.c.status == "waiting", journey_waits.c.due_at <= now)
            .order_by(journey_waits.c.due_at)
            .limit(limit)
        )
        return list((await session.execute(stmt)).all())

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
        stmt = _SETTING
        if for_update and _row_locks(session):
            stmt = stmt.with_for_update()
        return (await session.execute(stmt, {"name": name})).first()

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


async def _update_by_id(session: AsyncSession, table: Any, changes: Sequence[Mapping[str, Any]]) -> None:
    """UPDATE … WHERE id = :id for every change (its ``id`` and the columns to set), one
    executemany per set of columns."""
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for change in changes:
        columns = tuple(sorted(k for k in change if k != "id"))
        by_columns[columns].append({"b_id": change["id"], **{f"b_{k}": change[k] for k in columns}})
    for columns, params in by_columns.items():
        await session.execute(_update_by_id_statement(table, columns), params)


@functools.cache
def _update_by_id_statement(table: Any, columns: tuple[str, ...]) -> Any:
    # One per table and set of columns (a handful: each settle and send changes the same ones),
    # built once, as the consumer's statements are.
    values: dict[str, Any] = {k: bindparam(f"b_{k}") for k in columns}
    return update(table).where(table.c.id == bindparam("b_id")).values(values)


def rows_to_dicts(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in rows]


async def _claim_once(
    session: AsyncSession, key: Column[Any], value: str, now: datetime, forget_before: datetime
) -> bool:
    """Insert ``value`` into ``key``'s table (its primary key, beside received_at) unless it is
    there: True when it was not. Rows received before ``forget_before`` are dropped first."""
    table = key.table
    await session.execute(delete(table).where(table.c.received_at < forget_before))
    stmt = (
        insert_ignoring_conflicts(session, table).values({key.name: value, "received_at": now}).returning(key)
    )
    return (await session.execute(stmt)).first() is not None
