"""ordered_deadlines - one loop timer for many waits of the same length.

SYNOPSIS
    OrderedDeadlines(expired: Callable[[item], None])
        .add(item, loop)     item has .deadline (loop time) and .done; added as the waits begin
        .clear()             cancels the timer and forgets every item

DESCRIPTION
    When every wait has the same length (a resolver's timeout, the DNSBL's
    time limit), the deadlines come in the order the waits began, so one
    timer armed for the oldest item not yet done guards them all: a timer
    and its handle per query were the dearest part of one. When it fires,
    each item past its deadline leaves the queue and, unless done
    meanwhile, is handed to expired(); then the timer is armed again for
    the oldest item still waiting. Items done before their deadline are let
    go as the queue reaches them. expired() may call clear().
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any


class OrderedDeadlines:
    __slots__ = ("_expired", "_items", "_loop", "_timer")

    def __init__(self, expired: Callable[[Any], None]) -> None:
        self._expired = expired
        self._items: collections.deque = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: Any, loop: asyncio.AbstractEventLoop) -> None:
        items = self._items
        while items and items[0].done:  # finished: nothing left to time
            items.popleft()
        items.append(item)
        self._loop = loop
        if self._timer is None:
            self._timer = loop.call_at(item.deadline, self._fire)

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._items.clear()

    def _fire(self) -> None:
        self._timer = None
        loop, items = self._loop, self._items
        now = loop.time()
        while items:
            item = items[0]
            if not item.done and item.deadline > now:
                self._timer = loop.call_at(item.deadline, self._fire)
                return
            items.popleft()  # before expired(): it may clear the queue
            if not item.done:
                self._expired(item)
