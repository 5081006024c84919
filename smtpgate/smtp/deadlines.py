"""deadlines - one worker's deadlines for client waits: one loop timer for all, swept per tick.

SYNOPSIS
    deadlines_of(loop) -> Deadlines            the loop's, made at first use
    deadlines.watch(waiter)                    file it at its deadline (or keep an earlier file)
    deadlines.forget(waiter)                   out of the wheel (closed, or waiting no more)
    len(deadlines)                             the waiters filed
    TICK                                       the wheel's granularity, in seconds

DESCRIPTION
    An idle connection waits for its client with a deadline. A loop timer
    of its own (uvloop: a TimerHandle, its libuv timer, a copy of the
    context and a bound method, about 0.5 KB) is the biggest thing an idle
    session held after its transport; ten thousand of them are five MB.
    Instead every waiter is filed here, in the bucket of the tick its
    deadline falls in (a set per tick: a slot per waiter), and one loop
    timer fires at the earliest bucket's end: the waiters whose deadline
    has come are told (`waiter._expired()`), the rest filed again at their
    deadline. A deadline moved later costs nothing until its old bucket
    comes round (a busy session re-arms its deadline per command: an
    attribute write); one moved earlier is filed again at once.

    A deadline fires when its tick ends: never early, at most TICK late
    (Postfix's own timers count whole seconds). A waiter that closes
    leaves its bucket at once, so a closed connection is not held until
    its deadline.

    A waiter has `deadline` (loop time), `_filed` (its bucket's tick, or
    None; the wheel's to set), `_waiting()` (whether it waits for its
    client now: one that does not leaves the wheel until its next wait)
    and `_expired()` (its deadline has come: it ends its wait, if any).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref

TICK = 0.5

_WHEELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def deadlines_of(loop: asyncio.AbstractEventLoop) -> Deadlines:
    wheel = _WHEELS.get(loop)
    if wheel is None:
        wheel = _WHEELS[loop] = Deadlines()
    return wheel


class Deadlines:
    # no reference to its loop (the running one is asked): the loop's entry in _WHEELS, weak,
    # must not be kept alive by its own value
    __slots__ = ("_buckets", "_due", "_ticks", "_timer")

    def __init__(self) -> None:
        self._buckets: dict[int, set] = {}
        self._ticks: list[int] = []  # the buckets' ticks, a heap
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0  # the tick the timer is set for

    def __len__(self) -> int:
        return sum(map(len, self._buckets.values()))

    def watch(self, waiter) -> None:
        tick = math.ceil(waiter.deadline / TICK)
        filed = waiter._filed
        if filed is not None:
            if filed <= tick:
                return  # an earlier bucket: it is filed again there if it must wait on
            self._buckets[filed].discard(waiter)
        self._file(waiter, tick)

    def forget(self, waiter) -> None:
        filed = waiter._filed
        if filed is not None:
            waiter._filed = None
            bucket = self._buckets.get(filed)
            if bucket is not None:
                bucket.discard(waiter)

    def _file(self, waiter, tick: int, arm: bool = True) -> None:
        waiter._filed = tick
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
        bucket.add(waiter)
        if arm and (self._timer is None or tick < self._due):
            self._arm(tick)

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = tick
        self._timer = asyncio.get_running_loop().call_at(tick * TICK, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        ticks, buckets = self._ticks, self._buckets
        while ticks and ticks[0] * TICK <= now:
            bucket = buckets.pop(heapq.heappop(ticks))
            for waiter in bucket:
                waiter._filed = None
                if waiter.deadline <= now:
                    waiter._expired()
                elif waiter._waiting():  # moved later since it was filed
                    self._file(waiter, math.ceil(waiter.deadline / TICK), arm=False)
        while ticks and not buckets[ticks[0]]:  # emptied by forget()
            del buckets[heapq.heappop(ticks)]
        if ticks:
            self._arm(ticks[0])
