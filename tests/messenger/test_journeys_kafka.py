"""Every default journey end to end through the real broker: customer updates produced onto
retain.segments, the real messenger consumer loop (its tick fires due waits) on a clock the test
moves, a separate sender service on the same database (as the sender process), and then the
rendered message in the sandbox outbox in Hebrew, Arabic and English, the outcome events on
retain.messages, or the reason nothing was sent.

One broker topic set, one database and one consumer serve the whole module; every test uses
customers of its own and sets the clock to its own Tuesday noon first (time moving backwards
between tests is harmless: no two tests share a customer)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS
from services.messenger.consumer import build_loop as messenger_loop
from services.messenger.decision import in_holdout
from services.messenger.links import survey_token
from services.messenger.providers.outbox import OutboxProvider
from services.messenger.service import MessengerService
from services.messenger.tables import journey_waits
from shared.codec import encode, encode_key
from shared.db import Database, migrate
from shared.events import (
    MESSAGE_EVENT_ADAPTER,
    CancellationReason,
    Channel,
    CustomerUpdate,
    MessageEvent,
    MessageStatus,
    SupportAction,
    UpdateCause,
)
from shared.kafka.consumer import ConsumerLoop
from shared.kafka.producer import OutboundRecord, Producer
from shared.topics import MESSAGES, SEGMENTS, all_topic_names, ensure_topics
from tests.messenger.test_journeys import (
    DAY,
    DISCOUNT_WORDS,
    FIRST_NAME,
    GOLD_PERKS,
    JOURNEYS,
    LANGS,
    NO_PERSONAL_CONTACT,
    OFFER,
    PERSONAL_CONTACT,
    SILVER_ONLY_PERK,
    TIER_NAME,
    Mail,
    assert_in_language,
    cancellation,
    churned,
    mail_of,
    purchase,
    ticket,
    treated,
    update,
)
from tests.messenger.test_service import NOON, Clock, World, messages
from tests.support.infra import KafkaHandle
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration

PUBLIC_URL = "https://retain.example"


@dataclass
class Pipeline:
    """The messenger as deployed: a consumer process and a sender process on one database."""

    bootstrap: str
    prefix: str
    producer: Producer
    loop: ConsumerLoop[CustomerUpdate]
    consumer: MessengerService
    world: World  # the sender's service, the clock, the sandbox outbox, the database
    produced: int = 0
    ours: set[str] = field(default_factory=set)

    @property
    def clock(self) -> Clock:
        return self.world.clock

    async def feed(self, updates: Sequence[CustomerUpdate], timeout_s: float = 60) -> None:
        """Produce onto retain.segments and wait until the consumer has applied and committed them."""
        await self.producer.send_all(
            [OutboundRecord(self.prefix + SEGMENTS, encode_key(u.customer_id), encode(u)) for u in updates]
        )
        self.produced += len(updates)
        async with asyncio.timeout(timeout_s):
            while self.loop.stats.records < self.produced:
                await asyncio.sleep(0.05)

    async def advance(self, to: datetime, timeout_s: float = 30) -> None:
        """Move the clock; wait until the consumer's tick has settled every wait due by then."""
        self.clock.now = to
        async with asyncio.timeout(timeout_s):
            while await self._due_waiting(to):
                await asyncio.sleep(0.05)

    async def _due_waiting(self, now: datetime) -> int:
        async with self.world.db.sessions() as session:
            rows = (
                await session.execute(
                    select(journey_waits.c.id).where(
                        journey_waits.c.status == "waiting", journey_waits.c.due_at <= now
                    )
                )
            ).all()
        return len(rows)

    async def send(self) -> None:
        """One pass of the sender process."""
        await self.world.service.send_due()

    async def rows(self, customer: str) -> list[dict[str, Any]]:
        return await messages(self.world, customer)

    async def only(self, customer: str, journey: str, status: str = "sent") -> dict[str, Any]:
        [row] = [r for r in await self.rows(customer) if r["journey"] == journey]
        assert row["status"] == status, row
        return row

    def mail(self, row: dict[str, Any]) -> Mail:
        return mail_of(self.world, row["id"])

    async def published(self, customers: set[str]) -> list[MessageEvent]:
        """The outcome events on the real retain.messages topic, for ``customers``."""
        records = await read_all(self.bootstrap, [self.prefix + MESSAGES])
        events = [MESSAGE_EVENT_ADAPTER.validate_json(r.value) for r in records]
        return [e for e in events if e.customer_id in customers]


@pytest.fixture(scope="module")
async def pipeline(kafka: KafkaHandle, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pipeline]:
    unique = uuid.uuid4().hex[:10]
    prefix = f"j{unique}.retain."
    await ensure_topics(kafka.bootstrap, all_topic_names(prefix), partitions=3)
    tmp = tmp_path_factory.mktemp("journeys-kafka")
    url = f"sqlite+aiosqlite:///{tmp / 'messenger.db'}"
    settings = MessengerSettings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=prefix,
        messenger_database_url=url,
        messenger_group_id=f"msg-{unique}",
        messenger_outbox_dir=str(tmp / "outbox"),
        messenger_public_url=PUBLIC_URL,
        # The person named in an escalated complaint's acknowledgement (none by default).
        messenger_escalation_contact_name="Dana",
        messenger_escalation_contact_phone="+972 3 555 0100",
        var_dir=tmp,
    )
    db = Database(url)
    await migrate(db, MIGRATIONS)
    clock = Clock(NOON)
    producer = Producer(kafka.bootstrap, client_id=f"journeys-{unique}")
    consumer = MessengerService(db, settings, producer, clock=clock)
    await consumer.ensure_defaults()
    outbox = Path(settings.outbox_dir)
    sender = MessengerService(
        db, settings, producer, dict.fromkeys(Channel, OutboxProvider(outbox)), clock=clock
    )
    loop = messenger_loop(settings, consumer, producer)
    task = asyncio.create_task(loop.run())
    try:
        yield Pipeline(kafka.bootstrap, prefix, producer, loop, consumer, World(sender, clock, outbox, db))
    finally:
        loop.stop()
        await task
        await producer.stop()
        await db.dispose()


def customers(prefix: str, *journeys: str) -> dict[str, str]:
    """A customer per language, outside the holdout of ``journeys``."""
    return {lang: treated(f"k-{prefix}-{lang}", *journeys) for lang in LANGS}


# --- welcome, thank_you, tier_upgrade, at_risk: at once ---------------------------------------------


async def test_welcome_through_kafka(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    who = customers("welcome", "welcome")
    await pipeline.feed([update(c, lang, NOON, tier_old=None) for lang, c in who.items()])
    await pipeline.send()
    for lang, c in who.items():
        mail = pipeline.mail(await pipeline.only(c, "welcome"))
        assert mail.to == f"{c}@example.com"
        assert FIRST_NAME[lang] in mail.subject
        assert_in_language(mail, lang, "welcome")


async def test_thank_you_through_kafka_names_the_order(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    who = customers("thanks", "thank_you")
    bought = {lang: purchase(NOON - timedelta(minutes=5)) for lang in LANGS}
    await pipeline.feed([update(c, lang, NOON, bought[lang]) for lang, c in who.items()])
    await pipeline.send()
    for lang, c in who.items():
        mail = pipeline.mail(await pipeline.only(c, "thank_you"))
        assert_in_language(mail, lang, "thank_you")
        assert str(bought[lang].order_id) in mail.text


async def test_tier_upgrade_through_kafka_lists_the_new_tiers_perks(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    who = customers("tier", "tier_upgrade")
    await pipeline.feed(
        [
            update(c, lang, NOON, tier_old="silver", tier="gold", cause=UpdateCause.RULES)
            for lang, c in who.items()
        ]
    )
    await pipeline.send()
    for lang, c in who.items():
        mail = pipeline.mail(await pipeline.only(c, "tier_upgrade"))
        assert_in_language(mail, lang, "tier_upgrade")
        assert TIER_NAME[lang] in mail.subject
        for perk in GOLD_PERKS[lang]:
            assert perk in mail.text
            assert perk in mail.html
        assert SILVER_ONLY_PERK[lang] not in mail.text


async def test_at_risk_through_kafka_is_a_check_in_without_a_discount(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    who = customers("risk", "at_risk")
    await pipeline.feed(
        [
            update(
                c,
                lang,
                NOON,
                entered=("at_risk",),
                cause=UpdateCause.TIME,
                lifecycle_stage="at_risk",
                segments=["at_risk"],
                predicted_clv=Decimal("5000"),
            )
            for lang, c in who.items()
        ]
    )
    await pipeline.send()
    for lang, c in who.items():
        row = await pipeline.only(c, "at_risk")
        assert "offer" not in row["details"]
        mail = pipeline.mail(row)
        assert_in_language(mail, lang, "at_risk")
        body = mail.text.split("\n--\n")[0].lower()  # the message, not the unsubscribe footer
        for word in DISCOUNT_WORDS[lang]:
            assert word not in body, (word, body)


# --- complaint_ack -----------------------------------------------------------------------------------


async def test_complaint_ack_through_kafka_escalates_for_the_valuable(pipeline: Pipeline) -> None:
    # 23:30 in Jerusalem: quiet hours for marketing, but an acknowledgement goes at once.
    night = NOON.replace(hour=21, minute=30)
    pipeline.clock.now = night
    regular = {lang: f"k-complaint-{lang}-silver" for lang in LANGS}
    # Escalated: the top tier, or the high_value segment in a lower one.
    valuable: dict[str, tuple[str, dict[str, Any]]] = {
        f"k-complaint-{lang}-{kind}": (lang, values)
        for lang in LANGS
        for kind, values in (
            ("platinum", {"tier": "platinum", "predicted_clv": Decimal("12000")}),
            ("high-value", {"tier": "gold", "segments": ["high_value"], "predicted_clv": Decimal("3000")}),
        )
    }
    opened = {
        c: ticket(night, SupportAction.OPENED, ticket_id=f"T-{c}") for c in [*regular.values(), *valuable]
    }
    complaining: dict[str, Any] = {"open_tickets": 1, "last_complaint_resolved": False, "consents": {}}
    updates = [update(c, lang, night, opened[c], **complaining) for lang, c in regular.items()] + [
        update(c, lang, night, opened[c], **complaining, **values) for c, (lang, values) in valuable.items()
    ]
    await pipeline.feed(updates)
    await pipeline.send()

    for lang in LANGS:
        plain = pipeline.mail(await pipeline.only(regular[lang], "complaint_ack"))
        assert_in_language(plain, lang, "complaint_ack")
        assert f"T-{regular[lang]}" in plain.text
        assert NO_PERSONAL_CONTACT[lang] in plain.text
        assert PERSONAL_CONTACT[lang] not in plain.text
    for c, (lang, _) in valuable.items():
        personal = pipeline.mail(await pipeline.only(c, "complaint_ack"))
        assert_in_language(personal, lang, "complaint_ack")
        assert f"T-{c}" in personal.text
        assert PERSONAL_CONTACT[lang] in personal.text

    everyone = {*regular.values(), *valuable}
    events = await pipeline.published(everyone)
    escalations = {e.customer_id: e for e in events if e.status is MessageStatus.ESCALATION}
    assert set(escalations) == set(valuable)
    for c, e in escalations.items():
        _, values = valuable[c]
        assert e.journey == "complaint_ack"
        assert e.details["ticket_id"] == f"T-{c}"
        assert e.details["tier"] == values["tier"]
        assert e.details["predicted_clv"] == str(values["predicted_clv"])
    assert {e.customer_id for e in events if e.status is MessageStatus.SENT} == everyone


# --- feedback_survey: a day later -------------------------------------------------------------------


async def test_feedback_survey_through_kafka_a_day_after_the_resolution(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    who = customers("survey", "feedback_survey")
    await pipeline.feed(
        [
            update(c, lang, NOON, ticket(NOON, SupportAction.RESOLVED, ticket_id=f"T-{c}"))
            for lang, c in who.items()
        ]
    )
    await pipeline.send()
    for c in who.values():
        assert await pipeline.rows(c) == []  # not yet: a day after the resolution

    await pipeline.advance(NOON + DAY - timedelta(minutes=1))
    for c in who.values():
        assert await pipeline.rows(c) == []
    await pipeline.advance(NOON + DAY)
    await pipeline.send()
    for lang, c in who.items():
        row = await pipeline.only(c, "feedback_survey")
        mail = pipeline.mail(row)
        assert_in_language(mail, lang, "feedback_survey")
        assert f"{PUBLIC_URL}/s/{survey_token(row['id'])}" in mail.text


async def test_feedback_survey_through_kafka_not_twice_in_30_days(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    [c] = [treated("k-survey-twice", "feedback_survey")]
    await pipeline.feed([update(c, "ar", NOON, ticket(NOON, SupportAction.RESOLVED, ticket_id="T-1"))])
    await pipeline.advance(NOON + DAY)
    await pipeline.send()
    await pipeline.only(c, "feedback_survey")
    again = NOON + 10 * DAY
    pipeline.clock.now = again
    await pipeline.feed([update(c, "ar", again, ticket(again, SupportAction.RESOLVED, ticket_id="T-2"))])
    await pipeline.advance(again + 2 * DAY)
    await pipeline.send()
    assert [r["journey"] for r in await pipeline.rows(c)] == ["feedback_survey"]


# --- win_back: cool-off, offer, blocked by a complaint --------------------------------------------


async def test_win_back_through_kafka_after_the_price_cool_off(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    valuable = customers("winback-clv", "win_back")
    modest = customers("winback-low", "win_back")

    def cancelled(c: str, lang: str, clv: str) -> CustomerUpdate:
        return update(
            c,
            lang,
            NOON,
            cancellation(NOON, CancellationReason.PRICE),
            **churned(churned_at=NOON, predicted_clv=Decimal(clv)),
        )

    await pipeline.feed(
        [cancelled(c, lang, "1500") for lang, c in valuable.items()]
        + [cancelled(c, lang, "300") for lang, c in modest.items()]
    )
    await pipeline.advance(NOON + 14 * DAY - timedelta(minutes=1))
    await pipeline.send()
    for c in [*valuable.values(), *modest.values()]:
        assert await pipeline.rows(c) == []  # still cooling off

    await pipeline.advance(NOON + 14 * DAY)
    await pipeline.send()
    for lang in LANGS:
        row = await pipeline.only(valuable[lang], "win_back")
        mail = pipeline.mail(row)
        assert_in_language(mail, lang, "win_back")
        assert OFFER[lang] in mail.text
        assert "BACK-" + row["id"].replace("-", "")[:8].upper() in mail.text
        plain = pipeline.mail(await pipeline.only(modest[lang], "win_back"))
        assert_in_language(plain, lang, "win_back")
        assert OFFER[lang] not in plain.text
        assert "BACK-" not in plain.text


async def test_win_back_through_kafka_is_blocked_by_an_open_complaint(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    # One cancels with a complaint still open: never starts. One complains during the cool-off:
    # the waiting win-back ends, with the reason.
    at_cancel = treated("k-winback-open", "win_back")
    in_cool_off = treated("k-winback-later", "win_back")
    await pipeline.feed(
        [
            update(
                at_cancel,
                "he",
                NOON,
                cancellation(NOON, CancellationReason.SERVICE),
                **churned(
                    churn_reason=CancellationReason.SERVICE, open_tickets=1, last_complaint_resolved=False
                ),
            ),
            update(
                in_cool_off,
                "ar",
                NOON,
                cancellation(NOON, CancellationReason.PRICE),
                **churned(predicted_clv=Decimal("1500")),
            ),
        ]
    )
    complaint_at = NOON + 3 * DAY
    pipeline.clock.now = complaint_at
    await pipeline.feed(
        [
            update(
                in_cool_off,
                "ar",
                complaint_at,
                ticket(complaint_at, SupportAction.OPENED),
                open_tickets=1,
                last_complaint_resolved=False,
                consents={},  # nothing but the transactional acknowledgement can go
                **churned(predicted_clv=Decimal("1500")),
            )
        ]
    )
    await pipeline.send()
    await pipeline.advance(NOON + 60 * DAY)
    await pipeline.send()

    assert await waits_of(pipeline, at_cancel) == []
    assert await waits_of(pipeline, in_cool_off) == [("cancelled", "exit condition met")]
    assert await pipeline.rows(at_cancel) == []
    assert [r["journey"] for r in await pipeline.rows(in_cool_off)] == ["complaint_ack"]


async def waits_of(pipeline: Pipeline, customer: str) -> list[tuple[str, str | None]]:
    async with pipeline.world.db.sessions() as session:
        rows = (
            await session.execute(
                select(journey_waits.c.status, journey_waits.c.reason).where(
                    journey_waits.c.customer_id == customer
                )
            )
        ).all()
    return [(r.status, r.reason) for r in rows]


# --- holdout ------------------------------------------------------------------------------------


async def test_holdout_through_kafka_is_recorded_and_sent_nothing(pipeline: Pipeline) -> None:
    pipeline.clock.now = NOON
    share = JOURNEYS["welcome"].holdout_percent
    held = next(c for c in (f"k-held-{i}" for i in range(10_000)) if in_holdout(c, "welcome", share))
    await pipeline.feed([update(held, "he", NOON, tier_old=None)])
    await pipeline.send()
    row = await pipeline.only(held, "welcome", status="holdout")
    assert row["channel"] is None
    assert not [p for p in pipeline.world.outbox.iterdir() if row["id"] in p.name]
    [event] = await pipeline.published({held})
    assert event.status is MessageStatus.HOLDOUT
    assert event.holdout is True
    assert event.journey == "welcome"
