"""A seeded, deterministic stream of the events a shop's backend would send to Retain.

Pure: no I/O and no clock. The caller says when the history starts; the same arguments give
the same events, byte for byte. Each customer lives a small story drawn from one archetype
(loyal, occasional, one-time, lapsing, big spender, never buys): a profile first, then
purchases, support tickets with a full lifecycle, sometimes a cancellation and sometimes a
win-back. The events are JSON-ready dicts, sorted by ``occurred_at``, shaped as a backend
developer would POST them to ``/v1/events``.

Phone numbers are real-format (they pass ``phonenumbers.is_valid_number``); e-mail addresses
use the reserved ``example.*`` domains. Send demo messages to a sandbox, not a live provider.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import accumulate
from zoneinfo import ZoneInfo

import phonenumbers
from faker import Faker

DemoEvent = dict[str, object]

SCHEMA_VERSION = 1
_NAMESPACE = uuid.UUID("6f1b7a52-3c1e-4d8a-9a57-52e7a1d0c0de")
_MIN_GAP = timedelta(minutes=1)
_DAY = timedelta(days=1)
_HOURS = tuple(range(24))


def _cum(weights: Sequence[float]) -> tuple[float, ...]:
    return tuple(accumulate(weights))


# When people shop and when they write to support, by local hour: quiet nights, a lunch bump,
# the evening peak after the kids are asleep.
_SHOPPING_HOURS = _cum((
    0.4, 0.2, 0.1, 0.05, 0.05, 0.1, 0.3, 0.6, 1.0, 1.3, 1.5, 1.6,
    1.8, 1.7, 1.5, 1.4, 1.4, 1.5, 1.7, 2.0, 2.3, 2.4, 2.0, 1.0,
))  # fmt: skip
_SUPPORT_HOURS = _cum((
    0.1, 0.05, 0.03, 0.02, 0.02, 0.05, 0.2, 0.8, 1.6, 2.2, 2.4, 2.3,
    2.0, 2.1, 2.2, 2.0, 1.8, 1.5, 1.2, 1.1, 1.0, 0.8, 0.5, 0.2,
))  # fmt: skip

# The support desk sits in Israel: Sunday to Thursday 08-21, Friday 08-14, closed Saturday.
# Tickets opened outside these hours wait for an on-call agent or the morning shift, which is
# where most 4-hour breaches come from.
_DESK_TZ = ZoneInfo("Asia/Jerusalem")
_DESK_HOURS: dict[int, tuple[int, int] | None] = {
    0: (8, 21),
    1: (8, 21),
    2: (8, 21),
    3: (8, 21),
    4: (8, 14),
    5: None,
    6: (8, 21),
}


# --------------------------------------------------------------------------- markets


@dataclass(frozen=True, slots=True)
class _City:
    name: str
    timezone: str
    area_codes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Market:
    """Who a customer is: language, country (phone, currency) and where they live."""

    locale: str
    country: str
    currency: str
    names: str
    cities: tuple[_City, ...]
    whatsapp_share: float
    # email, sms, whatsapp
    channel_weights: tuple[float, float, float]


def _cities(timezone: str, *names: str) -> tuple[_City, ...]:
    return tuple(_City(name, timezone) for name in names)


_IL_HE = _cities(
    "Asia/Jerusalem",
    "תל אביב-יפו", "ירושלים", "חיפה", "ראשון לציון", "פתח תקווה", "אשדוד", "נתניה",
    "באר שבע", "חולון", "רמת גן", "רחובות", "הרצליה", "כפר סבא", "מודיעין", "אשקלון",
    "בת ים", "רעננה", "קריית שמונה", "עפולה", "אילת",
)  # fmt: skip
_IL_AR = _cities(
    "Asia/Jerusalem",
    "الناصرة", "أم الفحم", "رهط", "الطيبة", "شفاعمرو", "طمرة", "سخنين", "حيفا", "عكا",
    "يافا", "باقة الغربية", "كفر قاسم", "الطيرة", "عرابة", "كفر كنا",
)  # fmt: skip
_IL_EN = _cities("Asia/Jerusalem", "Tel Aviv", "Jerusalem", "Ra'anana", "Modi'in", "Haifa", "Beit Shemesh")
_EG_AR = _cities(
    "Africa/Cairo",
    "القاهرة", "الجيزة", "الإسكندرية", "المنصورة", "طنطا", "أسيوط", "بورسعيد",
    "الإسماعيلية", "الأقصر", "الزقازيق", "السويس", "دمياط",
)  # fmt: skip
_US_EN = (
    _City("New York", "America/New_York", ("212", "646", "917")),
    _City("Brooklyn", "America/New_York", ("718", "347", "929")),
    _City("Boston", "America/New_York", ("617", "857")),
    _City("Miami", "America/New_York", ("305", "786")),
    _City("Washington", "America/New_York", ("202",)),
    _City("Chicago", "America/Chicago", ("312", "773", "872")),
    _City("Houston", "America/Chicago", ("713", "832")),
    _City("Denver", "America/Denver", ("303", "720")),
    _City("Los Angeles", "America/Los_Angeles", ("213", "310", "323", "424", "818")),
    _City("San Francisco", "America/Los_Angeles", ("415",)),
    _City("Seattle", "America/Los_Angeles", ("206",)),
)
_GB_EN = _cities("Europe/London", "London", "Manchester", "Leeds")
_GB_HE = _cities("Europe/London", "לונדון", "מנצ'סטר")

_MARKETS: tuple[tuple[_Market, float], ...] = (
    (_Market("he-IL", "IL", "ILS", "he", _IL_HE, 0.82, (0.30, 0.25, 0.45)), 0.52),
    (_Market("ar-IL", "IL", "ILS", "ar-IL", _IL_AR, 0.88, (0.20, 0.25, 0.55)), 0.20),
    (_Market("ar-EG", "EG", "EGP", "ar-EG", _EG_AR, 0.90, (0.15, 0.25, 0.60)), 0.10),
    (_Market("en-US", "US", "USD", "en", _US_EN, 0.25, (0.60, 0.35, 0.05)), 0.12),
    (_Market("en-US", "IL", "ILS", "en", _IL_EN, 0.85, (0.45, 0.15, 0.40)), 0.03),
    (_Market("en-US", "GB", "GBP", "en", _GB_EN, 0.70, (0.55, 0.15, 0.30)), 0.02),
    (_Market("he-IL", "GB", "GBP", "he", _GB_HE, 0.90, (0.35, 0.10, 0.55)), 0.01),
)
_MARKET_CUM = _cum([weight for _, weight in _MARKETS])

_EMAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example.com")
_SIGNUP_SOURCES = ("web", "app", "store", "checkout", "referral", "facebook_ads", "google_ads")
_SIGNUP_CUM = _cum((0.28, 0.18, 0.14, 0.20, 0.08, 0.07, 0.05))


# --------------------------------------------------------------------------- names


@dataclass(frozen=True, slots=True)
class _NamePool:
    female: tuple[str, ...]
    male: tuple[str, ...]
    last: tuple[str, ...]


def _distinct(draw: list[str]) -> tuple[str, ...]:
    # Faker's Arabic surnames sometimes carry a clan name in brackets; nobody types that.
    return tuple(dict.fromkeys(name.strip() for name in draw if "(" not in name and name.strip()))


# Which Faker locale speaks for each group: Faker's ar_EG has no Arabic names of its own,
# so Egyptians get the generic Arabic list, Arab citizens of Israel the Palestinian one.
_FAKER_LOCALES = {"he": "he_IL", "ar-IL": "ar_PS", "ar-EG": "ar_AA", "en": "en_US"}


@lru_cache(maxsize=8)
def _name_pools(seed: int) -> tuple[dict[str, _NamePool], tuple[str, ...]]:
    """Names and e-mail user names, drawn once per seed (Faker is slow per call)."""
    pools: dict[str, _NamePool] = {}
    for key, locale in _FAKER_LOCALES.items():
        fake = Faker(locale)
        fake.seed_instance(seed)
        pools[key] = _NamePool(
            female=_distinct([fake.first_name_female() for _ in range(300)]),
            male=_distinct([fake.first_name_male() for _ in range(300)]),
            last=_distinct([fake.last_name() for _ in range(400)]),
        )
    latin = Faker("en_US")
    latin.seed_instance(seed)
    user_names = _distinct(
        [f"{latin.first_name()}.{latin.last_name()}".lower().replace("'", "") for _ in range(600)]
        + [latin.user_name() for _ in range(300)]
    )
    return pools, user_names


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True, slots=True)
class _Product:
    sku: str
    category: str
    ils_cents: int


# category, SKU prefix, median shelf price in ILS, spread, share of order lines
_CATEGORIES = (
    ("apparel", "APP", 120.0, 0.5, 18.0),
    ("shoes", "SHO", 280.0, 0.4, 7.0),
    ("beauty", "BEA", 70.0, 0.5, 14.0),
    ("home", "HOM", 150.0, 0.7, 13.0),
    ("electronics", "ELE", 450.0, 0.8, 9.0),
    ("books", "BOO", 60.0, 0.3, 9.0),
    ("toys", "TOY", 90.0, 0.5, 9.0),
    ("sports", "SPO", 160.0, 0.6, 8.0),
    ("grocery", "GRO", 35.0, 0.4, 13.0),
)
_CATEGORY_CUM = _cum([share for *_, share in _CATEGORIES])
_FX_FROM_ILS = {"ILS": 1.0, "USD": 1 / 3.7, "GBP": 1 / 4.7, "EGP": 13.0}
# Order lines per basket and units per line (1..5).
_COUNTS = (1, 2, 3, 4, 5)
_LINES = (0.55, 0.27, 0.12, 0.05, 0.01)
_BIG_LINES = (0.05, 0.25, 0.30, 0.25, 0.15)
_QUANTITY = (0.88, 0.10, 0.02, 0.0, 0.0)
_CHEAP_QUANTITY = (0.55, 0.30, 0.10, 0.04, 0.01)
# A normal basket costs 40-2000 ILS, a big spender's up to four times that.
_BASKET_ILS = (40.0, 2000.0)
_BIG_BASKET_ILS = (300.0, 8000.0)


@lru_cache(maxsize=1)
def _catalogue() -> tuple[tuple[_Product, ...], ...]:
    """The shop's shelves: a fixed catalogue, the same for every seed."""
    rng = random.Random(0x5EED)  # noqa: S311 - demo data, not secrets
    shelves = []
    for category, prefix, median, spread, _ in _CATEGORIES:
        shelves.append(
            tuple(
                _Product(
                    f"{prefix}-{1001 + index}",
                    category,
                    max(990, round(rng.lognormvariate(math.log(median), spread) * 100)),
                )
                for index in range(40)
            )
        )
    return tuple(shelves)


def _shelf_price(ils_cents: int, currency: str) -> int:
    """The price tag in the customer's currency, rounded the way shops round it."""
    value = ils_cents / 100 * _FX_FROM_ILS[currency]
    if currency == "ILS":
        return max(1, round(value)) * 100 - 10  # 129.90
    if currency == "EGP":
        return max(1, round(value / 5)) * 500  # 1695.00
    return max(1, round(value)) * 100 - 1  # 34.99


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# --------------------------------------------------------------------------- words

# Short things customers write in a cancellation form, in their own language.
_REASON_TEXTS: dict[str, dict[str, tuple[str, ...]]] = {
    "he-IL": {
        "price": (
            "המחיר עלה יותר מדי בחודשים האחרונים",
            "מצאתי את אותו דבר בזול יותר",
            "כרגע זה לא נכנס לי בתקציב",
            "יקר מדי בשביל כמה שאני משתמשת בזה",
            "קיבלתי הצעה טובה יותר ממקום אחר",
        ),
        "service": (
            "חיכיתי שבוע לתשובה ואף אחד לא חזר אליי",
            "ההזמנה האחרונה הגיעה באיחור ופגומה",
            "פניתי כמה פעמים והבעיה עדיין לא נפתרה",
            "לא אהבתי איך שדיברו איתי בטלפון",
        ),
        "both": (
            "גם יקר וגם השירות ירד ברמה",
            "משלם יותר ומקבל פחות, לא שווה לי",
            "המחיר עלה והשירות רק נהיה גרוע יותר",
        ),
        "other": (
            'עברתי לגור בחו"ל',
            "אני כבר לא צריך את זה",
            "פתחתי חשבון חדש עם מייל אחר",
            "אין לי זמן לזה בתקופה הזאת",
        ),
    },
    "ar-IL": {
        "price": (
            "السعر ارتفع كثيرًا في الفترة الأخيرة",
            "وجدت نفس المنتج بسعر أرخص",
            "الاشتراك غالٍ بالنسبة لاستخدامي",
            "الميزانية لا تسمح حاليًا",
        ),
        "service": (
            "انتظرت أسبوعًا كاملًا حتى رد عليّ أحد",
            "وصل الطلب متأخرًا وفيه تلف",
            "تواصلت معكم أكثر من مرة والمشكلة لم تُحل",
            "لم يعجبني أسلوب موظف الخدمة",
        ),
        "both": (
            "السعر مرتفع والخدمة لم تعد كما كانت",
            "أدفع أكثر وأحصل على خدمة أسوأ",
        ),
        "other": (
            "انتقلت للسكن خارج البلاد",
            "لم أعد بحاجة إلى المنتج",
            "فتحت حسابًا جديدًا ببريد آخر",
        ),
    },
    "ar-EG": {
        "price": (
            "الأسعار غليت قوي",
            "لقيت نفس الحاجة أرخص في حتة تانية",
            "مش قادر أدفع الاشتراك دلوقتي",
        ),
        "service": (
            "استنيت أسبوع ومحدش رد عليا",
            "الأوردر وصل متأخر وفيه حاجة بايظة",
            "كلمتكم كذا مرة والمشكلة لسه زي ما هي",
        ),
        "both": (
            "غالي والخدمة بقت وحشة",
            "بدفع أكتر وباخد خدمة أقل",
        ),
        "other": (
            "مسافر برة مصر",
            "مبقتش محتاج المنتج",
        ),
    },
    "en-US": {
        "price": (
            "Too expensive for how often I use it",
            "Found the same thing cheaper elsewhere",
            "Prices went up again",
            "Can't fit it in my budget right now",
        ),
        "service": (
            "Waited days for anyone from support to answer",
            "My last order arrived late and damaged",
            "Contacted support three times and it's still not fixed",
        ),
        "both": (
            "It costs more and the service got worse",
            "Not worth the price with this level of service",
        ),
        "other": (
            "Moving abroad",
            "Don't need it anymore",
            "Opened a new account with a different email",
        ),
    },
}

_REASONS = ("price", "service", "both", "other")
# Price is the most common reason to leave; people who had complaints leave over service.
_REASON_CUM = _cum((0.45, 0.25, 0.15, 0.15))
_REASON_AFTER_COMPLAINT_CUM = _cum((0.20, 0.40, 0.30, 0.10))
# Those who left over price come back far more often than those who left over service.
_WIN_BACK = {"price": 0.38, "both": 0.18, "service": 0.10, "other": 0.15}

_PRIORITIES = ("low", "normal", "high", "urgent")
_PRIORITY_CUM = _cum((0.20, 0.55, 0.18, 0.07))
_COMPLAINT_PRIORITY_CUM = _cum((0.02, 0.38, 0.40, 0.20))
# Median minutes to the first agent reply once the desk is staffed.
_FIRST_REPLY_MINUTES = {"urgent": 12.0, "high": 25.0, "normal": 50.0, "low": 90.0}

_AFTER_PURCHASE_CATEGORIES = ("delivery", "product", "billing", "complaint")
_AFTER_PURCHASE_CUM = _cum((0.45, 0.30, 0.15, 0.10))
_BACKGROUND_CATEGORIES = ("account", "technical", "billing", "product")
_BACKGROUND_CUM = _cum((0.35, 0.35, 0.20, 0.10))

_ARCHETYPES = ("loyal", "occasional", "one_time", "lapsing", "big_spender", "never_buys")
_ARCHETYPE_CUM = _cum((0.22, 0.25, 0.20, 0.20, 0.05, 0.08))


# --------------------------------------------------------------------------- helpers


def _pick(rng: random.Random, options: Sequence[str], cum: Sequence[float]) -> str:
    return rng.choices(options, cum_weights=cum)[0]


def _desk_staffed_from(moment: datetime) -> datetime:
    """The earliest moment at or after ``moment`` when someone sits at the support desk."""
    local = moment.astimezone(_DESK_TZ)
    for _ in range(4):
        hours = _DESK_HOURS[local.weekday()]
        if hours is not None:
            opening = local.replace(hour=hours[0], minute=0, second=0)
            closing = local.replace(hour=hours[1], minute=0, second=0)
            if local < opening:
                return opening.astimezone(UTC)
            if local < closing:
                return moment
        local = (local + _DAY).replace(hour=0, minute=0, second=0)
    raise AssertionError("the desk is open at least once in any four days")  # pragma: no cover


class _Registry:
    """Phone numbers and addresses already handed out, so no two customers share one."""

    def __init__(self) -> None:
        self.phones: set[str] = set()
        self.emails: set[str] = set()

    def phone(self, rng: random.Random, country: str, city: _City) -> str:
        for _ in range(50):
            if country == "IL":
                number = f"+9725{rng.choice('0234568')}{rng.randrange(10**7):07d}"
            elif country == "EG":
                number = f"+201{rng.choice('0125')}{rng.randrange(10**8):08d}"
            elif country == "GB":
                number = f"+447{rng.choice('4579')}{rng.randrange(10**8):08d}"
            else:
                exchange = rng.randrange(200, 1000)
                if exchange % 100 == 11 or exchange == 555:
                    continue
                number = f"+1{rng.choice(city.area_codes)}{exchange}{rng.randrange(10**4):04d}"
            if number in self.phones:
                continue
            if phonenumbers.is_valid_number(phonenumbers.parse(number, None)):
                self.phones.add(number)
                return number
        raise AssertionError(f"no valid {country} number in 50 draws")  # pragma: no cover

    def email(self, rng: random.Random, user_names: Sequence[str]) -> str:
        while True:
            user = rng.choice(user_names)
            suffix = rng.choice(("", "", str(rng.randrange(1, 100)), str(rng.randrange(1960, 2008))))
            address = f"{user}{suffix}@{rng.choice(_EMAIL_DOMAINS)}"
            if address not in self.emails:
                self.emails.add(address)
                return address


@dataclass(frozen=True, slots=True)
class _World:
    """What all customers of one run share."""

    start: datetime
    end: datetime
    pools: dict[str, _NamePool]
    user_names: tuple[str, ...]
    registry: _Registry


@dataclass(slots=True)
class _Draft:
    at: datetime
    number: int
    seq: int
    tz: ZoneInfo | None  # None: the producing system speaks UTC ("Z")
    fields: DemoEvent


@dataclass(slots=True)
class _Customer:
    number: int
    customer_id: str
    market: _Market
    tz: ZoneInfo
    phone: str
    whatsapp: str | None
    email: str
    preferred: str
    consents: dict[str, bool]
    subscription_id: str | None
    signup_source: str


# --------------------------------------------------------------------------- one customer


@dataclass(slots=True)
class _Story:
    """Everything one customer does between ``start`` and ``end``."""

    rng: random.Random
    customer: _Customer
    end: datetime
    drafts: list[_Draft] = field(default_factory=list)
    orders: int = 0
    tickets: int = 0
    complained: bool = False
    consent_changes: list[tuple[datetime, str, bool]] = field(default_factory=list)

    def emit(self, at: datetime, kind: str, fields: DemoEvent, *, utc: bool = False) -> bool:
        if at >= self.end:
            return False
        fields = {"type": kind, **fields}
        tz = None if utc else self.customer.tz
        self.drafts.append(_Draft(at, self.customer.number, len(self.drafts), tz, fields))
        return True

    # ---- time

    def local_time(self, day: datetime, hours: Sequence[float]) -> datetime:
        """A moment on the customer's local calendar day of ``day``, at a typical hour."""
        date = day.astimezone(self.customer.tz).date()
        hour = self.rng.choices(_HOURS, cum_weights=hours)[0]
        local = datetime(
            date.year, date.month, date.day, hour,
            self.rng.randrange(60), self.rng.randrange(60), tzinfo=self.customer.tz,
        )  # fmt: skip
        return local.astimezone(UTC)

    def later(self, after: datetime, days: float, hours: Sequence[float]) -> datetime:
        """A typical-hour moment about ``days`` after ``after``, and strictly after it."""
        moment = self.local_time(after + timedelta(days=days), hours)
        if moment <= after + _MIN_GAP:
            moment = self.local_time(after + timedelta(days=max(days, 0.0) + 1), hours)
        return max(moment, after + _MIN_GAP)

    def minutes_after(self, after: datetime, median: float, sigma: float) -> datetime:
        minutes = self.rng.lognormvariate(math.log(median), sigma)
        return after + max(_MIN_GAP, timedelta(seconds=round(minutes * 60)))

    # ---- purchases

    def purchase(self, at: datetime, *, big: bool = False) -> bool:
        rng = self.rng
        currency = self.customer.market.currency
        shelves = _catalogue()
        lo, hi = _BIG_BASKET_ILS if big else _BASKET_ILS
        lo_cents = round(lo * 100 * _FX_FROM_ILS[currency])
        hi_cents = round(hi * 100 * _FX_FROM_ILS[currency])
        lines: dict[str, tuple[_Product, int, int]] = {}
        # Draw baskets until one lands in the usual range (nearly always the first or second).
        for _ in range(12):
            lines = {}
            count = rng.choices(_COUNTS, _BIG_LINES if big else _LINES)[0]
            for _ in range(count):
                shelf = shelves[rng.choices(range(len(shelves)), cum_weights=_CATEGORY_CUM)[0]]
                product = rng.choice(shelf)
                cheap = product.ils_cents < 5000
                quantity = rng.choices(_COUNTS, _CHEAP_QUANTITY if cheap else _QUANTITY)[0]
                price = _shelf_price(product.ils_cents, currency)
                previous = lines.get(product.sku)
                quantity += previous[1] if previous else 0
                lines[product.sku] = (product, quantity, price)
            total = sum(quantity * price for _, quantity, price in lines.values())
            if lo_cents <= total <= hi_cents:
                break
        total = sum(quantity * price for _, quantity, price in lines.values())
        self.orders += 1
        return self.emit(
            at,
            "purchase",
            {
                "order_id": f"ord-{self.customer.number:06d}-{self.orders:03d}",
                "amount": _money(total),
                "currency": currency,
                "items": [
                    {
                        "sku": product.sku,
                        "category": product.category,
                        "quantity": quantity,
                        "unit_price": _money(price),
                    }
                    for product, quantity, price in lines.values()
                ],
            },
        )

    def purchases(
        self, first: datetime, mean_gap_days: float, shape: float, limit: int, *, big: bool = False
    ) -> datetime | None:
        """A run of purchases; returns when the last one happened (None: none did)."""
        last: datetime | None = None
        moment = first
        for _ in range(limit):
            if not self.purchase(moment, big=big):
                break
            last = moment
            self.maybe_ticket_after_purchase(moment)
            gap = self.rng.gammavariate(shape, mean_gap_days / shape)
            moment = self.later(moment, max(1.0, gap), _SHOPPING_HOURS)
        return last

    # ---- support

    def ticket(
        self,
        opened: datetime,
        category: str,
        *,
        complaint: bool = False,
        resolve: float = 0.97,
    ) -> None:
        rng = self.rng
        complaint = complaint or category == "complaint"
        priority = _pick(rng, _PRIORITIES, _COMPLAINT_PRIORITY_CUM if complaint else _PRIORITY_CUM)
        self.tickets += 1
        self.complained = self.complained or complaint
        common: DemoEvent = {
            "ticket_id": f"tkt-{self.customer.number:06d}-{self.tickets:02d}",
            "category": category,
            "priority": priority,
            "is_complaint": complaint,
        }

        def say(at: datetime, action: str) -> bool:
            # The help desk reports in UTC, unlike the shop.
            return self.emit(at, "support", {**common, "action": action}, utc=True)

        def agent_reply(after: datetime, median: float) -> datetime:
            staffed = _desk_staffed_from(after)
            if staffed > after and (priority == "urgent" or rng.random() < 0.65):
                # The on-call agent answers some tickets out of hours, more slowly.
                moment = self.minutes_after(after, median * 2, 1.0)
            else:
                moment = self.minutes_after(staffed, median, 1.0)
            if rng.random() < 0.03:  # lost in the queue until someone notices
                moment += timedelta(hours=rng.uniform(4, 30))
            return max(moment, after + _MIN_GAP)

        if not say(opened, "opened"):
            return
        last = agent_reply(opened, _FIRST_REPLY_MINUTES[priority])
        if not say(last, "agent_replied"):
            return
        if rng.random() < 0.45:
            last = self.minutes_after(last, 90, 1.2)
            if not say(last, "customer_replied"):
                return
            if rng.random() < 0.7:
                last = agent_reply(last, 60)
                if not say(last, "agent_replied"):
                    return
        if rng.random() >= resolve:
            return
        last = self.minutes_after(_desk_staffed_from(last), 600 if complaint else 180, 1.0)
        if not say(last, "resolved"):
            return
        if rng.random() < 0.08:
            last = self.minutes_after(last, 2 * 24 * 60, 0.8)
            if not say(last, "reopened"):
                return
            last = agent_reply(last, 45)
            if not say(last, "agent_replied"):
                return
            last = self.minutes_after(_desk_staffed_from(last), 240, 1.0)
            say(last, "resolved")

    def maybe_ticket_after_purchase(self, bought: datetime) -> None:
        if self.rng.random() < 0.07:
            opened = self.later(bought, self.rng.uniform(1, 12), _SUPPORT_HOURS)
            category = _pick(self.rng, _AFTER_PURCHASE_CATEGORIES, _AFTER_PURCHASE_CUM)
            self.ticket(opened, category, complaint=self.rng.random() < 0.12)

    def background_tickets(self, since: datetime, per_year: float) -> None:
        moment = since
        while True:
            moment = self.later(moment, self.rng.expovariate(per_year / 365), _SUPPORT_HOURS)
            if moment >= self.end:
                return
            self.ticket(moment, _pick(self.rng, _BACKGROUND_CATEGORIES, _BACKGROUND_CUM))

    # ---- leaving and coming back

    def cancel(self, at: datetime) -> tuple[str, bool]:
        """Cancels with a reason; returns the reason and whether the event made it in time."""
        rng = self.rng
        reason = _pick(rng, _REASONS, _REASON_AFTER_COMPLAINT_CUM if self.complained else _REASON_CUM)
        if reason in ("service", "both") and not self.complained:
            # Service leavers usually complained first, and not always to a happy ending.
            opened = self.local_time(at - timedelta(days=rng.uniform(5, 40)), _SUPPORT_HOURS)
            opened = max(opened, self.drafts[0].at + _MIN_GAP)
            self.ticket(
                opened,
                rng.choice(("complaint", "delivery", "product")),
                complaint=True,
                resolve=0.5,
            )
            at = max(at, self.drafts[-1].at + _MIN_GAP)
        fields: DemoEvent = {"reason": reason}
        if self.customer.subscription_id and rng.random() < 0.9:
            fields["subscription_id"] = self.customer.subscription_id
        if rng.random() < 0.75:
            fields["reason_text"] = rng.choice(_REASON_TEXTS[self.customer.market.locale][reason])
        emitted = self.emit(at, "cancellation", fields)
        if emitted and rng.random() < 0.25:
            # Some also unsubscribe from marketing on the way out.
            unsubscribed = self.minutes_after(at, 20, 1.0)
            given = self.consents_to_change(unsubscribed, ("email", "sms"), to=False)
            if given:
                self.change_consent(unsubscribed, rng.choice(given), False)
        return reason, emitted

    def maybe_cancel_and_return(self, after: datetime, probability: float) -> None:
        if self.rng.random() >= probability:
            return
        at = self.later(after, self.rng.uniform(10, 60), _SHOPPING_HOURS)
        reason, emitted = self.cancel(at)
        if emitted and self.rng.random() < _WIN_BACK[reason]:
            cancelled = max(draft.at for draft in self.drafts)
            back = self.later(cancelled, self.rng.uniform(30, 150), _SHOPPING_HOURS)
            self.purchases(back, 60, 2.0, 1 + int(self.rng.expovariate(0.6)))

    # ---- profile changes

    def consent_at(self, channel: str, at: datetime) -> bool:
        value, since = self.customer.consents[channel], None
        for when, changed, given in self.consent_changes:
            if changed == channel and when <= at and (since is None or when > since):
                value, since = given, when
        return value

    def consents_to_change(self, at: datetime, channels: Sequence[str], *, to: bool) -> list[str]:
        """Channels whose consent is not ``to`` at ``at`` and that no later event sets again.

        Changes are drawn out of time order, so this keeps every consent event a real change.
        """
        return [
            channel
            for channel in channels
            if self.consent_at(channel, at) != to
            and not any(changed == channel and when > at for when, changed, _ in self.consent_changes)
        ]

    def change_consent(self, at: datetime, channel: str, given: bool) -> bool:
        # Only the channel that changed: the contract leaves the others as they were.
        self.consent_changes.append((at, channel, given))
        return self.emit(at, "profile", {"consents": {channel: given}})

    def profile_change(self, at: datetime, world: _World) -> None:
        """A later profile event that changes one thing: consent, address, channel, WhatsApp."""
        rng = self.rng
        customer = self.customer
        change = rng.choices(("consent", "email", "channel", "whatsapp"), (0.4, 0.25, 0.2, 0.15))[0]
        channels = ["email", "sms"] + (["whatsapp"] if customer.whatsapp else [])
        if change == "consent":
            # Mostly a withdrawal; now and then someone opts back in.
            opt_in = rng.random() < 0.2
            options = self.consents_to_change(at, channels, to=opt_in)
            if not options:
                opt_in = not opt_in
                options = self.consents_to_change(at, channels, to=opt_in)
            if options:
                self.change_consent(at, rng.choice(options), opt_in)
                return
            change = "email"
        if change == "whatsapp" and customer.whatsapp is None:
            customer.whatsapp = customer.phone
            self.consent_changes.append((at, "whatsapp", True))
            self.emit(at, "profile", {"whatsapp": customer.whatsapp, "consents": {"whatsapp": True}})
        elif change == "channel":
            customer.preferred = rng.choice([c for c in channels if c != customer.preferred])
            self.emit(at, "profile", {"preferred_channel": customer.preferred})
        else:
            customer.email = world.registry.email(rng, world.user_names)
            self.emit(at, "profile", {"email": customer.email})


def _signup(rng: random.Random, number: int, world: _World) -> tuple[_Customer, DemoEvent]:
    registry = world.registry
    market = _MARKETS[rng.choices(range(len(_MARKETS)), cum_weights=_MARKET_CUM)[0]][0]
    city = rng.choice(market.cities)
    pool = world.pools[market.names]
    first = rng.choice(pool.female if rng.random() < 0.5 else pool.male)
    name = f"{first} {rng.choice(pool.last)}"
    phone = registry.phone(rng, market.country, city)
    whatsapp: str | None = None
    if rng.random() < market.whatsapp_share:
        whatsapp = phone if rng.random() < 0.9 else registry.phone(rng, market.country, city)
    channels = ["email", "sms", "whatsapp"]
    weights = list(market.channel_weights)
    if whatsapp is None:
        weights[2] = 0.0
    preferred = rng.choices(channels, weights)[0]
    consents = {channel: rng.random() < 0.6 for channel in channels}
    consents[preferred] = rng.random() < 0.92
    if whatsapp is None:
        consents["whatsapp"] = False
    email = registry.email(rng, world.user_names)
    subscription_id = f"sub-{number:06d}" if rng.random() < 0.35 else None
    signup_source = _pick(rng, _SIGNUP_SOURCES, _SIGNUP_CUM)
    attributes: dict[str, object] = {
        "city": city.name,
        "signup_source": signup_source,
        "birth_year": rng.randint(1950, 2006),
    }
    if subscription_id is not None:
        attributes["plan"] = rng.choice(("monthly", "monthly", "annual"))
    fields: DemoEvent = {
        "name": name,
        "email": email,
        "phone": phone,
        **({"whatsapp": whatsapp} if whatsapp is not None else {}),
        "locale": market.locale,
        "timezone": city.timezone,
        "preferred_channel": preferred,
        "consents": consents,
        "attributes": attributes,
    }
    customer = _Customer(
        number=number,
        customer_id=f"c-{number:06d}",
        market=market,
        tz=ZoneInfo(city.timezone),
        phone=phone,
        whatsapp=whatsapp,
        email=email,
        preferred=preferred,
        consents=consents,
        subscription_id=subscription_id,
        signup_source=signup_source,
    )
    return customer, fields


def _live(rng: random.Random, number: int, world: _World) -> list[_Draft]:
    customer, profile = _signup(rng, number, world)
    story = _Story(rng, customer, world.end)
    span_days = (world.end - world.start) / _DAY
    # A third of the base is already known when the history starts and is loaded in the first
    # week; the rest sign up over the period.
    latest = min(7.0, span_days) if rng.random() < 0.33 else span_days * 0.95
    offset = rng.uniform(0, latest)
    joined = story.local_time(world.start + timedelta(days=offset), _SHOPPING_HOURS)
    if joined < world.start:
        joined += _DAY
    joined = min(joined, world.end - _MIN_GAP)
    story.emit(joined, "profile", profile)

    archetype = _pick(rng, _ARCHETYPES, _ARCHETYPE_CUM)
    if customer.signup_source == "checkout":
        # Signed up at the till: the first order follows within minutes.
        first = joined + timedelta(minutes=rng.uniform(1, 20))
    else:
        first = story.later(joined, rng.expovariate(1 / 7), _SHOPPING_HOURS)

    if archetype == "loyal":
        last = story.purchases(first, rng.uniform(14, 42), 4.0, 10_000)
        if last is not None:
            story.maybe_cancel_and_return(last, 0.02)
    elif archetype == "big_spender":
        story.purchases(first, rng.uniform(20, 60), 3.0, 10_000, big=True)
    elif archetype == "occasional":
        last = story.purchases(first, rng.uniform(60, 150), 2.0, 10_000)
        if last is not None:
            story.maybe_cancel_and_return(last, 0.05)
    elif archetype == "one_time":
        last = story.purchases(first, 1, 1.0, 1)
        if last is not None:
            story.maybe_cancel_and_return(last, 0.12)
    elif archetype == "lapsing":
        last = story.purchases(first, rng.uniform(14, 45), 3.0, rng.randint(2, 6))
        if last is not None:
            story.maybe_cancel_and_return(last, 0.6)

    story.background_tickets(joined, 0.35)
    if rng.random() < 0.18:
        story.profile_change(story.later(joined, rng.uniform(5, span_days), _SHOPPING_HOURS), world)
    return story.drafts


def _timestamp(moment: datetime, tz: ZoneInfo | None) -> str:
    if tz is None:
        return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return moment.astimezone(tz).isoformat(timespec="seconds")


def generate(seed: int, customers: int, start: datetime, days: int) -> list[DemoEvent]:
    """The demo history: ``customers`` customers over ``days`` days from ``start``.

    Events are sorted by ``occurred_at``; each customer's first event is their profile.
    Customer ``n`` is the same whatever the total, so a larger run extends a smaller one.
    """
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be timezone-aware")
    if customers < 0:
        raise ValueError("customers must be >= 0")
    if days <= 0:
        raise ValueError("days must be > 0")
    begin = start.astimezone(UTC).replace(microsecond=0)
    end = begin + timedelta(days=days)
    pools, user_names = _name_pools(seed)
    world = _World(begin, end, pools, user_names, _Registry())
    master = random.Random(seed)  # noqa: S311 - demo data, not secrets
    drafts: list[_Draft] = []
    for number in range(1, customers + 1):
        # One generator per customer, so customer n does not depend on how many follow.
        rng = random.Random(master.getrandbits(64))  # noqa: S311
        drafts.extend(_live(rng, number, world))
    for draft in drafts:
        draft.at = draft.at.replace(microsecond=0)
    drafts.sort(key=lambda draft: (draft.at, draft.number, draft.seq))
    events: list[DemoEvent] = []
    for draft in drafts:
        customer_id = f"c-{draft.number:06d}"
        event: DemoEvent = {
            "event_id": str(uuid.uuid5(_NAMESPACE, f"{seed}/{customer_id}/{draft.seq}")),
            "type": draft.fields["type"],
            "customer_id": customer_id,
            "occurred_at": _timestamp(draft.at, draft.tz),
            "schema_version": SCHEMA_VERSION,
        }
        event.update(draft.fields)
        events.append(event)
    return events
