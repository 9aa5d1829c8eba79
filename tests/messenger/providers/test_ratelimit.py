"""Per-sender token buckets on a fake clock: pacing, sender kinds, fairness, cancellation."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from services.messenger.config import MessengerSettings
from services.messenger.providers.ratelimit import SenderRateLimiter, SenderThroughput, sender_kind
from shared.events import Channel


class FakeClock:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def times_of(
    limiter: SenderRateLimiter, clock: FakeClock, sender: str, channel: Channel, n: int
) -> list[float]:
    """When each of ``n`` sequential sends from ``sender`` may go, relative to the start."""
    start = clock.now
    out = []
    for _ in range(n):
        await limiter.acquire(sender, channel)
        out.append(round(clock.now - start, 6))
    return out


@pytest.mark.parametrize(
    ("sender", "channel", "kind"),
    [
        ("+15017122661", Channel.SMS, "long_code"),
        ("+972501234567", Channel.SMS, "long_code"),
        ("+18005550100", Channel.SMS, "toll_free"),
        ("+18885550100", Channel.SMS, "toll_free"),
        ("88888", Channel.SMS, "short_code"),
        ("Retain", Channel.SMS, "long_code"),  # alphanumeric sender id
        ("+14155238886", Channel.WHATSAPP, "whatsapp"),
        ("whatsapp:+14155238886", Channel.SMS, "whatsapp"),
        ("hello@retain.example", Channel.EMAIL, "email"),
    ],
)
def test_sender_kind(sender: str, channel: Channel, kind: str) -> None:
    assert sender_kind(sender, channel) == kind


async def test_long_code_sends_one_per_second() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(clock=clock, sleep=clock.sleep)
    assert await times_of(limiter, clock, "+15017122661", Channel.SMS, 5) == [0, 1, 2, 3, 4]


async def test_toll_free_bursts_three_then_paces() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(clock=clock, sleep=clock.sleep)
    times = await times_of(limiter, clock, "+18005550100", Channel.SMS, 7)
    assert times[:3] == [0, 0, 0]
    assert times[3:] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3])


async def test_whatsapp_and_short_code_rates() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(clock=clock, sleep=clock.sleep)
    times = await times_of(limiter, clock, "+14155238886", Channel.WHATSAPP, 160)
    assert times[79] == 0  # a second's worth at once
    assert times[-1] == pytest.approx(80 / 80)  # then 80 per second
    clock2 = FakeClock()
    limiter2 = SenderRateLimiter(clock=clock2, sleep=clock2.sleep)
    times2 = await times_of(limiter2, clock2, "88888", Channel.SMS, 300)
    assert times2[-1] == pytest.approx(200 / 100)


async def test_senders_are_independent_and_email_is_unpaced() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(clock=clock, sleep=clock.sleep)
    await limiter.acquire("+15017122661", Channel.SMS)
    await limiter.acquire("+15017122662", Channel.SMS)  # another long code: its own bucket
    for _ in range(100):
        await limiter.acquire("hello@retain.example", Channel.EMAIL)
    assert clock.sleeps == []


async def test_idle_sender_refills_but_never_beyond_a_second() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(clock=clock, sleep=clock.sleep)
    sender = "+18005550100"
    await times_of(limiter, clock, sender, Channel.SMS, 3)
    clock.now += 60  # a minute idle earns one second's worth (3), not 180
    assert await times_of(limiter, clock, sender, Channel.SMS, 4) == pytest.approx([0, 0, 0, 1 / 3])


async def test_concurrent_waiters_are_served_in_order_without_polling() -> None:
    clock = FakeClock()
    sleeps: list[float] = []

    async def record(seconds: float) -> None:  # all five arrive at the same instant
        sleeps.append(seconds)
        await asyncio.sleep(0)

    limiter = SenderRateLimiter(clock=clock, sleep=record)
    order: list[int] = []

    async def send(i: int) -> None:
        await limiter.acquire("+15017122661", Channel.SMS)
        order.append(i)

    await asyncio.gather(*(send(i) for i in range(5)))
    assert order == [0, 1, 2, 3, 4]
    assert sleeps == [1, 2, 3, 4]  # each reserved its slot up front: one sleep each


async def test_cancelled_waiter_gives_its_slot_back() -> None:
    limiter = SenderRateLimiter(SenderThroughput(long_code=1.0))
    sender = "+15017122661"
    await limiter.acquire(sender, Channel.SMS)  # uses the burst
    waiter = asyncio.create_task(limiter.acquire(sender, Channel.SMS))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # The cancelled reservation is returned: the next caller waits about 1s, not 2s.
    assert limiter.reserve(sender, Channel.SMS) == pytest.approx(1.0, abs=0.05)


async def test_overrides_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the environment, as a deployment sets them (the fields were once missing from the
    settings, which dropped RETAIN_MESSENGER_MPS_* silently)."""
    for kind in ("LONG_CODE", "TOLL_FREE", "SHORT_CODE", "WHATSAPP", "EMAIL", "OVERRIDES"):
        monkeypatch.delenv(f"RETAIN_MESSENGER_MPS_{kind}", raising=False)  # whatever the machine has
    monkeypatch.setenv("RETAIN_MESSENGER_MPS_LONG_CODE", "2")
    monkeypatch.setenv("RETAIN_MESSENGER_MPS_OVERRIDES", '{"+15017122661": 10}')
    throughput = SenderThroughput.from_settings(MessengerSettings())
    assert throughput.long_code == 2.0
    assert throughput.toll_free == 3.0  # absent settings keep the defaults
    assert throughput.rate_for("+15017122661", Channel.SMS) == 10.0
    assert throughput.rate_for("+15017122662", Channel.SMS) == 2.0
    monkeypatch.delenv("RETAIN_MESSENGER_MPS_LONG_CODE")
    monkeypatch.delenv("RETAIN_MESSENGER_MPS_OVERRIDES")
    assert SenderThroughput.from_settings(MessengerSettings()) == SenderThroughput()
    for bad in (
        {"messenger_mps_long_code": -1},
        {"messenger_mps_overrides": {"+1": -5}},
        {"messenger_fallback_order": ["mail", "sms"]},
    ):
        with pytest.raises(ValidationError):
            MessengerSettings(**bad)


def test_one_number_sending_sms_and_whatsapp_has_a_bucket_for_each() -> None:
    """Twilio counts a number's SMS and its WhatsApp as two senders: a burst of WhatsApp does
    not hold back the SMS of the same number."""
    limiter = SenderRateLimiter(SenderThroughput(long_code=1.0, whatsapp=80.0), clock=lambda: 0.0)
    number = "+15017122661"
    assert [limiter.reserve(number, Channel.WHATSAPP) for _ in range(80)] == [0.0] * 80
    assert limiter.reserve(number, Channel.SMS) == 0.0
    assert limiter.reserve(number, Channel.SMS) == 1.0  # the SMS bucket's own second


def test_an_override_is_for_the_channel_it_names() -> None:
    number = "+15017122661"
    throughput = SenderThroughput(overrides={number: 10.0, f"whatsapp:{number}": 200.0})
    assert throughput.rate_for(number, Channel.SMS) == 10.0
    assert throughput.rate_for(number, Channel.WHATSAPP) == 200.0
    assert SenderThroughput(overrides={number: 10.0}).rate_for(number, Channel.WHATSAPP) == 80.0
