"""The kpi consumer through the real broker, on SQLite and PostgreSQL: a shuffled, duplicated
demo stream with message outcomes gives the KPIs the pure functions give on the raw events
(the oracle); predictions reach retain.clv; the CDNOW reference is reproduced through the
service path (events in through Kafka, parameters out of the API); a poison record goes to
its DLQ."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.kpi import churn as churn_kpi
from services.kpi import conversion as conversion_kpi
from services.kpi import response_time as response_kpi
from services.kpi.app import create_app
from services.kpi.clv import BgNbdParams
from services.kpi.config import KpiSettings
from services.kpi.consumer import MIGRATIONS, build_loop
from services.kpi.periods import Granularity, buckets, period
from services.kpi.service import KpiQuery, KpiService
from shared.auth import create_key
from shared.codec import decode_with, encode, encode_key
from shared.db import Database, migrate
from shared.demo.generator import generate
from shared.events import (
    CLV_ADAPTER,
    EVENT_ADAPTER,
    TOPIC_OF_TYPE,
    CancellationEvent,
    Event,
    MessageEvent,
    PurchaseEvent,
    SupportEvent,
)
from shared.kafka.producer import OutboundRecord, Producer
from tests.kpi.factories import message, purchase
from tests.support.infra import KafkaHandle
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
HISTORY_START = NOW - timedelta(days=300)
CDNOW = Path(__file__).parent / "data" / "CDNOW_sample.txt"

Record = Event | MessageEvent


def demo_events(customers: int, seed: int = 11) -> list[Event]:
    return [EVENT_ADAPTER.validate_python(e) for e in generate(seed, customers, HISTORY_START, 300)]


def outreach(events: list[Event], seed: int = 5) -> list[MessageEvent]:
    """Message outcomes as the messenger would report them, for a third of the purchases."""
    rng = random.Random(seed)
    out: list[MessageEvent] = []
    for n, e in enumerate(e for e in events if isinstance(e, PurchaseEvent)):
        if rng.random() > 0.33:
            continue
        sent = e.occurred_at - timedelta(hours=rng.uniform(1, 200))
        mid = f"m{n}"
        journey = rng.choice(["thank_you", "win_back"])
        tier = rng.choice(["gold", "silver", None])
        if rng.random() < 0.15:
            out.append(
                message(mid, e.customer_id, "holdout", sent, journey=journey, channel=None, holdout=True)
            )
            continue
        channel = rng.choice(["sms", "email", "whatsapp"])
        out.append(message(mid, e.customer_id, "sent", sent, journey=journey, channel=channel, tier=tier))
        outcome = rng.choice(["delivered", "delivered", "failed"])
        out.append(
            message(
                mid, e.customer_id, outcome, sent + timedelta(seconds=30), journey=journey, channel=channel
            )
        )
        if outcome == "delivered" and rng.random() < 0.3:
            out.append(
                message(mid, e.customer_id, "replied", sent + timedelta(hours=1), journey=journey, seq=1)
            )
    return out


def topic_of(prefix: str, e: Record) -> str:
    return prefix + ("messages" if isinstance(e, MessageEvent) else TOPIC_OF_TYPE[e.type])


async def produce(kafka: KafkaHandle, prefix: str, events: list[Record]) -> None:
    producer = Producer(kafka.bootstrap, client_id="test-producer")
    records = [OutboundRecord(topic_of(prefix, e), encode_key(e.customer_id), encode(e)) for e in events]
    for i in range(0, len(records), 2000):
        await producer.send_all(records[i : i + 2000])
    await producer.stop()


def settings_for(
    kafka: KafkaHandle, prefix: str, url: str, group: str, tmp_path: Path, **kw: Any
) -> KpiSettings:
    return KpiSettings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=prefix,
        kpi_database_url=url,
        kpi_group_id=group,
        var_dir=tmp_path,
        **{"kpi_batch_size": 200, **kw},
    )


async def consume(settings: KpiSettings, service: KpiService, producer: Producer, records: int) -> Any:
    loop = build_loop(settings, service, producer)
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(120):
            while loop.stats.records < records:
                await asyncio.sleep(0.1)
        loop.stop()
        await task
    finally:
        if not task.done():
            task.cancel()
    return loop


# --- the oracle: the pure functions on the raw events ------------------------------------------------


def oracle_tickets(events: list[Record]) -> list[response_kpi.Ticket]:
    steps: dict[str, list[response_kpi.SupportStep]] = defaultdict(list)
    for e in events:
        if isinstance(e, SupportEvent):
            steps[e.ticket_id].append(response_kpi.SupportStep.of(e))
    return [response_kpi.ticket_from_steps(s) for s in steps.values()]


def oracle_purchases(
    events: list[Record], settings: KpiSettings
) -> dict[str, list[tuple[datetime, Decimal | None]]]:
    out: dict[str, list[tuple[datetime, Decimal | None]]] = defaultdict(list)
    for e in events:
        if isinstance(e, PurchaseEvent):
            out[e.customer_id].append((e.occurred_at, settings.fx.convert(e.amount, e.currency)))
    return {c: sorted(v, key=lambda x: x[0]) for c, v in out.items()}


def oracle_histories(events: list[Record]) -> list[churn_kpi.CustomerHistory]:
    bought: dict[str, list[datetime]] = defaultdict(list)
    cancelled: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    for e in events:
        if isinstance(e, PurchaseEvent):
            bought[e.customer_id].append(e.occurred_at)
        elif isinstance(e, CancellationEvent):
            cancelled[e.customer_id].append((e.occurred_at, e.reason.value))
    return [churn_kpi.history(c, bought[c], cancelled[c]) for c in sorted(set(bought) | set(cancelled))]


async def check_against_oracle(service: KpiService, events: list[Record]) -> dict[str, Any] | None:
    """Compare every KPI with the oracle's; return the CLV model non-contractual churn used."""
    s = service.settings
    first, last = date(2025, 9, 1), date(2026, 5, 31)
    q = KpiQuery(first, last, Granularity.MONTH)
    whole = period(first, last, s.tz)

    tickets = [t for t in oracle_tickets(events) if whole.contains(t.opened_at)]
    answer = await service.response_time(q)
    assert answer["total"]["stats"] == response_kpi.summarize(tickets, s.targets, NOW)
    for b, got in zip(buckets(first, last, Granularity.MONTH, s.tz), answer["buckets"], strict=True):
        assert got["stats"] == response_kpi.summarize(
            [t for t in tickets if b.contains(t.opened_at)], s.targets, NOW
        )

    histories = oracle_histories(events)
    months = buckets(first, last, Granularity.MONTH, s.tz)
    answer = await service.churn(q)
    # P(alive) comes from whichever model the consumer's tick has fitted by now (if any): the
    # oracle uses the parameters the answer names.
    model: dict[str, Any] | None = answer["p_alive_model"]
    alive = (
        None
        if model is None
        else churn_kpi.AliveTest(
            BgNbdParams(model["r"], model["alpha"], model["a"], model["b"]),
            s.kpi_churn_p_alive_threshold,
            s.tz,
        )
    )
    expected = churn_kpi.churn(histories, [whole, *months], s.churn_window, NOW, alive)
    assert answer["total"]["contractual"] == expected[0].contractual
    assert [(b["contractual"], b["non_contractual"], b["lapsed"]) for b in answer["buckets"]] == [
        (e.contractual, e.non_contractual, e.lapsed) for e in expected[1:]
    ]
    assert answer["total"]["win_back"] == churn_kpi.win_back(histories, whole, s.win_back_window, NOW)

    facts = [
        conversion_kpi.MessageFact(
            e.event_id,
            e.message_id,
            e.customer_id,
            e.status.value,
            e.occurred_at,
            e.journey,
            None if e.channel is None else e.channel.value,
            e.tier,
            e.locale,
            e.holdout,
        )
        for e in events
        if isinstance(e, MessageEvent)
    ]
    messages = [m for m in conversion_kpi.build_messages(facts) if whole.contains(m.at)]
    expected_conversion = conversion_kpi.summarize(messages, oracle_purchases(events, s), s.conversion_window)
    answer = await service.conversion(q)
    assert answer["total"]["stats"] == expected_conversion
    assert expected_conversion.sent > 50  # the scenario is not empty
    assert expected_conversion.holdout > 5
    return model


async def test_shuffled_duplicated_stream_gives_the_oracles_kpis(
    kafka: KafkaHandle, topic_prefix: str, unique: str, database_url: str, tmp_path: Path
) -> None:
    backend = demo_events(120)
    events: list[Record] = [*backend, *outreach(backend)]
    replay = events + random.Random(3).sample(events, 300)
    random.Random(5).shuffle(replay)
    await produce(kafka, topic_prefix, replay)

    settings = settings_for(
        kafka, topic_prefix, database_url, f"kpi-{unique}", tmp_path, kpi_rollup_interval_s=0.5
    )
    db = Database(database_url, inline_sqlite=True)  # as the worker runs it
    await migrate(db, MIGRATIONS)
    producer = Producer(kafka.bootstrap, client_id="kpi-test")
    service = KpiService(db, settings, producer, clock=lambda: NOW)
    try:
        loop = await consume(settings, service, producer, len(replay))
        assert loop.stats.duplicates == 300
        assert loop.stats.dead_lettered == 0
        await check_against_oracle(service, events)

        # Every customer with a purchase gets a prediction on retain.clv, equal to the stored one.
        await service.refit_and_publish()
        # With the model on all of the purchases, non-contractual churn still matches the oracle.
        assert await check_against_oracle(service, events) is not None
        published = [
            decode_with(CLV_ADAPTER, r.value) for r in await read_all(kafka.bootstrap, [topic_prefix + "clv"])
        ]
        buyers = {e.customer_id for e in events if isinstance(e, PurchaseEvent)}
        assert {p.customer_id for p in published} == buyers
        latest = {p.customer_id: p for p in sorted(published, key=lambda p: p.occurred_at)}
        stored = await service.customer_clv(sorted(buyers)[0])
        assert stored is not None
        assert float(latest[sorted(buyers)[0]].predicted_clv) == pytest.approx(
            stored["predicted_clv"], abs=0.01
        )
    finally:
        await producer.stop()
        await db.dispose()


class FitsWatched(KpiService):
    """Notes how many orders each scheduled refit found stored."""

    fits: list[int]

    async def refit_and_publish(self) -> int:
        async with self.db.sessions() as session:
            self.fits.append(len(await self.repo.purchases(session)))
        return await super().refit_and_publish()


async def test_the_first_clv_fit_waits_for_the_backlog(
    kafka: KafkaHandle, topic_prefix: str, unique: str, database_url: str, tmp_path: Path
) -> None:
    """A consumer started on a backlog (make run's replayed year, a new deployment) fits once it
    has caught up: a fit after its first batch was published and served until the next refit,
    minutes later, from a fraction of the history."""
    events = demo_events(60)
    await produce(kafka, topic_prefix, list(events))
    orders = len({(e.customer_id, e.order_id) for e in events if isinstance(e, PurchaseEvent)})
    settings = settings_for(kafka, topic_prefix, database_url, f"kpi-{unique}", tmp_path, kpi_batch_size=40)
    db = Database(database_url, inline_sqlite=True)
    await migrate(db, MIGRATIONS)
    producer = Producer(kafka.bootstrap, client_id="kpi-test")
    service = FitsWatched(db, settings, producer, clock=lambda: NOW)
    service.fits = []
    try:
        loop = await consume(settings, service, producer, len(events))
        assert loop.stats.batches >= len(events) // 40  # a backlog of many batches
        assert service.fits == [orders]  # one fit, on every order
    finally:
        await producer.stop()
        await db.dispose()


async def test_cdnow_through_the_service_reproduces_the_published_fit(
    kafka: KafkaHandle, topic_prefix: str, unique: str, database_url: str, tmp_path: Path
) -> None:
    events: list[Record] = []
    for n, line in enumerate(CDNOW.read_text().splitlines()):
        _, customer, day, _, amount = line.split()
        when = datetime(int(day[:4]), int(day[4:6]), int(day[6:]), 12, tzinfo=UTC)
        events.append(purchase(f"cdnow-{customer}", when, amount, "USD", order=f"line-{n}"))
    await produce(kafka, topic_prefix, events)

    keys = tmp_path / "keys.json"
    _, key = create_key(keys, ["kpi:read"], "analyst")
    # CDNOW's amounts are dollars: report in dollars, so the parameters are the papers' ones.
    settings = settings_for(
        kafka,
        topic_prefix,
        database_url,
        f"kpi-{unique}",
        tmp_path,
        api_keys_file=keys,
        kpi_reporting_currency="USD",
        kpi_fx_rates={},  # CDNOW's purchases are all in dollars; the default table is in shekels
    )
    db = Database(database_url, inline_sqlite=True)  # as the worker runs it
    await migrate(db, MIGRATIONS)
    producer = Producer(kafka.bootstrap, client_id="kpi-test")
    service = KpiService(db, settings, producer, clock=lambda: datetime(1998, 7, 1, tzinfo=UTC))
    try:
        await consume(settings, service, producer, len(events))
    finally:
        await producer.stop()
        await db.dispose()

    published = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426, "p": 6.25, "q": 3.74, "gamma": 15.44}
    app = create_app(settings)
    app.state.service.clock = lambda: datetime(1998, 7, 1, tzinfo=UTC)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kpi") as http:
        response = await http.get(
            "/v1/clv/model", params={"as_of": "1997-09-30"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        model = response.json()
        for name, value in published.items():
            assert model["params"][name] == pytest.approx(value, rel=0.01), name
        assert model["log_likelihood"]["bgnbd"] == pytest.approx(-9582.4, rel=0.001)
        assert (model["customers"], model["repeat_customers"]) == (2357, 946)
        assert model["time_unit"] == "week"
        assert model["fit_seconds"] < 2

    # In shekels the shapes stay and the scale follows the rate (3.65 ILS per USD).
    shekels = settings.model_copy(
        update={"kpi_reporting_currency": "ILS", "kpi_fx_rates": {"USD": Decimal("3.65")}}
    )
    db = Database(database_url, inline_sqlite=True)  # as the worker runs it
    ils = await KpiService(db, shekels).clv_model(date(1997, 9, 30))
    await db.dispose()
    assert ils["cached"] is False  # another currency is another model
    assert ils["params"]["p"] == pytest.approx(model["params"]["p"], rel=1e-3)
    assert ils["params"]["q"] == pytest.approx(model["params"]["q"], rel=1e-3)
    assert ils["params"]["gamma"] == pytest.approx(model["params"]["gamma"] * 3.65, rel=1e-3)
    assert ils["params"]["r"] == pytest.approx(model["params"]["r"], rel=1e-6)


async def test_poison_message_goes_to_the_dlq_and_the_rest_flows(
    kafka: KafkaHandle, topic_prefix: str, unique: str, tmp_path: Path
) -> None:
    events: list[Record] = list(demo_events(5, seed=3))
    # A purchase a producer put on the support topic: valid, but not where it belongs.
    stray = next(e for e in events if isinstance(e, PurchaseEvent)).model_copy(update={"event_id": "stray"})
    producer = Producer(kafka.bootstrap, client_id="poison")
    await producer.send_all(
        [
            OutboundRecord(topic_prefix + "messages", b"c-x", b'{"type": "message", "status": "sent"}'),
            OutboundRecord(topic_prefix + "support", encode_key(stray.customer_id), encode(stray)),
        ]
    )
    await producer.stop()
    await produce(kafka, topic_prefix, events)
    url = f"sqlite+aiosqlite:///{tmp_path / 'kpi.db'}"
    settings = settings_for(kafka, topic_prefix, url, f"kpi-{unique}", tmp_path)
    db = Database(url, inline_sqlite=True)  # as the worker runs it
    await migrate(db, MIGRATIONS)
    producer = Producer(kafka.bootstrap, client_id="kpi-test")
    service = KpiService(db, settings, producer, clock=lambda: NOW)
    try:
        loop = await consume(settings, service, producer, len(events) + 2)
    finally:
        await producer.stop()
    assert loop.stats.dead_lettered == 2
    [dead] = await read_all(kafka.bootstrap, [topic_prefix + "messages.dlq"])
    assert dead.value == b'{"type": "message", "status": "sent"}'
    # The detail is for whoever produced it: each field and what is wrong, no pydantic internals.
    detail = dict(dead.headers)["x-retain-error-detail"].decode()
    assert detail.startswith("event_id: Field required; ")
    assert "tagged-union" not in detail
    assert "errors.pydantic.dev" not in detail
    [wrong_topic] = await read_all(kafka.bootstrap, [topic_prefix + "support.dlq"])
    assert dict(wrong_topic.headers)["x-retain-error-detail"].decode() == (
        f"a purchase event on {topic_prefix}support: purchase events go on the 'purchases' topic"
    )
    assert loop.stats.applied == len(events)
    await db.dispose()
