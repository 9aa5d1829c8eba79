"""Provider callbacks with forged, missing or replayed signatures: 403, and nothing in the
messenger's database changes. The same callbacks correctly signed do change it, so each refusal
is the signature's doing.

Twilio signs the public URL and the form parameters (HMAC-SHA1 with the auth token), without a
timestamp: a signature replayed with other parameters or on another URL fails, while a replay of
the identical request passes and is idempotent (a status never moves backwards). SendGrid signs
timestamp + body with an ECDSA P-256 key whose public half the messenger is configured with.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from sqlalchemy import select
from twilio.request_validator import RequestValidator

from services.messenger.providers.outbox import OutboxProvider
from services.messenger.service import MessengerService
from services.messenger.tables import metadata
from services.messenger.tables import outbox as outbox_table
from shared.events import MESSAGE_EVENT_ADAPTER, Channel, MessageStatus
from tests.hostile.apps import build, dispose, prepare
from tests.messenger.test_service import NOON, customer_not_in_holdout, delivered, purchase_update

TOKEN = "hostile-twilio-auth-token"
BASE = "https://retain.example"
STATUS = "/webhooks/twilio/status"
INBOUND = "/webhooks/twilio/inbound"
SENDGRID = "/webhooks/sendgrid/events"
PHONE = "+972521234567"  # the profile's phone, SMS and WhatsApp
EMAIL = "noa@example.com"


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    """The public key as SendGrid shows it: base64 of the DER SubjectPublicKeyInfo."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def sendgrid_signature(key: ec.EllipticCurvePrivateKey, timestamp: str, payload: str) -> str:
    signature = key.sign((timestamp + payload).encode(), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode()


def twilio_signature(path: str, params: dict[str, str], token: str = TOKEN) -> str:
    signature: str = RequestValidator(token).compute_signature(f"{BASE}{path}", params)
    return signature


@dataclass
class Messenger:
    http: httpx.AsyncClient
    service: MessengerService
    sendgrid_key: ec.EllipticCurvePrivateKey
    sid: str
    message_id: str

    async def state(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table of the messenger."""
        async with self.service.db.sessions() as session:
            return {
                table.name: sorted(
                    (tuple(row) for row in (await session.execute(select(table))).all()), key=repr
                )
                for table in metadata.sorted_tables
            }

    async def twilio(self, path: str, form: dict[str, str], signature: str | None) -> httpx.Response:
        headers = {} if signature is None else {"X-Twilio-Signature": signature}
        return await self.http.post(path, data=form, headers=headers)

    async def sendgrid(self, payload: str, signature: str | None, timestamp: str | None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["X-Twilio-Email-Event-Webhook-Signature"] = signature
        if timestamp is not None:
            headers["X-Twilio-Email-Event-Webhook-Timestamp"] = timestamp
        return await self.http.post(SENDGRID, content=payload.encode(), headers=headers)


@pytest.fixture
async def messenger(tmp_path: Path) -> AsyncIterator[Messenger]:
    sendgrid_key = ec.generate_private_key(ec.SECP256R1())
    app = build(
        "messenger",
        tmp_path,
        keys=tmp_path / "keys.json",
        twilio_auth_token=SecretStr(TOKEN),
        messenger_public_url=BASE,
        sendgrid_webhook_public_key=public_key_b64(sendgrid_key),
    )
    await prepare("messenger", app)
    service: MessengerService = app.state.service
    service.clock = lambda: NOON
    service.providers = dict.fromkeys(Channel, OutboxProvider(tmp_path / "outbox"))  # the sender's
    customer = customer_not_in_holdout("thank_you")
    await service.apply_batch(delivered([purchase_update(customer, 1, NOON)]))
    [outcome] = await service.send_due()
    assert outcome.status == "sent"
    [row] = await service.list_messages(customer_id=customer, journey=None, status=None, before=None, limit=5)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as http:
        yield Messenger(http, service, sendgrid_key, row["provider_message_id"], row["id"])
    await dispose("messenger", app)


# --- Twilio ----------------------------------------------------------------------------------------


async def test_status_callback_forged_missing_or_replayed_is_refused(messenger: Messenger) -> None:
    delivered_form = {"MessageSid": messenger.sid, "MessageStatus": "delivered"}
    failed_form = {"MessageSid": messenger.sid, "MessageStatus": "failed", "ErrorCode": "30003"}
    good = twilio_signature(STATUS, delivered_form)
    before = await messenger.state()

    refused = {
        "forged": await messenger.twilio(STATUS, failed_form, "bm90IGEgc2lnbmF0dXJl"),
        "missing": await messenger.twilio(STATUS, failed_form, None),
        "empty": await messenger.twilio(STATUS, failed_form, ""),
        "other params": await messenger.twilio(STATUS, failed_form, good),
        "one param more": await messenger.twilio(STATUS, {**delivered_form, "ErrorCode": "1"}, good),
        "other url": await messenger.twilio(
            STATUS, delivered_form, twilio_signature(INBOUND, delivered_form)
        ),
        "other token": await messenger.twilio(
            STATUS, delivered_form, twilio_signature(STATUS, delivered_form, "another-token")
        ),
    }

    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 403)
    assert all(r.json()["error"]["code"] == "forbidden" for r in refused.values())
    assert await messenger.state() == before

    accepted = await messenger.twilio(STATUS, delivered_form, good)
    assert accepted.status_code == 204
    after = await messenger.state()
    assert after != before
    replayed = await messenger.twilio(STATUS, delivered_form, good)
    assert replayed.status_code == 204
    assert await messenger.state() == after  # the identical replay is idempotent


async def test_inbound_stop_with_a_forged_or_replayed_signature_changes_no_consent(
    messenger: Messenger,
) -> None:
    stop = {"From": PHONE, "Body": "STOP", "MessageSid": "SM-in-1"}
    hello = {"From": PHONE, "Body": "hello", "MessageSid": "SM-in-1"}
    before = await messenger.state()

    forged = await messenger.twilio(INBOUND, stop, twilio_signature(INBOUND, stop, "another-token"))
    missing = await messenger.twilio(INBOUND, stop, None)
    replayed = await messenger.twilio(INBOUND, stop, twilio_signature(INBOUND, hello))

    assert (forged.status_code, missing.status_code, replayed.status_code) == (403, 403, 403)
    assert await messenger.state() == before
    accepted = await messenger.twilio(INBOUND, stop, twilio_signature(INBOUND, stop))
    assert accepted.status_code == 200
    assert (await messenger.state())["consent_facts"] != before["consent_facts"]


# --- SendGrid ---------------------------------------------------------------------------------------


def bounce(messenger: Messenger) -> str:
    return json.dumps([{"email": EMAIL, "event": "bounce", "message_id": messenger.message_id}])


async def test_sendgrid_events_without_a_valid_signature_are_refused(messenger: Messenger) -> None:
    payload = bounce(messenger)
    timestamp = str(int(time.time()))
    good = sendgrid_signature(messenger.sendgrid_key, timestamp, payload)
    stranger = sendgrid_signature(ec.generate_private_key(ec.SECP256R1()), timestamp, payload)
    before = await messenger.state()

    refused = {
        "missing": await messenger.sendgrid(payload, None, None),
        "no timestamp": await messenger.sendgrid(payload, good, None),
        "no signature": await messenger.sendgrid(payload, None, timestamp),
        "not base64": await messenger.sendgrid(payload, "%%% not base64 %%%", timestamp),
        "not a signature": await messenger.sendgrid(payload, "bm90IGEgc2lnbmF0dXJl", timestamp),
        "another key": await messenger.sendgrid(payload, stranger, timestamp),
        "other timestamp": await messenger.sendgrid(payload, good, str(int(timestamp) + 1)),
        "other payload": await messenger.sendgrid(payload.replace("bounce", "spamreport"), good, timestamp),
    }

    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 403)
    assert await messenger.state() == before


async def test_sendgrid_events_with_a_valid_signature_are_applied_once(messenger: Messenger) -> None:
    payload = bounce(messenger)
    timestamp = str(int(time.time()))
    signature = sendgrid_signature(messenger.sendgrid_key, timestamp, payload)
    before = await messenger.state()

    response = await messenger.sendgrid(payload, signature, timestamp)

    assert response.status_code == 204, response.text
    after = await messenger.state()
    assert after["consent_facts"] != before["consent_facts"]
    assert any("bounce" in row for row in after["consent_facts"])

    # The same delivery again, inside the timestamp's window: refused, nothing applied twice.
    replayed = await messenger.sendgrid(payload, signature, timestamp)
    assert replayed.status_code == 403
    assert "received before" in replayed.text
    assert (await messenger.state()) == after


async def test_a_signed_sendgrid_body_that_is_not_json_is_a_400(messenger: Messenger) -> None:
    """As a body that is not JSON is everywhere (400), not a 422 about a field; nothing applied."""
    payload = '[{"email": "a@example.com", "event": '
    timestamp = str(int(time.time()))
    before = await messenger.state()
    response = await messenger.sendgrid(
        payload, sendgrid_signature(messenger.sendgrid_key, timestamp, payload), timestamp
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("the body is not valid JSON")
    assert await messenger.state() == before


async def test_sendgrid_delivery_and_click_find_their_message_by_its_custom_arg(messenger: Messenger) -> None:
    """SendGrid echoes the send's custom_args ({"message_id": …}, providers/sendgrid_api.py)
    as keys of each event: the delivery settles that message, the click is published. A value
    that is not an id (a number, a megabyte) finds nothing and breaks nothing."""
    events = [
        {"email": EMAIL, "event": "delivered", "message_id": messenger.message_id, "sg_message_id": "x.1"},
        {"email": EMAIL, "event": "click", "message_id": messenger.message_id, "url": "https://shop.example"},
        {"email": EMAIL, "event": "click", "message_id": 12345},
        {"email": EMAIL, "event": "click", "message_id": "m" * 1_000_000},
    ]
    payload = json.dumps(events)
    timestamp = str(int(time.time()))
    response = await messenger.sendgrid(
        payload, sendgrid_signature(messenger.sendgrid_key, timestamp, payload), timestamp
    )
    assert response.status_code == 204, response.text
    [row] = await messenger.service.list_messages(
        customer_id=None, journey=None, status="delivered", before=None, limit=5
    )
    assert row["id"] == messenger.message_id
    async with messenger.service.db.sessions() as session:
        values = (await session.execute(select(outbox_table.c.value))).scalars().all()
    statuses = [(e.message_id, e.status) for e in map(MESSAGE_EVENT_ADAPTER.validate_json, values)]
    assert (messenger.message_id, MessageStatus.DELIVERED) in statuses
    assert statuses.count((messenger.message_id, MessageStatus.CLICKED)) == 1


def clock_at(minutes: int) -> Callable[[], datetime]:
    """The messenger's clock, stopped that many minutes after NOON."""
    return lambda: NOON + timedelta(minutes=minutes)


async def test_a_click_sendgrid_delivers_again_is_the_same_event(messenger: Messenger) -> None:
    """SendGrid retries a delivery it got no 2xx for (our answer lost after the commit): a new
    timestamp, a new signature, so a new receipt. The click in it is the same event (named by
    its sg_event_id), which consumers apply once, minutes later as at once."""
    payload = json.dumps(
        [{"email": EMAIL, "event": "click", "message_id": messenger.message_id, "sg_event_id": "ev-click-1"}]
    )
    for minutes in (0, 7):
        messenger.service.clock = clock_at(minutes)
        timestamp = str(int(time.time()) + minutes)
        signature = sendgrid_signature(messenger.sendgrid_key, timestamp, payload)
        assert (await messenger.sendgrid(payload, signature, timestamp)).status_code == 204
    async with messenger.service.db.sessions() as session:
        values = (await session.execute(select(outbox_table.c.value))).scalars().all()
    clicks = [
        e for e in map(MESSAGE_EVENT_ADAPTER.validate_json, values) if e.status is MessageStatus.CLICKED
    ]
    assert len(clicks) == 2  # published twice,
    assert len({e.event_id for e in clicks}) == 1  # as one event


async def test_an_inbound_reply_replayed_is_the_same_event(messenger: Messenger) -> None:
    """Twilio's signature has no time: a captured inbound reply can be replayed. It is applied
    once, by its sid: the replay is answered as the first was, and publishes nothing again."""
    form = {"From": PHONE, "Body": "תודה, הגיע", "MessageSid": "SM" + "1" * 32}
    for minutes in (0, 30):
        messenger.service.clock = clock_at(minutes)
        response = await messenger.twilio(INBOUND, form, twilio_signature(INBOUND, form))
        assert response.status_code == 200, response.text
    other = {**form, "MessageSid": "SM" + "2" * 32}
    messenger.service.clock = clock_at(45)
    assert (await messenger.twilio(INBOUND, other, twilio_signature(INBOUND, other))).status_code == 200
    async with messenger.service.db.sessions() as session:
        values = (await session.execute(select(outbox_table.c.value))).scalars().all()
    replies = [
        e for e in map(MESSAGE_EVENT_ADAPTER.validate_json, values) if e.status is MessageStatus.REPLIED
    ]
    assert len(replies) == 2
    assert len({e.event_id for e in replies}) == 2  # the replayed one once, the other once


async def test_sendgrid_events_signed_long_ago_or_ahead_are_refused(messenger: Messenger) -> None:
    """A captured delivery replayed after the tolerance (600 s by default) is refused by its
    signed timestamp alone, as is one signed far in the future; nothing changes."""
    payload = bounce(messenger)
    before = await messenger.state()
    now = int(time.time())
    statuses = {}
    for name, at in {"an hour ago": now - 3600, "an hour ahead": now + 3600, "not a number": None}.items():
        timestamp = "soon" if at is None else str(at)
        signature = sendgrid_signature(messenger.sendgrid_key, timestamp, payload)
        statuses[name] = (await messenger.sendgrid(payload, signature, timestamp)).status_code
    assert statuses == {"an hour ago": 403, "an hour ahead": 403, "not a number": 403}
    assert await messenger.state() == before
