"""send_with_retry: full-jitter backoff bounds, Retry-After, permanent vs retryable, lookup first.

The provider here is a scripted implementation of the Provider protocol (what the retry loop
sees of any provider); the real providers' error mapping is tested against real servers in
test_twilio, test_sendgrid and test_smtp.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from services.messenger.providers.base import OutgoingMessage, ProviderError, ProviderResult
from services.messenger.providers.ratelimit import SenderRateLimiter
from services.messenger.providers.retry import backoff_ceiling, send_with_retry
from tests.messenger.providers.factories import sms_message

OK = ProviderResult("scripted", "SM1", "queued", "queued")


class ScriptedProvider:
    name = "scripted"

    def __init__(self, outcomes: Iterable[ProviderError | None], *, paced: bool = False) -> None:
        self.outcomes = list(outcomes)
        self.paced = paced
        self.can_look_up = True
        self.sends = 0
        self.lookups = 0
        self.found: ProviderResult | None = None

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        self.sends += 1
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        return OK

    async def lookup(self, msg: OutgoingMessage) -> ProviderResult | None:
        self.lookups += 1
        return self.found

    async def close(self) -> None:
        return None


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def retryable(code: str = "503", **kw: object) -> ProviderError:
    return ProviderError(code, "try later", permanent=False, **kw)  # type: ignore[arg-type]


def permanent(code: str = "21211", **kw: object) -> ProviderError:
    return ProviderError(code, "no", permanent=True, **kw)  # type: ignore[arg-type]


async def test_success_first_time_does_not_sleep() -> None:
    provider, sleep = ScriptedProvider([None]), Sleeps()
    assert await send_with_retry(provider, sms_message(), sleep=sleep) == OK
    assert provider.sends == 1
    assert sleep.calls == []


async def test_retryable_errors_back_off_with_full_jitter_within_bounds() -> None:
    provider, sleep = ScriptedProvider([retryable()] * 4), Sleeps()
    result = await send_with_retry(
        provider,
        sms_message(),
        max_attempts=5,
        base_delay=0.5,
        max_delay=3.0,
        rng=random.Random(7),
        sleep=sleep,
    )
    assert result == OK
    assert provider.sends == 5
    ceilings = [backoff_ceiling(n, 0.5, 3.0) for n in range(1, 5)]
    assert ceilings == [0.5, 1.0, 2.0, 3.0]  # exponential, capped at max_delay
    assert len(sleep.calls) == 4
    for delay, ceiling in zip(sleep.calls, ceilings, strict=True):
        assert 0.0 <= delay <= ceiling


async def test_jitter_is_full_not_equal() -> None:
    """Over many runs the first delay spans [0, base): a burst of failures spreads out."""
    delays = []
    for seed in range(300):
        sleep = Sleeps()
        await send_with_retry(
            ScriptedProvider([retryable()]),
            sms_message(),
            base_delay=1.0,
            rng=random.Random(seed),
            sleep=sleep,
        )
        delays.extend(sleep.calls)
    assert min(delays) < 0.05
    assert max(delays) > 0.95
    assert all(0.0 <= d <= 1.0 for d in delays)


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    errors = [retryable("500"), retryable("502"), retryable("503")]
    provider, sleep = ScriptedProvider(errors), Sleeps()
    with pytest.raises(ProviderError) as caught:
        await send_with_retry(provider, sms_message(), max_attempts=3, sleep=sleep)
    assert caught.value.code == "503"
    assert provider.sends == 3
    assert len(sleep.calls) == 2


async def test_permanent_error_fails_at_once() -> None:
    provider, sleep = ScriptedProvider([permanent("21610", suppress_address=True)]), Sleeps()
    with pytest.raises(ProviderError) as caught:
        await send_with_retry(provider, sms_message(), max_attempts=5, sleep=sleep)
    assert caught.value.permanent
    assert caught.value.suppress_address
    assert provider.sends == 1
    assert sleep.calls == []


async def test_retry_after_is_a_floor() -> None:
    provider, sleep = ScriptedProvider([retryable("429", retry_after=2.5)]), Sleeps()
    await send_with_retry(provider, sms_message(), base_delay=0.1, max_delay=10.0, sleep=sleep)
    assert sleep.calls == [2.5]


async def test_retry_after_beyond_max_delay_hands_back_instead_of_sleeping() -> None:
    provider, sleep = ScriptedProvider([retryable("429", retry_after=3600.0)]), Sleeps()
    with pytest.raises(ProviderError) as caught:
        await send_with_retry(provider, sms_message(), max_delay=30.0, sleep=sleep)
    assert caught.value.retryable
    assert caught.value.retry_after == 3600.0
    assert sleep.calls == []
    assert provider.sends == 1


async def test_maybe_delivered_is_looked_up_before_sending_again() -> None:
    provider, sleep = ScriptedProvider([retryable("timeout", maybe_delivered=True)]), Sleeps()
    provider.found = ProviderResult("scripted", "SM-found", "sent", "sent")
    result = await send_with_retry(provider, sms_message(), sleep=sleep)
    assert result.provider_message_id == "SM-found"
    assert provider.sends == 1  # never twice
    assert provider.lookups == 1


async def test_maybe_delivered_not_found_is_sent_again() -> None:
    provider, sleep = ScriptedProvider([retryable("timeout", maybe_delivered=True)]), Sleeps()
    assert await send_with_retry(provider, sms_message(), sleep=sleep) == OK
    assert provider.lookups == 1
    assert provider.sends == 2


async def test_a_clean_refusal_is_not_looked_up() -> None:
    provider, sleep = ScriptedProvider([retryable("429")]), Sleeps()
    await send_with_retry(provider, sms_message(), sleep=sleep)
    assert provider.lookups == 0


async def test_paced_providers_wait_for_the_sender_bucket() -> None:
    now = [0.0]

    async def advance(seconds: float) -> None:
        now[0] += seconds

    limiter = SenderRateLimiter(clock=lambda: now[0], sleep=advance)
    paced, unpaced = ScriptedProvider([], paced=True), ScriptedProvider([], paced=False)
    for _ in range(3):
        await send_with_retry(paced, sms_message(), limiter)
    assert now[0] == pytest.approx(2.0)  # long code: 1 per second
    for _ in range(3):
        await send_with_retry(unpaced, sms_message(from_="+15005550007"), limiter)
    assert now[0] == pytest.approx(2.0)
