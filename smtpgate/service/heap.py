"""heap - the cyclic garbage collector set for a long-running worker.

SYNOPSIS
    before_fork()          in the supervisor, just before it forks a worker
    settle_heap()          once the worker is built, before it takes sessions

DESCRIPTION
    CPython's collector walks every tracked object it has not frozen. A
    worker holds some 50,000 of them from its start (modules, configuration,
    tables), and a full collection walked them all again each time a
    quarter more objects had lived long enough: 100 ms and more a time on a
    busy 2-core machine, over 6% of the worker's CPU in the first-contact
    benchmark (benchmarks/README.md).

    settle_heap() collects once, then freezes what the worker holds at
    start (gc.freeze: left out of every later collection; it lives as long
    as the worker, or is freed by reference counting, as a reload's old
    settings are), and collects the youngest generation after GEN0 more
    allocations than frees instead of 700. The young collections walk what
    is still alive, about the same work whatever the threshold, but the
    middle generation is then collected 14 times less often. Measured in
    the same run, 6,000 sessions: the collector's CPU 1,108 ms -> 546 ms
    (full collections 550 -> 69 ms); a young collection now takes 4-7 ms
    and a middle one about 50 ms on that busy machine (the full ones took
    100-370 ms). Cycles are still found and freed; they wait a little
    longer.

    before_fork() freezes the supervisor's heap, as the gc module's
    documentation advises: a collection writes into the header of every
    object it walks, so a worker walking what it inherited would copy
    every page of it (about 8 MB a worker); frozen, those pages stay
    shared between the supervisor and its workers.
"""

from __future__ import annotations

import gc

GEN0 = 10_000
GEN1, GEN2 = 10, 10  # CPython's own


def before_fork() -> None:
    gc.freeze()


def settle_heap() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0, GEN1, GEN2)
