"""Frequency caps: may one more message go to this customer now? Pure.

A cap counts the customer's past sends that match it and holds back a candidate that would make
the count exceed ``limit``:

- what it matches: its ``channel`` (None = every channel) and ``journey`` (None = every journey);
  ``scope`` says which of the two a cap is about and is checked against them (``channel``: a
  channel and no journey; ``global``: neither; ``journey``: a journey, optionally a channel);
- which candidates it holds back: ``kinds`` (marketing only by default, so transactional
  messages are exempt from marketing caps);
- which sends it counts: ``counted_kinds`` (every kind by default: a ticket update by SMS still
  uses up the customer's patience for SMS);
- its window: a number of days, rolling (a send at ``t`` counts until ``t + days``), or
  ``"day"``, the customer's local calendar day (DST-correct: a local day may last 23 or 25 hours).

Sends dated after ``now`` (another consumer's clock running ahead) count as if in the window, so
a skewed clock never lets a candidate through. ``GET/PUT /v1/caps`` carry ``CapsConfig``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal, Self
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from services.messenger.quiet import start_of_day
from shared.events import Channel, MessageKind


class CapScope(StrEnum):
    CHANNEL = "channel"
    GLOBAL = "global"
    JOURNEY = "journey"


def _distinct(kinds: list[MessageKind]) -> list[MessageKind]:
    if len(set(kinds)) != len(kinds):
        raise ValueError("a kind is listed twice")
    return kinds


Kinds = Annotated[list[MessageKind], Field(min_length=1), AfterValidator(_distinct)]
CapName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
JourneyName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^\S+$")]
RollingDays = Annotated[int, Field(ge=1, le=366, strict=True)]


class Cap(BaseModel):
    """One cap (rules: module doc); ``window`` is rolling days (1–366) or ``"day"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: CapName
    scope: CapScope
    channel: Channel | None = None
    journey: JourneyName | None = None
    kinds: Kinds = Field(default_factory=lambda: [MessageKind.MARKETING])
    counted_kinds: Kinds = Field(default_factory=lambda: [MessageKind.MARKETING, MessageKind.TRANSACTIONAL])
    limit: Annotated[int, Field(ge=0, le=10_000, strict=True)]
    window: RollingDays | Literal["day"]

    @model_validator(mode="after")
    def _scope_fits(self) -> Self:
        if self.scope is CapScope.CHANNEL:
            if self.channel is None:
                raise ValueError(f"cap {self.name!r}: scope 'channel' needs a channel")
            if self.journey is not None:
                raise ValueError(f"cap {self.name!r}: scope 'channel' takes no journey (use scope 'journey')")
        elif self.scope is CapScope.GLOBAL:
            if self.channel is not None or self.journey is not None:
                raise ValueError(f"cap {self.name!r}: scope 'global' takes neither channel nor journey")
        elif self.journey is None:
            raise ValueError(f"cap {self.name!r}: scope 'journey' needs a journey")
        return self

    def matches(self, channel: Channel, journey: str) -> bool:
        return (self.channel is None or self.channel is channel) and (
            self.journey is None or self.journey == journey
        )

    def describe_count(self, count: int) -> str:
        """E.g. "2 SMS in 7 days", "1 win_back message on the local calendar day"."""
        one, many = _NOUNS[self.channel]
        what = f"{count} {one if count == 1 else many}"
        if self.journey:
            what = f"{count} {self.journey} {one if count == 1 else many}"
        if self.window == "day":
            return f"{what} on the local calendar day"
        return f"{what} in {'1 day' if self.window == 1 else f'{self.window} days'}"


_NOUNS: dict[Channel | None, tuple[str, str]] = {
    Channel.EMAIL: ("email", "emails"),
    Channel.SMS: ("SMS", "SMS"),
    Channel.WHATSAPP: ("WhatsApp message", "WhatsApp messages"),
    None: ("message", "messages"),
}


def _unique_names(caps: list[Cap]) -> list[Cap]:
    names = [c.name for c in caps]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"cap names must be unique: {', '.join(dupes)}")
    return caps


class CapsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    caps: Annotated[list[Cap], Field(max_length=100), AfterValidator(_unique_names)]

    @property
    def lookback_days(self) -> int:
        """How far back a decision reads the customer's messages: the longest window (a local
        day spans at most two UTC dates) and a day to spare for time zones. A 90-day cap must
        see 90 days; the defaults need 31."""
        return max((2 if c.window == "day" else c.window for c in self.caps), default=1) + 1


DEFAULT_CAPS = CapsConfig(
    caps=[
        # The seeds: don't bombard customers by SMS.
        Cap(name="sms_7d", scope=CapScope.CHANNEL, channel=Channel.SMS, limit=2, window=7),
        Cap(name="marketing_day", scope=CapScope.GLOBAL, limit=1, window="day"),
        Cap(name="marketing_7d", scope=CapScope.GLOBAL, limit=4, window=7),
        Cap(name="win_back_30d", scope=CapScope.JOURNEY, journey="win_back", limit=1, window=30),
    ]
)


@dataclass(frozen=True, slots=True)
class SentRecord:
    """A message that was sent (or is committed to be sent) to the customer."""

    at: datetime
    channel: Channel
    journey: str
    kind: MessageKind
    # The message's own id: a held message checked again leaves out its own record by it (two
    # of one journey held to the same minute share time, journey and channel).
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class CapCandidate:
    channel: Channel
    journey: str
    kind: MessageKind


@dataclass(frozen=True, slots=True)
class CapVerdict:
    allowed: bool
    # The first violated cap in configuration order; ``violated`` lists them all.
    cap_name: str | None = None
    # When every violated cap would let it through (UTC); None when allowed or never (limit 0).
    next_allowed_at: datetime | None = None
    reason: str = "within caps"
    violated: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Breach:
    cap: Cap
    count: int
    next_allowed_at: datetime | None


def _local_day(at: datetime, tz: ZoneInfo) -> date:
    return at.astimezone(tz).date()


def _breach(cap: Cap, counted: Sequence[datetime], tz: ZoneInfo, now: datetime) -> _Breach | None:
    if cap.window == "day":
        today = _local_day(now, tz)
        days = [_local_day(at, tz) for at in counted]
        count = days.count(today)
        if count < cap.limit:
            return None
        if cap.limit == 0:
            return _Breach(cap, count, None)
        day = today + timedelta(days=1)
        while days.count(day) >= cap.limit:  # sends already dated on later days
            day += timedelta(days=1)
        return _Breach(cap, count, start_of_day(day, tz))
    window = timedelta(days=cap.window)
    in_window = sorted(at for at in counted if at > now - window)
    count = len(in_window)
    if count < cap.limit:
        return None
    if cap.limit == 0:
        return _Breach(cap, count, None)
    # Once the (count - limit + 1) oldest have left the window, one more fits.
    return _Breach(cap, count, in_window[count - cap.limit] + window)


def check_caps(
    caps: Iterable[Cap],
    history: Sequence[SentRecord],
    candidate: CapCandidate,
    tz: ZoneInfo,
    now: datetime,
) -> CapVerdict:
    """Whether ``candidate`` may be sent at ``now`` without breaking any cap (rules: module doc)."""
    now = now.astimezone(UTC)
    breaches: list[_Breach] = []
    for cap in caps:
        if candidate.kind not in cap.kinds or not cap.matches(candidate.channel, candidate.journey):
            continue
        counted = [
            s.at.astimezone(UTC)
            for s in history
            if s.kind in cap.counted_kinds and cap.matches(s.channel, s.journey)
        ]
        if (breach := _breach(cap, counted, tz, now)) is not None:
            breaches.append(breach)
    if not breaches:
        return CapVerdict(allowed=True)
    first = breaches[0]
    times = [b.next_allowed_at for b in breaches]
    next_allowed_at = None if None in times else max(t for t in times if t is not None)
    reason = f"cap {first.cap.name!r}: {first.cap.describe_count(first.count)} (limit {first.cap.limit})"
    if len(breaches) > 1:
        reason += f"; also {', '.join(repr(b.cap.name) for b in breaches[1:])}"
    return CapVerdict(
        allowed=False,
        cap_name=first.cap.name,
        next_allowed_at=next_allowed_at,
        reason=reason,
        violated=tuple(b.cap.name for b in breaches),
    )
