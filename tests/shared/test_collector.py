"""settle_collector(): what a service process does to the collector once it has started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from shared.collector import GEN0_THRESHOLD, settle_collector


@pytest.fixture
def collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector")
def test_what_exists_at_start_is_frozen_and_young_objects_are_collected_less_often() -> None:
    gc.unfreeze()
    started_with: list[list[int]] = [[1]]  # lives as long as the process would
    assert any(o is started_with for o in gc.get_objects())
    settle_collector()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == GEN0_THRESHOLD
    # Frozen: in no generation a collection walks any more.
    assert all(o is not started_with for o in gc.get_objects())


@pytest.mark.usefixtures("collector")
def test_cycles_made_after_start_are_still_collected() -> None:
    settle_collector()

    class Node:
        def __init__(self) -> None:
            self.me = self

    Node()  # a cycle: only the collector frees it
    assert gc.collect() > 0
