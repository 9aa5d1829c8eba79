"""End to end through the real broker: backend events → segmenter → retain.segments →
messenger → messages in the customer's language; and a sender process killed with SIGKILL
while it sends through a real SMTP server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS as MESSENGER_MIGRATIONS
from services.messenger.consumer import build_loop as messenger_loop
from services.messenger.providers.outbox import OutboxProvider
from services.messenger.service import MessengerService
from services.messenger.tables import messages
from services.segmenter.config import SegmenterSettings
from services.segmenter.consumer import MIGRATIONS as SEGMENTER_MIGRATIONS
from services.segmenter.consumer import build_loop as segmenter_loop
from services.segmenter.service import SegmenterService
from shared.codec import encode_event, encode_key
from shared.config import REPO_ROOT
from shared.db import Database, migrate
from shared.events import (
    EVENT_ADAPTER,
    MESSAGE_EVENT_ADAPTER,
    TOPIC_OF_TYPE,
    Channel,
    ConsentState,
    CustomerUpdate,
    EventType,
    ProfileSnapshot,
    TriggeringEvent,
    UpdateCause,
)
from shared.kafka.consumer import ConsumerLoop, Delivered
from shared.kafka.producer import OutboundRecord, Producer
from tests.messenger.conftest import SmtpServer
from tests.support.infra import KafkaHandle
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration

# Tuesday 10:00 UTC: 12:00 in Jerusalem and Cairo, 05:00 in New York (quiet there).
NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


CUSTOMERS: dict[str, dict[str, Any]] = {
    "he-1": {"name": "נועה לוי", "locale": "he-IL", "timezone": "Asia/Jerusalem", "phone": "+972521234567"},
    "ar-1": {"name": "ليلى حداد", "locale": "ar-EG", "timezone": "Africa/Cairo", "phone": "+201001234567"},
    "en-1": {
        "name": "Dana Smith",
        "locale": "en-US",
        "timezone": "America/New_York",
        "phone": "+12125551234",
    },
}


def backend_events() -> list[Any]:
    raw: list[dict[str, Any]] = []
    for n, (cid, who) in enumerate(CUSTOMERS.items()):
        at = NOW - timedelta(minutes=30 - n)
        raw.append({
            "event_id": f"{cid}-profile", "type": "profile", "customer_id": cid,
            "occurred_at": (at - timedelta(minutes=5)).isoformat(), "name": who["name"],
            "email": f"{cid}@example.com", "phone": who["phone"], "locale": who["locale"],
            "timezone": who["timezone"], "preferred_channel": "email",
            "consents": {"email": True, "sms": True, "whatsapp": False},
        })  # fmt: skip
        raw.append({
            "event_id": f"{cid}-ticket", "type": "support", "customer_id": cid, "occurred_at": at.isoformat(),
            "ticket_id": f"T-{cid}", "action": "opened", "category": "delivery", "is_complaint": True,
        })  # fmt: skip
    return [EVENT_ADAPTER.validate_python(e) for e in raw]


async def run_until(loop: ConsumerLoop[Any], records: int, timeout_s: float = 60) -> None:
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(timeout_s):
            while loop.stats.records < records:
                await asyncio.sleep(0.05)
    finally:
        loop.stop()
        await task


async def test_events_become_messages_in_the_customers_language(
    kafka: KafkaHandle, topic_prefix: str, unique: str, tmp_path: Path
) -> None:
    events = backend_events()
    producer = Producer(kafka.bootstrap, client_id="pipeline")
    await producer.send_all(
        [
            OutboundRecord(topic_prefix + TOPIC_OF_TYPE[e.type], encode_key(e.customer_id), encode_event(e))
            for e in events
        ]
    )
    clock = Clock(NOW)

    seg_settings = SegmenterSettings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=topic_prefix,
        segmenter_database_url=f"sqlite+aiosqlite:///{tmp_path / 'segmenter.db'}",
        segmenter_group_id=f"seg-{unique}",
        var_dir=tmp_path,
    )
    seg_db = Database(seg_settings.database_url)
    await migrate(seg_db, SEGMENTER_MIGRATIONS)
    segmenter = SegmenterService(seg_db, seg_settings, producer, clock=clock)
    await segmenter.ensure_default_rules()
    await run_until(segmenter_loop(seg_settings, segmenter, producer), len(events))

    msg_settings = MessengerSettings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=topic_prefix,
        messenger_database_url=f"sqlite+aiosqlite:///{tmp_path / 'messenger.db'}",
        messenger_group_id=f"msg-{unique}",
        messenger_outbox_dir=str(tmp_path / "outbox"),
        var_dir=tmp_path,
    )
    msg_db = Database(msg_settings.database_url)
    await migrate(msg_db, MESSENGER_MIGRATIONS)
    outbox = OutboxProvider(tmp_path / "outbox")
    messenger = MessengerService(msg_db, msg_settings, producer, dict.fromkeys(Channel, outbox), clock=clock)
    await messenger.ensure_defaults()
    updates = await read_all(kafka.bootstrap, [topic_prefix + "segments"])
    assert len(updates) >= len(CUSTOMERS)
    await run_until(messenger_loop(msg_settings, messenger, producer), len(updates))
    outcomes = await messenger.send_due()
    await producer.stop()

    async with msg_db.sessions() as session:
        rows = (await session.execute(select(messages))).all()
    decided = {(r.customer_id, r.journey): r.status for r in rows}
    # Complaint acknowledgements are transactional: at once, quiet hours or not (05:00 in NY).
    for cid in CUSTOMERS:
        assert decided[(cid, "complaint_ack")] == "sent", decided
    # Welcome is marketing: it waits for the morning in New York.
    assert decided.get(("en-1", "welcome")) in ("held_quiet_hours", "holdout"), decided
    assert {o.status for o in outcomes} == {"sent"}

    texts = {p.name.split("_", 2)[2]: p.read_text(encoding="utf-8") for p in (tmp_path / "outbox").iterdir()}
    by_customer = {r.customer_id: r.id for r in rows if r.journey == "complaint_ack"}
    hebrew = next(t for name, t in texts.items() if by_customer["he-1"] in name)
    arabic = next(t for name, t in texts.items() if by_customer["ar-1"] in name)
    english = next(t for name, t in texts.items() if by_customer["en-1"] in name)
    assert 'dir=3D"rtl"' in hebrew
    assert 'lang=3D"he"' in hebrew
    assert 'lang=3D"ar"' in arabic
    assert 'dir=3D"ltr"' in english
    assert "T-he-1" in hebrew

    published = [
        MESSAGE_EVENT_ADAPTER.validate_json(r.value)
        for r in await read_all(kafka.bootstrap, [topic_prefix + "messages"])
    ]
    statuses = Counter((e.journey, e.status.value) for e in published)
    assert statuses[("complaint_ack", "sent")] == len(CUSTOMERS)
    assert statuses[("complaint_ack", "queued")] == len(CUSTOMERS)
    await seg_db.dispose()
    await msg_db.dispose()


def email_update(n: int, now: datetime) -> CustomerUpdate:
    cid = f"m{n:04d}"
    return CustomerUpdate(
        event_id=f"u-{cid}",
        customer_id=cid,
        occurred_at=now,
        cause=UpdateCause.EVENTS,
        triggering_events=[
            TriggeringEvent(
                event_id=f"t-{cid}",
                type=EventType.SUPPORT,
                occurred_at=now,
                ticket_id=f"T-{n}",
                action="opened",
                category="billing",
                is_complaint=True,
            )
        ],
        tier_old="bronze",
        tier_new="bronze",
        rule_version=1,
        profile=ProfileSnapshot(
            name="Sam Lee",
            email=f"{cid}@example.com",
            locale="en-US",
            timezone="UTC",
            preferred_channel=Channel.EMAIL,
            consents={Channel.EMAIL: ConsentState(granted=True, at=now - timedelta(days=1))},
            lifecycle_stage="active",
            tier="bronze",
            orders_count=1,
            total_value=Decimal(100),
            reporting_currency="ILS",
        ),
    )


async def test_sender_killed_mid_batch_delivers_every_message(
    smtp_server: SmtpServer, pg_url: str, tmp_path: Path
) -> None:
    """SIGKILL the sender twice while it sends 60 emails through a real SMTP server; after a
    restart every message is delivered, and any copy has the same Message-ID (what receivers
    dedupe on: SMTP cannot be asked whether it got a message, see providers/smtp.py)."""
    n = 60
    settings = MessengerSettings(messenger_database_url=pg_url, var_dir=tmp_path)
    db = Database(pg_url)
    await migrate(db, MESSENGER_MIGRATIONS)
    # The sender process runs on the wall clock: decide on it too (a complaint_ack lives 24 h).
    service = MessengerService(db, settings, None, {})
    await service.ensure_defaults()
    await service.apply_batch(
        [Delivered("s", 0, i, None, email_update(i, datetime.now(UTC)), 0) for i in range(n)]  # transactional
    )
    before = len(smtp_server.handler.received)
    env = {
        **os.environ,
        "RETAIN_MESSENGER_DATABASE_URL": pg_url,
        "RETAIN_SMTP_HOST": smtp_server.host,
        "RETAIN_MESSENGER_LINK_SECRET": "pipeline-test-link-secret",
        "RETAIN_SMTP_PORT": str(smtp_server.port),
        "RETAIN_SMTP_STARTTLS": "false",
        "RETAIN_MESSENGER_SEND_CONCURRENCY": "2",
        # Reconciliation must wait out the longest send (a local SMTP server answers at once).
        "RETAIN_MESSENGER_SEND_TIMEOUT_S": "3",
        "RETAIN_MESSENGER_RECONCILE_AFTER_S": "4",
        "RETAIN_MESSENGER_SENDER_INTERVAL_S": "0.2",
        "RETAIN_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # outcomes wait in the outbox table
        "RETAIN_VAR_DIR": str(tmp_path),
        "RETAIN_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "services.messenger.sender"]
    for threshold in (10, 30):
        proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT)  # noqa: ASYNC220
        try:
            async with asyncio.timeout(60):
                while len(smtp_server.handler.received) - before < threshold:
                    await asyncio.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT)  # noqa: ASYNC220
    try:
        async with asyncio.timeout(90):
            while True:
                async with db.sessions() as session:
                    left = await session.scalar(
                        select(func.count()).select_from(messages).where(messages.c.status != "sent")
                    )
                if left == 0:
                    break
                await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    mails = smtp_server.handler.received[before:]
    ids = Counter(m.parsed()["Message-ID"] for m in mails)
    async with db.sessions() as session:
        ledger = {r.id for r in (await session.execute(select(messages.c.id))).all()}
    assert {f"<{i}@retain>" for i in ledger} == set(ids)  # every message delivered
    duplicates = sum(c - 1 for c in ids.values())
    assert duplicates <= 2 * 2  # at most the in-flight sends of each kill (concurrency 2)
    await db.dispose()
