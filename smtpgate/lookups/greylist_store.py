"""greylist_store - greylisting's memory in Redis: triplets first seen, networks passed.

SYNOPSIS
    GreylistStore(redis, *, delay, retry_window, pass_ttl, timeout=2.0)
    await store.see(network, tail, write=True) -> Seen        (smtpgate.checks.greylist)
    GreylistError               Redis did not answer in time: the caller tempfails

KEYS (smtpgate.lookups.keys: greylist_key, greylist_pass_key)
    smtpgate:greypass:{network}            the network passed; expires pass_ttl after
    smtpgate:grey:{network}:tail           a triplet's first try (ms); expires retry_window
                                           after it, deleted when it passes

DESCRIPTION
    see() is one script, one round trip, on Redis's clock (TIME), so that
    every node judges a retry by the same time: a network that passed
    before is "passed"; a triplet never seen (or seen longer than
    retry_window ago) is "new" and remembered now; one seen less than
    `delay` seconds ago is "early"; one seen `delay` seconds ago or more is
    "retried": the network is remembered as passed for `pass_ttl` and the
    triplet forgotten. `waited` is the seconds since the first try.

    write=False (explain's dry run) reads the same and writes nothing.

    The two keys share the network as hash tag, so the script runs on a
    Cluster as on one server.
"""

from __future__ import annotations

import asyncio

from smtpgate.checks.greylist import Seen
from smtpgate.lookups import keys, redis_client

_STATES = ("passed", "new", "early", "retried")
_SEE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
local first = redis.call('GET', KEYS[2])
if not first then
  if ARGV[4] == '1' then redis.call('SET', KEYS[2], now, 'PX', ARGV[2]) end
  return {1, 0}
end
local waited = now - tonumber(first)
if waited < tonumber(ARGV[1]) then return {2, waited} end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], now, 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
end
return {3, waited}
"""


class GreylistError(Exception):
    """Redis could not answer in time; whether the client may pass is unknown."""


class GreylistStore:
    def __init__(self, redis, *, delay: float, retry_window: float, pass_ttl: float,
                 timeout: float = 2.0) -> None:
        self._see = redis.register_script(_SEE)
        self._args = (int(delay * 1000), max(1, int(retry_window * 1000)),
                      max(1, int(pass_ttl * 1000)))
        self._timeout = timeout

    async def see(self, network: str, tail: str, write: bool = True) -> Seen:
        try:
            async with asyncio.timeout(self._timeout):
                state, waited = await self._see(
                    keys=[keys.greylist_pass_key(network), keys.greylist_key(network, tail)],
                    args=[*self._args, 1 if write else 0])
        except (*redis_client.ERRORS, TimeoutError) as exc:
            raise GreylistError(f"greylist lookup failed: {type(exc).__name__}: {exc}") \
                from None
        return Seen(_STATES[int(state)], int(waited) / 1000)
