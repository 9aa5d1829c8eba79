"""A slow, failing provider slows its own channel only: nothing lost, nothing sent twice.

The messenger's real ``send_due`` (default concurrency, real retry policy) sends one batch of
queued messages on two channels. SMS goes through the real Twilio provider to a fault-injecting
proxy in front of Prism (Twilio's OpenAPI spec, ``--errors``): most SMS are answered 429 with
Retry-After first, then 500, then a timeout, and only then, slowly, forwarded to Prism; a few
recipients get a 500 with a large HTML body on every attempt. ``send_due`` is what the sender
process (``services/messenger/sender.py``) runs each pass. Email goes to the sandbox outbox,
healthy. The proxy's log of creates it forwarded is the provider's call log.

The faults never reach Prism: a 429, a 500 or a timeout here means Twilio did not create the
message. A 500 or timeout *after* Twilio created it cannot be told apart by ``lookup`` against
Prism (it answers list requests with its spec example), so that case is not exercised here.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS
from services.messenger.providers.base import OutgoingMessage, Provider, ProviderResult
from services.messenger.providers.outbox import OutboxProvider
from services.messenger.providers.twilio_sms import TwilioProvider
from services.messenger.service import MessengerService
from shared.db import Database, migrate
from shared.events import (
    Channel,
    ConsentState,
    CustomerUpdate,
    EventType,
    ProfileSnapshot,
    SupportAction,
    TriggeringEvent,
    UpdateCause,
)
from shared.kafka.consumer import Delivered
from tests.chaos.cluster import say
from tests.support.infra import free_port
from tests.support.prism import PrismServer, prism_mock, twilio_spec_for_mock
from tests.support.providers import Wrapping

pytestmark = pytest.mark.integration

NOON = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)  # a Tuesday, 12:00 in Jerusalem
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
SMS_FROM = "+15005550006"
CLIENT_TIMEOUT_S = 1.0
RETRY_AFTER_S = 2
SLOW_S = 0.3  # latency of the forwarded (successful) create
RECOVERING = 20  # SMS answered 429, 500, timeout, then forwarded: more than the 16 send slots
DEAD = 3  # SMS answered 500 (with a 64 KiB HTML body) on every attempt
HEALTHY = 30  # email, to the outbox
MAX_REASON = 500  # characters of a failure's reason in the ledger


@dataclass
class Attempt:
    to: str
    n: int  # the how-manieth create for this recipient
    answer: str  # 429, 500, timeout, forwarded
    began: float
    ended: float = 0.0


@dataclass
class FaultyTwilio:
    """A proxy in front of Prism that fails each SMS create by recipient, on a schedule."""

    upstream: str
    dead: set[str]
    attempts: list[Attempt] = field(default_factory=list)
    forwarded: list[tuple[str, str]] = field(default_factory=list)  # (To, Body) Prism answered 201
    _seen: Counter[str] = field(default_factory=Counter)
    _session: aiohttp.ClientSession | None = None

    async def create(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        to, body = str(form["To"]), str(form["Body"])
        self._seen[to] += 1
        n = self._seen[to]
        attempt = Attempt(to, n, "forwarded", time.monotonic())
        self.attempts.append(attempt)
        try:
            if to in self.dead:
                attempt.answer = "500"
                html = "<html><body>" + "upstream exploded " * 3700 + "</body></html>"
                return web.Response(status=500, text=html, content_type="text/html")
            if n == 1:
                attempt.answer = "429"
                error = {"code": 20429, "message": "Too Many Requests", "more_info": "", "status": 429}
                return web.json_response(error, status=429, headers={"Retry-After": str(RETRY_AFTER_S)})
            if n == 2:
                attempt.answer = "500"
                error = {"code": 20500, "message": "Internal Server Error", "more_info": "", "status": 500}
                return web.json_response(error, status=500)
            if n == 3:
                attempt.answer = "timeout"  # the client gives up first; nothing goes upstream
                await asyncio.sleep(CLIENT_TIMEOUT_S * 2)
                return web.Response(status=504)
            await asyncio.sleep(SLOW_S)
            response = await self._forward(request, await request.read())
            if response.status == 201:
                self.forwarded.append((to, body))
            return response
        finally:
            attempt.ended = time.monotonic()

    async def other(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, await request.read())  # lookups: straight to Prism

    async def _forward(self, request: web.Request, data: bytes) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in {"host", "content-length"}}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=data, headers=headers
        ) as upstream:
            content = await upstream.read()
            return web.Response(status=upstream.status, body=content, content_type=upstream.content_type)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self.create)
        app.router.add_route("*", "/{tail:.*}", self.other)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self._session = aiohttp.ClientSession()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await self._session.close()
            await runner.cleanup()


@dataclass
class Call:
    message_id: str
    channel: Channel
    began: float
    ended: float
    ok: bool


class Timed(Wrapping):
    """The provider it wraps, with every ``send`` written down (when, and whether it worked)."""

    def __init__(self, inner: Provider, calls: list[Call]) -> None:
        super().__init__(inner)
        self._calls = calls

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        began = time.monotonic()
        ok = False
        try:
            result = await self._inner.send(msg)
            ok = True
            return result
        finally:
            self._calls.append(Call(msg.message_id, msg.channel, began, time.monotonic(), ok))


@pytest.fixture(scope="module")
def twilio_prism(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServer]:
    # prism_mock installs Prism from deploy/prism's lock file when it is missing: never skipped.
    spec = twilio_spec_for_mock(tmp_path_factory.mktemp("twilio-spec"))
    with prism_mock(spec, "twilio-chaos") as server:
        yield server


def complaint(customer: str, channel: Channel, phone: str) -> CustomerUpdate:
    """A complaint: the transactional 'complaint' journey, not capped, no holdout."""
    consent = ConsentState(granted=True, at=NOON - timedelta(days=30))
    profile = ProfileSnapshot(
        name="Dana",
        email=f"{customer}@example.com",
        phone=phone,
        whatsapp=None,
        locale="en-US",
        timezone="Asia/Jerusalem",
        preferred_channel=channel,
        consents={Channel.EMAIL: consent, Channel.SMS: consent},
        lifecycle_stage="active",
        tier="gold",
        segments=[],
        orders_count=3,
        total_value=Decimal("900"),
        reporting_currency="ILS",
    )
    return CustomerUpdate(
        event_id=f"u-{customer}",
        customer_id=customer,
        occurred_at=NOON,
        cause=UpdateCause.EVENTS,
        triggering_events=[
            TriggeringEvent(
                event_id=f"t-{customer}",
                type=EventType.SUPPORT,
                occurred_at=NOON,
                ticket_id=f"T-{customer}",
                action=SupportAction.OPENED,
                category="delivery",
                is_complaint=True,
            )
        ],
        tier_old="gold",
        tier_new="gold",
        rule_version=1,
        profile=profile,
    )


@pytest.mark.timeout(180)
async def test_a_slow_failing_sms_provider_loses_duplicates_and_blocks_nothing(
    twilio_prism: PrismServer, tmp_path: Path
) -> None:
    sms = {f"s{i}": f"+9725200{i:05d}" for i in range(RECOVERING + DEAD)}
    dead = {sms[f"s{i}"] for i in range(RECOVERING, RECOVERING + DEAD)}
    mail = {f"e{i}": f"+9725300{i:05d}" for i in range(HEALTHY)}
    proxy = FaultyTwilio(twilio_prism.url, dead)
    url = f"sqlite+aiosqlite:///{tmp_path / 'messenger.db'}"
    calls: list[Call] = []
    async with proxy.serving() as proxy_url:
        settings = MessengerSettings(
            messenger_database_url=url,
            var_dir=tmp_path,
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=SecretStr("test-auth-token"),
            twilio_sms_from=SMS_FROM,
            # Email configured too (its provider here is the outbox, the healthy one): otherwise
            # the decisions would try it after SMS for the customers who prefer it.
            smtp_host="mail.example.com",
            messenger_link_secret=SecretStr("chaos-test-link-secret"),
            messenger_public_url="https://retain.example",
        )
        twilio = TwilioProvider(ACCOUNT_SID, "test-auth-token", base_url=proxy_url, timeout=CLIENT_TIMEOUT_S)
        providers: dict[Channel, Provider] = {
            Channel.SMS: Timed(twilio, calls),
            Channel.EMAIL: Timed(OutboxProvider(tmp_path / "outbox"), calls),
        }
        db = Database(url)
        try:
            await migrate(db, MIGRATIONS)
            service = MessengerService(db, settings, None, providers, clock=lambda: NOON)
            await service.ensure_defaults()
            # Interleaved, so the healthy channel's messages are spread among the failing ones.
            updates = [complaint(c, Channel.SMS, p) for c, p in sms.items()]
            updates += [complaint(c, Channel.EMAIL, p) for c, p in mail.items()]
            updates.sort(key=lambda u: u.customer_id[1:] + u.customer_id[0])
            batch = [
                Delivered("retain.segments", 0, i, u.customer_id.encode(), u, 0)
                for i, u in enumerate(updates)
            ]
            await service.apply_batch(batch)
            began = time.monotonic()
            outcomes = await service.send_due()
            elapsed = time.monotonic() - began
            ledger = await service.list_messages(
                customer_id=None, journey=None, status=None, before=None, limit=500
            )
        finally:
            await twilio.close()
            await db.dispose()

    by_customer = {r["customer_id"]: r for r in ledger}
    assert set(by_customer) == set(sms) | set(mail), "one message per complaint"
    assert sorted(o.message_id for o in outcomes) == sorted(r["id"] for r in ledger)
    # None lost: every message settled, sent or failed; none left queued or mid-send.
    statuses = Counter(r["status"] for r in ledger)
    assert statuses == {"sent": RECOVERING + HEALTHY, "failed": DEAD}, statuses
    # Never twice: each recovering SMS reached Prism exactly once, dead ones never.
    creates = Counter(to for to, _ in proxy.forwarded)
    assert creates == Counter({sms[f"s{i}"]: 1 for i in range(RECOVERING)}), creates
    answers = Counter(a.answer for a in proxy.attempts)
    max_attempts = settings.messenger_max_attempts
    assert answers == {
        "429": RECOVERING,
        "500": RECOVERING + DEAD * max_attempts,
        "timeout": RECOVERING,
        "forwarded": RECOVERING,
    }, answers
    assert sorted(f.name.rsplit("_", 1)[-1].split(".")[0] for f in (tmp_path / "outbox").iterdir()) == sorted(
        by_customer[c]["id"] for c in mail
    ), "one outbox file per email"
    email_calls = [c for c in calls if c.channel is Channel.EMAIL]
    assert Counter(c.message_id for c in email_calls) == Counter({by_customer[c]["id"]: 1 for c in mail})
    # Not blocked: every email was handed over before the first retry of a throttled SMS had
    # finished (its first create was refused with Retry-After: RETRY_AFTER_S). With one pool of
    # send slots for every channel, the last email went 3.6-4.6 s after the first 429.
    first_refusal = min(a.ended for a in proxy.attempts if a.answer == "429")
    first_retry = min(a.ended for a in proxy.attempts if a.n == 2 and a.to not in dead)
    last_email = max(c.ended for c in email_calls)
    assert last_email < first_retry, (last_email - first_refusal, first_retry - first_refusal)
    # Failures recorded with their code and a bounded reason.
    for customer in (c for c, p in sms.items() if p in dead):
        row = by_customer[customer]
        assert row["status"] == "failed"
        assert row["error_code"] == "500"
        assert row["reason"].startswith("twilio 500")
        assert len(row["reason"]) <= MAX_REASON, len(row["reason"])
    reasons = sorted({by_customer[c]["reason"] for c, p in sms.items() if p in dead})
    say(
        f"providers: {len(ledger)} messages in {elapsed:.1f}s; attempts {dict(answers)}; last email "
        f"{last_email - began:.2f}s, first 429 {first_refusal - began:.2f}s, first retry done "
        f"{first_retry - began:.2f}s after the start; failure reasons {reasons}"
    )
