"""heap - the cyclic garbage collector set for a long-running worker.

SYNOPSIS
    settle_heap()          once the worker is built, before it takes sessions

DESCRIPTION
    CPython's collector walks every tracked object it has not frozen: a
    full collection of a worker that holds its modules, configuration,
    tables and caches costs tens of milliseconds, and it runs again each
    time a quarter more objects have lived long enough. Sessions make
    little cyclic garbage (an exception caught with its traceback, a
    cancelled task), but allocate a great deal that reference counting
    frees on its own.

    settle_heap() collects once, then freezes what the worker holds at
    start (gc.freeze: kept out of every later collection), and collects the youngest generation
    after GEN0 more allocations than frees instead of 700: objects that
    live only within one command are freed by reference counting before a
    collection looks at them. Cycles are still found; they only wait a
    little longer.
"""

from __future__ import annotations

import gc

GEN0 = 10_000
GEN1, GEN2 = 10, 10  # CPython's own


def settle_heap() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0, GEN1, GEN2)
