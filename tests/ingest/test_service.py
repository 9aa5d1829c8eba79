"""IngestService between requests: resends answered from the window or from a request still
being produced, and an id used for another event refused. The broker is a stand-in whose
acknowledgement the test releases, so that two requests overlap for certain (the real broker
is in test_api.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import orjson
import pytest
from prometheus_client import REGISTRY

from services.ingest.dedupe import RecentIds
from services.ingest.service import ConflictingIdsError, IngestService
from shared.events import EXAMPLES
from shared.kafka.producer import BrokerUnavailableError, Producer


class HeldBroker:
    """Acknowledges a send when the test says so, or refuses it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.release = asyncio.Event()
        self.refuse = False

    async def send_columns(
        self, topics: Sequence[str], keys: Sequence[bytes], values: Sequence[bytes]
    ) -> None:
        await self.release.wait()
        if self.refuse:
            raise BrokerUnavailableError("the broker is down")
        self.sent.extend(values)


def service(broker: HeldBroker) -> IngestService:
    return IngestService(
        cast(Producer, broker), topic_prefix="t.", max_batch=100, recent=RecentIds(ttl_s=3600, max_ids=1000)
    )


def body(**overrides: Any) -> bytes:
    return orjson.dumps({**EXAMPLES["purchase"], "event_id": "order-5", **overrides})


async def test_a_resend_during_the_first_request_is_produced_once() -> None:
    broker = HeldBroker()
    ingest = service(broker)
    first = asyncio.create_task(ingest.produce(ingest.prepare(ingest.validate(body()))))
    await asyncio.sleep(0)  # the first request is now waiting for its acknowledgement
    second = asyncio.create_task(ingest.produce(ingest.prepare(ingest.validate(body()))))
    await asyncio.sleep(0)
    assert not second.done()  # answered only once the broker has the event
    broker.release.set()
    a, b = await first, await second
    assert (a.produced, a.duplicates, b.produced, b.duplicates) == (1, 0, 0, 1)
    assert len(broker.sent) == 1


async def test_another_event_under_an_id_being_produced_is_refused() -> None:
    broker = HeldBroker()
    ingest = service(broker)
    first = asyncio.create_task(ingest.produce(ingest.prepare(ingest.validate(body()))))
    await asyncio.sleep(0)
    with pytest.raises(ConflictingIdsError) as refused:
        ingest.prepare(ingest.validate(body(amount="1.00")))
    [error] = refused.value.errors
    assert error.index == 0
    assert "'order-5' is being accepted in another request right now for a different event" in error.message
    broker.release.set()
    await first
    with pytest.raises(ConflictingIdsError) as later:
        ingest.prepare(ingest.validate(body(amount="1.00")))
    assert "'order-5' was accepted in the last 1 hour for a different event" in later.value.errors[0].message
    assert len(broker.sent) == 1


async def test_an_id_whose_request_failed_is_free_again() -> None:
    # Not acknowledged, the event may or may not be in the log (at least once): ingest does
    # not remember it, and the resend, whatever it carries now, is produced.
    broker = HeldBroker()
    broker.refuse = True
    broker.release.set()
    ingest = service(broker)
    with pytest.raises(BrokerUnavailableError):
        await ingest.produce(ingest.prepare(ingest.validate(body())))
    broker.refuse = False
    accepted = await ingest.produce(ingest.prepare(ingest.validate(body(amount="1.00"))))
    assert (accepted.produced, accepted.duplicates) == (1, 0)
    assert orjson.loads(broker.sent[0])["amount"] == "1.00"


async def test_a_resend_whose_map_came_out_in_another_order_is_the_same_event() -> None:
    # A client serialising a hash map (Go's, say) sends the attributes in another order each time.
    broker = HeldBroker()
    broker.release.set()
    ingest = service(broker)
    first = {**EXAMPLES["profile"], "event_id": "crm-9", "attributes": {"city": "Haifa", "tier_src": "crm"}}
    again = {**first, "attributes": {"tier_src": "crm", "city": "Haifa"}}
    await ingest.produce(ingest.prepare(ingest.validate(orjson.dumps(first))))
    resent = await ingest.produce(ingest.prepare(ingest.validate(orjson.dumps(again))))
    assert (resent.produced, resent.duplicates) == (0, 1)


class GatedBroker:
    """Each send waits for the gate given for it, in order; sends beyond the gates go through."""

    def __init__(self, *gates: asyncio.Event) -> None:
        self.gates = list(gates)
        self.sent: list[bytes] = []

    async def send_columns(
        self, topics: Sequence[str], keys: Sequence[bytes], values: Sequence[bytes]
    ) -> None:
        if self.gates:
            await self.gates.pop(0).wait()
        self.sent.extend(values)


async def test_an_id_of_a_request_waiting_on_another_stays_known_while_it_waits() -> None:
    # D is producing Y; A sends X and Y, produces X, and waits for D's Y. Meanwhile another
    # event under X was in neither the in-flight table nor the window, and was produced.
    d_gate = asyncio.Event()
    broker = GatedBroker(d_gate)
    ingest = IngestService(
        cast(Producer, broker), topic_prefix="t.", max_batch=100, recent=RecentIds(ttl_s=3600, max_ids=1000)
    )
    y = {**EXAMPLES["purchase"], "event_id": "Y", "order_id": "o-y"}
    x = {**EXAMPLES["purchase"], "event_id": "X", "order_id": "o-x"}
    d = asyncio.create_task(ingest.produce(ingest.prepare(ingest.validate(orjson.dumps(y)))))
    await asyncio.sleep(0)
    a = asyncio.create_task(ingest.produce(ingest.prepare(ingest.validate(orjson.dumps([x, y])))))
    await asyncio.sleep(0.01)
    assert not a.done()  # X is produced, Y is D's and not acknowledged yet
    with pytest.raises(ConflictingIdsError):
        ingest.prepare(ingest.validate(orjson.dumps({**x, "amount": "1.00"})))
    d_gate.set()
    assert (await a).duplicates == 1
    await d
    assert len(broker.sent) == 2


async def test_duplicates_are_counted_for_requests_answered_202_only() -> None:
    def counted() -> float:
        return REGISTRY.get_sample_value("retain_ingest_events_duplicate_total", {"type": "purchase"}) or 0.0

    broker = HeldBroker()
    broker.release.set()
    ingest = service(broker)
    await ingest.produce(ingest.prepare(ingest.validate(body())))
    before = counted()
    broker.refuse = True  # the resend comes with a new event, and the broker is away
    new = {**EXAMPLES["purchase"], "event_id": "order-6", "order_id": "o-6"}
    with pytest.raises(BrokerUnavailableError):
        await ingest.produce(ingest.prepare(ingest.validate(b"[" + body() + b"," + orjson.dumps(new) + b"]")))
    assert counted() == before  # a 503: nothing was answered as a duplicate
    broker.refuse = False
    await ingest.produce(ingest.prepare(ingest.validate(b"[" + body() + b"," + orjson.dumps(new) + b"]")))
    assert counted() == before + 1


async def test_an_event_produced_by_a_request_answered_503_is_counted_accepted_once() -> None:
    # A produces X, then waits for D's Y; D's broker call fails, so A is a 503. X is in the log:
    # the resend answers it as a duplicate, so it was counted accepted when it was produced.
    def accepted() -> float:
        return REGISTRY.get_sample_value("retain_ingest_events_accepted_total", {"type": "purchase"}) or 0.0

    d_gate = asyncio.Event()

    class FailingFirst(GatedBroker):
        async def send_columns(
            self, topics: Sequence[str], keys: Sequence[bytes], values: Sequence[bytes]
        ) -> None:
            if self.gates:
                await self.gates.pop(0).wait()
                raise BrokerUnavailableError("the broker did not acknowledge")
            self.sent.extend(values)

    broker = FailingFirst(d_gate)
    ingest = IngestService(
        cast(Producer, broker), topic_prefix="t.", max_batch=100, recent=RecentIds(ttl_s=3600, max_ids=1000)
    )
    y = {**EXAMPLES["purchase"], "event_id": "Y2", "order_id": "o-y"}
    x = {**EXAMPLES["purchase"], "event_id": "X2", "order_id": "o-x"}
    before = accepted()
    d = asyncio.create_task(ingest.produce(ingest.prepare(ingest.validate(orjson.dumps(y)))))
    await asyncio.sleep(0)
    a = asyncio.create_task(ingest.produce(ingest.prepare(ingest.validate(orjson.dumps([x, y])))))
    await asyncio.sleep(0.01)
    d_gate.set()
    for request in (d, a):
        with pytest.raises(BrokerUnavailableError):
            await request
    resent = await ingest.produce(ingest.prepare(ingest.validate(orjson.dumps([x, y]))))
    assert (resent.produced, resent.duplicates) == (1, 1)
    assert accepted() == before + 2  # X once (by A), Y once (by the resend)
