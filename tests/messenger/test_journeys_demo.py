"""What `make run` shows: the demo's replayed year of history and a round of its live trickle,
through the segmenter and the messenger (their apply paths, the segmenter's sweep and the
messenger's waits, no broker), end in the outbox with a message of every default journey, each
in its customer's language.

The history lies in the past when it is replayed, all of it within seconds: time-driven journeys
show up only if a wait is measured from the event (a cool-off that is over is due at once, and
may then be late by its TTL counted from the end of the wait) and if a lifecycle stage reached
by time alone (60 days without a purchase) is published as a change when it is noticed."""

from __future__ import annotations

import email
import email.policy
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS as MESSENGER_MIGRATIONS
from services.messenger.journeys import default_journeys
from services.messenger.providers.outbox import OutboxProvider
from services.messenger.service import MessengerService
from services.messenger.tables import messages
from services.messenger.templates import language_of
from services.segmenter.config import SegmenterSettings
from services.segmenter.consumer import MIGRATIONS as SEGMENTER_MIGRATIONS
from services.segmenter.service import SegmenterService
from services.segmenter.tables import outbox as segmenter_outbox
from shared.db import Database, migrate
from shared.demo.generator import generate
from shared.demo.live import live_round
from shared.events import CUSTOMER_UPDATE_ADAPTER, EVENT_ADAPTER, Channel, CustomerUpdate, Event
from shared.kafka.consumer import Delivered
from tests.messenger.test_service import Clock

pytestmark = pytest.mark.integration

# The history ends (and the live round starts) on a Tuesday at noon in Jerusalem and Cairo.
END = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
SEED, CUSTOMERS, DAYS, LIVE_ROUNDS = 130, 200, 365, 1
BATCH = 500  # records per consumer batch, as the consumers take them from a full topic


@dataclass(frozen=True)
class Outcome:
    rows: list[Any]
    outbox: Path
    updates: list[CustomerUpdate]

    def sent(self, journey: str) -> list[Any]:
        return [r for r in self.rows if r.journey == journey and r.status == "sent"]


async def _segment(events: Sequence[Event], tmp: Path, clock: Clock) -> list[CustomerUpdate]:
    settings = SegmenterSettings(
        segmenter_database_url=f"sqlite+aiosqlite:///{tmp / 'segmenter.db'}", var_dir=tmp
    )
    db = Database(settings.database_url)
    await migrate(db, SEGMENTER_MIGRATIONS)
    segmenter = SegmenterService(db, settings, None, clock=clock)
    await segmenter.ensure_default_rules()
    for start in range(0, len(events), BATCH):
        chunk = events[start : start + BATCH]
        await segmenter.apply_batch([Delivered("b", 0, start + i, None, e, 0) for i, e in enumerate(chunk)])
    await segmenter.sweep()  # the consumer's tick, after the replay
    async with db.sessions() as session:
        values = (
            (await session.execute(select(segmenter_outbox.c.value).order_by(segmenter_outbox.c.id)))
            .scalars()
            .all()
        )
    await db.dispose()
    return [CUSTOMER_UPDATE_ADAPTER.validate_json(v) for v in values]


async def replay(tmp: Path, customers: int = CUSTOMERS, live_rounds: int = LIVE_ROUNDS) -> Outcome:
    """The demo's history and live rounds through segmenter and messenger; what was decided."""
    clock = Clock(END)
    raw = generate(SEED, customers, END - timedelta(days=DAYS), DAYS)
    for n in range(live_rounds):  # a round a minute, as the demo's --then-live trickle
        raw += live_round(SEED, "test", n, END + timedelta(minutes=n), rate=20)
    events = [EVENT_ADAPTER.validate_python(e) for e in raw]
    updates = await _segment(events, tmp, clock)

    settings = MessengerSettings(
        messenger_database_url=f"sqlite+aiosqlite:///{tmp / 'messenger.db'}",
        messenger_outbox_dir=str(tmp / "outbox"),
        var_dir=tmp,
    )
    db = Database(settings.database_url)
    await migrate(db, MESSENGER_MIGRATIONS)
    provider = OutboxProvider(tmp / "outbox")
    messenger = MessengerService(db, settings, None, dict.fromkeys(Channel, provider), clock=clock)
    await messenger.ensure_defaults()
    for start in range(0, len(updates), BATCH):
        chunk = updates[start : start + BATCH]
        await messenger.apply_batch([Delivered("s", 0, start + i, None, u, 0) for i, u in enumerate(chunk)])
    # The live rounds' events happen over the next minutes; then the waits and the sender.
    clock.now = END + timedelta(minutes=30)
    await messenger.fire_waits()
    await messenger.send_due()
    async with db.sessions() as session:
        rows = list((await session.execute(select(messages))).all())
    await db.dispose()
    return Outcome(rows, tmp / "outbox", updates)


@pytest.fixture(scope="module")
async def demo(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return await replay(tmp_path_factory.mktemp("journeys-demo"))


def _mail(outbox: Path, message_id: str) -> EmailMessage | None:
    found = [p for p in outbox.iterdir() if message_id in p.name]
    if not found or found[0].suffix != ".eml":
        return None
    message = email.message_from_bytes(found[0].read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


_ALL = [j.name for j in default_journeys()]


@pytest.mark.parametrize("journey", _ALL)
async def test_the_demo_sends_every_journey_in_the_customers_language(demo: Outcome, journey: str) -> None:
    sent = demo.sent(journey)
    statuses = Counter(r.status for r in demo.rows if r.journey == journey)
    assert sent, f"no {journey} message sent; decided: {dict(statuses)}"
    for row in sent:
        files = [p for p in demo.outbox.iterdir() if row.id in p.name]
        assert len(files) == 1, (row.id, files)
        mail = _mail(demo.outbox, row.id)
        if mail is not None:  # SMS and WhatsApp are JSON in the sandbox, with no language tag
            html = mail.get_body(("html",))
            assert html is not None
            assert f'lang="{language_of(row.locale)}"' in html.get_content()


def test_the_history_is_not_resent_as_if_it_were_new(demo: Outcome) -> None:
    """A year of thanks and acknowledgements is history: what is older than its TTL is
    recorded as expired, never sent (only the last days' and the live round's go)."""
    ttl = {j.name: timedelta(hours=j.ttl_hours) for j in default_journeys()}
    sent_at = END + timedelta(minutes=30)
    for journey in ("thank_you", "complaint_ack"):
        for row in demo.sent(journey):
            triggered_at = datetime.fromisoformat(row.details["trigger"]["occurred_at"])
            assert sent_at - triggered_at <= ttl[journey], (journey, triggered_at)
    expired = Counter(r.journey for r in demo.rows if r.status == "expired")
    assert expired["thank_you"] > 10 * len(demo.sent("thank_you"))
