"""event_rates - per-client and per-login event counters in fixed windows, in Redis.

SYNOPSIS
    EventRates(redis, *, timeout=2.0)
        await .count([(key, window), ...]) -> [rate, ...]   each counted in, one round trip
        await .peek(key) -> rate                            read only
    EventRateError                                          Redis failed or timed out

DESCRIPTION
    The counts behind smtpgate.checks.rate_limits, under
    smtpgate.lookups.keys.event_rate_key(event, whose), shared by every
    worker and host that uses one Redis. count() runs one script (sent by
    SHA1) over all the keys of a stage, the client's and the login's: one
    round trip, one command; on a Cluster, where the two live in different
    slots, one EVAL per key in one pipeline (a round trip per node, the
    nodes at once). It returns the counts with this event included. The
    window starts with the event that created the counter and ends
    `window` seconds later, when Redis drops the key: anvil's fixed window
    per client (ANVIL_REMOTE_INCR_RATE in Postfix's anvil.c), kept like
    the connection rate of smtpgate.lookups.screening_cache. Anvil keeps
    one window for all of a client's events; here each event has its own,
    which differs only in where a window starts. A counter found without
    an expiry gets one at its next event, so none limits its client for
    ever.

    peek() is for a check that must not count (the look before a TLS
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


# KEYS: the counters; ARGV: each one's window in ms. Returns the counts, this event included.
# The window starts with the INCR that creates a counter; a counter found without an expiry
# (written by hand, say) gets one, so no counter limits its client for ever.
_COUNT = """
local counts = {}
for i, key in ipairs(KEYS) do
    local n = redis.call('INCR', key)
    if n == 1 or redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ARGV[i]) end
    counts[i] = n
end
return counts
"""


class EventRates:
    def __init__(self, redis, *, timeout: float = 2.0) -> None:
        self._redis = redis
        self._timeout = timeout
        self._cluster = redis_client.is_cluster(redis)
        self._count = redis.register_script(_COUNT)

    async def count(self, counters: Sequence[tuple[str, float]]) -> list[int]:
        keys = [key for key, _ in counters]
        windows = [max(1, int(window * 1000)) for _, window in counters]
        async with _redis_call(self._timeout):
            if not self._cluster or len(keys) == 1:
                return [int(n) for n in await self._count(keys=keys, args=windows)]
            async with self._redis.pipeline(transaction=False) as pipe:  # a slot per key
                for key, window in zip(keys, windows, strict=True):
                    pipe.eval(_COUNT, 1, key, window)
                answers = await pipe.execute()
        return [int(answer[0]) for answer in answers]

    async def peek(self, key: str) -> int:
        async with _redis_call(self._timeout):
            return int(await self._redis.get(key) or 0)
