"""expiring_cache - an in-process cache whose entries leave when they expire, not only when full.

SYNOPSIS
    ExpiringCache(size, clock=time.monotonic)
        .get(key) -> value | None          None: absent or expired
        .put(key, value, ttl)              ttl in seconds; <= 0 stores nothing
        .pop(key) ; .clear() ; len(cache)

DESCRIPTION
    A least-recently-used map of at most `size` entries, each with its own
    expiry. Expired entries are removed as time passes (every put() drops
    those whose time has come, in expiry order, from a heap), so the memory
    held follows the entries still alive: the rate of new keys times their
    lifetime. An LRU that drops entries only when full holds `size` entries
    forever once a stream of new keys (client addresses never seen again)
    has filled it, however short their TTLs.

    The heap holds one (expiry, key) per put(); an entry replaced or evicted
    early leaves its heap item behind until its expiry, and the heap is
    rebuilt from the live entries whenever it outgrows twice `size`. A
    size of 0 caches nothing.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class ExpiringCache:
    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = max(0, int(size))
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._heap: list[tuple[float, int, Hashable]] = []
        self._serial = itertools.count()  # ties on expiry never compare keys

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Hashable, value: Any, ttl: float) -> None:
        if ttl <= 0 or self.size == 0:
            return
        now = self._clock()
        expires = now + ttl
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        heapq.heappush(self._heap, (expires, next(self._serial), key))
        self._expire(now)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        if len(self._heap) > 2 * self.size + 64:
            self._heap = [(e, next(self._serial), k) for k, (e, _) in self._entries.items()]
            heapq.heapify(self._heap)

    def pop(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
        self._heap.clear()

    def _expire(self, now: float) -> None:
        heap, entries = self._heap, self._entries
        while heap and heap[0][0] <= now:
            expires, _, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and entry[0] == expires:  # not replaced since
                del entries[key]
