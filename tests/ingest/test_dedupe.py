from __future__ import annotations

from services.ingest.dedupe import RecentIds


def test_ids_are_remembered_for_the_ttl() -> None:
    recent = RecentIds(ttl_s=10, max_ids=100)
    recent.add(["a", "b"], [0, 1], now=0)
    assert recent.contains("a", now=9.9)
    assert not recent.contains("a", now=10.0)
    assert not recent.contains("c", now=1)


def test_expired_ids_are_dropped_and_size_is_bounded() -> None:
    recent = RecentIds(ttl_s=10, max_ids=3)
    recent.add(["a", "b", "c", "d"], [0, 1, 2, 3], now=0)
    assert len(recent) == 3
    assert not recent.contains("a", now=1)  # evicted as the oldest
    recent.add(["e"], [0], now=20)
    assert len(recent) == 1
    assert recent.contains("e", now=20)


def test_zero_ttl_disables_the_window() -> None:
    recent = RecentIds(ttl_s=0, max_ids=3)
    recent.add(["a"], [0], now=0)
    assert not recent.contains("a", now=0)


def test_an_id_accepted_again_after_its_window_stays_for_a_new_window() -> None:
    recent = RecentIds(ttl_s=10, max_ids=100)
    recent.add(["a", "b"], [0, 1], now=0)
    recent.add(["a"], [0], now=12)  # "a" expired at 10 and came again
    assert recent.contains("a", now=15)
    assert not recent.contains("b", now=15)
    assert len(recent) == 1


def test_among_answers_for_a_whole_request() -> None:
    recent = RecentIds(ttl_s=10, max_ids=100)
    recent.add(["a", "b"], [0, 1], now=0)
    recent.add(["c"], [0], now=5)
    assert recent.among(["a", "c", "x"], now=3) == {"a": 0, "c": 0}
    assert recent.among(["a", "c", "x"], now=11) == {"c": 0}


def test_the_size_bound_evicts_the_oldest_ids_across_requests() -> None:
    recent = RecentIds(ttl_s=100, max_ids=4)
    recent.add(["a", "b", "c"], [0, 1, 2], now=0)
    recent.add(["d", "e"], [0, 1], now=1)
    assert len(recent) == 4
    assert recent.among(["a", "b", "c", "d", "e"], now=2).keys() == {"b", "c", "d", "e"}
    recent.add(["f", "g", "h"], [0, 1, 2], now=2)
    assert recent.among(["b", "c", "d", "e", "f", "g", "h"], now=3).keys() == {"e", "f", "g", "h"}


def test_each_id_keeps_the_digest_of_what_it_named() -> None:
    recent = RecentIds(ttl_s=10, max_ids=100)
    recent.add(["a", "b"], [11, 22], now=0)
    recent.add(["c"], [33], now=5)
    assert recent.among(["a", "b", "c", "x"], now=6) == {"a": 11, "b": 22, "c": 33}
    recent.add(["a"], [44], now=12)  # expired at 10 and accepted again: the new event's
    assert recent.among(["a"], now=13) == {"a": 44}
