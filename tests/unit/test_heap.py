"""node/heap.py: after settle_heap the collector no longer walks the start-up objects,
and still collects cycles made later."""

from __future__ import annotations

import gc
import weakref

from node.heap import settle_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settle_heap_hides_what_exists_and_still_collects_later_cycles() -> None:
    kept = [_Cycle() for _ in range(1000)]          # alive at "start-up"
    try:
        tracked = len(gc.get_objects())
        frozen = settle_heap()
        assert frozen == gc.get_freeze_count() >= len(kept)
        assert len(gc.get_objects()) < tracked - len(kept)   # no longer walked
        later = _Cycle()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None                       # a later cycle is still collected
        assert all(c.me is c for c in kept)         # the frozen ones stay as they were
    finally:
        gc.unfreeze()
