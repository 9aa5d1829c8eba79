"""One provider call, retried the same way for every provider.

Retryable errors (429, 5xx, timeouts, SMTP 4xx) are retried with exponential backoff and full
jitter: before attempt n+1 we sleep a uniform random time in [0, min(max_delay, base_delay *
2**(n-1))], so a burst of failures spreads out instead of returning in lockstep. A provider's
own hint (Retry-After) is a floor for that sleep. A hint longer than ``max_delay`` is not slept
through here: the error is raised (still retryable) so the caller can keep the message
``pending`` and come back later instead of holding a worker for minutes.

Permanent errors are raised at once. When an error says the request may have reached the
provider (``maybe_delivered``), the next attempt first asks the provider whether the message
is there (``lookup``) and settles on what it finds instead of sending a second copy.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from services.messenger.providers.base import OutgoingMessage, Provider, ProviderError, ProviderResult
from services.messenger.providers.ratelimit import SenderRateLimiter
from shared.logs import get_logger

log = get_logger(__name__)


def backoff_ceiling(attempt: int, base_delay: float, max_delay: float) -> float:
    """The upper bound of the jittered sleep after failed attempt ``attempt`` (1-based)."""
    return min(max_delay, base_delay * 2.0 ** (attempt - 1))


async def send_with_retry(
    provider: Provider,
    msg: OutgoingMessage,
    limiter: SenderRateLimiter | None = None,
    *,
    max_attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> ProviderResult:
    """Send ``msg`` through ``provider``; return its result or raise the last ProviderError."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    rng = rng or random.Random()  # noqa: S311 - jitter, not security
    check_first = False
    for attempt in range(1, max_attempts + 1):
        try:
            if check_first:
                found = await provider.lookup(msg)
                if found is not None:
                    log.info(
                        "provider_send_settled_by_lookup", message_id=msg.message_id, provider=provider.name
                    )
                    return found
            if limiter is not None and provider.paced:
                await limiter.acquire(msg.from_, msg.channel)
            return await provider.send(msg)
        except ProviderError as err:
            if err.permanent or attempt == max_attempts:
                raise
            delay = rng.uniform(0.0, backoff_ceiling(attempt, base_delay, max_delay))
            if err.retry_after is not None:
                if err.retry_after > max_delay:
                    raise
                delay = max(delay, err.retry_after)
            check_first = check_first or err.maybe_delivered
            log.warning(
                "provider_send_retry",
                message_id=msg.message_id,
                provider=provider.name,
                code=err.code,
                attempt=attempt,
                delay_s=round(delay, 3),
            )
            await sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises
