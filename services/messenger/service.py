"""The messenger's use cases: journeys → decisions (consumer), sending and reconciling
(sender), provider callbacks and the API. Transactions begin and end here; SQL lives in the
repository; every decision lives in a pure module (journeys, decision, consent, caps, quiet,
status, templates)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

from prometheus_client import Counter, Gauge, Histogram

from services.messenger.caps import DEFAULT_CAPS, CapsConfig, SentRecord
from services.messenger.channels import NO_TEMPLATE, WhatsAppMode, whatsapp_window_open
from services.messenger.config import MessengerSettings
from services.messenger.consent import MARKETING_ONLY_SOURCES, ConsentFact, FactSource, active_opt_outs
from services.messenger.decision import NO_CHANNEL_STATUS, Candidate, DecisionContext, decide, recheck_at_send
from services.messenger.journeys import (
    Entry,
    Journey,
    default_journeys,
    holds,
    message_key,
    next_attempt_at,
    reentry_allowed,
    schedule,
    snapshot_facts,
    triggered,
    validate_journey,
)
from services.messenger.links import survey_token, unsubscribe_url
from services.messenger.pages import SurveyState
from services.messenger.providers.base import OutgoingMessage, Provider, ProviderError, ProviderResult
from services.messenger.providers.ratelimit import SenderRateLimiter
from services.messenger.providers.retry import send_with_retry
from services.messenger.quiet import QuietHours, customer_zone, region_zones
from services.messenger.repository import DUE, MessengerRepository, lookup_form
from services.messenger.status import EmailEvent, advances, email_outcome, ours
from services.messenger.tables import applied_events, outbox
from services.messenger.templates import (
    OPT_OUT_REQUIRED,
    Template,
    TemplateNotFoundError,
    TemplateRenderError,
    TemplateStore,
    approved_content_sid,
    build_variables,
    formatting_locale,
    in_language,
    render,
    shows_opt_out,
)
from shared.codec import content_etag, encode, encode_key
from shared.conditions import unknown_hint
from shared.db import Database, claim_events
from shared.errors import InvalidInputError
from shared.events import (
    ADDRESS_FIELD,
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
from shared.outbox import OutboxRelay, Staged, enqueue, stage_or_enqueue
from shared.topics import MESSAGES

log = get_logger(__name__)

DECISIONS = Counter(
    "retain_messenger_decisions_total", "Message decisions, by journey and outcome.", ["journey", "status"]
)
PROVIDER_CALLS = Counter(
    "retain_messenger_provider_calls_total",
    "Provider calls by provider, channel and result (after retries): ok; error (the message "
    "failed); deferred (the provider said when to come back, a rate limit's Retry-After longer "
    "than a call waits: the message is queued again until then).",
    ["provider", "channel", "result"],
)
PROVIDER_SECONDS = Histogram(
    "retain_messenger_provider_seconds",
    "Provider call latency (including retries).",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Set by refresh_gauges, which the API (on /readyz) and the sender (every pass) run; registered
# by those processes only (``shared.metrics.expose``): the consumer would export zeros.
HELD = Gauge(
    "retain_messenger_held_messages",
    "Messages held for quiet hours, waiting for their window.",
    registry=None,
)
HELD_OLDEST_AGE = Gauge(
    "retain_messenger_held_oldest_age_seconds",
    "Age of the oldest message held for quiet hours (0: none).",
    registry=None,
)
HELD_OVERDUE = Gauge(
    "retain_messenger_held_overdue_seconds",
    "How long ago the earliest window of a still-held message opened (0: none is past its window).",
    registry=None,
)
UNHAPPY_WAITING = Gauge(
    "retain_messenger_unhappy_answers_waiting",
    "Survey answers of 1 or 2 out of 5 that nobody has followed up yet (PUT /v1/surveys/{id}/follow-up).",
    registry=None,
)
UNHAPPY_OLDEST_AGE = Gauge(
    "retain_messenger_unhappy_answers_oldest_age_seconds",
    "How long the oldest survey answer of 1 or 2 not followed up has waited (0: none waits).",
    registry=None,
)
REPLIES_WAITING = Gauge(
    "retain_messenger_replies_waiting",
    "What customers wrote back that nobody has followed up yet (PUT /v1/replies/{id}/follow-up).",
    registry=None,
)
REPLIES_OLDEST_AGE = Gauge(
    "retain_messenger_replies_oldest_age_seconds",
    "How long the oldest reply not followed up has waited (0: none waits).",
    registry=None,
)
REFRESHED_GAUGES = (
    HELD,
    HELD_OLDEST_AGE,
    HELD_OVERDUE,
    UNHAPPY_WAITING,
    UNHAPPY_OLDEST_AGE,
    REPLIES_WAITING,
    REPLIES_OLDEST_AGE,
)
FollowUpAction = Literal["followed_up", "amended", "taken_back"]
# What support follows up: the survey answers (by their message's id) and the replies.
Inbox = Literal["survey", "reply"]


@dataclass(frozen=True, slots=True)
class Inbound:
    """What an inbound message was taken as: its customer (None: no customer has the number)
    and what it asked ("stop", "start", "help"; None: an answer)."""

    customer_id: str | None
    intent: str | None


# Free text on WhatsApp only while the customer's window stays open this much longer: our time
# of their last message is when its webhook reached us, a little after WhatsApp's own.
FREEFORM_MARGIN = timedelta(minutes=5)
# The answers support calls back: the dissatisfied, as the kpi's CSAT counts them (1 or 2 of 5).
CALL_BACK_MAX_SCORE = 2
CAP_HITS = Counter("retain_messenger_cap_hits_total", "Messages stopped by a frequency cap.", ["journey"])
UNSUBSCRIBES = Counter(
    "retain_messenger_unsubscribes_total", "Opt-outs recorded, by channel and source.", ["channel", "source"]
)

Clock = Callable[[], datetime]
# How long a message for a customer without any known address waits for their profile.
PROFILE_GRACE = timedelta(minutes=10)
# A queued message the sender claims later than this after its decision is checked again
# (consent, caps, quiet hours): normally the sender takes it within seconds.
RECHECK_QUEUED_AFTER = timedelta(seconds=60)
# How long an inbound message's sid is kept against a second delivery of it. Twilio retries
# within minutes; a replay by someone who kept a signed request months is what the rest of
# this bounds (each sid is one row: a customer's every message, for ever, would not be).
INBOUND_KEPT = timedelta(days=90)
# A reply as kept (WhatsApp's longest message; an SMS is at most 1,600 characters), and as its
# 'replied' event carries it (an event's detail is a string of at most 500).
MAX_REPLY_CHARS = 4096
MAX_DETAIL_CHARS = 500


def utcnow() -> datetime:
    return datetime.now(UTC)


def _candidate_of(row: Any) -> Candidate:
    """The candidate a ledger row was decided from, on its own channel (the recheck at send
    time: it goes by the channel it was rendered for or not at all)."""
    return Candidate(
        message_key=row.idempotency_key,
        customer_id=row.customer_id,
        journey=row.journey,
        kind=MessageKind(row.kind),
        template=row.template or row.journey,
        triggered_at=row.created_at,
        channel=Channel(row.channel),
        ttl=(row.expires_at - row.created_at) if row.expires_at else None,
    )


def _answer_out(row: Any) -> dict[str, Any]:
    """A survey answer or a reply as the API gives it: with who wrote it and support's follow-up."""
    answer = dict(row._mapping)
    stored = answer.pop("customer_profile")
    answer["customer"] = None if stored is None else ProfileSnapshot.model_validate(stored)
    at, by, note = answer.pop("followed_up_at"), answer.pop("followed_up_by"), answer.pop("follow_up_note")
    history = answer.pop("follow_up_history") or []
    agent = _follow_up_agent(history)
    answer["follow_up"] = None if at is None else {"at": at, "by": by, "note": note, "agent": agent}
    answer["follow_up_history"] = history
    return answer


def _follow_up_agent(history: Sequence[Mapping[str, Any]] | None) -> str | None:
    """Who, as support named them, made the follow-up in force: its history's last entry's."""
    return (history or [{}])[-1].get("agent")


@dataclass(slots=True)
class _Memo:
    customer: Any
    history: list[SentRecord]
    facts: list[ConsentFact]
    entries: dict[str, datetime]


@dataclass
class _Batch:
    """What the decisions of one transaction read (``_load``) and will write (``_write``),
    kept current in memory as they are made, so that each sees those before it."""

    memos: dict[str, _Memo]  # per customer deciding
    ledger: dict[str, Any]  # idempotency key → ledger row, stored or decided in this batch
    waits: defaultdict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    entries: dict[tuple[str, str], tuple[datetime, int]] = field(default_factory=dict)
    new_waits: list[dict[str, Any]] = field(default_factory=list)
    changed_waits: list[dict[str, Any]] = field(default_factory=list)  # id and the columns to set
    new_messages: list[dict[str, Any]] = field(default_factory=list)
    events: list[MessageEvent] = field(default_factory=list)

    def record_entry(self, customer_id: str, journey: str, at: datetime) -> None:
        """(customer, journey) → (the last entry, how many this batch made)."""
        _, count = self.entries.get((customer_id, journey), (at, 0))
        self.entries[customer_id, journey] = (at, count + 1)

    def add_wait(self, wait: dict[str, Any]) -> None:
        self.new_waits.append(wait)
        self.waits[wait["customer_id"]].append(wait)

    def close_wait(self, wait: dict[str, Any], status: str, reason: str | None) -> None:
        self._change_wait(wait, status=status, reason=reason)

    def move_wait(self, wait: dict[str, Any], due: datetime) -> None:
        self._change_wait(wait, due_at=due)

    def _change_wait(self, wait: dict[str, Any], **columns: Any) -> None:
        wait.update(columns)
        if not any(w is wait for w in self.new_waits):  # a new one is inserted as it ends up
            self.changed_waits.append({"id": wait["id"], **columns})


class _Recheck(NamedTuple):
    """What the claim's check of a message that waited says: it goes now (``status`` None) or is
    settled with ``status`` (``send_at``: held again until then); ``moved``: the channel (and
    WhatsApp mode) it goes or waits by, when not its own."""

    status: str | None = None
    reason: str = ""
    outcome: str = ""
    send_at: datetime | None = None
    # The channel (and WhatsApp mode) it goes or waits by, when not its own, and why.
    moved: tuple[Channel, WhatsAppMode | None, str] | None = None

    def moves(self, row: Any) -> dict[str, Any]:
        """The ledger row's new values for a move: the channel, and in its details why (the
        reason of a message sent is the provider's)."""
        if self.moved is None:
            return {}
        channel, mode, why = self.moved
        return {
            "channel": channel.value,
            "whatsapp_mode": mode,
            "details": {**(row.details or {}), "moved": why},
        }


class _Row:
    """A ledger row as written, without reading it back."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)

    @property
    def _mapping(self) -> dict[str, Any]:
        return self.__dict__


class _SendPass:
    """One ``send_due``: ``messenger_send_concurrency`` workers, each taking a claimed message,
    calling its provider and settling the result. One transaction at a time (SQLite has one
    writer anyway; on PostgreSQL a claim never waits on a settle's locks), and few of them:
    a settle commits every result that arrived meanwhile, and claims the next two chunks in
    the same transaction when fewer than a chunk are left to hand out."""

    def __init__(
        self,
        service: MessengerService,
        due: list[str],
        outcomes: list[SendOutcome],
        chunk: int,
        transactions: asyncio.Lock,
    ):
        self.service = service
        self.due = due
        self.outcomes = outcomes
        self.chunk = chunk
        self.claimed_upto = 0  # due[:claimed_upto] were claimed
        # Claimed, not yet handed out, with when each was claimed (its 'sending' row's updated_at).
        self.ready: deque[tuple[Any, OutgoingMessage, datetime]] = deque()
        self.results: list[tuple[Any, ProviderResult | ProviderError]] = []
        self.received = 0  # results handed to _settle so far…
        self.settled = 0  # …and the first this many of them are committed
        self.transactions = transactions  # shared by the passes of one send_due
        self.unsettled = asyncio.Semaphore(4 * chunk)  # results waiting for their settle, slots freed
        self._tasks: asyncio.TaskGroup

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as workers:
                self._tasks = workers
                for _ in range(min(self.chunk, len(self.due))):
                    workers.create_task(self._work())
        except BaseExceptionGroup as errors:
            # One error, as a single send raises it: the sender retries a database or broker
            # outage and stops on anything else.
            raise errors.exceptions[0] from None

    async def _work(self) -> None:
        while (item := await self._next()) is not None:
            row, outgoing, claimed_at = item
            if not self.service._may_start(claimed_at):
                # Waited so long in this pass that the call could outlast the moment another
                # sender's reconciliation may take the row: left 'sending' for it, as a crash
                # would leave it (looked up, then queued again), rather than sent twice.
                continue
            result = await self.service._provider_call(row, outgoing)
            if self.service._can_look_up(row):
                # After a crash the reconciler finds this one at the provider instead of
                # sending it again: the slot takes its next message while the result waits
                # for the next settle (a bounded number of them, so a crash leaves a bounded
                # number to look up).
                await self.unsettled.acquire()
                self._tasks.create_task(self._settle_released(row, result))
            else:
                await self._settle(row, result)

    async def _settle_released(self, row: Any, result: ProviderResult | ProviderError) -> None:
        try:
            await self._settle(row, result)
        finally:
            self.unsettled.release()

    async def _next(self) -> tuple[Any, OutgoingMessage, datetime] | None:
        while not self.ready:
            if self.claimed_upto >= len(self.due):
                return None
            async with self.transactions:
                if not self.ready and self.claimed_upto < len(self.due):
                    async with self.service.db.transaction() as session:
                        await self._claim_next(session)
        return self.ready.popleft()

    async def _claim_next(self, session: Any) -> None:
        # Two chunks: claimed messages not yet handed to a provider cost nothing but a delay
        # after a crash (the reconciler finds them not sent, and queues them again).
        ids = self.due[self.claimed_upto : self.claimed_upto + 2 * self.chunk]
        self.claimed_upto += len(ids)
        # Stamped now, not at the pass's start: reconciliation reads the age of a claim.
        now = self.service.clock()
        claimed, outcomes = await self.service._claim(session, ids, now)
        self.ready.extend((row, outgoing, now) for row, outgoing in claimed)
        self.outcomes += outcomes

    async def _settle(self, row: Any, result: ProviderResult | ProviderError) -> None:
        """Returns once the result is committed: with every result that arrived meanwhile, by
        whichever worker got the transaction first. A worker whose provider cannot be asked
        afterwards takes its next message only then, so at most ``chunk`` of its messages are
        ever handed over and not settled (see ``_work`` for the others)."""
        self.results.append((row, result))
        self.received += 1
        ticket = self.received
        async with self.transactions:
            if ticket <= self.settled:
                return
            results, self.results, self.settled = self.results, [], self.received
            async with self.service.db.transaction() as session:
                self.outcomes += await self.service._record(session, results)
            # The next claim in a transaction of its own: it locks customers in id order, which
            # after the settle's (an address suppressed) could meet a consumer's batch holding
            # them the other way round (PostgreSQL deadlock: the settle rolled back, its
            # messages left 'sending').
            if len(self.ready) < self.chunk and self.claimed_upto < len(self.due):
                async with self.service.db.transaction() as session:
                    await self._claim_next(session)


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
        self.templates = TemplateStore(public_url=settings.messenger_public_url, brand=settings.brand)
        # The channels the sender's providers cannot really reach while others can: decisions
        # try them last (the consumer decides for the sender's providers, built from the same
        # settings by providers.registry).
        self.last_resort = settings.sandboxed_last
        self._journeys: tuple[datetime | None, list[Journey]] = (None, [])
        self._caps: tuple[datetime | None, CapsConfig] = (None, DEFAULT_CAPS)
        self._templates_at: datetime | None = None
        self._zones: dict[tuple[str | None, str | None], ZoneInfo] = {}
        self._jitter = random.Random()  # noqa: S311 - retry jitter, not security (one, not one per call)

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
            store = await self.load_template_overrides(session)
            journeys = await self.journeys(session)
        self._warn_of_saved_settings(store, journeys)
        for key, count in store.long_sms():
            log.warning(
                "an SMS template goes in more segments than it was written for with this public URL "
                "and brand name: shorten RETAIN_MESSENGER_PUBLIC_URL, RETAIN_MESSENGER_BRAND_NAME or "
                "the template",
                template=str(key),
                segments=count.segments,
                characters=count.units,
                encoding=count.encoding,
                messenger_public_url=self.settings.messenger_public_url,
                messenger_brand_name=self.settings.messenger_brand_name,
            )

    def _warn_of_saved_settings(self, store: TemplateStore, journeys: Sequence[Journey]) -> None:
        """Template overrides and journeys saved under an earlier release's checks that fail
        today's, said at start, per one. An override's messages fail (a marketing journey's
        template saved as transactional: no opt-out) or go longer than written; a journey runs
        as it is, but saving it again, even unchanged, is refused; until they are corrected."""
        for journey in journeys:
            refused = validate_journey(journey.model_dump(mode="json"), templates=store.journeys())
            if refused:
                log.warning(
                    "a saved journey fails today's checks: correct it before its next edit",
                    journey=journey.name,
                    problems=[f"{e.path}: {e.message}" for e in refused][:20],
                )
        offering = sorted(j.name for j in journeys if j.enabled and j.offer_if is not None)
        if offering and not self.settings.messenger_offer_value:
            # The code is made and published for the shop either way; what it gives is the
            # shop's to say, and the customer reads a bare code until it does.
            log.warning(
                "a journey grants offer codes, and RETAIN_MESSENGER_OFFER_VALUE does not say what they "
                "give: its messages show a bare code",
                journeys=offering,
            )
        marketing = {j.template for j in journeys if j.kind is MessageKind.MARKETING}
        for key in store.keys():  # noqa: SIM118 - a list, not a dict
            template = store.get(key)
            if template is None or not store.is_overridden(key):
                continue
            problems = [f"{e.path}: {e.message}" for e in store.validate(template)]
            if template.kind is not MessageKind.MARKETING and key.journey in marketing:
                # Sent as marketing, it must show how to opt out (email has it in its footer).
                as_sent = store.validate(template.model_copy(update={"kind": MessageKind.MARKETING}))
                if any(e.message == OPT_OUT_REQUIRED for e in as_sent):
                    problems.append(
                        "$.text: a marketing journey sends it, and it shows no way to opt out: "
                        "each message fails"
                    )
            if problems:
                log.warning(
                    "a saved template override fails today's checks: save it again, corrected",
                    template=str(key),
                    problems=problems,
                )

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
            self.templates = TemplateStore(
                overrides, public_url=self.settings.messenger_public_url, brand=self.settings.brand
            )
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
        staged = Staged([], [])
        async with self.db.transaction() as session:
            claimed = await claim_events(session, applied_events, batch)
            fresh = [d.value for d in claimed.fresh]
            if fresh:
                journeys = [j for j in await self.journeys(session) if j.enabled]
                caps = await self.caps(session)
                # Whether a message can go on WhatsApp outside the window depends on its
                # template (an override may carry an approved template's SID).
                await self.load_template_overrides(session)
                decisions = await self._on_updates(session, fresh, journeys, caps, now)
                staged = await self._stage(session, decisions)
        if self.relay is not None:
            # Publish after commit, from memory, while the next batch is applied: flushing
            # the table here (read, send, wait for the acks, delete) held every batch up.
            await self.relay.after_commit(staged)
        return BatchResult(len(claimed.fresh), claimed.duplicates, claimed.reused)

    async def _on_updates(
        self,
        session: Any,
        updates: Sequence[CustomerUpdate],
        journeys: list[Journey],
        caps: CapsConfig,
        now: datetime,
    ) -> list[MessageEvent]:
        """The updates in their order, with the outcome of applying them one after another, in
        a few statements per batch: customers upserted in one, what the decisions read in one
        per table (``_load``), the decisions made in memory (each sees those before it), and
        what they wrote in one per table (``_write``)."""
        latest: dict[str, CustomerUpdate] = {}
        for update in updates:
            kept = latest.get(update.customer_id)
            if kept is None or kept.occurred_at <= update.occurred_at:
                latest[update.customer_id] = update
        await self.repo.upsert_customers(
            session,
            [
                {
                    "customer_id": customer_id,
                    "profile": update.profile.model_dump(mode="json"),
                    "profile_at": update.occurred_at,
                    "updated_at": now,
                    "email": lookup_form(Channel.EMAIL, update.profile.email) or None,
                    "phone": update.profile.phone,
                    "whatsapp": update.profile.whatsapp,
                }
                for customer_id, update in latest.items()
            ],
        )
        plans = []
        for update in updates:
            facts = snapshot_facts(update)
            entries = [
                (journey, entry)
                for journey in journeys
                for entry in triggered(journey, update)
                if holds(journey.entry, facts, now)
            ]
            plans.append((update, facts, entries))
        batch = await self._load(
            session,
            {u.customer_id for u, _, entries in plans if entries},
            {message_key(u.customer_id, entry) for u, _, entries in plans for _, entry in entries},
            now,
            caps=caps,
            waits_of=latest.keys(),
        )
        for update, facts, entries in plans:
            customer_id = update.customer_id
            self._cancel_waits(batch, update, facts, now, journeys)
            self._wake_waits_for_address(batch, update, now)
            for journey, entry in entries:
                memo = batch.memos[customer_id]
                if not reentry_allowed(journey, memo.entries.get(journey.name), entry.at):
                    continue
                memo.entries[journey.name] = entry.at
                batch.record_entry(customer_id, journey.name, entry.at)
                plan = schedule(journey, entry, facts, update.triggering_events, now)
                if plan.wait_until is not None:
                    self._add_wait(batch, customer_id, entry, plan.wait_until, now)
                    continue
                if plan.ended is not None:  # its wait was over on arrival, and its exit came first
                    continue
                self._decide(batch, customer_id, journey, plan.entry, update.profile, caps, now)
        await self._write(session, batch)
        return batch.events

    @staticmethod
    def _expired(journey: Journey, entry: Entry, now: datetime) -> bool:
        return now - entry.at >= timedelta(hours=journey.ttl_hours)

    @staticmethod
    def _add_wait(batch: _Batch, customer_id: str, entry: Entry, due: datetime, now: datetime) -> None:
        batch.add_wait(
            {
                "id": str(uuid.uuid4()),
                "customer_id": customer_id,
                "journey": entry.journey.name,
                "due_at": due,
                "trigger_event_id": entry.event_id,
                "status": "waiting",
                "reason": None,
                "data": {
                    "key": entry.key,
                    "details": entry.details,
                    "at": entry.at.isoformat(),
                    "attempt": entry.attempt,
                },
                "created_at": now,
            }
        )

    async def _load(
        self,
        session: Any,
        customer_ids: Collection[str],
        keys: Collection[str],
        now: datetime,
        *,
        caps: CapsConfig,
        customers: Mapping[str, Any] | None = None,
        waits_of: Collection[str] = (),
        entries: bool = True,
    ) -> _Batch:
        """What decisions about these customers read, in one statement per table, under the
        customers' row locks (taken here unless ``customers`` holds the locked rows already):
        every decision that counts caps takes them first, so two deciders for one customer
        never both see room under a cap. ``keys``: the idempotency keys that may be decided."""
        if customers is None:
            customers = await self.repo.lock_customers(session, customer_ids)
        history: dict[str, list[SentRecord]] = defaultdict(list)
        since = now - timedelta(days=caps.lookback_days)
        for r in await self.repo.histories(session, customer_ids, since):
            if r.channel:
                history[r.customer_id].append(
                    SentRecord(
                        at=_went_at(r),
                        channel=Channel(r.channel),
                        journey=r.journey,
                        kind=MessageKind(r.kind),
                        message_id=r.id,
                    )
                )
        facts: dict[str, list[ConsentFact]] = defaultdict(list)
        for f in await self.repo.consent_facts_of(session, customer_ids):
            facts[f.customer_id].append(_fact_of(f))
        entered = await self.repo.entries_of(session, customer_ids) if entries else {}
        batch = _Batch(
            memos={
                c: _Memo(customers.get(c), history[c], facts[c], dict(entered.get(c, {})))
                for c in customer_ids
            },
            ledger=await self.repo.messages_by_keys(session, keys),
        )
        for wait in await self.repo.waiting_of(session, waits_of):
            batch.waits[wait.customer_id].append(dict(wait._mapping))
        return batch

    async def _write(self, session: Any, batch: _Batch) -> None:
        await self.repo.record_entries(
            session,
            [
                {"customer_id": customer_id, "journey": journey, "entered_at": at, "count": count}
                for (customer_id, journey), (at, count) in batch.entries.items()
            ],
        )
        await self.repo.add_waits(session, batch.new_waits)
        await self.repo.update_waits(session, batch.changed_waits)
        await self.repo.insert_messages(session, batch.new_messages)

    @staticmethod
    def _cancel_waits(
        batch: _Batch, update: CustomerUpdate, facts: dict[str, Any], now: datetime, enabled: list[Journey]
    ) -> None:
        """Waiting messages whose exit condition now holds, or whose 'unless' happened, end."""
        journeys = {j.name: j for j in enabled}
        types = {e.type for e in update.triggering_events}
        for wait in batch.waits.get(update.customer_id, ()):
            journey = journeys.get(wait["journey"])
            if journey is None or wait["status"] != "waiting":
                continue
            reason = None
            if journey.exited(facts, now):
                reason = "exit condition met"
            elif journey.wait and journey.wait.unless is not None and holds(journey.wait.unless, facts, now):
                reason = "'unless' condition met"
            elif (
                journey.wait and journey.wait.unless_event is not None and journey.wait.unless_event in types
            ):
                reason = f"a {journey.wait.unless_event.value} happened first"
            if reason is not None:
                batch.close_wait(wait, "cancelled", reason)

    @staticmethod
    def _wake_waits_for_address(batch: _Batch, update: CustomerUpdate, now: datetime) -> None:
        """Messages waiting for the customer's contact details (``PROFILE_GRACE``) are due now
        that an update brings some: the next tick decides them, seconds after the profile, not
        when the grace ends. A welcome should not reach a new customer ten minutes late."""
        if not update.profile.has_address:
            return
        for wait in batch.waits.get(update.customer_id, ()):
            awaited = wait["data"].get("details", {}).get("awaited_profile")
            if wait["status"] == "waiting" and awaited and wait["due_at"] > now:
                batch.move_wait(wait, now)

    def _decide(
        self,
        batch: _Batch,
        customer_id: str,
        journey: Journey,
        entry: Entry,
        profile: ProfileSnapshot,
        caps: CapsConfig,
        now: datetime,
    ) -> None:
        memo = batch.memos[customer_id]
        key = message_key(customer_id, entry)
        existing = batch.ledger.get(key)
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
        context = self._context_of(memo, profile, caps, journey.template, duplicate=existing is not None)
        decision = decide(candidate, context, now)
        DECISIONS.labels(journey.name, decision.status.value).inc()
        if decision.status == MessageStatus.DUPLICATE:
            batch.events.append(
                self._event(existing, MessageStatus.DUPLICATE, decision.reason, now, seq="dup")
            )
            return
        if decision.status == MessageStatus.CAPPED:
            CAP_HITS.labels(journey.name).inc()
        unreachable = decision.status in (MessageStatus.NO_ADDRESS, MessageStatus.NO_CONSENT)
        if unreachable and not self._expired(journey, entry, now):
            # The backend topics are consumed independently: a purchase can be applied before
            # the profile that came with it. With no contact details known at all, wait a
            # little for them (once) rather than record a customer we cannot reach. An update
            # with an address wakes the wait (_wake_waits_for_address); if the profile is still
            # not enough for this message (an address without its consent, a phone for an
            # email), the rest of the grace is waited out, as it was before the wake: a message
            # is decided early only when it can go.
            awaited_until = entry.details.get("awaited_until")
            grace_ends = None if awaited_until is None else datetime.fromisoformat(awaited_until)
            first = decision.status == MessageStatus.NO_ADDRESS and not entry.details.get("awaited_profile")
            if first and not profile.has_address:
                until = now + PROFILE_GRACE
                marked = {**entry.details, "awaited_profile": True, "awaited_until": until.isoformat()}
                self._add_wait(batch, customer_id, replace(entry, details=marked), until, now)
                return
            if grace_ends is not None and now < grace_ends:
                self._add_wait(batch, customer_id, entry, grace_ends, now)
                return
        # The next attempt (win-back) waits like the first, so the journey's exits and
        # 'unless' can still end it; it is scheduled whatever became of this one.
        next_due = next_attempt_at(journey, entry.attempt, decision.send_at or now)
        if next_due is not None:
            # Its own wait for an address, if it needs one: this attempt's is over, and a next
            # attempt marked as awaiting one would be woken early by the next address.
            own = {k: v for k, v in entry.details.items() if k not in ("awaited_profile", "awaited_until")}
            following = replace(entry, attempt=entry.attempt + 1, details=own)
            self._add_wait(batch, customer_id, following, next_due, now)
        facts = snapshot_facts_of(profile)
        details: dict[str, Any] = {"trigger": entry.details, "profile": profile.model_dump(mode="json")}
        if journey.offer_if is not None and holds(journey.offer_if, facts, now):
            details["offer"] = True
        escalate = journey.escalate_if is not None and holds(journey.escalate_if, facts, now)
        if escalate:
            details["escalated"] = True
        message_id = str(uuid.uuid4())
        values = {
            "id": message_id,
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
        batch.new_messages.append(values)
        row = _Row(provider=None, provider_message_id=None, error_code=None, **values)
        batch.ledger[key] = row
        if decision.status == MessageStatus.QUEUED and decision.channel is not None:
            memo.history.append(
                SentRecord(
                    at=decision.send_at or now,
                    channel=decision.channel,
                    journey=journey.name,
                    kind=journey.kind,
                    message_id=message_id,
                )
            )
        batch.events.append(self._event(row, decision.status, decision.reason, now))
        if escalate:
            batch.events.append(
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

    def _context_of(
        self, memo: _Memo, profile: ProfileSnapshot, caps: CapsConfig, template: str, *, duplicate: bool
    ) -> DecisionContext:
        customer = memo.customer
        history = list(memo.history)
        facts = list(memo.facts)
        return DecisionContext(
            addresses={channel: profile.address(channel) for channel in Channel},
            consents=dict(profile.consents),
            timezone=self._zone(profile.timezone, profile.locale),
            locale=profile.locale,
            preferred_channel=profile.preferred_channel,
            facts=facts,
            history=history,
            caps=tuple(caps.caps),
            quiet=self.quiet,
            fallback_order=tuple(self.settings.messenger_fallback_order),
            whatsapp_last_inbound_at=customer.whatsapp_inbound_at if customer else None,
            has_whatsapp_template=self._approved_on_whatsapp(template, profile.locale),
            templated=self._templated(template, profile.locale),
            duplicate=duplicate,
            last_resort=self.last_resort,
            quiet_zones=region_zones(profile.timezone, profile.locale),
        )

    def _templated(self, template: str, locale: str | None) -> frozenset[Channel]:
        """The channels ``template`` has a version on for ``locale`` (or a fallback of it)."""
        found: set[Channel] = set()
        for channel in Channel:
            with contextlib.suppress(TemplateNotFoundError):
                self.templates.resolve(template, channel, locale)
                found.add(channel)
        return frozenset(found)

    def _approved_on_whatsapp(self, template: str, locale: str | None) -> bool:
        """Whether the message can go on WhatsApp outside the 24-hour window: its template in
        the customer's language has an approved WhatsApp template (a Content SID)."""
        try:
            found = self.templates.resolve(template, Channel.WHATSAPP, locale)
        except TemplateNotFoundError:
            return False
        return approved_content_sid(found, self.settings.messenger_whatsapp_content_sids) is not None

    def _offer_last_day(self, row: Any) -> tuple[date, datetime] | None:
        """The last day the offer of ``row`` is good (the decision's local day plus the days
        configured, through its end) and the first instant it is not: what the message says and
        what the shop checks agree. From the decision, not the sending, and in the zone of the
        message's locale (the sent event has no profile to read a customer's own zone from), or
        of its region's zones the latest."""
        days = self.settings.messenger_offer_valid_days
        if days is None:
            return None
        zone = self._zone(None, row.locale)
        last = row.created_at.astimezone(zone).date() + timedelta(days=days)
        # A locale whose region has several zones (en-US) names no zone of its own: the offer
        # lasts through the last day in each of them, to its latest midnight. In the business's
        # zone, "valid until December 6" ended at 17:00 in New York that day.
        zones = region_zones(None, row.locale) or (zone,)
        after = last + timedelta(days=1)
        ends = max(datetime.combine(after, clock_time.min, tzinfo=z).astimezone(UTC) for z in zones)
        return last, ends

    def _zone(self, timezone: str | None, locale: str | None) -> ZoneInfo:
        # zoneinfo keeps only the last 8 zones it was asked for that nobody still holds; a batch
        # of customers in many zones would load most from disk again.
        key = (timezone, locale)
        zone = self._zones.get(key)
        if zone is None:
            default = self.settings.messenger_default_timezone
            zone = self._zones[key] = customer_zone(timezone, locale, default)
        return zone

    # --- waits (between consumer batches) ------------------------------------------------------

    async def fire_waits(self, limit: int = 500) -> int:
        """Waits whose time has come become decisions now (their exits were checked on every
        update meanwhile)."""
        now = self.clock()
        async with self.db.transaction() as session:
            journeys = {j.name: j for j in await self.journeys(session)}
            caps = await self.caps(session)
            await self.load_template_overrides(session)
            due = await self.repo.due_waits(session, now, limit)
            customers = await self.repo.lock_customers(session, {w.customer_id for w in due})
            # Read again under the locks: another worker's batch may have cancelled a wait
            # (its unless came true) or moved it since, and committed; fired from the first
            # read, it overwrote 'cancelled' and sent what its journey had called off.
            chosen = {w.id for w in due}
            due = sorted(
                (
                    w
                    for w in await self.repo.waiting_of(session, customers)
                    if w.id in chosen and w.due_at <= now
                ),
                key=lambda w: w.due_at,
            )
            profiles: dict[str, ProfileSnapshot] = {}
            closed: list[dict[str, Any]] = []
            firing: list[tuple[Any, Journey, Entry, ProfileSnapshot]] = []
            for wait in due:
                journey = journeys.get(wait.journey)
                customer = customers.get(wait.customer_id)
                if journey is None or not journey.enabled or customer is None:
                    closed.append(
                        {"id": wait.id, "status": "cancelled", "reason": "journey disabled or removed"}
                    )
                    continue
                profile = profiles.get(wait.customer_id)
                if profile is None:
                    profile = profiles[wait.customer_id] = ProfileSnapshot.model_validate(customer.profile)
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
                if journey.exited(snapshot_facts_of(profile), now):
                    closed.append({"id": wait.id, "status": "cancelled", "reason": "exit condition met"})
                    continue
                closed.append({"id": wait.id, "status": "fired", "reason": None})
                firing.append((wait, journey, entry, profile))
            batch = await self._load(
                session,
                {w.customer_id for w, _, _, _ in firing},
                {message_key(w.customer_id, entry) for w, _, entry, _ in firing},
                now,
                caps=caps,
                customers=customers,
                entries=False,
            )
            batch.changed_waits += closed
            for wait, journey, entry, profile in firing:
                self._decide(batch, wait.customer_id, journey, entry, profile, caps, now)
            await self._write(session, batch)
            await self._publish(session, batch.events)
        if firing:
            await self.flush()
        return len(firing)

    # --- the sender ------------------------------------------------------------------------------

    async def send_due(self, limit: int = 200) -> list[SendOutcome]:
        """Send what is due with ``messenger_send_concurrency`` provider calls in flight (see
        ``_SendPass``). Messages are claimed in one transaction, committed ('sending') before
        any of them goes to a provider; results are settled together, in one transaction for
        every call that ended meanwhile. For a provider that cannot be asked afterwards (SMTP,
        SendGrid), a call's slot is free again only once its result is committed, so a crash
        leaves at most ``messenger_send_concurrency`` messages handed to it and not settled: what
        may go twice. For one that can (the outbox, Twilio), the slot is free at once and the
        result waits for the next settle, at most four times that many: after a crash, the
        reconciler looks each of them up instead of sending it again.

        Each channel gets its own pass and an equal share of the slots: a provider's retries
        sleep in their slot, so with one pool a slow or failing provider would hold every slot
        and the other channels' messages would wait behind it (tests/chaos/test_providers.py)."""
        now = self.clock()
        async with self.db.sessions() as session:
            await self.load_template_overrides(session)
            due = await self.repo.due_messages(session, now, limit)
        by_channel: dict[str | None, list[str]] = {}
        for d in due:
            by_channel.setdefault(d.channel, []).append(d.id)
        outcomes: list[SendOutcome] = []
        if by_channel:
            shares = _shares(self.settings.messenger_send_concurrency, len(by_channel))
            transactions = asyncio.Lock()
            try:
                async with asyncio.TaskGroup() as passes:
                    # With fewer slots than channels due, the channels past them wait for the
                    # next pass (the earliest due first), so the slots in flight stay within it.
                    for ids, share in zip(by_channel.values(), shares, strict=False):
                        passes.create_task(_SendPass(self, ids, outcomes, share, transactions).run())
            except BaseExceptionGroup as errors:
                raise errors.exceptions[0] from None  # as _SendPass.run: one error, as one send
        await self.flush()
        return outcomes

    async def send_one(self, message_id: str) -> SendOutcome | None:
        """Claim (commit 'sending'), call the provider, settle. Never twice: the claim is
        committed before the call, and only a 'queued' or held row can be claimed."""
        async with self.db.transaction() as session:
            claimed, outcomes = await self._claim(session, [message_id], self.clock())
        if outcomes:
            return outcomes[0]
        if not claimed:
            return None  # another sender took it, or it was settled meanwhile
        row, outgoing = claimed[0]
        result = await self._provider_call(row, outgoing)
        async with self.db.transaction() as session:
            [outcome] = await self._record(session, [(row, result)])
        return outcome

    async def _claim(
        self, session: Any, message_ids: Sequence[str], now: datetime
    ) -> tuple[list[tuple[Any, OutgoingMessage]], list[SendOutcome]]:
        """Mark the messages still due 'sending', with what is handed to the provider; those
        that may not go after all (or cannot) are settled with their outcome instead."""
        position = {m: i for i, m in enumerate(message_ids)}
        rows = sorted(await self.repo.claimable(session, message_ids), key=lambda r: position[r.id])
        # Due when this pass listed it, but another sender may have put it back since, until a
        # provider's Retry-After: not before then.
        rows = [r for r in rows if r.send_at is None or r.send_at <= now]
        customers = {r.customer_id: r for r in rows}  # whatsapp_inbound_at and customer_profile
        profiles = {c: ProfileSnapshot.model_validate(r.customer_profile) for c, r in customers.items()}
        # A WhatsApp message whose window closed since its decision, with no approved template,
        # is checked again too: it may go by the next channel (_recheck) rather than fail.
        recheck = {
            r.id
            for r in rows
            if _needs_recheck(r, now)
            or self._whatsapp_mode(
                r, customers[r.customer_id].whatsapp_inbound_at, profiles[r.customer_id], now
            )[1]
        }
        caps, journeys, memos = await self._recheck_inputs(session, [r for r in rows if r.id in recheck], now)
        claimed: list[tuple[Any, OutgoingMessage]] = []
        outcomes: list[SendOutcome] = []
        settled: list[tuple[Any, str, str | None, dict[str, Any]]] = []

        # Rows the recheck moved to another channel: their new values, written however they end.
        moved: dict[str, dict[str, Any]] = {}

        def settle(row: Any, status: str, reason: str, outcome: str | None, **values: Any) -> None:
            settled.append((row, status, reason, {**moved.get(row.id, {}), **values}))
            outcomes.append(SendOutcome(row.id, status, outcome))
            memo = memos.get(row.customer_id)
            if memo is not None and row.status == "queued":
                memo.history = _history_without(memo.history, row)  # it counted until now

        for stored in rows:
            profile = profiles[stored.customer_id]
            memo = memos.get(stored.customer_id) if stored.id in recheck else None
            verdict = None if memo is None else self._recheck(stored, memo, profile, caps, journeys, now)
            row = stored
            if verdict is not None and verdict.moved is not None:
                moved[row.id] = verdict.moves(stored)
                row = _Row(**{**stored._mapping, **moved[row.id]})  # as it goes, or waits, now
            if verdict is not None and verdict.status is not None:
                settle(row, verdict.status, verdict.reason, verdict.outcome, send_at=verdict.send_at)
                continue
            if self.providers.get(Channel(row.channel)) is None:
                settle(row, "failed", f"no provider for {row.channel}", "no provider")
                continue
            # Free text or the approved template as things stand now, not at the decision.
            mode, refusal = self._whatsapp_mode(
                row, customers[row.customer_id].whatsapp_inbound_at, profile, now
            )
            if refusal is not None:
                settle(row, "failed", refusal, "window closed")
                continue
            try:
                outgoing = self._outgoing(row, profile, whatsapp_mode=mode)
            except Exception as exc:  # noqa: BLE001 - a template that cannot render fails this message only
                settle(row, "failed", f"render failed: {type(exc).__name__}: {exc}", "render failed")
                continue
            if memo is not None:
                # Going now, and counted now, against the caps of the messages after it: a held
                # one was not counted yet, and a queued one was at its send time, which after an
                # outage may be a day past, where a day's cap would miss it.
                memo.history = _history_without(memo.history, row)
                memo.history.append(
                    SentRecord(
                        at=now,
                        channel=Channel(row.channel),
                        journey=row.journey,
                        kind=MessageKind(row.kind),
                        message_id=row.id,
                    )
                )
            claimed.append((row, outgoing))
        await self.repo.update_messages(
            session,
            [
                {
                    "id": row.id,
                    **moved.get(row.id, {}),
                    "status": "sending",
                    "attempts": row.attempts + 1,
                    "updated_at": now,
                    "content": _content_of(outgoing),
                    "whatsapp_mode": _whatsapp_mode_of(outgoing),
                }
                for row, outgoing in claimed
            ],
        )
        await self._settle_many(session, settled, now)
        return claimed, outcomes

    async def _recheck_inputs(
        self, session: Any, rows: Sequence[Any], now: datetime
    ) -> tuple[CapsConfig, dict[str, Journey], dict[str, _Memo]]:
        """What the recheck of ``rows`` reads: the caps, the journeys, and their customers'
        memos (histories, consent facts)."""
        if not rows:
            return DEFAULT_CAPS, {}, {}
        caps = await self.caps(session)
        journeys = {j.name: j for j in await self.journeys(session)}
        customers = {r.customer_id: r for r in rows}
        loaded = await self._load(
            session, set(customers), (), now, caps=caps, customers=customers, entries=False
        )
        return caps, journeys, loaded.memos

    def _recheck(
        self,
        row: Any,
        memo: _Memo,
        profile: ProfileSnapshot,
        caps: CapsConfig,
        journeys: Mapping[str, Journey],
        now: datetime,
    ) -> _Recheck:
        """Whether a message that waited may go now, and by which channel; if not, why."""
        journey = journeys.get(row.journey)
        # Pausing or deleting a journey is the marketer's stop: what it held for the morning
        # (a wrong offer, a campaign called off) must not go out at nine.
        if journey is None or not journey.enabled:
            return _Recheck("cancelled", "the journey was paused or deleted before it went", "journey off")
        # A win-back held overnight must not go over the complaint opened meanwhile, nor to a
        # customer who came back (as for a waiting one).
        if journey.exited(snapshot_facts_of(profile), now):
            return _Recheck("cancelled", "the journey's exit condition came true before it went", "exit")
        # Its own record (a queued message that expired) must not count against itself.
        template = row.template or row.journey
        context = _without(self._context_of(memo, profile, caps, template, duplicate=False), row)
        # Is its own channel still usable? It was decided on it: the order that put channels
        # without a provider last must not pass it over for another (that would cancel it).
        context = replace(context, last_resort=frozenset())
        own = Channel(row.channel)
        candidate = _candidate_of(row)
        decision = recheck_at_send(candidate, context, now)
        moved: tuple[Channel, WhatsAppMode | None, str] | None = None
        reason = decision.reason
        if decision.channel is not None and decision.channel is not own:
            why = next((s for s in decision.skipped if s.channel is own), None)
            if why is None or why.reason != "no_template":
                # The customer withdrew its channel (a STOP on SMS, an address removed): the
                # recheck's fallback (email) is not what they were to get; it is not sent.
                status = "no_consent" if why is None else NO_CHANNEL_STATUS[why.reason].value
                detail = f"{own.value} no longer usable" if why is None else why.detail
                return _Recheck(status, detail, detail)
            # The WhatsApp window closed while it waited (held through a night, a sender
            # outage) and there is no approved template: the customer withdrew nothing, and the
            # message goes by the next channel a decision now would choose (rendered at the
            # claim, for the channel it goes by): channels without a provider last again.
            decision = recheck_at_send(candidate, replace(context, last_resort=self.last_resort), now)
            if decision.channel is not None and decision.channel is not own:
                note = f"by {decision.channel.value}, not {own.value}: {why.detail}"
                moved = (decision.channel, decision.whatsapp_mode, note)
                reason = f"{decision.reason}; {note}"
        if decision.status != MessageStatus.QUEUED:
            return _Recheck(decision.status.value, reason, decision.reason, decision.send_at, moved)
        return _Recheck(moved=moved)

    def _whatsapp_mode(
        self, row: Any, inbound_at: datetime | None, profile: ProfileSnapshot, now: datetime
    ) -> tuple[WhatsAppMode | None, str | None]:
        """(how a WhatsApp message goes now, why it cannot): the window may have closed or
        opened since the decision, a template been approved or withdrawn. Free text inside the
        customer's 24-hour window, with a margin (our time of their last message is when its
        webhook reached us, a little after WhatsApp's), else the approved template; free text
        in the window's last minutes when there is none (it is sent within seconds). WhatsApp
        refuses free text outside the window. (None, None) for the other channels."""
        if row.channel != Channel.WHATSAPP.value:
            return None, None
        if whatsapp_window_open(inbound_at, now + FREEFORM_MARGIN):
            return "freeform", None
        if self._approved_on_whatsapp(row.template or row.journey, profile.locale):
            return "template", None
        if whatsapp_window_open(inbound_at, now):
            return "freeform", None
        return None, NO_TEMPLATE

    def _may_start(self, claimed_at: datetime) -> bool:
        """Whether a provider call started now ends (``messenger_send_timeout_s``) before the row
        claimed at ``claimed_at`` is old enough for reconciliation to take it."""
        waited = (self.clock() - claimed_at).total_seconds()
        s = self.settings
        return waited + s.messenger_send_timeout_s < s.messenger_reconcile_after_s

    def _can_look_up(self, row: Any) -> bool:
        return self.providers[Channel(row.channel)].can_look_up

    async def _provider_call(self, row: Any, outgoing: OutgoingMessage) -> ProviderResult | ProviderError:
        provider = self.providers[Channel(row.channel)]
        started = self.clock()
        try:
            # Bounded, so that reconciliation (messenger_reconcile_after_s, longer) never takes
            # a message a sender is still at work on for one a crash left behind.
            async with asyncio.timeout(self.settings.messenger_send_timeout_s):
                result = await send_with_retry(
                    provider,
                    outgoing,
                    self.limiter,
                    max_attempts=self.settings.messenger_max_attempts,
                    rng=self._jitter,
                )
        except TimeoutError:
            seconds = self.settings.messenger_send_timeout_s
            message = f"no answer within {seconds:g} s, retries and pacing included"
            return ProviderError(
                "timeout", message, permanent=False, maybe_delivered=True, provider=provider.name
            )
        except ProviderError as exc:
            return exc  # counted by _record: an error, or deferred to when the provider said
        finally:
            PROVIDER_SECONDS.labels(provider.name).observe((self.clock() - started).total_seconds())
        PROVIDER_CALLS.labels(provider.name, row.channel, "ok").inc()
        return result

    async def _record(
        self, session: Any, results: Sequence[tuple[Any, ProviderResult | ProviderError]]
    ) -> list[SendOutcome]:
        """The providers' answers: 'sent' with the provider's id, or 'failed' with its error
        (and the address suppressed where the error says so)."""
        now = self.clock()
        settled: list[tuple[Any, str, str | None, dict[str, Any]]] = []
        outcomes: list[SendOutcome] = []
        opt_outs: list[tuple[str, Channel, FactSource, str | None]] = []
        later: list[dict[str, Any]] = []
        # The customers whose address an error suppresses, locked first and in id order, as a
        # consumer's batch locks them before their messages (PostgreSQL: no deadlock between).
        suppressing = {
            r.customer_id
            for r, result in results
            if isinstance(result, ProviderError) and result.suppress_address
        }
        await self.repo.lock_customers(session, suppressing)
        # Settled meanwhile by what came after the call: the provider's status callback (Twilio's
        # may come before this, which waits for the next settle; SendGrid's 'delivered') or a
        # reconciliation that found it; or claimed again since (another attempt under way).
        # Written over, 'delivered' went back to 'sent', or a later attempt's row was taken.
        stored = await self.repo.statuses(session, [row.id for row, _ in results])
        for row, result in results:
            status, attempts = stored.get(row.id, (None, None))
            again = status == "sending" and attempts != row.attempts + 1
            if status is not None and (again or (status != "sending" and status not in DUE)):
                outcomes.append(SendOutcome(row.id, status, None))
                continue
            if not isinstance(result, ProviderError):
                values = {"provider": result.provider, "provider_message_id": result.provider_message_id}
                settled.append((row, "sent", f"handed to {result.provider}", values))
                outcomes.append(SendOutcome(row.id, "sent", None))
                continue
            about = {
                "message_id": row.id,
                "channel": row.channel,
                "provider": result.provider,
                "code": result.code,
            }
            send_at = _come_back_at(row, result, now)
            name = self.providers[Channel(row.channel)].name
            PROVIDER_CALLS.labels(name, row.channel, "error" if send_at is None else "deferred").inc()
            if send_at is not None:
                # The provider named when to come back (a rate limit's Retry-After, longer than
                # a call sleeps through): queued again until then, not failed. Still queued to
                # anyone reading retain.messages, so nothing is published.
                log.warning(
                    "message put back", **about, retry_after_s=result.retry_after, claims=row.attempts + 1
                )
                again = (
                    f"{result.provider} {result.code}: again after {send_at.isoformat(timespec='seconds')}"
                )
                later.append(
                    {"id": row.id, "status": "queued", "send_at": send_at, "reason": again, "updated_at": now}
                )
                outcomes.append(SendOutcome(row.id, "queued", result.code))
                continue
            # One line per failure with the provider's code: what on-call reads first when
            # RetainProviderFailureRate fires (credentials, a rate limit, an outage).
            log.warning("message failed", **about, permanent=result.permanent, detail=result.message[:300])
            reason = f"{result.provider} {result.code}: {result.message}"
            settled.append((row, "failed", reason, {"error_code": result.code}))
            if result.suppress_address:
                source = FactSource.PROVIDER_21610 if result.code == "21610" else FactSource.BOUNCE
                opt_outs.append((row.customer_id, Channel(row.channel), source, _address_of(row)))
            outcomes.append(SendOutcome(row.id, "failed", result.code))
        await self.repo.update_messages(session, later)
        await self._settle_many(session, settled, now)
        for customer_id, channel, source, address in opt_outs:
            await self._opt_out(session, customer_id, channel, source, now, address)
        return outcomes

    def _outgoing(
        self, row: Any, profile: ProfileSnapshot, *, whatsapp_mode: str | None = None
    ) -> OutgoingMessage:
        """What the provider is handed for ``row``; ``whatsapp_mode``: how it goes, if not as
        decided (``_whatsapp_mode`` at the claim)."""
        channel = Channel(row.channel)
        mode = whatsapp_mode or row.whatsapp_mode
        template = self.templates.resolve(row.template or row.journey, channel, profile.locale)
        details = row.details or {}
        unsubscribe = unsubscribe_url(
            self.settings.messenger_public_url,
            self.settings.messenger_link_secret.get_secret_value(),
            row.customer_id,
            channel.value,
        )
        s = self.settings
        contact = s.messenger_escalation_contact_name
        variables = build_variables(
            profile,
            details.get("trigger") or {},
            # The template's language formats the amounts and dates: a customer in ru-RU who
            # gets the English template reads English dates, as the preview shows them.
            locale=formatting_locale(profile.locale, template.key.locale),
            unsubscribe_url=unsubscribe,
            survey_url=f"{s.messenger_public_url.rstrip('/')}/s/{survey_token(row.id)}",
            offer_code=_offer_code(row) if details.get("offer") else None,
            offer_value=in_language(s.messenger_offer_value, template.key.locale),
            offer_expires=last[0] if (last := self._offer_last_day(row)) else None,
            personal_contact={"name": contact, "phone": s.messenger_escalation_contact_phone or ""}
            if contact and details.get("escalated")
            else None,
            perks_config=s.messenger_tier_perks,
            tier_names=s.messenger_tier_names,
            can_reply=channel is not Channel.SMS or s.sms_takes_replies,
            opt_out_by_reply=channel is Channel.SMS and s.sms_takes_replies,
            brand=s.brand,
            timezone=self._zone(profile.timezone, profile.locale).key,
        )
        kind = MessageKind(row.kind)
        rendered = render(
            template, variables, strict=False, kind=kind, content_sids=s.messenger_whatsapp_content_sids
        )
        content_variables = rendered.content_variables
        if channel is Channel.WHATSAPP and mode == "template":
            if rendered.content_sid is None:
                # Claimed for the approved template, whose SID was unset since (a reconcile):
                # free text outside the 24-hour window would be refused by WhatsApp.
                key = f"{template.key.journey}.{template.key.locale}"
                raise TemplateRenderError("$.content_sid", f"no approved WhatsApp template for {key}")
            # WhatsApp refuses an empty template parameter (render folds each one to a line).
            empty = sorted(k for k, v in content_variables.items() if not v)
            if empty:
                raise TemplateRenderError(
                    "$.content_variables", f"WhatsApp refuses empty template variables: {', '.join(empty)}"
                )
        if (
            kind is MessageKind.MARKETING
            and (channel is Channel.SMS or (channel is Channel.WHATSAPP and mode != "template"))
            and not shows_opt_out(rendered.text, variables)
        ):
            # The template API checks this when a template is saved; the journey's kind can
            # change afterwards. Email gets the link in its footer and headers whatever the text.
            raise TemplateRenderError("$.text", OPT_OUT_REQUIRED)
        address = profile.address(channel)
        headers = {"List-Unsubscribe": f"<{unsubscribe}>"} if channel == Channel.EMAIL else {}
        return OutgoingMessage(
            message_id=row.id,
            channel=channel,
            to=address or "",
            from_=self._sender(channel),
            text=rendered.text,
            created_at=row.created_at,
            subject=rendered.subject,
            html=rendered.html,
            locale=rendered.lang,
            headers=headers,
            content_sid=rendered.content_sid if mode == "template" else None,
            content_variables=content_variables or None,
        )

    def _sender(self, channel: Channel) -> str:
        return {
            Channel.EMAIL: self.settings.email_from,
            Channel.SMS: self.settings.twilio_sms_from or "Retain",
            Channel.WHATSAPP: self.settings.twilio_whatsapp_from or "Retain",
        }[channel]

    def _as_handed_over(self, row: Any, profile: ProfileSnapshot) -> OutgoingMessage:
        """What the claim handed the provider, from the row's content: rendered then, as the
        provider has it, whatever the templates, the settings or the profile are now (a render
        now could differ, or fail, and the lookup would miss it). Rows claimed before the
        content kept the WhatsApp template are rendered again."""
        content = row.content or {}
        if "text" not in content or (row.whatsapp_mode == "template" and "content_sid" not in content):
            return self._outgoing(row, profile)
        return OutgoingMessage(
            message_id=row.id,
            channel=Channel(row.channel),
            to=content.get("to") or "",
            from_=self._sender(Channel(row.channel)),
            text=content["text"],
            created_at=row.created_at,
            subject=content.get("subject"),
            locale=row.locale or "en",
            content_sid=content.get("content_sid"),
            content_variables=content.get("content_variables"),
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
                found = await provider.lookup(self._as_handed_over(row, profile))
            except ProviderError as exc:
                log.warning("reconcile lookup failed", message_id=row.id, error=exc.code)
                continue
            except (TemplateNotFoundError, TemplateRenderError) as exc:
                # Only for a row claimed before its content was kept whole: left 'sending' (a
                # send cannot be known not to have happened), said every pass, never a crash.
                log.warning("reconcile cannot rebuild the message", message_id=row.id, error=str(exc)[:300])
                continue
            async with self.db.transaction() as session:
                current = await self.repo.message(session, row.id, for_update=True)
                # Claimed again since it was read (another sender requeued and claimed it): the
                # answer is about the attempt before; requeued now, it went twice.
                if current is None or current.status != "sending" or current.attempts != row.attempts:
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
        await self._settle_many(session, [(row, status, reason, values)], now)

    async def _settle_many(
        self, session: Any, settled: Sequence[tuple[Any, str, str | None, Mapping[str, Any]]], now: datetime
    ) -> None:
        """Ledger rows moved to their outcome (row, status, reason, other values), in one
        statement, and the outcomes published."""
        changes: list[dict[str, Any]] = []
        events: list[MessageEvent] = []
        for row, status, reason, values in settled:
            change = {"id": row.id, "status": status, "reason": reason, "updated_at": now, **values}
            if status == "sent":
                change["sent_at"] = now
            changes.append(change)
            current = _Row(**{**row._mapping, **change})
            # The win-back's offer code, for the shop to honour at checkout: it is made here.
            offer = status == "sent" and (row.details or {}).get("offer")
            extra = None
            if offer:
                extra = {"offer_code": _offer_code(row)}
                if (last := self._offer_last_day(row)) is not None:
                    extra |= {"offer_last_day": last[0].isoformat(), "offer_expires_at": last[1].isoformat()}
            events.append(self._event(current, MessageStatus(status), reason, now, extra=extra))
        await self.repo.update_messages(session, changes)
        await self._publish(session, events)

    # --- provider callbacks ----------------------------------------------------------------------

    async def provider_status(
        self,
        provider_message_id: str,
        provider_status: str,
        error_code: str | None,
        message_id: str | None = None,
    ) -> bool:
        """A status callback; False when it would move the message backwards (ignored).
        ``message_id``: ours, which the callback's URL carries (Twilio's StatusCallback)."""
        now = self.clock()
        status = ours(provider_status)
        async with self.db.transaction() as session:
            row = await self.repo.message_by_provider_id(session, provider_message_id)
            if row is None and message_id is not None and status is not None:
                row = await self._sent_before_recorded(session, message_id, provider_message_id, now)
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

    async def _sent_before_recorded(
        self, session: Any, message_id: str, provider_message_id: str, now: datetime
    ) -> Any:
        """The message a callback names by our id, its provider's id not recorded yet: Twilio's
        answer waits for the sender's next settle, and a quick 'failed' (a WhatsApp window, an
        unreachable number) came before it, found nothing and was lost for good. Recorded here
        as the sender would ('sent', with the provider's id), which the sender then leaves."""
        row = await self.repo.message(session, message_id, for_update=True)
        if row is None or row.provider_message_id not in (None, provider_message_id):
            return None
        if row.status != "sending":
            return row if row.provider_message_id == provider_message_id else None
        return await self._record_send_first(
            session, row, now, "twilio", provider_message_id=provider_message_id
        )

    async def _record_send_first(
        self, session: Any, row: Any, now: datetime, default_provider: str, **values: Any
    ) -> Any:
        """``row``, still 'sending', recorded 'sent' as its sender would record it (which the
        sender then leaves: _record), before a provider's word on it that came first; the row
        as it is then."""
        provider = self.providers.get(Channel(row.channel))
        name = provider.name if provider is not None else default_provider
        await self._settle(session, row, "sent", f"handed to {name}", now, provider=name, **values)
        return await self.repo.message(session, row.id, for_update=True)

    async def inbound(
        self,
        channel: Channel,
        from_address: str,
        body: str,
        kind: str | None,
        sid: str | None = None,
        media: Sequence[Mapping[str, str]] = (),
    ) -> Inbound:
        """An inbound SMS/WhatsApp: STOP/START change consent; anything else is a reply, whose
        event is named by the inbound message's ``sid``. A START (YES, התחל …) with nothing to
        lift is an answer, not a re-subscription: "Yes" to "is everything all right?" is a
        reply. HELP is a reply too: someone should see that the customer asked. Applied once
        per ``sid``: Twilio's signature has no time, so a delivery retried or replayed is valid,
        and applied again an old START would lift a later STOP and an old message reopen the
        WhatsApp window."""
        now = self.clock()
        address = from_address.removeprefix("whatsapp:")
        async with self.db.transaction() as session:
            customer_id = await self.repo.customer_by_address(session, channel.value, address)
            if customer_id is None:
                return Inbound(None, kind)
            if kind == "start" and not await self._opted_out(session, customer_id, channel, address):
                kind = None
            if sid and not await self.repo.claim_inbound(session, sid, now, now - INBOUND_KEPT):
                return Inbound(customer_id, kind)
            if channel == Channel.WHATSAPP:
                await self.repo.set_whatsapp_inbound(session, customer_id, now)
            if kind == "stop":
                await self._opt_out(session, customer_id, channel, FactSource.STOP, now, address)
            elif kind == "start":
                await self.repo.add_consent_fact(
                    session, customer_id, channel.value, now, True, FactSource.START.value, False, address
                )
            if kind in (None, "help"):
                await self._keep_reply(session, customer_id, channel, kind, body, sid, now, media)
        await self.flush()
        return Inbound(customer_id, kind)

    async def _keep_reply(
        self,
        session: Any,
        customer_id: str,
        channel: Channel,
        kind: str | None,
        body: str,
        sid: str | None,
        now: datetime,
        media: Sequence[Mapping[str, str]] = (),
    ) -> None:
        """Kept for support to read (GET /v1/replies): the messages invite replies, and what the
        customer wrote (and sent: a photo) is the point of one. Its message's 'replied' event
        names it, with its beginning. Once per sid: one replayed after INBOUND_KEPT is not kept
        or published again."""
        # PostgreSQL's text refuses NUL; a phone that sends one still means the rest.
        text = body.replace("\x00", "")
        last = await self.repo.last_message_to(session, customer_id, channel.value)
        reply_id = sid or uuid.uuid4().hex
        row = {
            "id": reply_id,
            "customer_id": customer_id,
            "channel": channel.value,
            "kind": kind or "reply",
            "text": text[:MAX_REPLY_CHARS],
            "message_id": None if last is None else last.id,
            "journey": None if last is None else last.journey,
            "created_at": now,
            "media": [dict(m) for m in media] or None,
        }
        if not await self.repo.add_reply(session, row) or last is None:
            return
        answered = self._event(
            last,
            MessageStatus.REPLIED,
            "the customer answered",
            now,
            seq=sid or now.isoformat(),
            extra={"reply_id": reply_id, "reply": text[:MAX_DETAIL_CHARS], "reply_media": len(media) or None},
        )
        await self._publish(session, [answered])

    async def _opted_out(self, session: Any, customer_id: str, channel: Channel, address: str) -> bool:
        """Whether an opt-out still blocks marketing to ``address`` on ``channel``."""
        row = await self.repo.lock_customer(session, customer_id)
        consents = ProfileSnapshot.model_validate(row.profile).consents if row is not None else {}
        facts = [_fact_of(f) for f in await self.repo.consent_facts(session, customer_id)]
        return bool(active_opt_outs(channel, MessageKind.MARKETING, consents, facts, address))

    async def customer_locale(self, customer_id: str) -> str | None:
        """The locale of the customer's latest profile (the language of the pages behind links)."""
        async with self.db.sessions() as session:
            row = await self.repo.lock_customer(session, customer_id)
        return None if row is None else ProfileSnapshot.model_validate(row.profile).locale

    async def survey_state(self, message_id: str) -> tuple[str | None, SurveyState | None]:
        """(the message's locale, 'already' when answered, 'gone' when there is no such
        message, None when the form is to be shown)."""
        async with self.db.sessions() as session:
            row = await self.repo.message(session, message_id)
        if row is None:
            return None, "gone"
        return row.locale, "already" if (row.details or {}).get("survey") else None

    async def answer_survey(
        self, message_id: str, score: int, comment: str
    ) -> tuple[str | None, SurveyState]:
        """Record the customer's answer to the survey of ``message_id``, once: the message's
        row keeps it, and a 'replied' event carries it on retain.messages (the kpi counts it as
        an action). A second answer changes nothing ('already')."""
        now = self.clock()
        async with self.db.transaction() as session:
            row = await self.repo.message(session, message_id, for_update=True)
            if row is None:
                return None, "gone"
            details = row.details or {}
            if details.get("survey"):
                return row.locale, "already"
            answer = {"score": score, "comment": comment or None, "at": now.isoformat()}
            await self.repo.update_message(
                session, row.id, details={**details, "survey": answer}, updated_at=now
            )
            await self.repo.add_survey_answer(
                session,
                id=row.id,
                customer_id=row.customer_id,
                journey=row.journey,
                channel=row.channel,
                locale=row.locale,
                tier=row.tier,
                score=score,
                comment=comment or None,
                created_at=now,
            )
            event = self._event(
                row,
                MessageStatus.REPLIED,
                f"survey answer: {score} of 5",
                now,
                seq="survey",
                extra={"survey_score": score, "survey_comment": comment or None},
            )
            await self._publish(session, [event])
        await self.flush()
        return row.locale, "thanks"

    async def unsubscribe(
        self, customer_id: str, channel: Channel, source: FactSource = FactSource.UNSUBSCRIBE_LINK
    ) -> None:
        async with self.db.transaction() as session:
            await self._opt_out(session, customer_id, channel, source, self.clock())
        await self.flush()

    async def email_events(self, events: Sequence[EmailEvent], receipt: str | None = None) -> bool:
        """SendGrid event webhook: bounces, drops, spam reports and unsubscribes are consent
        facts as ``email_outcome`` says; deliveries, bounces and drops settle the message,
        clicks are published. One transaction for the whole delivery, with its receipt (the
        signature's digest): a replay applies nothing and returns False."""
        now = self.clock()
        async with self.db.transaction() as session:
            if receipt is not None:
                # Kept twice the tolerance: a delivery signed up to a tolerance ahead of our
                # clock is still accepted a tolerance after that.
                forget_before = now - 2 * timedelta(seconds=self.settings.sendgrid_webhook_tolerance_s)
                if not await self.repo.claim_receipt(session, receipt, now, forget_before):
                    return False
            # Every customer of the delivery locked first, in id order: SendGrid batches the
            # events of many messages, and two deliveries at once about the same two customers
            # took their locks in their events' order, each one's first blocking the other's
            # second (a deadlock PostgreSQL ends by failing one of them, a 500 to SendGrid).
            about = {(await self._email_about(session, event))[1] for event in events}
            await self.repo.lock_customers(session, sorted(c for c in about if c is not None))
            for event in events:
                await self._email_event(session, event, now)
        await self.flush()
        return True

    async def _email_about(self, session: Any, e: EmailEvent) -> tuple[Any, str | None, str]:
        """An event's message (if ours), whose it is and the address it is about. The message
        names both: a bounce or a spam report days later may be about an address the customer
        has since changed."""
        row = await self.repo.message(session, e.message_id) if e.message_id else None
        if row is None:
            return None, await self.repo.customer_by_address(session, "email", e.address), e.address
        return row, row.customer_id, (row.content or {}).get("to") or e.address

    async def _email_event(self, session: Any, e: EmailEvent, now: datetime) -> None:
        outcome = email_outcome(e)
        row, customer_id, address = await self._email_about(session, e)
        if customer_id is not None and outcome.opt_out is not None:
            await self._opt_out(session, customer_id, Channel.EMAIL, outcome.opt_out, now, address)
        elif customer_id is not None and outcome.opt_in is not None:
            source = outcome.opt_in.value
            await self.repo.add_consent_fact(session, customer_id, "email", now, True, source, False)
        if row is None:
            return
        if row.status == "sending" and outcome.status is not None:
            # Before the sender recorded the send (its answer waits for the commit): recorded
            # here as the sender would, first, so 'sent' (and a win-back's offer code, published
            # with it) is not lost under the 'delivered' that came first.
            row = await self._record_send_first(session, row, now, "sendgrid")
        current = (row.details or {}).get("provider_status", row.status)
        if outcome.status is not None and outcome.status != row.status and advances(current, outcome.status):
            why = (
                f"sendgrid: {e.event}"
                + (f" ({e.type})" if e.type else "")
                + (f": {e.reason}" if e.reason else "")
            )
            await self._settle(session, row, outcome.status, why[:500], now)
        elif e.event == "click":
            # Named by SendGrid's event id: a delivery SendGrid sends again (it retries until it
            # gets a 2xx) is the same click, which consumers apply once.
            seq = e.event_id or now.isoformat()
            await self._publish(
                session, [self._event(row, MessageStatus.CLICKED, "link clicked", now, seq=seq)]
            )

    async def _opt_out(
        self,
        session: Any,
        customer_id: str,
        channel: Channel,
        source: FactSource,
        now: datetime,
        address: str | None = None,
    ) -> None:
        """Record an opt-out; ``address``: the one it was about (a STOP from this number, a
        bounce of this email), which it stops blocking once the customer's address changes. An
        unsubscribe is the customer's wish wherever they are reached: kept for the channel."""
        # The customer's lock first, as every decider takes it: a decision under way commits its
        # message before this reads the pending ones (and marks it), or waits and reads this
        # fact. Without it, on PostgreSQL each missed the other's uncommitted row and the
        # message went unchecked after the opt-out.
        await self.repo.lock_customer(session, customer_id)
        marketing_only = source in MARKETING_ONLY_SOURCES
        await self.repo.add_consent_fact(
            session,
            customer_id,
            channel.value,
            now,
            False,
            source.value,
            marketing_only,
            None if marketing_only else address,
        )
        # What was decided before and not sent yet is checked again when the sender claims it,
        # however soon: an opt-out is honoured from the moment it arrives, not from the next
        # decision. (Settling it here would repeat the consent rules: an unsubscribe link
        # leaves transactional email allowed, a STOP does not.)
        pending = await self.repo.pending_messages(session, customer_id, channel.value)
        marked = [
            {"id": p.id, "details": {**(p.details or {}), "recheck": source.value}, "updated_at": now}
            for p in pending
        ]
        await self.repo.update_messages(session, marked)
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
            decided_at=row.created_at,
            holdout=status == MessageStatus.HOLDOUT,
            details={k: v for k, v in (extra or {}).items() if v is not None},
        )

    def _records(self, events: Sequence[MessageEvent]) -> list[OutboundRecord]:
        return [OutboundRecord(self.topic, encode_key(e.customer_id), encode(e)) for e in events]

    async def _publish(self, session: Any, events: Sequence[MessageEvent]) -> None:
        """Put the outcomes in the outbox, for ``flush`` once the transaction commits."""
        await enqueue(session, outbox, self._records(events))

    async def _stage(self, session: Any, events: Sequence[MessageEvent]) -> Staged:
        """The consumer's outcomes: staged with the relay, which sends them once the
        transaction commits (``after_commit``) and holds their rows leased meanwhile, so the
        sender's flushes leave them alone."""
        return await stage_or_enqueue(self.relay, session, outbox, self._records(events))

    async def flush(self) -> None:
        """Publish what the outbox table holds, after all this process has handed the relay."""
        await self._relay_table(wait=True)

    async def tick(self) -> None:
        """Work between consumer batches (a few times a second: build_loop): due waits, and the
        outbox rows that are anyone's to send (the API's, a dead relay's). Each batch's own
        outcomes go out from memory; the next batch deletes their rows, or this when none
        comes."""
        await self.fire_waits()
        await self._relay_table(wait=False)

    async def _relay_table(self, *, wait: bool) -> None:
        """Send the outbox rows that are anyone's to send (``send_waiting``), after waiting for
        everything this process handed the relay (``wait``: a flush), or after deleting only
        the rows it has sent (between batches: ``delete_sent``). With the broker away, the
        rows wait in the table for the next call: sending to customers does not stop because
        Kafka is down."""
        if self.relay is None:
            return
        try:
            if wait:
                await self.relay.drain()
            else:
                await self.relay.delete_sent()
            await self.relay.send_waiting()
        except BrokerUnavailableError as exc:
            log.warning("outcomes wait in the outbox: Kafka unreachable", error=str(exc)[:200])

    # --- the API's reads and writes ------------------------------------------------------------------

    async def list_messages(self, **filters: Any) -> list[dict[str, Any]]:
        async with self.db.sessions() as session:
            return [dict(r._mapping) for r in await self.repo.list_messages(session, **filters)]

    async def list_replies(self, **filters: Any) -> list[dict[str, Any]]:
        """Replies with who wrote them, as the messenger knows them now (as survey answers)."""
        async with self.db.sessions() as session:
            rows = await self.repo.list_replies(session, **filters)
        return [_answer_out(r) for r in rows]

    async def list_survey_answers(self, **filters: Any) -> list[dict[str, Any]]:
        """Answers with who answered, as the messenger knows them now: name and addresses to
        call them back, and their value, to call the valuable first."""
        async with self.db.sessions() as session:
            rows = await self.repo.list_survey_answers(session, **filters)
        return [_answer_out(r) for r in rows]

    async def _inbox_row(self, session: Any, inbox: Inbox, row_id: str, *, for_update: bool = False) -> Any:
        if inbox == "survey":
            return await self.repo.survey_answer(session, row_id, for_update=for_update)
        return await self.repo.reply(session, row_id, for_update=for_update)

    async def follow_up(
        self, inbox: Inbox, row_id: str, note: str | None, by: str, agent: str | None = None
    ) -> dict[str, Any] | None:
        """Record that support took up a survey answer (by its message's id) or a reply (called
        the customer back, refunded, apologised, answered): what they did and, as support names
        them, who (``agent``; ``by`` is the API key, which a team may share). On one already
        taken up, what is left out stays, and the same again changes nothing (a retried request
        keeps its first time); anything else amends it, stamped with who and when. Each change
        is kept in its history. None: no such answer or reply."""
        async with self.db.transaction() as session:
            row = await self._inbox_row(session, inbox, row_id, for_update=True)
            if row is None:
                return None
            taken = row.followed_up_at is not None
            current = _follow_up_agent(row.follow_up_history) if taken else None
            if taken and note in (None, row.follow_up_note) and agent in (None, current):
                return _answer_out(row)
            if taken:
                note = row.follow_up_note if note is None else note
                agent = current if agent is None else agent
            action: FollowUpAction = "amended" if taken else "followed_up"
            await self._change_follow_up(session, inbox, row, action, by, note, agent)
            row = await self._inbox_row(session, inbox, row_id)
        return _answer_out(row)

    async def reopen(self, inbox: Inbox, row_id: str, by: str) -> bool:
        """Take back a follow-up recorded by mistake: the answer or reply is open again, and its
        history says who took it back. False: no such answer or reply."""
        async with self.db.transaction() as session:
            row = await self._inbox_row(session, inbox, row_id, for_update=True)
            if row is None:
                return False
            if row.followed_up_at is not None:
                await self._change_follow_up(session, inbox, row, "taken_back", by, None)
        return True

    async def _change_follow_up(
        self,
        session: Any,
        inbox: Inbox,
        row: Any,
        action: FollowUpAction,
        by: str,
        note: str | None,
        agent: str | None = None,
    ) -> None:
        now = self.clock()
        entry = {"action": action, "at": now.isoformat(), "by": by, "note": note, "agent": agent}
        current = (None, None, None) if action == "taken_back" else (now, by, note)
        update = self.repo.update_survey_answer if inbox == "survey" else self.repo.update_reply
        await update(
            session,
            row.id,
            followed_up_at=current[0],
            followed_up_by=current[1],
            follow_up_note=current[2],
            follow_up_history=[*(row.follow_up_history or []), entry],
        )
        if inbox == "survey":  # as logged before replies had follow-ups: searches keep matching
            log.info("survey answer follow-up", message_id=row.id, action=action, by=by)
        else:
            log.info("reply follow-up", reply_id=row.id, action=action, by=by)

    async def list_waits(self, **filters: Any) -> list[dict[str, Any]]:
        async with self.db.sessions() as session:
            return [dict(r._mapping) for r in await self.repo.list_waits(session, **filters)]

    async def get_caps(self) -> tuple[CapsConfig, datetime | None, str | None]:
        async with self.db.sessions() as session:
            row = await self.repo.setting(session, "caps")
        if row is None:
            return DEFAULT_CAPS, None, None
        return CapsConfig.model_validate(row.value), row.updated_at, row.updated_by

    async def put_caps(
        self, caps: CapsConfig, actor: str, if_match: str | None = None, *, match_required: bool = False
    ) -> None:
        """Replace the caps. ``if_match``: the ETag of the caps the editor read (``caps_etag``),
        so that two editors cannot silently undo each other (the API requires it:
        ``match_required``); a journey a cap names must exist."""
        async with self.db.transaction() as session:
            row = await self.repo.setting(session, "caps", for_update=True)
            current = DEFAULT_CAPS if row is None else CapsConfig.model_validate(row.value)
            journeys = {j.name for j in await self.journeys(session)}
            unknown = [
                (i, c.journey) for i, c in enumerate(caps.caps) if c.journey and c.journey not in journeys
            ]
            if unknown:
                raise InvalidInputError(
                    "the caps are not valid",
                    details=[
                        {
                            "field": f"caps.{i}.journey",
                            "message": f"no journey {name!r}{unknown_hint(name, list(journeys), 'journeys')}",
                        }
                        for i, name in unknown
                    ],
                )
            if match_required and if_match in (None, "*"):  # "*" would be a blind PUT too
                raise CapsMatchRequiredError
            if if_match not in (None, "*") and if_match != caps_etag(current):
                raise CapsConflictError
            await self.repo.put_setting(session, "caps", caps.model_dump(mode="json"), actor, self.clock())

    async def refresh_gauges(self) -> None:
        async with self.db.sessions() as session:
            held, oldest_created, earliest_window = await self.repo.held(session)
            unhappy, earliest_unhappy = await self.repo.unhappy_waiting(session, CALL_BACK_MAX_SCORE)
            replies, earliest_reply = await self.repo.replies_waiting(session)
        now = self.clock()
        HELD.set(held)
        HELD_OLDEST_AGE.set((now - oldest_created).total_seconds() if oldest_created else 0.0)
        HELD_OVERDUE.set(_waited(now, earliest_window))
        UNHAPPY_WAITING.set(unhappy)
        UNHAPPY_OLDEST_AGE.set(_waited(now, earliest_unhappy))
        REPLIES_WAITING.set(replies)
        REPLIES_OLDEST_AGE.set(_waited(now, earliest_reply))


def _waited(now: datetime, since: datetime | None) -> float:
    """Seconds since ``since`` (0 when nothing waits, or for a time ahead of this clock)."""
    return max(0.0, (now - since).total_seconds()) if since else 0.0


class CapsConflictError(Exception):
    """The caps changed since the editor read them (a stale If-Match)."""


class CapsMatchRequiredError(Exception):
    """A replacement of the caps without the ETag of those the editor read (no If-Match)."""


def caps_etag(caps: CapsConfig) -> str:
    """The caps' version as an ETag: a digest of their canonical JSON."""
    return content_etag(caps.model_dump(mode="json"))


def _shares(slots: int, channels: int) -> list[int]:
    """The send slots of each channel due, in order: equal shares of ``slots`` (the first ones
    one more when they do not divide), none for the channels past ``slots``."""
    base, extra = divmod(slots, channels)
    return [base + (1 if i < extra else 0) for i in range(min(channels, slots))]


# The claims of one message (each with its provider attempts) before a provider that keeps
# asking to come back later fails it: a rate limit that does not lift is an outage.
MAX_CLAIMS = 5


def _come_back_at(row: Any, error: ProviderError, now: datetime) -> datetime | None:
    """When a failed call's message goes again, put back in the queue rather than failed: the
    provider said when to come back, and the message has not been claimed ``MAX_CLAIMS`` times
    (``attempts`` is the count before this claim). None: it fails."""
    if error.permanent or error.retry_after is None or row.attempts + 1 >= MAX_CLAIMS:
        return None
    return now + timedelta(seconds=error.retry_after)


def _needs_recheck(row: Any, now: datetime) -> bool:
    """Consent, caps, quiet hours and the journey's exit are checked again, at the claim, for a
    held message whose window opened, a message that expired, one that waited (a backlog, the
    sender down: the night may have come) and one whose customer opted out on its channel
    since its decision (``_opt_out``)."""
    return bool(
        row.status == "held_quiet_hours"
        or (row.expires_at and row.expires_at <= now)
        or now - row.created_at >= RECHECK_QUEUED_AFTER
        or (row.details or {}).get("recheck")
    )


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


def _content_of(outgoing: OutgoingMessage) -> dict[str, Any]:
    """What the ledger keeps of a message handed to a provider (``_as_handed_over``)."""
    content: dict[str, Any] = {"subject": outgoing.subject, "text": outgoing.text, "to": outgoing.to}
    if outgoing.content_sid is not None:
        content |= {
            "content_sid": outgoing.content_sid,
            "content_variables": dict(outgoing.content_variables or {}),
        }
    return content


def _fact_of(row: Any) -> ConsentFact:
    """A consent_facts row as the consent rules read it."""
    return ConsentFact(
        channel=Channel(row.channel), at=row.at, source=FactSource(row.source), address=row.address
    )


def _address_of(row: Any) -> str | None:
    """The address a claimed message went to: its customer's on its channel (None if unknown)."""
    profile = getattr(row, "customer_profile", None) or {}
    return profile.get(ADDRESS_FIELD[Channel(row.channel)])


def _whatsapp_mode_of(outgoing: OutgoingMessage) -> WhatsAppMode | None:
    if outgoing.channel is not Channel.WHATSAPP:
        return None
    return "template" if outgoing.content_sid is not None else "freeform"


def _offer_code(row: Any) -> str:
    return "BACK-" + str(row.id).replace("-", "")[:8].upper()


def _history_without(history: Sequence[SentRecord], row: Any) -> list[SentRecord]:
    """The history but the message's own record, by its id: two messages of one journey held to
    the same minute have the same time, journey and channel, and matched by those the second
    left out the first one's record too, and both went past a cap of one a day."""
    return [h for h in history if h.message_id != row.id]


def _went_at(row: Any) -> datetime:
    """When a message of the ledger went or goes, for the caps: sent, when it was sent; being
    sent, when it was claimed (its send time may be a day past, after an outage); otherwise
    its send time (a held one counts at the time it will go) or its decision."""
    if row.sent_at is not None:
        return row.sent_at  # type: ignore[no-any-return]
    if row.status == "sending":
        return row.updated_at  # type: ignore[no-any-return]
    return row.send_at or row.created_at  # type: ignore[no-any-return]


def _without(context: DecisionContext, row: Any) -> DecisionContext:
    return replace(context, history=_history_without(context.history, row))
