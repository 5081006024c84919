"""pool - a few Postfix connections greeted ahead of need, and the limit on transactions in flight.

SYNOPSIS
    HopPool(hop, timeout, ehlo_name, size=4, max_age=60.0, on_outcome=None)
    await pool.take() -> NextHop            a greeted connection (a fresh one if none idle)
    await pool.connect() -> NextHop         a fresh one
    pool.check() -> (ok: bool | None, detail: str)    for /healthz; starts a reconnect
    pool.forget(reason) ; pool.close()
    TransactionLimit(limit, wait)
    async with limit.slot(): ...            RelayBusy when none is free within `wait`

DESCRIPTION
    A hand-off then costs Postfix only XCLIENT, EHLO and the transaction:
    the connect, the banner and the first EHLO happened while nobody
    waited. Each idle connection holds one Postfix smtpd process, so the
    pool stays small, and a connection older than max_age is closed rather
    than risk Postfix's own idle timeout. on_outcome(ok, detail), when given,
    hears every connection attempt's outcome, the background ones included
    (relay.hops marks a hop down or up again by it).

    TransactionLimit bounds the Postfix connections this worker uses at
    once (next_hop_transaction_limit, split between the workers), below
    Postfix's default process limit of 100, so Postfix always has a
    process left for its own work and a client never waits on a Postfix
    that has none. A message that finds no slot within `wait` seconds is
    answered at once with a 4xx (RelayBusy); the client tries again later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator

from smtpgate.config import HostPort
from smtpgate.relay.hop_timeouts import HopTimeouts
from smtpgate.relay.next_hop import NextHop, RelayError


class RelayBusy(Exception):
    """Every transaction slot towards Postfix stayed taken for the whole wait."""


class HopPool:
    def __init__(self, hop: HostPort, timeout: float | HopTimeouts, ehlo_name: str, size: int = 4,
                 max_age: float = 60.0,
                 on_outcome: Callable[[bool, str], None] | None = None) -> None:
        self.hop, self.timeout, self.ehlo_name = hop, timeout, ehlo_name
        self.on_outcome = on_outcome
        self.size, self.max_age = size, max_age
        self.offered: frozenset[str] | None = None  # XCLIENT attributes, once learned
        self._idle: list[NextHop] = []
        self._filling = 0
        self._tasks: set[asyncio.Task] = set()
        self.closed = False  # after reload or shutdown: hand out, but keep nothing idle
        self.ok: bool | None = None  # the last connection attempt's outcome (None: none yet)
        self.detail = ""

    async def take(self) -> NextHop:
        found = self.take_idle()
        return found if found is not None else await self.connect()

    async def connect(self) -> NextHop:
        """A fresh connection, greeted (what take() does when none is idle)."""
        try:
            hop = await NextHop.greeted(self.hop, self.timeout, self.ehlo_name, self.offered)
        except RelayError as exc:
            self.forget(str(exc))
            raise
        self.offered, self.ok, self.detail = hop.offered, True, ""
        if self.on_outcome is not None:
            self.on_outcome(True, "")
        return hop

    def forget(self, reason: str) -> None:
        """A hand-off failed: learn Postfix's XCLIENT attributes again (its settings may have
        changed), and say so on /healthz until a connection succeeds."""
        self.offered, self.ok, self.detail = None, False, reason
        if self.on_outcome is not None:
            self.on_outcome(False, reason)

    def check(self) -> tuple[bool | None, str]:
        """The next hop's health as last seen; idle connections Postfix closed are dropped
        and replaced, so a Postfix that went away (or came back) shows at the next check."""
        alive = []
        for hop in self._idle:
            if hop.closed or hop.peer_closed():
                hop.abort()
            else:
                alive.append(hop)
        self._idle = alive
        self._refill()
        return self.ok, self.detail

    def take_idle(self) -> NextHop | None:
        now = time.monotonic()
        found = None
        while self._idle and found is None:
            hop = self._idle.pop()
            if hop.closed or hop.peer_closed():
                hop.abort()
            elif now - hop.greeted_at > self.max_age:
                hop.close_quietly()
            else:
                found = hop
        self._refill()
        return found

    def _refill(self) -> None:
        while not self.closed and len(self._idle) + self._filling < self.size:
            self._filling += 1
            # no session's context: the connection serves whichever session comes next
            task = asyncio.get_running_loop().create_task(
                self._open_one(), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open_one(self) -> None:
        try:
            hop = await self.connect()
        except RelayError:
            return  # Postfix is down: the session that needs it will say 451
        finally:
            self._filling -= 1
        if self.closed:
            hop.close_quietly()
        else:
            self._idle.append(hop)

    def close(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for hop in self._idle:
            hop.close_quietly()
        self._idle.clear()


class TransactionLimit:
    def __init__(self, limit: int, wait: float) -> None:
        self.limit, self.wait = limit, wait
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._slot = _Slot(self)

    def slot(self) -> _Slot:
        """`async with limit.slot():` one transaction; a free slot is taken without a
        future, a generator or a timer (every message takes one)."""
        return self._slot

    async def _acquire(self) -> None:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.wait)  # a slot handed over, still counted
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed over just as the wait ended: pass it on
            if isinstance(exc, TimeoutError):
                raise RelayBusy from None
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


class _Slot:
    """The context manager of TransactionLimit.slot(); it holds no state of its own, so one
    serves every transaction of the limit. Entering takes a free slot at once and leaving
    gives it back at once, each answering with an awaitable that is already done (no
    coroutine made for either); only a wait for a slot is a coroutine."""

    __slots__ = ("_limit",)

    def __init__(self, limit: TransactionLimit) -> None:
        self._limit = limit

    def __aenter__(self) -> Awaitable[None]:
        limit = self._limit
        if limit.in_flight < limit.limit and not limit._waiters:
            limit.in_flight += 1
            return _DONE
        return limit._acquire()

    def __aexit__(self, *exc: object) -> Awaitable[None]:
        self._limit._release()
        return _DONE


class _Done:
    """An awaitable that is done: awaiting it gives None without suspending."""

    __slots__ = ()

    def __await__(self) -> Iterator[None]:
        return iter(())


_DONE = _Done()
