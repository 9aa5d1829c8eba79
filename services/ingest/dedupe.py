"""The window of recently accepted event ids. Pure bookkeeping: the caller passes the clock.

It answers a resend of an accepted event without producing it again. It lives in the ingest
process (lost on restart, not shared between replicas); the consumers' applied-event ledgers
are what guarantee exactly-once effects beyond it.
"""

from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    def __init__(self, ttl_s: float, max_ids: int) -> None:
        self.ttl_s = ttl_s
        self.max_ids = max_ids
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def contains(self, event_id: str, now: float) -> bool:
        accepted_at = self._seen.get(event_id)
        return accepted_at is not None and now - accepted_at < self.ttl_s

    def add(self, event_ids: list[str], now: float) -> None:
        if self.max_ids == 0 or self.ttl_s == 0:
            return
        for event_id in event_ids:
            self._seen[event_id] = now
            self._seen.move_to_end(event_id)
        self._expire(now)

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen and len(seen) > self.max_ids:
            seen.popitem(last=False)
        while seen:
            oldest_id, accepted_at = next(iter(seen.items()))
            if now - accepted_at < self.ttl_s:
                break
            del seen[oldest_id]
