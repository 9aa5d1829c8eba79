"""The messenger's use cases: journeys → decisions (consumer), sending and reconciling
(sender), provider callbacks and the API. Transactions begin and end here; SQL lives in the
repository; every decision lives in a pure module (journeys, decision, consent, caps, quiet,
status, templates)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.messenger.caps import DEFAULT_CAPS, CapsConfig, SentRecord
from services.messenger.config import MessengerSettings
from services.messenger.consent import ConsentFact, FactSource
from services.messenger.decision import Candidate, DecisionContext, decide, recheck_at_send
from services.messenger.journeys import (
    Entry,
    Journey,
    default_journeys,
    holds,
    message_key,
    next_attempt_at,
    reentry_allowed,
    snapshot_facts,
    triggered,
    wait_until,
)
from services.messenger.links import unsubscribe_url
from services.messenger.providers.base import OutgoingMessage, Provider, ProviderError, ProviderResult
from services.messenger.providers.ratelimit import SenderRateLimiter
from services.messenger.providers.retry import send_with_retry
from services.messenger.quiet import QuietHours, customer_zone
from services.messenger.repository import MessengerRepository
from services.messenger.status import advances, ours
from services.messenger.tables import applied_events, outbox
from services.messenger.templates import Template, TemplateStore, build_variables, render
from shared.codec import encode, encode_key
from shared.db import Database, claim_events
from shared.events import (
    Channel,
    CustomerUpdate,
    MessageEvent,
    MessageKind,
    MessageStatus,
    ProfileSnapshot,
)
from shared.kafka.consumer import BatchResult, Delivered
from shared.kafka.producer import BrokerUnavailableError, OutboundRecord, Producer
from shared.logs import get_logger
from shared.outbox import OutboxRelay, enqueue
from shared.topics import MESSAGES

log = get_logger(__name__)

DECISIONS = Counter(
    "retain_messenger_decisions_total", "Message decisions, by journey and outcome.", ["journey", "status"]
)
PROVIDER_CALLS = Counter(
    "retain_messenger_provider_calls_total",
    "Provider calls by provider, channel and result (after retries).",
    ["provider", "channel", "result"],
)
PROVIDER_SECONDS = Histogram(
    "retain_messenger_provider_seconds",
    "Provider call latency (including retries).",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
HELD = Gauge("retain_messenger_held_messages", "Messages held for quiet hours, waiting for their window.")
HELD_OLDEST_AGE = Gauge(
    "retain_messenger_held_oldest_age_seconds", "Age of the oldest message held for quiet hours (0: none)."
)
HELD_OVERDUE = Gauge(
    "retain_messenger_held_overdue_seconds",
    "How long ago the earliest window of a still-held message opened (0: none is past its window).",
)
CAP_HITS = Counter("retain_messenger_cap_hits_total", "Messages stopped by a frequency cap.", ["journey"])
UNSUBSCRIBES = Counter(
    "retain_messenger_unsubscribes_total", "Opt-outs recorded, by channel and source.", ["channel", "source"]
)

Clock = Callable[[], datetime]
# How long a message for a customer without any known address waits for their profile.
PROFILE_GRACE = timedelta(minutes=10)
HISTORY_DAYS = 31  # the longest default cap window (win-back: 30 days) and a day to spare


def utcnow() -> datetime:
    return datetime.now(UTC)


def _candidate_of(row: Any) -> Candidate:
    return Candidate(
        message_key=row.idempotency_key,
        customer_id=row.customer_id,
        journey=row.journey,
        kind=MessageKind(row.kind),
        template=row.template or row.journey,
        triggered_at=row.created_at,
        channel=Channel(row.channel) if row.details and row.details.get("forced_channel") else None,
        ttl=(row.expires_at - row.created_at) if row.expires_at else None,
    )


@dataclass(slots=True)
class _Memo:
    customer: Any
    history: list[SentRecord]
    facts: list[ConsentFact]
    entries: dict[str, datetime]


class _Row:
    """A ledger row just written, without reading it back."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


@dataclass(frozen=True, slots=True)
class SendOutcome:
    message_id: str
    status: str
    reason: str | None


class MessengerService:
    def __init__(
        self,
        db: Database,
        settings: MessengerSettings,
        producer: Producer | None = None,
        providers: Mapping[Channel, Provider] | None = None,
        clock: Clock = utcnow,
        limiter: SenderRateLimiter | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.repo = MessengerRepository()
        self.clock = clock
        self.topic = settings.topic(MESSAGES)
        self.relay = OutboxRelay(db, outbox, producer) if producer is not None else None
        self.providers: dict[Channel, Provider] = dict(providers or {})
        self.limiter = limiter
        self.quiet = QuietHours()
        self.templates = TemplateStore()
        self._journeys: tuple[datetime | None, list[Journey]] = (None, [])
        self._caps: tuple[datetime | None, CapsConfig] = (None, DEFAULT_CAPS)
        self._templates_at: datetime | None = None

    # --- configuration kept in the database ------------------------------------------------------

    async def ensure_defaults(self) -> None:
        now = self.clock()
        async with self.db.transaction() as session:
            await self.repo.insert_setting_if_absent(
                session, "caps", DEFAULT_CAPS.model_dump(mode="json"), now
            )
            await self.repo.insert_setting_if_absent(
                session, "journeys", [j.model_dump(mode="json") for j in default_journeys()], now
            )
            await self.load_template_overrides(session)

    async def journeys(self, session: Any) -> list[Journey]:
        row = await self.repo.setting(session, "journeys")
        if row is None:
            return default_journeys()
        if self._journeys[0] != row.updated_at:
            self._journeys = (row.updated_at, [Journey.model_validate(j) for j in row.value])
        return self._journeys[1]

    async def load_template_overrides(self, session: Any) -> TemplateStore:
        """The marketers' template overrides (setting "templates", a list of
        ``Template.to_json()``), read again only when the setting's updated_at changes."""
        row = await self.repo.setting(session, "templates")
        updated_at = row.updated_at if row is not None else None
        if updated_at != self._templates_at:
            overrides = [Template.from_json(t) for t in row.value] if row is not None else []
            self.templates = TemplateStore(overrides)
            self._templates_at = updated_at
        return self.templates

    async def caps(self, session: Any) -> CapsConfig:
        row = await self.repo.setting(session, "caps")
        if row is None:
            return DEFAULT_CAPS
        if self._caps[0] != row.updated_at:
            self._caps = (row.updated_at, CapsConfig.model_validate(row.value))
        return self._caps[1]

    # --- the consumer: customer updates → journeys → decisions --------------------------------------

    async def apply_batch(self, batch: Sequence[Delivered[CustomerUpdate]]) -> BatchResult:
        now = self.clock()
        async with self.db.transaction() as session:
            new_ids = await claim_events(
                session, applied_events, [(d.value.event_id, d.topic, d.partition, d.offset) for d in batch]
            )
            taken: set[str] = set()
            journeys = [j for j in await self.journeys(session) if j.enabled]
            caps = await self.caps(session)
            events: list[MessageEvent] = []
            for d in batch:
                update = d.value
                if update.event_id not in new_ids or update.event_id in taken:
                    continue
                taken.add(update.event_id)
                events += await self._on_update(session, update, journeys, caps, now)
            await self._publish(session, events)
        await self.flush()
        return BatchResult(applied=len(taken), duplicates=len(batch) - len(taken))

    async def _on_update(
        self, session: Any, update: CustomerUpdate, journeys: list[Journey], caps: CapsConfig, now: datetime
    ) -> list[MessageEvent]:
        customer_id = update.customer_id
        profile = update.profile.model_dump(mode="json")
        await self.repo.upsert_customer(session, customer_id, profile, update.occurred_at, now)
        facts = snapshot_facts(update)
        events = await self._cancel_waits(session, update, facts, now, journeys)
        memo: _Memo | None = None
        for journey in journeys:
            for entry in triggered(journey, update):
                if not holds(journey.entry, facts, now):
                    continue
                if memo is None:
                    memo = await self._memo(session, customer_id, now)
                if not reentry_allowed(journey, memo.entries.get(journey.name), entry.at):
                    continue
                memo.entries[journey.name] = entry.at
                await self.repo.record_entry(session, customer_id, journey.name, entry.at)
                due = wait_until(journey, entry.at, facts.get("churn_reason"))
                if due is not None and due > now:
                    await self._add_wait(session, customer_id, entry, due, now)
                    continue
                events += await self._decide(
                    session, customer_id, journey, entry, update.profile, caps, now, memo
                )
        return events

    @staticmethod
    def _expired(journey: Journey, entry: Entry, now: datetime) -> bool:
        return now - entry.at >= timedelta(hours=journey.ttl_hours)

    async def _add_wait(
        self, session: Any, customer_id: str, entry: Entry, due: datetime, now: datetime
    ) -> None:
        await self.repo.add_wait(
            session,
            {
                "customer_id": customer_id,
                "journey": entry.journey.name,
                "due_at": due,
                "trigger_event_id": entry.event_id,
                "status": "waiting",
                "data": {
                    "key": entry.key,
                    "details": entry.details,
                    "at": entry.at.isoformat(),
                    "attempt": entry.attempt,
                },
                "created_at": now,
            },
        )

    async def _memo(self, session: Any, customer_id: str, now: datetime) -> _Memo:
        """What decisions about one customer read, loaded once per update (and kept current
        in memory as messages are decided), under the customer's row lock."""
        customer = await self.repo.lock_customer(session, customer_id)
        history = [
            SentRecord(
                at=r.sent_at or r.send_at or r.created_at,
                channel=Channel(r.channel),
                journey=r.journey,
                kind=MessageKind(r.kind),
            )
            for r in await self.repo.history(session, customer_id, now - timedelta(days=HISTORY_DAYS))
            if r.channel
        ]
        facts = [
            ConsentFact(channel=Channel(f.channel), at=f.at, source=FactSource(f.source))
            for f in await self.repo.consent_facts(session, customer_id)
        ]
        entries = await self.repo.entries(session, customer_id)
        return _Memo(customer, history, facts, entries)

    async def _cancel_waits(
        self,
        session: Any,
        update: CustomerUpdate,
        facts: dict[str, Any],
        now: datetime,
        enabled: list[Journey],
    ) -> list[MessageEvent]:
        """Waiting messages whose exit condition now holds, or whose 'unless' happened, end."""
        journeys = {j.name: j for j in enabled}
        types = {e.type for e in update.triggering_events}
        for wait in await self.repo.waiting(session, update.customer_id):
            journey = journeys.get(wait.journey)
            if journey is None:
                continue
            reason = None
            if journey.exit is not None and holds(journey.exit, facts, now):
                reason = "exit condition met"
            elif journey.wait and journey.wait.unless is not None and holds(journey.wait.unless, facts, now):
                reason = "'unless' condition met"
            elif (
                journey.wait and journey.wait.unless_event is not None and journey.wait.unless_event in types
            ):
                reason = f"a {journey.wait.unless_event.value} happened first"
            if reason is not None:
                await self.repo.close_wait(session, wait.id, "cancelled", reason)
        return []

    async def _decide(
        self,
        session: Any,
        customer_id: str,
        journey: Journey,
        entry: Entry,
        profile: ProfileSnapshot,
        caps: CapsConfig,
        now: datetime,
        memo: _Memo | None = None,
    ) -> list[MessageEvent]:
        memo = memo or await self._memo(session, customer_id, now)
        key = message_key(customer_id, entry)
        existing = await self.repo.message_by_key(session, key)
        candidate = Candidate(
            message_key=key,
            customer_id=customer_id,
            journey=journey.name,
            kind=journey.kind,
            template=journey.template,
            triggered_at=entry.at,
            channel=journey.channel,
            ttl=timedelta(hours=journey.ttl_hours),
            holdout_percent=journey.holdout_percent,
        )
        context = self._context_of(memo, profile, caps, duplicate=existing is not None)
        decision = decide(candidate, context, now)
        DECISIONS.labels(journey.name, decision.status.value).inc()
        if decision.status == MessageStatus.DUPLICATE:
            return [self._event(existing, MessageStatus.DUPLICATE, decision.reason, now, seq="dup")]
        if decision.status == MessageStatus.CAPPED:
            CAP_HITS.labels(journey.name).inc()
        if (
            decision.status == MessageStatus.NO_ADDRESS
            and not (profile.email or profile.phone or profile.whatsapp)
            and not entry.details.get("awaited_profile")
            and not self._expired(journey, entry, now)
        ):
            # The backend topics are consumed independently: a purchase can be applied before
            # the profile that came with it. With no contact details known at all, wait a
            # little for them (once) rather than record a customer we cannot reach.
            waiting = replace(entry, details={**entry.details, "awaited_profile": True})
            await self._add_wait(session, customer_id, waiting, now + PROFILE_GRACE, now)
            return []
        # The next attempt (win-back) waits like the first, so the journey's exits and
        # 'unless' can still end it; it is scheduled whatever became of this one.
        next_due = next_attempt_at(journey, entry.attempt, decision.send_at or now)
        if next_due is not None:
            await self._add_wait(
                session, customer_id, replace(entry, attempt=entry.attempt + 1), next_due, now
            )
        facts = snapshot_facts_of(profile)
        details: dict[str, Any] = {"trigger": entry.details, "profile": profile.model_dump(mode="json")}
        if journey.offer_if is not None and holds(journey.offer_if, facts, now):
            details["offer"] = True
        escalate = journey.escalate_if is not None and holds(journey.escalate_if, facts, now)
        if escalate:
            details["escalated"] = True
        values = {
            "idempotency_key": key,
            "customer_id": customer_id,
            "journey": journey.name,
            "kind": journey.kind.value,
            "channel": decision.channel.value if decision.channel else None,
            "template": journey.template,
            "locale": profile.locale,
            "tier": profile.tier,
            "status": decision.status.value,
            "reason": decision.reason,
            "send_at": decision.send_at,
            "expires_at": decision.expires_at,
            "created_at": now,
            "updated_at": now,
            "attempts": 0,
            "trigger_event_id": entry.event_id,
            "whatsapp_mode": decision.whatsapp_mode,
            "details": details,
        }
        message_id = await self.repo.insert_message(session, values)
        row = _Row(id=message_id, provider=None, provider_message_id=None, error_code=None, **values)
        if decision.status == MessageStatus.QUEUED and decision.channel is not None:
            memo.history.append(
                SentRecord(
                    at=decision.send_at or now,
                    channel=decision.channel,
                    journey=journey.name,
                    kind=journey.kind,
                )
            )
        out = [self._event(row, decision.status, decision.reason, now)]
        if escalate:
            out.append(
                self._event(
                    row,
                    MessageStatus.ESCALATION,
                    "complaint of a top-tier or high-value customer",
                    now,
                    extra={
                        "ticket_id": str(entry.details.get("ticket_id", "")),
                        "category": str(entry.details.get("category", "")),
                        "tier": profile.tier,
                        "predicted_clv": str(profile.predicted_clv)
                        if profile.predicted_clv is not None
                        else None,
                        "total_value": str(profile.total_value),
                    },
                )
            )
        return out

    async def _context(
        self, session: Any, customer_id: str, profile: ProfileSnapshot, caps: CapsConfig, *, duplicate: bool
    ) -> DecisionContext:
        memo = await self._memo(session, customer_id, self.clock())
        return self._context_of(memo, profile, caps, duplicate=duplicate)

    def _context_of(
        self, memo: _Memo, profile: ProfileSnapshot, caps: CapsConfig, *, duplicate: bool
    ) -> DecisionContext:
        customer = memo.customer
        history = list(memo.history)
        facts = list(memo.facts)
        return DecisionContext(
            addresses={
                Channel.EMAIL: profile.email,
                Channel.SMS: profile.phone,
                Channel.WHATSAPP: profile.whatsapp,
            },
            consents=dict(profile.consents),
            timezone=customer_zone(profile.timezone, profile.locale),
            locale=profile.locale,
            preferred_channel=profile.preferred_channel,
            facts=facts,
            history=history,
            caps=tuple(caps.caps),
            quiet=self.quiet,
            fallback_order=tuple(Channel(c) for c in self.settings.messenger_fallback_order),
            whatsapp_last_inbound_at=customer.whatsapp_inbound_at if customer else None,
            has_whatsapp_template=False,
            duplicate=duplicate,
        )

    # --- waits (between consumer batches) ------------------------------------------------------

    async def fire_waits(self, limit: int = 500) -> int:
        """Waits whose time has come become decisions now (their exits were checked on every
        update meanwhile)."""
        now = self.clock()
        fired = 0
        async with self.db.transaction() as session:
            journeys = {j.name: j for j in await self.journeys(session)}
            caps = await self.caps(session)
            events: list[MessageEvent] = []
            for wait in await self.repo.due_waits(session, now, limit):
                journey = journeys.get(wait.journey)
                customer = await self.repo.lock_customer(session, wait.customer_id)
                if journey is None or not journey.enabled or customer is None:
                    await self.repo.close_wait(session, wait.id, "cancelled", "journey disabled or removed")
                    continue
                profile = ProfileSnapshot.model_validate(customer.profile)
                # The message's TTL counts from the end of its wait, not from the trigger: a
                # win-back cools off for weeks, far longer than it may then be late.
                entry = Entry(
                    journey,
                    wait.data["key"],
                    wait.trigger_event_id,
                    wait.due_at,
                    wait.data["details"],
                    wait.data.get("attempt", 1),
                )
                facts = snapshot_facts_of(profile)
                if journey.exit is not None and holds(journey.exit, facts, now):
                    await self.repo.close_wait(session, wait.id, "cancelled", "exit condition met")
                    continue
                await self.repo.close_wait(session, wait.id, "fired", None)
                events += await self._decide(session, wait.customer_id, journey, entry, profile, caps, now)
                fired += 1
            await self._publish(session, events)
        if fired:
            await self.flush()
        return fired

    # --- the sender ------------------------------------------------------------------------------

    async def send_due(self, limit: int = 200) -> list[SendOutcome]:
        """Send what is due, a chunk of ``messenger_send_concurrency`` messages at a time:
        claim the chunk in one transaction (committed 'sending' before any provider is called),
        call the providers concurrently, settle the chunk in one transaction. The chunk bounds
        what a crash can leave unsettled (and, for providers that cannot be asked, resent)."""
        now = self.clock()
        outcomes: list[SendOutcome] = []
        async with self.db.sessions() as session:
            await self.load_template_overrides(session)
            due = [d.id for d in await self.repo.due_messages(session, now, limit)]
        chunk = self.settings.messenger_send_concurrency
        for i in range(0, len(due), chunk):
            claimed: list[tuple[Any, OutgoingMessage]] = []
            async with self.db.transaction() as session:
                for message_id in due[i : i + chunk]:
                    claim = await self._claim(session, message_id, now)
                    if isinstance(claim, SendOutcome):
                        outcomes.append(claim)
                    elif claim is not None:
                        claimed.append(claim)
            results = await asyncio.gather(*(self._provider_call(row, outgoing) for row, outgoing in claimed))
            if claimed:
                async with self.db.transaction() as session:
                    for (row, _), result in zip(claimed, results, strict=True):
                        outcomes.append(await self._record(session, row, result))
        await self.flush()
        return outcomes

    async def send_one(self, message_id: str) -> SendOutcome | None:
        """Claim (commit 'sending'), call the provider, settle. Never twice: the claim is
        committed before the call, and only a 'queued' or held row can be claimed."""
        async with self.db.transaction() as session:
            claim = await self._claim(session, message_id, self.clock())
        if claim is None or isinstance(claim, SendOutcome):
            return claim
        row, outgoing = claim
        result = await self._provider_call(row, outgoing)
        async with self.db.transaction() as session:
            return await self._record(session, row, result)

    async def _claim(
        self, session: Any, message_id: str, now: datetime
    ) -> tuple[Any, OutgoingMessage] | SendOutcome | None:
        row = await self.repo.message(session, message_id, for_update=True)
        if row is None or row.status not in ("queued", "held_quiet_hours"):
            return None  # another sender took it, or it was settled meanwhile
        customer = await self.repo.lock_customer(session, row.customer_id)
        profile = ProfileSnapshot.model_validate(customer.profile)
        if row.status == "held_quiet_hours" or (row.expires_at and row.expires_at <= now):
            # The window opened: consent, caps and quiet hours are checked again, now.
            caps = await self.caps(session)
            context = await self._context(session, row.customer_id, profile, caps, duplicate=False)
            # Its own hold must not count against itself.
            context = _without(context, row.id, row)
            decision = recheck_at_send(_candidate_of(row), context, now)
            if decision.status != MessageStatus.QUEUED:
                await self._settle(
                    session, row, decision.status.value, decision.reason, now, send_at=decision.send_at
                )
                return SendOutcome(row.id, decision.status.value, decision.reason)
        if self.providers.get(Channel(row.channel)) is None:
            await self._settle(session, row, "failed", f"no provider for {row.channel}", now)
            return SendOutcome(row.id, "failed", "no provider")
        try:
            outgoing = self._outgoing(row, profile)
        except Exception as exc:  # noqa: BLE001 - a template that cannot render fails this message only
            await self._settle(session, row, "failed", f"render failed: {type(exc).__name__}: {exc}", now)
            return SendOutcome(row.id, "failed", "render failed")
        await self.repo.update_message(
            session,
            row.id,
            status="sending",
            attempts=row.attempts + 1,
            updated_at=now,
            content={"subject": outgoing.subject, "text": outgoing.text, "to": outgoing.to},
        )
        return row, outgoing

    async def _provider_call(self, row: Any, outgoing: OutgoingMessage) -> ProviderResult | ProviderError:
        provider = self.providers[Channel(row.channel)]
        started = self.clock()
        try:
            result = await send_with_retry(
                provider, outgoing, self.limiter, max_attempts=self.settings.messenger_max_attempts
            )
        except ProviderError as exc:
            PROVIDER_CALLS.labels(provider.name, row.channel, "error").inc()
            return exc
        finally:
            PROVIDER_SECONDS.labels(provider.name).observe((self.clock() - started).total_seconds())
        PROVIDER_CALLS.labels(provider.name, row.channel, "ok").inc()
        return result

    async def _record(self, session: Any, row: Any, result: ProviderResult | ProviderError) -> SendOutcome:
        now = self.clock()
        if isinstance(result, ProviderError):
            await self._settle(
                session,
                row,
                "failed",
                f"{result.provider} {result.code}: {result.message}",
                now,
                error_code=result.code,
            )
            if result.suppress_address:
                source = FactSource.PROVIDER_21610 if result.code == "21610" else FactSource.BOUNCE
                await self._opt_out(session, row.customer_id, Channel(row.channel), source, now)
            return SendOutcome(row.id, "failed", result.code)
        await self._settle(
            session,
            row,
            "sent",
            f"handed to {result.provider}",
            now,
            provider=result.provider,
            provider_message_id=result.provider_message_id,
        )
        return SendOutcome(row.id, "sent", None)

    def _outgoing(self, row: Any, profile: ProfileSnapshot) -> OutgoingMessage:
        channel = Channel(row.channel)
        template = self.templates.resolve(row.template or row.journey, channel, profile.locale)
        details = row.details or {}
        unsubscribe = unsubscribe_url(
            self.settings.messenger_public_url,
            self.settings.messenger_link_secret.get_secret_value(),
            row.customer_id,
            channel.value,
        )
        variables = build_variables(
            profile,
            details.get("trigger") or {},
            locale=profile.locale,
            unsubscribe_url=unsubscribe,
            survey_url=f"{self.settings.messenger_public_url.rstrip('/')}/s/{row.id}",
            offer_code=_offer_code(row) if details.get("offer") else None,
            personal_contact={"name": "Dana", "phone": "+972 3 555 0100"}
            if details.get("escalated")
            else None,
        )
        rendered = render(template, variables, strict=False, kind=MessageKind(row.kind))
        address = {
            Channel.EMAIL: profile.email,
            Channel.SMS: profile.phone,
            Channel.WHATSAPP: profile.whatsapp,
        }[channel]
        senders = {
            Channel.EMAIL: self.settings.email_from,
            Channel.SMS: self.settings.twilio_sms_from or "Retain",
            Channel.WHATSAPP: self.settings.twilio_whatsapp_from or "Retain",
        }
        headers = {"List-Unsubscribe": f"<{unsubscribe}>"} if channel == Channel.EMAIL else {}
        return OutgoingMessage(
            message_id=row.id,
            channel=channel,
            to=address or "",
            from_=senders[channel],
            text=rendered.text,
            created_at=row.created_at,
            subject=rendered.subject,
            html=rendered.html,
            locale=rendered.lang,
            headers=headers,
            content_sid=rendered.content_sid if row.whatsapp_mode == "template" else None,
            content_variables=rendered.content_variables or None,
        )

    async def reconcile(self) -> int:
        """Messages left 'sending' by a crash between the provider call and the commit are
        looked up at the provider and settled, not sent again blindly."""
        now = self.clock()
        before = now - timedelta(seconds=self.settings.messenger_reconcile_after_s)
        async with self.db.sessions() as session:
            stuck = await self.repo.stuck_sending(session, before, 100)
        settled = 0
        for row in stuck:
            provider = self.providers.get(Channel(row.channel))
            if provider is None:
                continue
            async with self.db.sessions() as session:
                customer = await self.repo.lock_customer(session, row.customer_id)
            profile = ProfileSnapshot.model_validate(customer.profile)
            try:
                found = await provider.lookup(self._outgoing(row, profile))
            except ProviderError as exc:
                log.warning("reconcile lookup failed", message_id=row.id, error=exc.code)
                continue
            async with self.db.transaction() as session:
                current = await self.repo.message(session, row.id, for_update=True)
                if current is None or current.status != "sending":
                    continue
                if found is not None:
                    await self._settle(
                        session,
                        current,
                        "sent",
                        f"found at {found.provider} after a restart",
                        now,
                        provider=found.provider,
                        provider_message_id=found.provider_message_id,
                    )
                else:
                    # Not there: the call never reached the provider. Queue it again; the
                    # same ledger id keeps it one message.
                    await self.repo.update_message(
                        session, row.id, status="queued", updated_at=now, reason="requeued by reconciliation"
                    )
            settled += 1
        if settled:
            await self.flush()
        return settled

    async def _settle(
        self, session: Any, row: Any, status: str, reason: str | None, now: datetime, **values: Any
    ) -> None:
        extra = {}
        if status == "sent":
            extra["sent_at"] = now
        await self.repo.update_message(
            session, row.id, status=status, reason=reason, updated_at=now, **extra, **values
        )
        current = await self.repo.message(session, row.id)
        await self._publish(session, [self._event(current, MessageStatus(status), reason, now)])

    # --- provider callbacks ----------------------------------------------------------------------

    async def provider_status(
        self, provider_message_id: str, provider_status: str, error_code: str | None
    ) -> bool:
        """A status callback; False when it would move the message backwards (ignored)."""
        now = self.clock()
        status = ours(provider_status)
        async with self.db.transaction() as session:
            row = await self.repo.message_by_provider_id(session, provider_message_id)
            if row is None or status is None:
                return False
            current = (row.details or {}).get("provider_status", row.status)
            if not advances(current, provider_status):
                return False
            details = {**(row.details or {}), "provider_status": provider_status}
            await self.repo.update_message(session, row.id, details=details, updated_at=now)
            if status != row.status:
                await self._settle(
                    session, row, status, f"provider: {provider_status}", now, error_code=error_code
                )
        await self.flush()
        return True

    async def inbound(self, channel: Channel, from_address: str, body: str, kind: str | None) -> str | None:
        """An inbound SMS/WhatsApp: STOP/START change consent; anything else is a reply."""
        now = self.clock()
        address = from_address.removeprefix("whatsapp:")
        async with self.db.transaction() as session:
            customer_id = await self.repo.customer_by_address(session, channel.value, address)
            if customer_id is None:
                return None
            if channel == Channel.WHATSAPP:
                await self.repo.set_whatsapp_inbound(session, customer_id, now)
            if kind == "stop":
                await self._opt_out(session, customer_id, channel, FactSource.STOP, now)
            elif kind == "start":
                await self.repo.add_consent_fact(
                    session, customer_id, channel.value, now, True, FactSource.START.value, False
                )
            last = await self.repo.last_message_to(session, customer_id, channel.value)
            if last is not None and kind is None:
                await self._publish(
                    session,
                    [
                        self._event(
                            last, MessageStatus.REPLIED, "the customer answered", now, seq=now.isoformat()
                        )
                    ],
                )
        await self.flush()
        return customer_id

    async def unsubscribe(
        self, customer_id: str, channel: Channel, source: FactSource = FactSource.UNSUBSCRIBE_LINK
    ) -> None:
        async with self.db.transaction() as session:
            await self._opt_out(session, customer_id, channel, source, self.clock())
        await self.flush()

    async def email_event(self, address: str, event: str, message_id: str | None) -> None:
        """SendGrid event webhook: bounces, spam reports and unsubscribes suppress the address."""
        sources = {
            "bounce": FactSource.BOUNCE,
            "dropped": FactSource.BOUNCE,
            "spamreport": FactSource.SPAM_REPORT,
            "unsubscribe": FactSource.UNSUBSCRIBE_LINK,
            "group_unsubscribe": FactSource.UNSUBSCRIBE_LINK,
        }
        now = self.clock()
        async with self.db.transaction() as session:
            customer_id = await self.repo.customer_by_address(session, "email", address)
            if customer_id is not None and event in sources:
                await self._opt_out(session, customer_id, Channel.EMAIL, sources[event], now)
            if message_id and event in ("delivered", "click", "open"):
                row = await self.repo.message(session, message_id)
                if row is not None and event == "delivered" and row.status == "sent":
                    await self._settle(session, row, "delivered", "provider: delivered", now)
                elif row is not None and event == "click":
                    await self._publish(
                        session,
                        [self._event(row, MessageStatus.CLICKED, "link clicked", now, seq=now.isoformat())],
                    )
        await self.flush()

    async def _opt_out(
        self, session: Any, customer_id: str, channel: Channel, source: FactSource, now: datetime
    ) -> None:
        await self.repo.add_consent_fact(
            session,
            customer_id,
            channel.value,
            now,
            False,
            source.value,
            source == FactSource.UNSUBSCRIBE_LINK,
        )
        UNSUBSCRIBES.labels(channel.value, source.value).inc()
        await self._publish(
            session,
            [
                MessageEvent(
                    event_id=f"optout:{customer_id}:{channel.value}:{now.isoformat()}",
                    customer_id=customer_id,
                    occurred_at=now,
                    message_id=f"optout:{customer_id}",
                    journey="-",
                    kind=MessageKind.MARKETING,
                    status=MessageStatus.UNSUBSCRIBED,
                    reason=source.value,
                    channel=channel,
                )
            ],
        )

    # --- publishing ------------------------------------------------------------------------------

    def _event(
        self,
        row: Any,
        status: MessageStatus,
        reason: str | None,
        now: datetime,
        *,
        seq: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> MessageEvent:
        suffix = f":{seq}" if seq else ""
        return MessageEvent(
            event_id=f"{row.id}:{status.value}{suffix}",
            customer_id=row.customer_id,
            occurred_at=now,
            message_id=row.id,
            journey=row.journey,
            kind=MessageKind(row.kind),
            status=status,
            reason=reason,
            channel=Channel(row.channel) if row.channel else None,
            template=row.template,
            locale=row.locale,
            tier=row.tier,
            provider=row.provider,
            provider_message_id=row.provider_message_id,
            error_code=row.error_code,
            triggered_by=row.trigger_event_id,
            holdout=status == MessageStatus.HOLDOUT,
            details={k: v for k, v in (extra or {}).items() if v is not None},
        )

    async def _publish(self, session: Any, events: Sequence[MessageEvent]) -> None:
        await enqueue(
            session,
            outbox,
            [OutboundRecord(self.topic, encode_key(e.customer_id), encode(e)) for e in events],
        )

    async def flush(self) -> None:
        """Publish what the outbox table holds. With the broker away, the rows wait there for
        the next flush: sending to customers does not stop because Kafka is down."""
        if self.relay is None:
            return
        try:
            await self.relay.flush()
        except BrokerUnavailableError as exc:
            log.warning("outcomes wait in the outbox: Kafka unreachable", error=str(exc)[:200])

    async def tick(self) -> None:
        await self.fire_waits()
        await self.flush()

    # --- the API's reads and writes ------------------------------------------------------------------

    async def list_messages(self, **filters: Any) -> list[dict[str, Any]]:
        async with self.db.sessions() as session:
            return [dict(r._mapping) for r in await self.repo.list_messages(session, **filters)]

    async def get_caps(self) -> tuple[CapsConfig, datetime | None, str | None]:
        async with self.db.sessions() as session:
            row = await self.repo.setting(session, "caps")
        if row is None:
            return DEFAULT_CAPS, None, None
        return CapsConfig.model_validate(row.value), row.updated_at, row.updated_by

    async def put_caps(self, caps: CapsConfig, actor: str) -> None:
        async with self.db.transaction() as session:
            await self.repo.put_setting(session, "caps", caps.model_dump(mode="json"), actor, self.clock())

    async def refresh_gauges(self) -> None:
        async with self.db.sessions() as session:
            counts = await self.repo.count_by_status(session)
            oldest_created, earliest_window = await self.repo.oldest_held(session)
        now = self.clock()
        HELD.set(counts.get("held_quiet_hours", 0))
        HELD_OLDEST_AGE.set((now - oldest_created).total_seconds() if oldest_created else 0.0)
        HELD_OVERDUE.set(max(0.0, (now - earliest_window).total_seconds()) if earliest_window else 0.0)


def snapshot_facts_of(profile: ProfileSnapshot) -> dict[str, Any]:
    return {
        "tier": profile.tier,
        "segments": list(profile.segments),
        "lifecycle_stage": profile.lifecycle_stage,
        "churn_reason": profile.churn_reason.value if profile.churn_reason else None,
        "churned_at": profile.churned_at,
        "orders_count": profile.orders_count,
        "total_value": float(profile.total_value),
        "last_purchase_at": profile.last_purchase_at,
        "open_tickets": profile.open_tickets,
        "last_complaint_resolved": profile.last_complaint_resolved,
        "predicted_clv": None if profile.predicted_clv is None else float(profile.predicted_clv),
        "p_alive": profile.p_alive,
        "locale": profile.locale,
        "preferred_channel": profile.preferred_channel.value if profile.preferred_channel else None,
        "has_email": profile.email is not None,
        "has_phone": profile.phone is not None,
        "has_whatsapp": profile.whatsapp is not None,
    }


def _offer_code(row: Any) -> str:
    return "BACK-" + str(row.id).replace("-", "")[:8].upper()


def _without(context: DecisionContext, message_id: str, row: Any) -> DecisionContext:
    own_at = row.sent_at or row.send_at or row.created_at
    history = [
        h
        for h in context.history
        if not (h.at == own_at and h.journey == row.journey and h.channel.value == row.channel)
    ]
    del message_id
    return replace(context, history=history)
