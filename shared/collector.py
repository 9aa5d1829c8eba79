"""Python's garbage collector, tuned for a long-running service process."""

from __future__ import annotations

import gc

# Collect the youngest generation every 10,000 net allocations instead of 700. A request or a
# batch allocates and frees thousands of objects: at 700 the collector walked the live objects
# of the work in flight over and over (5% of ingest's CPU; 0.1% at 10,000, in make bench).
GEN0_THRESHOLD = 10_000


def settle_collector() -> None:
    """Call once a process has started (modules imported, clients built): what exists by then
    lives as long as the process, so it is frozen and no full collection walks it again. Full
    collections came twice a second under load and cost a fifth of ingest's CPU; in a worker
    they walked every object of the batch in hand once per few hundred new ones."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, 10, 10)
