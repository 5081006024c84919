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

    Expiry is filed by the whole second: a bucket per second (a list of
    keys) and a heap of those seconds, so an entry costs its dict slot,
    its (expires, value) pair and a list slot, not an ordered dict's node
    and a heap item of its own (about 0.15 KB less an entry; the resolver
    keeps five or so per new client). An entry
    replaced or evicted early leaves its key in its bucket until that
    second comes, and the buckets are rebuilt from the live entries
    whenever they hold more than twice `size` keys. A size of 0 caches
    nothing.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Hashable
from typing import Any


class ExpiringCache:
    __slots__ = ("_buckets", "_clock", "_entries", "_filed", "_seconds", "size")

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = max(0, int(size))
        self._clock = clock
        # a plain dict in use order (a hit is moved to the end): least recently used first
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._buckets: dict[int, list[Hashable]] = {}  # second -> keys expiring by then
        self._seconds: list[int] = []  # the buckets' seconds, a heap
        self._filed = 0  # keys in the buckets, stale ones included

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any:
        entries = self._entries
        entry = entries.pop(key, None)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            return None
        entries[key] = entry  # the most recently used now
        return entry[1]

    def put(self, key: Hashable, value: Any, ttl: float) -> None:
        if ttl <= 0 or self.size == 0:
            return
        now = self._clock()
        expires = now + ttl
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (expires, value)
        self._file(key, expires)
        self._expire(now)
        while len(entries) > self.size:
            del entries[next(iter(entries))]
        if self._filed > 2 * self.size + 64:
            self._refile()

    def pop(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
        self._buckets.clear()
        self._seconds.clear()
        self._filed = 0

    def _file(self, key: Hashable, expires: float) -> None:
        second = math.floor(expires)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = []
            heapq.heappush(self._seconds, second)
        bucket.append(key)
        self._filed += 1

    def _expire(self, now: float) -> None:
        seconds, buckets, entries = self._seconds, self._buckets, self._entries
        while seconds and seconds[0] <= now:
            second = seconds[0]
            bucket = buckets[second]
            later = []  # expiring later in this same second
            for key in bucket:
                entry = entries.get(key)
                if entry is None or math.floor(entry[0]) != second:
                    continue  # gone, or replaced: filed again where it expires now
                if entry[0] <= now:
                    del entries[key]
                else:
                    later.append(key)
            self._filed -= len(bucket) - len(later)
            if later:
                buckets[second] = later
                return
            del buckets[heapq.heappop(seconds)]

    def _refile(self) -> None:
        self._buckets.clear()
        self._seconds.clear()
        self._filed = 0
        for key, (expires, _) in self._entries.items():
            self._file(key, expires)
