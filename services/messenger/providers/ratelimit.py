"""Per-sender pacing: Twilio's throughput per sending number, as an async token bucket.

Twilio accepts messages faster than a sender may send them and queues the excess (up to four
hours, then fails them), so the sender's rate, not the API, is the limit to respect: a long
code sends 1 message per second, toll-free 3, a short code 100 and a WhatsApp sender 80 (the
defaults here; accounts with upgraded throughput set their own). Each sender has one bucket per
channel (a number's SMS and its WhatsApp are two senders to Twilio) holding up to one second
of sends.

``acquire`` reserves a slot and sleeps until it comes: the bucket may go negative, so waiters
are served in arrival order and nobody polls. A cancelled waiter gives its slot back.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from shared.events import Channel

if TYPE_CHECKING:
    from services.messenger.config import MessengerSettings

SenderKind = Literal["long_code", "toll_free", "short_code", "whatsapp", "email"]

# North American toll-free prefixes (+1 800, 833, 844, 855, 866, 877, 888).
_TOLL_FREE = re.compile(r"^\+1(800|833|844|855|866|877|888)\d{7}$")
_SHORT_CODE = re.compile(r"^\d{3,8}$")


@dataclass(frozen=True, slots=True)
class SenderThroughput:
    """Messages per second per sender; 0 means unpaced."""

    long_code: float = 1.0
    toll_free: float = 3.0
    short_code: float = 100.0
    whatsapp: float = 80.0
    email: float = 0.0
    # Exact senders with their own rate (e.g. a long code with upgraded throughput).
    overrides: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: MessengerSettings) -> SenderThroughput:
        """``RETAIN_MESSENGER_MPS_<KIND>`` and ``RETAIN_MESSENGER_MPS_OVERRIDES``."""
        return cls(
            long_code=settings.messenger_mps_long_code,
            toll_free=settings.messenger_mps_toll_free,
            short_code=settings.messenger_mps_short_code,
            whatsapp=settings.messenger_mps_whatsapp,
            email=settings.messenger_mps_email,
            overrides=dict(settings.messenger_mps_overrides),
        )

    def rate_for(self, sender: str, channel: Channel) -> float:
        # A WhatsApp sender's override is written as Twilio names it, "whatsapp:+1…": the
        # number's own (its SMS) is another sender with another rate.
        key = (
            f"whatsapp:{sender}"
            if channel is Channel.WHATSAPP and not sender.startswith("whatsapp:")
            else sender
        )
        if key in self.overrides:
            return self.overrides[key]
        return float(getattr(self, sender_kind(sender, channel)))


def sender_kind(sender: str, channel: Channel) -> SenderKind:
    if channel is Channel.EMAIL:
        return "email"
    if channel is Channel.WHATSAPP or sender.startswith("whatsapp:"):
        return "whatsapp"
    number = sender.replace(" ", "")
    if _SHORT_CODE.match(number):
        return "short_code"
    if _TOLL_FREE.match(number):
        return "toll_free"
    return "long_code"  # E.164 long codes and alphanumeric sender ids


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class SenderRateLimiter:
    def __init__(
        self,
        throughput: SenderThroughput | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.throughput = throughput or SenderThroughput()
        self._clock = clock
        self._sleep = sleep
        # Per channel and sender: one number may send SMS and WhatsApp, two senders to Twilio.
        self._buckets: dict[tuple[Channel, str], _Bucket] = {}

    def reserve(self, sender: str, channel: Channel) -> float:
        """Take a slot now; return the seconds to wait before using it (0 = go)."""
        rate = self.throughput.rate_for(sender, channel)
        if rate <= 0:
            return 0.0
        burst = max(1.0, rate)  # one second's worth of sends
        now = self._clock()
        bucket = self._buckets.get((channel, sender))
        if bucket is None:
            bucket = self._buckets[(channel, sender)] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        bucket.tokens -= 1.0
        return 0.0 if bucket.tokens >= 0 else -bucket.tokens / rate

    def release(self, sender: str, channel: Channel) -> None:
        """Give back a reserved slot that was not used."""
        bucket = self._buckets.get((channel, sender))
        if bucket is not None:
            bucket.tokens += 1.0

    async def acquire(self, sender: str, channel: Channel) -> None:
        wait = self.reserve(sender, channel)
        if wait <= 0:
            return
        try:
            await self._sleep(wait)
        except asyncio.CancelledError:
            self.release(sender, channel)
            raise
