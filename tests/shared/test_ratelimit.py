from __future__ import annotations

import pytest

from shared.ratelimit import RateLimiter


def test_burst_then_refill() -> None:
    limiter = RateLimiter(rate_per_s=2, burst=3)
    assert [limiter.acquire("k", now=0) for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("k", now=0) == pytest.approx(0.5)
    assert limiter.acquire("k", now=0.5) == 0
    assert limiter.acquire("other", now=0.5) == 0  # buckets are per key


def test_zero_rate_is_unlimited() -> None:
    limiter = RateLimiter(rate_per_s=0, burst=1)
    assert all(limiter.acquire("k", now=0) == 0 for _ in range(100))
