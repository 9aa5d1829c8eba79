"""The events the benchmarks send: the contract's EXAMPLES, each with a unique event id.

Unique ids matter: ingest answers a resent id from its dedupe window without producing, which
would measure the dedupe instead of the produce path. The four example types take turns and
customer ids are spread over many customers, so every partition gets its share.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from shared.events import EXAMPLES

KINDS: tuple[str, ...] = ("purchase", "support", "profile", "cancellation")
CUSTOMERS = 10_000


def event(run_id: str, n: int) -> dict[str, Any]:
    kind = KINDS[n % len(KINDS)]
    # A multiplicative spread, so neighbouring events belong to different customers.
    customer = (n * 7919) % CUSTOMERS
    # Shallow: only top-level fields change; nested values are shared and never mutated here.
    out = {**EXAMPLES[kind], "event_id": f"bench-{run_id}-{n}", "customer_id": f"c-{customer:06d}"}
    if kind == "profile":
        # Each customer's own address and numbers, as in life: validation caches what it has
        # seen, and one shared example address would make every profile event a cache hit.
        out["email"] = f"customer.{customer}@example.co.il"
        out["phone"] = out["whatsapp"] = f"+9725{customer % 10}{customer:07d}"
    return out


def events(run_id: str, start: int, count: int) -> Iterator[dict[str, Any]]:
    for n in range(start, start + count):
        yield event(run_id, n)


def single_bodies(run_id: str, count: int) -> list[bytes]:
    """``count`` JSON bodies holding one event each."""
    return [orjson.dumps(e) for e in events(run_id, 0, count)]


def batch_bodies(run_id: str, count: int, size: int) -> list[bytes]:
    """``count`` JSON bodies holding an array of ``size`` events each."""
    return [orjson.dumps(list(events(run_id, i * size, size))) for i in range(count)]
