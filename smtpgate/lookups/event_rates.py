"""event_rates - per-client and per-login event counters in fixed windows, in Redis.

SYNOPSIS
    EventRates(redis, *, timeout=2.0)
        await .count([(key, window), ...]) -> [rate, ...]   each counted in, one round trip
        await .peek(key) -> rate                            read only
    EventRateError                                          Redis failed or timed out

DESCRIPTION
    The counts behind smtpgate.checks.rate_limits, under
    smtpgate.lookups.keys.event_rate_key(event, whose), shared by every
    worker and host that uses one Redis. count() sends, for each key, INCR
    and `PEXPIRE key window NX` in one pipeline (one round trip however
    many limits a stage checks; on a Cluster one per node, the nodes at
    once) and returns the counts with this event included. The window
    starts with the event that created the counter and ends `window`
    seconds later, when Redis drops the key: anvil's fixed window per
    client (ANVIL_REMOTE_INCR_RATE in Postfix's anvil.c), kept like the
    connection rate of smtpgate.lookups.screening_cache. Anvil keeps one
    window for all of a client's events; here each event has its own,
    which differs only in where a window starts. Because every count also
    sends PEXPIRE NX, a counter that somehow lost its expiry gets it back
    at its next event instead of limiting its client for ever (NX needs
    Redis 7.0).

    peek() is for a check that must not count (the look before a STARTTLS
    handshake): the count as it is, 0 for none.

    A failure raises EventRateError; the policy then lets the event
    through with a warning, as Postfix's smtpd does when anvil cannot be
    reached.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from smtpgate.lookups import redis_client


class EventRateError(Exception):
    """The event counters could not be read or written."""


@contextlib.asynccontextmanager
async def _redis_call(timeout: float):
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError as exc:  # first: TimeoutError is an OSError, one of ERRORS
        raise EventRateError(f"no answer from Redis in {timeout:g}s") from exc
    except redis_client.ERRORS as exc:
        raise EventRateError(str(exc)) from exc


class EventRates:
    def __init__(self, redis, *, timeout: float = 2.0) -> None:
        self._redis = redis
        self._timeout = timeout

    async def count(self, counters: Sequence[tuple[str, float]]) -> list[int]:
        async with _redis_call(self._timeout), self._redis.pipeline(transaction=False) as pipe:
            for key, window in counters:
                pipe.incr(key)
                pipe.pexpire(key, max(1, int(window * 1000)), nx=True)
            answers = await pipe.execute()
        return [int(n) for n in answers[::2]]

    async def peek(self, key: str) -> int:
        async with _redis_call(self._timeout):
            return int(await self._redis.get(key) or 0)
