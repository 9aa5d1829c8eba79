"""Every default journey end to end on a real database (SQLite and PostgreSQL) with a clock the
test moves: customer updates in (``apply_batch``), waits fired by a freshly started messenger
(``fire_waits``: waits live in the database, not in the process), the sender (``send_due``),
and then the rendered message in the sandbox outbox, in Hebrew, Arabic and English, or the
reason nothing was sent."""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from services.messenger.admin import MessengerAdmin
from services.messenger.caps import DEFAULT_CAPS
from services.messenger.config import MessengerSettings
from services.messenger.decision import in_holdout
from services.messenger.journeys import default_journeys, triggered
from services.messenger.links import survey_token
from services.messenger.schemas import MessageOut
from services.messenger.service import MessengerService
from services.messenger.tables import journey_waits
from services.messenger.templates import format_day
from shared.events import (
    CancellationReason,
    Channel,
    CustomerUpdate,
    EventType,
    MessageStatus,
    SupportAction,
    TriggeringEvent,
    UpdateCause,
)
from tests.messenger.test_service import (
    NOON,
    World,
    api,  # noqa: F401 - a fixture, by this name
    delivered,
    messages,
    profile,
    published,
)
from tests.messenger.test_service import world as service_world  # noqa: F401 - a fixture, by this name

pytestmark = pytest.mark.integration

JOURNEYS = {j.name: j for j in default_journeys()}
WIN_BACK = JOURNEYS["win_back"]
DAY = timedelta(days=1)
LANGS = ("he", "ar", "en")
# Tuesday noon in Jerusalem for everyone: inside the sending window whatever the language.
PEOPLE: dict[str, dict[str, Any]] = {
    "he": {"name": "נועה לוי", "locale": "he-IL"},
    "ar": {"name": "ليلى حداد", "locale": "ar-IL"},
    "en": {"name": "Sarah Miller", "locale": "en-IL"},
}
FIRST_NAME = {"he": "נועה", "ar": "ليلى", "en": "Sarah"}
DIRECTION = {"he": "rtl", "ar": "rtl", "en": "ltr"}

# A sentence of each default template, as the customer reads it.
SAYS: dict[str, dict[str, str]] = {
    "welcome": {
        "he": "שמחים שהצטרפת אלינו",
        "ar": "يسعدنا انضمامك إلينا",
        "en": "We're glad you're here",
    },
    "thank_you": {
        "he": "תודה שקנית אצלנו",
        "ar": "شكرًا لتسوقك معنا",
        "en": "Thank you for shopping with us",
    },
    "complaint_ack": {
        "he": "קיבלנו את הפנייה שלך",
        "ar": "استلمنا رسالتك",
        "en": "We've received your message",
    },
    "feedback_survey": {
        "he": "ונשמח לדעת איך היה",
        "ar": "ونود أن نعرف رأيك",
        "en": "we'd love to know how it went",
    },
    "tier_upgrade": {
        "he": "ההטבות כבר פעילות בחשבון שלך",
        "ar": "المزايا مفعّلة في حسابك",
        "en": "Your new perks are already active",
    },
    "at_risk": {
        "he": "רצינו לבדוק שהכול בסדר",
        "ar": "أردنا أن نطمئن",
        "en": "wanted to check that all is well",
    },
    "win_back": {
        "he": "נשמח לראות אותך שוב",
        "ar": "سنسعد برؤيتك مجددًا",
        "en": "we'd love to have you back",
    },
}
PERSONAL_CONTACT = {
    "he": "לטיפול אישי של Dana",
    "ar": "إلى Dana لمتابعتها",
    "en": "Dana is now looking after it",
}
NO_PERSONAL_CONTACT = {
    "he": "אנחנו כבר בודקים",
    "ar": "نعمل على الأمر الآن",
    "en": "We're already looking into it",
}
OFFER = {
    "he": "שמרנו לך קוד הטבה אישי",
    "ar": "خصصنا لك رمزًا شخصيًا",
    "en": "we've saved a personal code for you",
}
GOLD_PERKS = {
    "he": ["נקודות כפולות על כל קנייה", "משלוח חינם בכל הזמנה", "קו שירות מועדף"],
    "ar": ["نقاط مضاعفة على كل عملية شراء", "توصيل مجاني لكل طلب", "خط خدمة بأولوية"],
    "en": ["Double points on every purchase", "Free delivery on every order", "A priority service line"],
}
TIER_NAME = {"he": "זהב", "ar": "الذهبي", "en": "Gold"}
SILVER_ONLY_PERK = {
    "he": "משלוח חינם פעמיים בשנה",
    "ar": "توصيل مجاني مرتين في السنة",
    "en": "Free delivery twice a year",
}
DISCOUNT_WORDS = {
    "he": ["הנחה", "קוד", "הטבה", "מבצע", "%"],
    "ar": ["خصم", "رمز", "عرض", "تخفيض", "%"],
    "en": ["discount", "code", "offer", "coupon", "%"],
}

_numbers = itertools.count()


@pytest.fixture
def world(service_world: World) -> World:  # noqa: F811 - the imported fixture, by name
    """The service's tests' world (SQLite and PostgreSQL, the sandbox outbox, a clock)."""
    return service_world


def treated(prefix: str, *journeys: str) -> str:
    """A customer id outside the holdout of every one of ``journeys``."""
    return next(
        c
        for c in (f"{prefix}-{i}" for i in itertools.count())
        if not any(in_holdout(c, j, JOURNEYS[j].holdout_percent) for j in journeys)
    )


def update(
    customer: str,
    lang: str,
    at: datetime,
    *events: TriggeringEvent,
    tier_old: str | None = "silver",
    entered: tuple[str, ...] = (),
    cause: UpdateCause = UpdateCause.EVENTS,
    **profile_overrides: Any,
) -> CustomerUpdate:
    who = {
        **PEOPLE[lang],
        "email": f"{customer}@example.com",
        "preferred_channel": Channel.EMAIL,
        **profile_overrides,
    }
    snapshot = profile(**who)
    return CustomerUpdate(
        event_id=f"u-{customer}-{next(_numbers)}",
        customer_id=customer,
        occurred_at=at,
        cause=cause,
        triggering_events=list(events),
        tier_old=tier_old,
        tier_new=snapshot.tier,
        segments_entered=list(entered),
        rule_version=1,
        profile=snapshot,
    )


def purchase(at: datetime) -> TriggeringEvent:
    n = next(_numbers)
    return TriggeringEvent(
        event_id=f"p-{n}",
        type=EventType.PURCHASE,
        occurred_at=at,
        order_id=f"o{n}",
        amount=Decimal("120.00"),
        currency="ILS",
    )


def ticket(at: datetime, action: SupportAction, ticket_id: str = "T-7") -> TriggeringEvent:
    return TriggeringEvent(
        event_id=f"t-{next(_numbers)}",
        type=EventType.SUPPORT,
        occurred_at=at,
        ticket_id=ticket_id,
        action=action,
        category="delivery",
        is_complaint=True,
    )


def cancellation(at: datetime, reason: CancellationReason) -> TriggeringEvent:
    return TriggeringEvent(
        event_id=f"c-{next(_numbers)}", type=EventType.CANCELLATION, occurred_at=at, reason=reason
    )


def restarted(world: World) -> MessengerService:
    """A new messenger process on the same database: nothing carried over in memory."""
    old = world.service
    return MessengerService(world.db, old.settings, None, old.providers, clock=world.clock)


@dataclass
class Mail:
    to: str
    subject: str
    text: str
    html: str


def mail_of(world: World, message_id: str) -> Mail:
    [path] = [p for p in world.outbox.iterdir() if message_id in p.name]
    assert path.suffix == ".eml", path
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    plain, html = message.get_body(("plain",)), message.get_body(("html",))
    assert plain is not None
    assert html is not None
    return Mail(str(message["To"]), str(message["Subject"]), plain.get_content(), html.get_content())


def assert_in_language(mail: Mail, lang: str, journey: str) -> None:
    assert SAYS[journey][lang] in mail.text, mail.text
    assert SAYS[journey][lang] in mail.html
    assert f'lang="{lang}"' in mail.html
    assert f'dir="{DIRECTION[lang]}"' in mail.html


async def waits(world: World, customer: str) -> list[tuple[str, str | None, int]]:
    async with world.db.sessions() as session:
        rows = (
            await session.execute(
                select(journey_waits)
                .where(journey_waits.c.customer_id == customer)
                .order_by(journey_waits.c.due_at)
            )
        ).all()
    return [(r.status, r.reason, r.data.get("attempt", 1)) for r in rows]


async def sent_one(world: World, customer: str, journey: str) -> dict[str, Any]:
    """Run the sender; exactly one message goes, of ``journey`` to ``customer``: its row."""
    outcomes = await world.service.send_due()
    assert [o.status for o in outcomes] == ["sent"], outcomes
    [row] = [r for r in await messages(world, customer) if r["id"] == outcomes[0].message_id]
    assert row["journey"] == journey
    return row


# --- welcome, thank_you -------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
async def test_welcome_greets_a_new_profile_once_ever(world: World, lang: str) -> None:
    customer = treated(f"welcome-{lang}", "welcome")
    await world.service.apply_batch(delivered([update(customer, lang, NOON, tier_old=None)]))
    row = await sent_one(world, customer, "welcome")
    mail = mail_of(world, row["id"])
    assert mail.to == f"{customer}@example.com"
    assert FIRST_NAME[lang] in mail.subject
    assert_in_language(mail, lang, "welcome")

    # The profile is created again a month later (a re-import): welcome is once ever.
    world.clock.now = NOON + 30 * DAY
    await world.service.apply_batch(delivered([update(customer, lang, world.clock.now, tier_old=None)]))
    assert await world.service.send_due() == []
    assert [r["journey"] for r in await messages(world, customer)] == ["welcome"]


@pytest.mark.parametrize("lang", LANGS)
async def test_thank_you_after_a_purchase_at_most_once_a_week(world: World, lang: str) -> None:
    customer = treated(f"thanks-{lang}", "thank_you")
    first = purchase(NOON)
    await world.service.apply_batch(delivered([update(customer, lang, NOON, first)]))
    row = await sent_one(world, customer, "thank_you")
    mail = mail_of(world, row["id"])
    assert_in_language(mail, lang, "thank_you")
    assert str(first.order_id) in mail.text

    world.clock.now = NOON + 6 * DAY  # within the week: no second thanks
    await world.service.apply_batch(
        delivered([update(customer, lang, world.clock.now, purchase(world.clock.now))])
    )
    assert await world.service.send_due() == []
    world.clock.now = NOON + 7 * DAY
    await world.service.apply_batch(
        delivered([update(customer, lang, world.clock.now, purchase(world.clock.now))])
    )
    await sent_one(world, customer, "thank_you")
    assert [r["status"] for r in await messages(world, customer)] == ["sent", "sent"]


# --- complaint_ack, feedback_survey -----------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize(
    ("tier", "segments", "escalated", "contact"),
    [
        ("platinum", [], True, True),
        ("gold", ["high_value"], True, False),  # no escalation contact configured
        ("silver", [], False, True),
    ],
    ids=["platinum", "high_value", "regular"],
)
async def test_complaint_ack_at_once_and_escalated_for_the_valuable(
    world: World, lang: str, tier: str, segments: list[str], escalated: bool, contact: bool
) -> None:
    if contact:
        world.service.settings = world.service.settings.model_copy(
            update={
                "messenger_escalation_contact_name": "Dana",
                "messenger_escalation_contact_phone": "+972 3 555 0100",
            }
        )
    # 23:30 in Jerusalem and no marketing consent at all: an acknowledgement goes regardless.
    world.clock.now = datetime(2026, 11, 24, 21, 30, tzinfo=NOON.tzinfo)
    customer = f"complaint-{lang}-{tier}"
    opened = ticket(world.clock.now, SupportAction.OPENED, ticket_id="T-4711")
    await world.service.apply_batch(
        delivered(
            [
                update(
                    customer,
                    lang,
                    world.clock.now,
                    opened,
                    tier=tier,
                    tier_old=tier,
                    segments=segments,
                    consents={},
                    open_tickets=1,
                    last_complaint_resolved=False,
                    predicted_clv=Decimal("4200"),
                    total_value=Decimal("3100"),
                )
            ]
        )
    )
    row = await sent_one(world, customer, "complaint_ack")
    assert row["kind"] == "transactional"
    mail = mail_of(world, row["id"])
    assert_in_language(mail, lang, "complaint_ack")
    assert "T-4711" in mail.subject
    assert "T-4711" in mail.text

    events = [e for e in await published(world) if e.customer_id == customer]
    escalations = [e for e in events if e.status is MessageStatus.ESCALATION]
    # Support sees it in GET /v1/messages (journey=complaint_ack): escalated or not.
    [listed] = await world.service.list_messages(
        customer_id=customer, journey="complaint_ack", status=None, before=None, limit=5
    )
    assert MessageOut.model_validate(listed).escalated is escalated
    if escalated:
        [escalation] = escalations
        assert escalation.message_id == row["id"]
        assert escalation.details == {
            "ticket_id": "T-4711",
            "category": "delivery",
            "tier": tier,
            "predicted_clv": "4200",
            "total_value": "3100",
        }
    if escalated and contact:
        assert PERSONAL_CONTACT[lang] in mail.text
        assert "+972 3 555 0100" in mail.text
    else:
        assert NO_PERSONAL_CONTACT[lang] in mail.text
        assert "Dana" not in mail.text
    if not escalated:
        assert escalations == []
    assert [e.status for e in events if e.status is not MessageStatus.ESCALATION] == [
        MessageStatus.QUEUED,
        MessageStatus.SENT,
    ]


@pytest.mark.parametrize("lang", LANGS)
async def test_feedback_survey_a_day_after_resolution_not_twice_in_30_days(world: World, lang: str) -> None:
    customer = treated(f"survey-{lang}", "feedback_survey")
    resolved = update(
        customer, lang, NOON, ticket(NOON, SupportAction.RESOLVED), last_complaint_resolved=True
    )
    await world.service.apply_batch(delivered([resolved]))
    assert await messages(world, customer) == []  # it waits a day

    world.clock.now = NOON + 23 * timedelta(hours=1)
    assert await restarted(world).fire_waits() == 0
    world.clock.now = NOON + DAY
    assert await restarted(world).fire_waits() == 1
    row = await sent_one(world, customer, "feedback_survey")
    mail = mail_of(world, row["id"])
    assert_in_language(mail, lang, "feedback_survey")
    assert f"https://retain.example/s/{survey_token(row['id'])}" in mail.text
    assert "T-7" in mail.text

    # Another ticket resolved ten days later: no second survey within 30 days.
    world.clock.now = NOON + 10 * DAY
    again = ticket(world.clock.now, SupportAction.RESOLVED, ticket_id="T-8")
    await world.service.apply_batch(delivered([update(customer, lang, world.clock.now, again)]))
    world.clock.now = NOON + 12 * DAY
    assert await restarted(world).fire_waits() == 0
    assert [r["journey"] for r in await messages(world, customer)] == ["feedback_survey"]


# PostgreSQL only: SQLite's transaction holds its write lock from the start, so no other writer
# commits between the read and the locks there.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_wait_another_worker_cancelled_meanwhile_is_not_fired(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fire_waits reads the due waits, then locks their customers. Another worker's batch that
    cancelled one in between (its journey's unless came true) and committed: the wait was fired
    anyway, 'fired' over 'cancelled', and its message sent. Read again under the locks, it is
    left as the other worker left it. (PostgreSQL: SQLite lets no other writer commit between
    the two.)"""
    customer = treated("survey-cancelled", "feedback_survey")
    resolved = update(
        customer, "en", NOON, ticket(NOON, SupportAction.RESOLVED), last_complaint_resolved=True
    )
    await world.service.apply_batch(delivered([resolved]))
    assert await waits(world, customer) == [("waiting", None, 1)]
    async with world.db.sessions() as session:
        wait_id = await session.scalar(
            select(journey_waits.c.id).where(journey_waits.c.customer_id == customer)
        )
    fire = restarted(world)
    real_lock = fire.repo.lock_customers

    async def cancelled_by_another_worker_first(session: Any, customer_ids: Any) -> Any:
        async with world.db.transaction() as other:
            await fire.repo.update_waits(other, [{"id": wait_id, "status": "cancelled", "reason": "unless"}])
        return await real_lock(session, customer_ids)

    monkeypatch.setattr(fire.repo, "lock_customers", cancelled_by_another_worker_first)
    world.clock.now = NOON + DAY
    assert await fire.fire_waits() == 0
    assert await waits(world, customer) == [("cancelled", "unless", 1)]
    assert await messages(world, customer) == []


# --- tier_upgrade, at_risk ------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
async def test_tier_upgrade_congratulates_with_the_new_tiers_perks(world: World, lang: str) -> None:
    customer = treated(f"tier-{lang}", "tier_upgrade")
    upgrade = update(customer, lang, NOON, tier_old="silver", tier="gold", cause=UpdateCause.RULES)
    await world.service.apply_batch(delivered([upgrade]))
    row = await sent_one(world, customer, "tier_upgrade")
    mail = mail_of(world, row["id"])
    assert_in_language(mail, lang, "tier_upgrade")
    assert TIER_NAME[lang] in mail.subject
    for perk in GOLD_PERKS[lang]:
        assert perk in mail.text
        assert perk in mail.html
    assert SILVER_ONLY_PERK[lang] not in mail.text

    # A move down the ladder is no occasion.
    world.clock.now = NOON + 40 * DAY
    down = update(customer, lang, world.clock.now, tier_old="gold", tier="silver", cause=UpdateCause.RULES)
    await world.service.apply_batch(delivered([down]))
    assert len(await messages(world, customer)) == 1


async def test_a_first_order_is_thanked_not_congratulated_on_a_tier(world: World) -> None:
    """A profile before the first order: that order moves the customer from no tier to bronze,
    an upgrade by the ladder. 'Thank you for sticking with us' after one order is untrue, and
    came beside the thank-you for the same order: only the thank-you goes. The second order's
    move up is congratulated."""
    customer = treated("tier-first", "tier_upgrade", "thank_you")
    first = update(customer, "en", NOON, purchase(NOON), tier_old="none", tier="bronze", orders_count=1)
    await world.service.apply_batch(delivered([first]))
    assert [r["journey"] for r in await messages(world, customer)] == ["thank_you"]
    world.clock.now = NOON + 40 * DAY
    second = update(
        customer,
        "en",
        world.clock.now,
        purchase(world.clock.now),
        tier_old="bronze",
        tier="silver",
        orders_count=2,
    )
    await world.service.apply_batch(delivered([second]))
    assert sorted(r["journey"] for r in await messages(world, customer)) == [
        "thank_you",
        "thank_you",
        "tier_upgrade",
    ]


async def test_no_congratulations_to_a_customer_who_cancelled(world: World) -> None:
    # Marketing lowers the gold threshold, or a purchase from before the cancellation arrives
    # late: the tier rises, and a customer who left is not told of their new perks.
    customer = treated("tier-churned", "tier_upgrade")
    upgrade = update(
        customer,
        "en",
        NOON,
        tier_old="silver",
        tier="gold",
        cause=UpdateCause.RULES,
        lifecycle_stage="churned",
    )
    await world.service.apply_batch(delivered([upgrade]))
    assert await messages(world, customer) == []
    back = update(customer, "en", NOON + DAY, tier_old="gold", tier="platinum", cause=UpdateCause.RULES)
    await world.service.apply_batch(delivered([back]))  # came back (active): the next one goes
    assert [m["journey"] for m in await messages(world, customer)] == ["tier_upgrade"]


def test_an_upgrade_is_what_the_segmenter_says_it_is_on_the_ladder_marketing_named() -> None:
    """The ladder is the rule set's, not the default names: a set with tiers vip > regular
    upgrades regular → vip, and the segmenter's word beats the default order both ways."""
    journey = JOURNEYS["tier_upgrade"]

    def fires(old: str, new: str, upgrade: bool | None) -> bool:
        moved = update("ladder", "en", NOON, tier_old=old, tier=new, cause=UpdateCause.RULES)
        return bool(triggered(journey, moved.model_copy(update={"tier_upgrade": upgrade})))

    assert fires("regular", "vip", True)
    assert not fires("vip", "regular", False)
    assert not fires("silver", "gold", False)  # gold ranks below silver in that set
    # Updates from before the segmenter said: the default ladder's names.
    assert fires("silver", "gold", None)
    assert not fires("regular", "vip", None)


@pytest.mark.parametrize("lang", LANGS)
async def test_at_risk_is_a_personal_check_in_without_a_discount(world: World, lang: str) -> None:
    customer = treated(f"risk-{lang}", "at_risk")
    drifting = update(
        customer,
        lang,
        NOON,
        entered=("at_risk",),
        cause=UpdateCause.TIME,
        lifecycle_stage="at_risk",
        segments=["at_risk"],
        predicted_clv=Decimal("5000"),  # valuable, and still no discount
    )
    await world.service.apply_batch(delivered([drifting]))
    row = await sent_one(world, customer, "at_risk")
    assert "offer" not in row["details"]
    mail = mail_of(world, row["id"])
    assert_in_language(mail, lang, "at_risk")
    body = mail.text.split("\n--\n")[0].lower()  # the message, not the unsubscribe footer
    for word in DISCOUNT_WORDS[lang]:
        assert word not in body, (word, body)
    assert "BACK-" not in mail.text


async def test_at_risk_does_not_check_in_over_an_open_ticket(world: World) -> None:
    """'We haven't heard from you in a while' to a customer whose complaint support is handling
    is untrue, and sounds like nobody is listening: no check-in then."""
    customer = treated("risk-open", "at_risk")
    drifting = update(
        customer,
        "en",
        NOON,
        entered=("at_risk",),
        cause=UpdateCause.TIME,
        lifecycle_stage="at_risk",
        segments=["at_risk"],
        open_tickets=1,
    )
    await world.service.apply_batch(delivered([drifting]))
    assert [r["journey"] for r in await messages(world, customer)] == []
    assert await world.service.send_due() == []


# --- win_back -------------------------------------------------------------------------------------


def churned(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "lifecycle_stage": "churned",
        "churn_reason": CancellationReason.PRICE,
        "churned_at": NOON,
        "segments": ["churned"],
    }
    return values | overrides


async def cancel(
    world: World,
    customer: str,
    lang: str,
    reason: CancellationReason = CancellationReason.PRICE,
    **overrides: Any,
) -> None:
    await world.service.apply_batch(
        delivered(
            [
                update(
                    customer,
                    lang,
                    world.clock.now,
                    cancellation(world.clock.now, reason),
                    **churned(churn_reason=reason, churned_at=world.clock.now, **overrides),
                )
            ]
        )
    )


@pytest.mark.parametrize(
    ("reason", "days"),
    [(CancellationReason.PRICE, 14), (CancellationReason.SERVICE, 30), (CancellationReason.BOTH, 30)],
)
async def test_win_back_cools_off_by_churn_reason(
    world: World, reason: CancellationReason, days: int
) -> None:
    customer = treated(f"cool-{reason.value}", "win_back")
    await cancel(world, customer, "he", reason)
    assert await messages(world, customer) == []
    assert await waits(world, customer) == [("waiting", None, 1)]

    world.clock.now = NOON + days * DAY - timedelta(minutes=1)
    assert await restarted(world).fire_waits() == 0
    world.clock.now = NOON + days * DAY
    assert await restarted(world).fire_waits() == 1
    row = await sent_one(world, customer, "win_back")
    assert row["idempotency_key"] == f"win_back:{customer}:{row['trigger_event_id']}"
    mail = mail_of(world, row["id"])
    assert_in_language(mail, "he", "win_back")
    # Who left over service is told we are sorry (seed 004), not asked what went wrong as if
    # we did not know; who left over price is asked.
    apology = "אנחנו מצטערים שהשירות שלנו לא היה ברמה שמגיעה לך"
    assert (apology in mail.text) == (reason is not CancellationReason.PRICE)
    assert (apology in mail.html) == (reason is not CancellationReason.PRICE)
    assert ("אם משהו אצלנו לא עבד" in mail.text) == (reason is CancellationReason.PRICE)


async def test_a_lapse_years_after_a_cancellation_over_service_is_not_apologised_for(world: World) -> None:
    """The profile keeps the last cancellation's reason for ever: one who left over service,
    came back and lapsed now is asked, not told we are sorry for what they may not remember."""
    customer = treated("lapsed-after-service", "win_back")
    lapsing = update(
        customer,
        "he",
        NOON,
        entered=("lapsed",),
        cause=UpdateCause.TIME,
        lifecycle_stage="lapsed",
        segments=["lapsed"],
        churn_reason=CancellationReason.SERVICE,
        churned_at=NOON - 900 * DAY,
    )
    await world.service.apply_batch(delivered([lapsing]))
    world.clock.now = NOON + 30 * DAY
    assert await restarted(world).fire_waits() == 1
    mail = mail_of(world, (await sent_one(world, customer, "win_back"))["id"])
    assert "אנחנו מצטערים" not in mail.text
    assert "אם משהו אצלנו לא עבד" in mail.text


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize(
    ("value", "offered"),
    [
        ({"predicted_clv": Decimal("1500")}, True),
        ({"predicted_clv": Decimal("300"), "total_value": Decimal("9000")}, False),  # the prediction rules
        ({"predicted_clv": None, "total_value": Decimal("2500")}, True),  # no prediction yet: history
        ({"predicted_clv": None, "total_value": Decimal("900")}, False),
    ],
    ids=["high-clv", "low-clv", "high-history", "low-history"],
)
async def test_win_back_offers_compensation_only_to_the_valuable(
    world: World, lang: str, value: dict[str, Any], offered: bool
) -> None:
    customer = treated(f"offer-{lang}", "win_back")
    await cancel(world, customer, lang, **value)
    world.clock.now = NOON + 14 * DAY
    assert await restarted(world).fire_waits() == 1
    row = await sent_one(world, customer, "win_back")
    mail = mail_of(world, row["id"])
    assert_in_language(mail, lang, "win_back")
    code = "BACK-" + row["id"].replace("-", "")[:8].upper()
    # The code the customer got is on the message's 'sent' event, for the shop to honour.
    [sent] = [
        e for e in await published(world) if e.message_id == row["id"] and e.status is MessageStatus.SENT
    ]
    if offered:
        assert row["details"]["offer"] is True
        assert OFFER[lang] in mail.text
        assert code in mail.text
        assert code in mail.html
        assert sent.details == {"offer_code": code}
    else:
        assert "offer" not in row["details"]
        assert OFFER[lang] not in mail.text
        assert "BACK-" not in mail.text
        assert "BACK-" not in mail.html
        assert "offer_code" not in sent.details


OFFER_VALUE = {"he": "15% הנחה", "ar": "خصم 15%", "en": "15% off"}
VALID_UNTIL = {"he": "בתוקף עד", "ar": "صالح حتى", "en": "valid until"}


@pytest.mark.parametrize("lang", LANGS)
async def test_a_configured_offer_says_what_it_gives_and_until_when(world: World, lang: str) -> None:
    """RETAIN_MESSENGER_OFFER_VALUE and _VALID_DAYS: the email says the value and the last day
    (30 days from the decision, in the customer's language), and the sent event gives the shop
    the instant the code is good until."""
    world.service.settings = world.service.settings.model_copy(
        update={"messenger_offer_value": {"he-IL": "15% הנחה", "ar": "خصم 15%", "en": "15% off"},
                "messenger_offer_valid_days": 30}
    )  # fmt: skip
    customer = treated(f"offer-value-{lang}", "win_back")
    await cancel(world, customer, lang, predicted_clv=Decimal("1500"))
    world.clock.now = NOON + 14 * DAY
    assert await restarted(world).fire_waits() == 1
    row = await sent_one(world, customer, "win_back")
    mail = mail_of(world, row["id"])
    code = "BACK-" + row["id"].replace("-", "")[:8].upper()
    # The zone of the message's locale (he-IL, ar-IL, en-IL: Israel's), as the customer reads it.
    zone = ZoneInfo("Asia/Jerusalem")
    decided = row["created_at"].astimezone(zone)
    last = decided.date() + timedelta(days=30)
    shown = format_day(last, PEOPLE[lang]["locale"])
    assert f"{code}" in mail.text
    assert f"– {OFFER_VALUE[lang]}" in mail.text
    assert f"{VALID_UNTIL[lang]} {shown}" in mail.text
    assert VALID_UNTIL[lang] in mail.html
    [sent] = [
        e for e in await published(world) if e.message_id == row["id"] and e.status is MessageStatus.SENT
    ]
    # Good through the last local day: the first instant it is not is the next local midnight.
    ends = datetime.combine(last + timedelta(days=1), datetime.min.time(), tzinfo=zone)
    assert sent.details == {
        "offer_code": code,
        "offer_last_day": last.isoformat(),
        "offer_expires_at": ends.astimezone(UTC).isoformat(),
    }


def test_an_offer_decided_just_after_local_midnight_lasts_from_that_local_day(world: World) -> None:
    """00:30 in Jerusalem is 22:30 UTC the day before: the days count from the local day."""
    world.service.settings = world.service.settings.model_copy(update={"messenger_offer_valid_days": 30})
    row = SimpleNamespace(created_at=datetime(2026, 11, 30, 22, 30, tzinfo=UTC), locale="he-IL")
    last, ends = world.service._offer_last_day(row) or (None, None)
    assert last == date(2026, 12, 31)
    assert ends == datetime(2026, 12, 31, 22, 0, tzinfo=UTC)  # midnight of 1 January, UTC+2


def test_an_offer_to_a_region_of_several_zones_lasts_through_its_last_day_in_each(world: World) -> None:
    """en-US names no zone: "valid until December 31" holds to midnight in the region's latest
    zone (Adak, UTC-10), not the business's (it ended at 17:00 in New York that day)."""
    world.service.settings = world.service.settings.model_copy(update={"messenger_offer_valid_days": 30})
    row = SimpleNamespace(created_at=datetime(2026, 12, 1, 10, 0, tzinfo=UTC), locale="en-US")
    last, ends = world.service._offer_last_day(row) or (None, None)
    assert last == date(2026, 12, 31)
    assert ends == datetime(2027, 1, 1, 10, 0, tzinfo=UTC)  # midnight in Adak and Honolulu
    assert ends > datetime(2027, 1, 1, 5, 0, tzinfo=UTC)  # past midnight in New York


def test_offer_settings_are_checked_at_start() -> None:
    settings = MessengerSettings(messenger_offer_value={"he_il": " 15% הנחה ", "EN": "15% off"})
    assert settings.messenger_offer_value == {"he-IL": "15% הנחה", "en": "15% off"}
    for bad in (
        {"messenger_offer_value": {"not a locale": "15% off"}},
        {"messenger_offer_value": {"en": "  "}},
        {"messenger_offer_value": {"en": "x" * 41}},
        {"messenger_offer_value": {"en": "15%\noff"}},
        {"messenger_offer_valid_days": 0},
    ):
        with pytest.raises(ValidationError):
            MessengerSettings(**bad)


def test_win_back_attempts_are_spaced_beyond_its_frequency_cap() -> None:
    """Otherwise the default caps would cap every attempt after the first."""
    [cap] = [c for c in DEFAULT_CAPS.caps if c.journey == "win_back"]
    assert isinstance(cap.window, int)
    assert WIN_BACK.max_attempts >= 2
    assert WIN_BACK.attempt_spacing_days >= cap.window + 1


async def test_win_back_stops_after_n_attempts_spaced_out(world: World) -> None:
    spacing = WIN_BACK.attempt_spacing_days * DAY
    customer = treated("attempts", "win_back")
    await cancel(world, customer, "en", predicted_clv=Decimal("1500"))
    first_due = NOON + 14 * DAY

    keys: list[str] = []
    codes: list[str] = []
    for attempt in range(1, WIN_BACK.max_attempts + 1):
        due = first_due + (attempt - 1) * spacing
        world.clock.now = due - timedelta(minutes=1)
        assert await restarted(world).fire_waits() == 0
        world.clock.now = due
        assert await restarted(world).fire_waits() == 1
        row = await sent_one(world, customer, "win_back")
        keys.append(row["idempotency_key"])
        mail = mail_of(world, row["id"])
        assert_in_language(mail, "en", "win_back")
        codes.append(next(w for w in mail.text.split() if w.startswith("BACK-")))

    base = f"win_back:{customer}:{row['trigger_event_id']}"
    assert keys == [base] + [f"{base}#{n}" for n in range(2, WIN_BACK.max_attempts + 1)]
    assert len(set(codes)) == len(codes)  # each attempt its own code
    # N attempts, and then never again.
    world.clock.now = first_due + 10 * WIN_BACK.max_attempts * spacing
    assert await restarted(world).fire_waits() == 0
    assert await world.service.send_due() == []
    assert [s for s, _, _ in await waits(world, customer)] == ["fired"] * WIN_BACK.max_attempts
    assert [r["journey"] for r in await messages(world, customer)] == ["win_back"] * WIN_BACK.max_attempts


async def test_win_back_attempts_are_decided_even_when_one_is_not_sent(world: World) -> None:
    """An attempt the customer does not get (no consent by then) still counts as one."""
    customer = treated("unsent", "win_back")
    await cancel(world, customer, "he")
    world.clock.now = NOON + 14 * DAY
    withdrawn = update(customer, "he", world.clock.now - DAY, consents={}, **churned())
    await world.service.apply_batch(delivered([withdrawn]))
    assert await restarted(world).fire_waits() == 1
    [first] = await messages(world, customer)
    assert first["status"] == "no_consent"
    world.clock.now = NOON + 14 * DAY + WIN_BACK.attempt_spacing_days * DAY
    assert await restarted(world).fire_waits() == 1
    assert [r["status"] for r in await messages(world, customer)] == ["no_consent"] * 2


def interruption(what: str, customer: str, at: datetime) -> CustomerUpdate:
    if what == "repurchase":  # the profile says won_back: the exit condition
        return update(customer, "he", at, purchase(at), **churned(lifecycle_stage="won_back"))
    if what == "purchase_before_the_profile_knows":  # still 'churned': wait.unless_event
        return update(customer, "he", at, purchase(at), **churned())
    if what == "won_back_by_the_sweep":  # no event in this update, the stage changed
        return update(customer, "he", at, cause=UpdateCause.TIME, **churned(lifecycle_stage="active"))
    assert what == "complaint"
    opened = ticket(at, SupportAction.OPENED)
    return update(customer, "he", at, opened, open_tickets=1, last_complaint_resolved=False, **churned())


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("repurchase", "exit condition met"),
        ("purchase_before_the_profile_knows", "a purchase happened first"),
        ("won_back_by_the_sweep", "exit condition met"),
        ("complaint", "exit condition met"),
    ],
)
@pytest.mark.parametrize("before_attempt", [1, 2])
async def test_win_back_ends_at_once_on_repurchase_or_an_unresolved_complaint(
    world: World, what: str, reason: str, before_attempt: int
) -> None:
    customer = treated(f"exit-{what}-{before_attempt}", "win_back", "thank_you")
    await cancel(world, customer, "he", CancellationReason.SERVICE)
    first_due = NOON + 30 * DAY
    if before_attempt == 2:
        world.clock.now = first_due
        assert await restarted(world).fire_waits() == 1
        await sent_one(world, customer, "win_back")
        world.clock.now = first_due + 2 * DAY  # between the attempts
    else:
        world.clock.now = NOON + 5 * DAY  # inside the cool-off

    await world.service.apply_batch(delivered([interruption(what, customer, world.clock.now)]))
    [cancelled] = [w for w in await waits(world, customer) if w[0] != "fired"]
    assert cancelled == ("cancelled", reason, before_attempt)

    world.clock.now = first_due + 10 * WIN_BACK.max_attempts * WIN_BACK.attempt_spacing_days * DAY
    assert await restarted(world).fire_waits() == 0
    await world.service.send_due()
    win_backs = [r for r in await messages(world, customer) if r["journey"] == "win_back"]
    assert len(win_backs) == before_attempt - 1


async def test_the_waits_api_shows_what_a_journey_waits_for_and_what_became_of_it(
    world: World,
    api: httpx.AsyncClient,  # noqa: F811 - the imported fixture, by name
) -> None:
    """Until its wait is due, a journey's message is in no list of messages: GET /v1/waits is
    where an operator finds it (and why a wait ended without one)."""
    first, second = treated("waits-api-a", "win_back"), treated("waits-api-b", "win_back")
    await cancel(world, first, "he", CancellationReason.SERVICE)
    world.clock.now = NOON + timedelta(minutes=1)
    await cancel(world, second, "ar", CancellationReason.PRICE)
    [wait] = (await api.get("/v1/waits", params={"customer_id": first})).json()["waits"]
    assert (wait["journey"], wait["status"], wait["reason"]) == ("win_back", "waiting", None)
    assert datetime.fromisoformat(wait["due_at"]) == NOON + 30 * DAY  # the service cool-off
    assert "data" not in wait  # the trigger's snapshot (contact details) stays inside
    assert await messages(world, first) == []

    # Newest first, a page at a time, filtered by journey.
    page = (await api.get("/v1/waits", params={"journey": "win_back", "limit": 1})).json()
    assert [w["customer_id"] for w in page["waits"]] == [second]
    rest = (await api.get("/v1/waits", params={"journey": "win_back", "cursor": page["next_cursor"]})).json()
    assert first in [w["customer_id"] for w in rest["waits"]]
    assert second not in [w["customer_id"] for w in rest["waits"]]

    # The customer buys again: the wait ends, and says why.
    world.clock.now = NOON + 5 * DAY
    await world.service.apply_batch(delivered([interruption("repurchase", first, world.clock.now)]))
    ended = await api.get("/v1/waits", params={"customer_id": first, "status": "cancelled"})
    assert [(w["status"], w["reason"]) for w in ended.json()["waits"]] == [
        ("cancelled", "exit condition met")
    ]
    waiting = await api.get("/v1/waits", params={"customer_id": first, "status": "waiting"})
    assert waiting.json() == {"waits": [], "next_cursor": None}

    bad = await api.get("/v1/waits", params={"status": "sleeping"})
    assert bad.status_code == 422
    assert "status" in bad.text
    assert (await api.get("/v1/waits", params={"cursor": "nonsense"})).status_code == 422
    forgeries = [
        b"2026-06-01T12:00:00|x",  # no offset
        b"0001-01-01T00:00:00+01:00|x",  # before the first instant a datetime holds, in UTC
        b"2026-06-01T12:00:00+00:00|x\x00y",  # a NUL, which PostgreSQL's text refuses
    ]
    for path in ("/v1/waits", "/v1/messages"):
        for forgery in forgeries:
            forged = await api.get(path, params={"cursor": base64.urlsafe_b64encode(forgery).decode()})
            assert forged.status_code == 422, (forgery, forged.text)
            assert [d["field"] for d in forged.json()["error"]["details"]] == ["query.cursor"]


async def test_an_attempt_that_waited_for_an_address_leaves_the_next_one_its_spacing(world: World) -> None:
    """Win-back's first attempt comes due with no address known: it waits for one, and is
    decided when it comes. The second attempt is then a wait of its own, which a later
    address does not bring forward."""
    customer = treated("no-address-yet", "win_back")
    nowhere: dict[str, Any] = {"email": None, "phone": None, "whatsapp": None, "consents": {}}
    await cancel(world, customer, "he", CancellationReason.PRICE, **nowhere)
    first_due = NOON + 14 * DAY  # the price cool-off
    world.clock.now = first_due
    assert await restarted(world).fire_waits() == 1  # decided: no address, so it waits for one
    assert await messages(world, customer) == []
    world.clock.now = first_due + timedelta(minutes=1)
    reachable = update(customer, "he", world.clock.now, cause=UpdateCause.EVENTS, **churned())
    await world.service.apply_batch(delivered([reachable]))
    assert await restarted(world).fire_waits() == 1  # due at once now that an address is known
    [first] = await messages(world, customer)
    assert (first["journey"], first["status"]) == ("win_back", "queued")

    world.clock.now = first_due + 2 * DAY
    again = update(customer, "he", world.clock.now, cause=UpdateCause.EVENTS, **churned())
    await world.service.apply_batch(delivered([again]))
    assert await restarted(world).fire_waits() == 0  # the second attempt keeps its spacing
    async with world.db.sessions() as session:
        [second] = (
            await session.execute(
                select(journey_waits).where(
                    journey_waits.c.customer_id == customer, journey_waits.c.status == "waiting"
                )
            )
        ).all()
    assert second.data["attempt"] == 2
    assert second.due_at > world.clock.now + (WIN_BACK.attempt_spacing_days - 3) * DAY


@pytest.mark.parametrize("stop", ["pause", "delete"])
async def test_a_message_held_for_the_night_does_not_go_once_its_journey_is_paused_or_deleted(
    world: World, stop: str
) -> None:
    """The marketer's stop (a wrong offer in the win-back) at midnight: what was held for the
    morning is cancelled then, not sent at nine."""
    customer = treated(f"held-then-{stop}", "win_back", "thank_you")
    await cancel(world, customer, "he", CancellationReason.SERVICE)
    world.clock.now = NOON + 30 * DAY + timedelta(hours=11)  # 23:00 (or 22:00) in Jerusalem
    assert await restarted(world).fire_waits() == 1
    [held] = [r for r in await messages(world, customer) if r["journey"] == "win_back"]
    assert held["status"] == "held_quiet_hours"
    admin = MessengerAdmin(world.service)
    if stop == "pause":
        await admin.set_enabled("win_back", False, "marketer")
    else:
        await admin.delete_journey("win_back", "marketer")
    world.clock.now = NOON + 31 * DAY  # the next noon
    outcomes = {o.message_id: o.status for o in await restarted(world).send_due()}
    assert outcomes[held["id"]] == "cancelled"
    [row] = [r for r in await messages(world, customer) if r["journey"] == "win_back"]
    assert (row["status"], row["reason"]) == ("cancelled", "the journey was paused or deleted before it went")


async def test_a_win_back_held_for_the_night_does_not_go_over_a_complaint_opened_meanwhile(
    world: World,
) -> None:
    """Its wait ends at 23:00 in Jerusalem, so the message is held for the morning; a complaint
    opened in the night is the journey's exit: in the morning it is cancelled, not sent."""
    customer = treated("held-then-complaint", "win_back", "thank_you")
    await cancel(world, customer, "he", CancellationReason.SERVICE)
    world.clock.now = NOON + 30 * DAY + timedelta(hours=11)  # 23:00 (or 22:00) in Jerusalem
    assert await restarted(world).fire_waits() == 1
    [held] = [r for r in await messages(world, customer) if r["journey"] == "win_back"]
    assert held["status"] == "held_quiet_hours"
    world.clock.now += timedelta(hours=1)
    await world.service.apply_batch(delivered([interruption("complaint", customer, world.clock.now)]))
    world.clock.now = NOON + 31 * DAY  # the next noon
    outcomes = {o.message_id: o.status for o in await world.service.send_due()}
    assert outcomes[held["id"]] == "cancelled"  # (the complaint's acknowledgement goes)
    [row] = [r for r in await messages(world, customer) if r["journey"] == "win_back"]
    assert row["status"] == "cancelled"
    assert row["reason"] == "the journey's exit condition came true before it went"


async def test_win_back_never_starts_over_an_open_complaint(world: World) -> None:
    customer = treated("open-ticket", "win_back")
    await cancel(world, customer, "ar", open_tickets=1, last_complaint_resolved=False)
    assert await waits(world, customer) == []
    world.clock.now = NOON + 60 * DAY
    assert await restarted(world).fire_waits() == 0
    assert await messages(world, customer) == []


async def test_a_wait_fired_by_a_restarted_messenger_is_sent_once(world: World) -> None:
    """Two processes fire the same due wait one after the other: one message."""
    customer = treated("twice", "win_back")
    await cancel(world, customer, "he")
    world.clock.now = NOON + 14 * DAY
    assert await restarted(world).fire_waits() == 1
    assert await restarted(world).fire_waits() == 0
    await sent_one(world, customer, "win_back")
    assert len(list(world.outbox.iterdir())) == 1


# --- holdout ---------------------------------------------------------------------------------------


async def test_holdout_share_is_within_tolerance_and_stable_per_customer(world: World) -> None:
    n = 1000
    share = JOURNEYS["thank_you"].holdout_percent / 100
    customers = [f"h{i:04d}" for i in range(n)]

    async def held_out(at: datetime) -> set[str]:
        world.clock.now = at
        for start in range(0, n, 250):
            chunk = customers[start : start + 250]
            await world.service.apply_batch(delivered([update(c, "he", at, purchase(at)) for c in chunk]))
        rows = await world.service.list_messages(
            customer_id=None, journey="thank_you", status="holdout", before=None, limit=n
        )
        return {r["customer_id"] for r in rows if r["created_at"] == at}

    first = await held_out(NOON)
    # The assignment is a hash, so fixed for these ids; it should look like a fair coin of the
    # journey's share: within four standard deviations of the binomial.
    tolerance = 4 * math.sqrt(share * (1 - share) / n)
    assert abs(len(first) / n - share) <= tolerance, len(first)
    events = [e for e in await published(world) if e.status is MessageStatus.HOLDOUT]
    assert {e.customer_id for e in events} == first
    assert all(e.holdout and e.journey == "thank_you" for e in events)

    second = await held_out(NOON + 8 * DAY)  # a week on, the same customers buy again
    assert second == first
    assert first == {c for c in customers if in_holdout(c, "thank_you", share * 100)}
