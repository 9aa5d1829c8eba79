from __future__ import annotations

from services.ingest.dedupe import RecentIds


def test_ids_are_remembered_for_the_ttl() -> None:
    recent = RecentIds(ttl_s=10, max_ids=100)
    recent.add(["a", "b"], now=0)
    assert recent.contains("a", now=9.9)
    assert not recent.contains("a", now=10.0)
    assert not recent.contains("c", now=1)


def test_expired_ids_are_dropped_and_size_is_bounded() -> None:
    recent = RecentIds(ttl_s=10, max_ids=3)
    recent.add(["a", "b", "c", "d"], now=0)
    assert len(recent) == 3
    assert not recent.contains("a", now=1)  # evicted as the oldest
    recent.add(["e"], now=20)
    assert len(recent) == 1
    assert recent.contains("e", now=20)


def test_zero_ttl_disables_the_window() -> None:
    recent = RecentIds(ttl_s=0, max_ids=3)
    recent.add(["a"], now=0)
    assert not recent.contains("a", now=0)
