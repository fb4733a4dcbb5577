"""`tune_gc`: fewer and cheaper garbage collections for a long-running server."""

from __future__ import annotations

import gc

__all__ = ["tune_gc"]


def tune_gc(young: int = 10_000) -> None:
    """Call once the server has started (the standalone server does).

    Every request allocates a few hundred short-lived objects, so with CPython's default
    (a collection per 700 allocations) the collector runs every other request, and its
    full collections walk every object alive: modules, pools, settings. `gc.freeze()`
    moves what is alive at start-up out of its sight, and a higher first threshold
    collects the young less often. Measured in bench/throughput.py: about 12% less CPU
    per request. It changes the whole process's collector, so a host decides.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
