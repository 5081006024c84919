"""test_redis_calls - the client's cost of one Redis round trip, three ways.

SYNOPSIS
    python -m pytest benchmarks/micro/test_redis_calls.py --benchmark-timer time.process_time

DESCRIPTION
    `calls` concurrent callers (1, or 5 as a burst of connects) each run the
    connect script once (a trivial Lua script by SHA1, the shape of the
    connection counter's), and all are awaited; with time.process_time as
    the timer the figure is this process's CPU for the batch, redis-server's
    own excluded. Divide by `calls` for the cost per call.

      redis-py     redis.asyncio.Redis: a pooled connection, retry wrapper and
                   a Pipeline per batch (what smtpgate used)
      connection   redis-py's lower layer: one long-lived redis.asyncio
                   Connection, commands packed and replies read by hand
                   (callers take turns on it: it cannot interleave)
      pipelined    smtpgate.lookups.redis_pipelined: one connection, every
                   caller's commands written at once, replies parsed by hiredis
      none         no Redis: the benchmark's own cost (the loop, gather, tasks),
                   to subtract from the others

    The counter case runs ConnectionCounter.connect() and release() (the
    _CONNECT and _OWN scripts) with redis-py's client and the pipelined one.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from smtpgate import redis_url as redis_url_mod

SCRIPT = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


class _Nothing:
    async def evalsha(self, sha, numkeys, key, arg):
        return [key.encode(), str(arg).encode(), 1]


class _Turns:
    """redis-py's Connection used directly: one request and its replies at a time."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()

    async def evalsha(self, *args):
        async with self.lock:
            await self.conn.send_packed_command(self.conn.pack_command("EVALSHA", *args))
            return await self.conn.read_response()


def _client(kind: str, url: str):
    import redis.asyncio as aioredis

    from smtpgate.lookups import redis_client
    if kind == "none":
        return _Nothing()
    if kind == "redis-py":
        return redis_client.connect(url, 2.0, decode=False)
    if kind == "connection":
        host, port = url.split("//")[1].split("/")[0].split(":")
        return _Turns(aioredis.Connection(host=host, port=int(port), socket_timeout=2.0))
    return redis_client.connect_hot(url, 2.0, decode=False)


async def _close(client) -> None:
    if isinstance(client, _Nothing):
        return
    if isinstance(client, _Turns):
        await client.conn.disconnect()
    else:
        await client.aclose()


@pytest.mark.parametrize("calls", [1, 5])
@pytest.mark.parametrize("kind", ["redis-py", "connection", "pipelined", "none"])
def test_script_call(benchmark, redis_url, loop, kind, calls):
    client = _client(kind, redis_url)
    loop.run_until_complete(_load(redis_url))

    async def batch() -> list:
        return await asyncio.gather(*(client.evalsha(SHA, 1, "bench:calls", i)
                                      for i in range(calls)))

    try:
        answers = benchmark(lambda: loop.run_until_complete(batch()))
        assert [a[1] for a in answers] == [str(i).encode() for i in range(calls)]
    finally:
        loop.run_until_complete(_close(client))


async def _load(url: str) -> None:
    from smtpgate.lookups import redis_client
    client = redis_client.connect(url, 2.0)
    try:
        await client.script_load(SCRIPT)
    finally:
        await client.aclose()


@pytest.mark.parametrize("calls", [1, 5])
@pytest.mark.parametrize("kind", ["redis-py", "pipelined"])
def test_counter_connect(benchmark, redis_url, loop, kind, calls):
    """connect() of `calls` sessions at once (one pipeline), then their releases."""
    from smtpgate.lookups.screening_cache import ConnectionCounter

    assert redis_url_mod.parse(redis_url).kind == "single"
    client = _client(kind, redis_url)
    counter = ConnectionCounter(client)

    async def sessions() -> list[int]:
        leases = await asyncio.gather(*(counter.connect(f"192.0.2.{i}") for i in range(calls)))
        for lease in leases:
            counter.release_soon(lease)
        await counter.flush()
        return [lease.client_count for lease in leases]

    try:
        assert benchmark(lambda: loop.run_until_complete(sessions())) == [1] * calls
    finally:
        loop.run_until_complete(_close(client))
