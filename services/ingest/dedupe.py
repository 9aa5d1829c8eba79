"""The window of recently accepted event ids. Pure bookkeeping: the caller passes the clock.

It answers a resend of an accepted event without producing it again, and knows each id's
content by a digest of the event as produced, so that another event sent under an id already
used is refused rather than dropped as a duplicate. It lives in the ingest process (lost on
restart, not shared between replicas); the consumers' applied-event ledgers are what guarantee
exactly-once effects beyond it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

DIGEST_MASK = 0xFFFFFFFF  # the digests are 32 bits: each id's is packed beside its time


class RecentIds:
    """Ids with the time they were accepted and their content's digest, packed in one integer
    (milliseconds << 32 | digest) in a plain dict; the order they came in is kept per ``add``
    (one request) rather than per id. An id costs one dict entry and one integer, not an
    ``OrderedDict`` entry and its move to the end (a twentieth of a batched request's CPU), nor
    a tuple of a float and an integer (three times the memory of the time alone); nothing the
    collector has to walk."""

    def __init__(self, ttl_s: float, max_ids: int) -> None:
        self.ttl_s = ttl_s
        self.max_ids = max_ids
        self._seen: dict[str, int] = {}  # id → (accepted at, ms) << 32 | digest
        # Oldest first: when each add happened (ms), its ids, and how many of the oldest add's
        # ids are evicted already (the size bound may cut one add in two).
        self._times: deque[int] = deque()
        self._ids: deque[tuple[str, ...]] = deque()
        self._evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def contains(self, event_id: str, now: float) -> bool:
        return bool(self.among([event_id], now))

    def among(self, event_ids: list[str], now: float) -> dict[str, int]:
        """Those of ``event_ids`` in the window, with their digests: one set operation for a
        whole request."""
        seen, ttl_ms, now_ms = self._seen, self.ttl_s * 1000, now * 1000
        found = {}
        for i in seen.keys() & event_ids:
            packed = seen[i]
            if now_ms - (packed >> 32) < ttl_ms:
                found[i] = packed & DIGEST_MASK
        return found

    def add(self, event_ids: Sequence[str], digests: Sequence[int], now: float) -> None:
        """Remember ``event_ids``, accepted at ``now`` (seconds, not negative), with the digests
        of their contents (32 bits)."""
        if self.max_ids == 0 or self.ttl_s == 0 or not event_ids:
            return
        seen = self._seen
        at = int(now * 1000)
        stamp = at << 32
        for event_id, digest in zip(event_ids, digests, strict=True):
            seen[event_id] = stamp | digest  # an id accepted again belongs to this add from now on
        self._times.append(at)
        self._ids.append(tuple(event_ids))
        self._expire(now)

    def _expire(self, now: float) -> None:
        seen, times, ids = self._seen, self._times, self._ids
        ttl_ms, now_ms = self.ttl_s * 1000, now * 1000
        while times:
            accepted_at, oldest = times[0], ids[0]
            expired = now_ms - accepted_at >= ttl_ms
            if not expired and len(seen) <= self.max_ids:
                return
            for i in range(self._evicted, len(oldest)):
                if not expired and len(seen) <= self.max_ids:
                    self._evicted = i
                    return
                packed = seen.get(oldest[i])
                if packed is not None and packed >> 32 == accepted_at:
                    del seen[oldest[i]]
            times.popleft()
            ids.popleft()
            self._evicted = 0
