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
    allocations than frees instead of 700. A session lives a second or
    more (the greet wait); it lets go of its subscribers, log and evidence
    when it ends (Session._let_go), so reference counting frees it without
    the collector, and what cycles remain are found in the young and
    middle generations rather than left for a full collection. Measured
    in one run of 6,000 sessions: the collector's CPU 1,108 ms -> 546 ms
    (full collections 550 -> 69 ms); freezing alone, in another run, left
    4.9% of the CPU to the collector, half of it in six full collections
    that found 100,000 objects of garbage. A young
    collection now takes 4-7 ms and a middle one about 50 ms on that busy
    machine (the full ones took 100-370 ms).

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
    gc.collect()  # the supervisor's garbage is not frozen into every worker
    gc.freeze()


def settle_heap() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0, GEN1, GEN2)
