"""redis_client - every Redis client smtpgate makes, built from REDIS in one place.

SYNOPSIS
    connect(url, timeout, *, decode=True, retries=1, max_connections=None,
            wait=True) -> client
        redis.asyncio.Redis (one server, or a Sentinel set's master) or
        redis.asyncio.cluster.RedisCluster
    connect_hot(url, timeout, *, decode=True, max_connections=None, wait=True) -> client
        the hot path's: one pipelined connection (redis_pipelined.PipelinedRedis) for one
        server or a Sentinel set's master, what connect() gives for the rest
    connect_sync(url, timeout) -> redis.Redis | redis.cluster.RedisCluster      (the CLI)
    await watch_targets(url, timeout) -> list[redis.asyncio.Redis]
        one plain RESP2 client per server whose keys a tracking connection must watch
    is_cluster(client) -> bool
    ERRORS                    the exceptions a failed call raises (with TimeoutError)
    await mget(client, keys) -> list          MGET; split per hash slot on a Cluster
    mget_sync(client, keys) -> list
    async for page in stream_pages(client, key, low, count, timeout): ...
        a stream's entries from id `low` to its end, `count` per XRANGE

DESCRIPTION
    REDIS (smtpgate.redis_url) names one server, a Sentinel set or a
    Cluster; the rest of smtpgate does not care which, as long as it keeps
    to three rules that make every command work on all three:

    - keys that meet in one command or Lua script share a hash tag
      (smtpgate.lookups.keys: `smtpgate:conns:{client}`, ...);
    - several keys that need not meet go in a pipeline (a Cluster splits
      it per node and sends the parts at once) or through mget() here;
    - SCAN and key tracking go to every primary (watch_targets()).

    A Sentinel client asks the sentinels for the master's address on each
    new connection. When the master changes, the sentinels kill the old
    connections (or a write meets READONLY on the demoted master), redis-py
    drops the pool's connections and the next command connects to the new
    master (connect_hot()'s connection likewise); meanwhile commands fail,
    which callers answer with a temporary error. The password in the URL
    is the master's (and its replicas'); `sentinel_password` is the
    sentinels' own.

    A Cluster client learns the slot map from the nodes named in the URL
    and follows MOVED and ASK redirections itself.

    max_connections bounds one server's (or a Sentinel master's) pool (for
    connect_hot(), the pool of the redis-py client behind it: the hot path's
    calls share one connection and wait for no pool): with
    wait, a call beyond it waits up to timeout for a free connection (a
    blocking pool, which costs some 20-40 us of CPU per call in its
    condition variable); without, it fails at once. redis-py's own default
    fails the 101st call at once.

    connect_hot() is for the calls every session makes (the connection
    counts, the screening cache, the evidence, the table lookups): redis-py
    spends some 85 us of CPU on one call, most of it in its pool, retry and
    pipeline machinery; redis_pipelined sends every caller's commands down
    one connection and reads the replies with hiredis, with the same
    timeouts, errors, reconnects and Sentinel failover. The commands it does
    not serve go to a redis-py client made with connect()'s arguments. TLS
    (rediss://) and a URL with query options stay on redis-py altogether.

    timeout bounds every connect and every reply. retries is how often a
    command is sent again on a broken connection (a pooled connection may
    be stale after a restart or failover); a tracking connection must use
    0, since a silent reconnect would lose its CLIENT TRACKING state.
    max_connections bounds a single server's pool (callers wait for a free
    connection, within timeout); Sentinel and Cluster pools are unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.sentinel
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry as SyncRetry

from smtpgate import redis_url
from smtpgate.lookups.redis_pipelined import PipelinedRedis

# What a failed Redis call raises, whichever the client (a Cluster's "no node reachable" is
# not a RedisError).
ERRORS = (RedisError, RedisClusterException, OSError)


def _common(target: redis_url.RedisTarget, timeout: float, decode: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "decode_responses": decode}
    if target.password is not None:
        kwargs["password"] = target.password
    if target.username is not None:
        kwargs["username"] = target.username
    return kwargs


def connect(url: str, timeout: float, *, decode: bool = True, retries: int = 1,
            max_connections: int | None = None, protocol: int | None = None,
            wait: bool = True) -> Any:
    target = redis_url.parse(url)
    kwargs = _common(target, timeout, decode)
    kwargs["retry"] = Retry(NoBackoff(), retries)
    if protocol is not None:
        kwargs["protocol"] = protocol
    if target.kind == "cluster":
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                            retry_on_error=[RedisConnectionError], **kwargs)
    kwargs["retry_on_error"] = [RedisConnectionError]
    if target.kind == "sentinel":
        if max_connections is not None:
            kwargs["max_connections"] = max_connections
        return _sentinel(target, timeout).master_for(
            target.service, redis_class=aioredis.Redis, db=target.db, **kwargs)
    if max_connections is None or not wait:
        if max_connections is not None:
            kwargs["max_connections"] = max_connections
        client = aioredis.Redis.from_url(target.url, **kwargs)
    else:
        client = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            target.url, max_connections=max_connections, timeout=timeout, **kwargs))
    if protocol is not None:  # whatever the URL's own protocol= says
        client.connection_pool.connection_kwargs["protocol"] = protocol
    return client


def connect_hot(url: str, timeout: float, *, decode: bool = True,
                max_connections: int | None = None, wait: bool = True) -> Any:
    target = redis_url.parse(url)
    if target.kind == "cluster" or target.url.startswith("rediss:") or \
            (target.kind == "single" and "?" in target.url and not target.url.startswith("unix:")):
        return connect(url, timeout, decode=decode, max_connections=max_connections, wait=wait)
    return PipelinedRedis(target, timeout, decode=decode, fallback=lambda: connect(
        url, timeout, decode=decode, max_connections=max_connections, wait=wait))


def _sentinel(target: redis_url.RedisTarget, timeout: float) -> Sentinel:
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout,
                                       "socket_connect_timeout": timeout}
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    return Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)


def connect_sync(url: str, timeout: float) -> Any:
    """The CLI's client: decoded replies, one retry on a broken connection."""
    target = redis_url.parse(url)
    kwargs = _common(target, timeout, True)
    if target.kind == "cluster":
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in target.nodes], **kwargs)
    kwargs["retry"] = SyncRetry(NoBackoff(), 1)
    if target.kind == "sentinel":
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout,
                                           "socket_connect_timeout": timeout}
        if target.sentinel_password is not None:
            sentinel_kwargs["password"] = target.sentinel_password
        return redis.sentinel.Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs) \
            .master_for(target.service, db=target.db, **kwargs)
    return redis.Redis.from_url(target.url, **kwargs)


async def watch_targets(url: str, timeout: float) -> list[aioredis.Redis]:
    """Plain RESP2 clients, no retries, one per server holding keys: the master of a single
    server or Sentinel set, or every primary of a Cluster (asked for its slot map now)."""
    target = redis_url.parse(url)
    if target.kind != "cluster":
        return [connect(url, timeout, retries=0, protocol=2)]
    discovery = connect(url, timeout, retries=0)
    try:
        await discovery.initialize()
        primaries = [(n.host, n.port) for n in discovery.get_primaries()]
    finally:
        with contextlib.suppress(Exception):
            await discovery.aclose()
    kwargs = _common(target, timeout, True)
    return [aioredis.Redis(host=h, port=p, protocol=2, retry=Retry(NoBackoff(), 0), **kwargs)
            for h, p in primaries]


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster | redis.cluster.RedisCluster)


async def mget(client: Any, keys: list[str]) -> list[Any]:
    if isinstance(client, RedisCluster):
        return await client.mget_nonatomic(keys)
    return await client.mget(keys)


def mget_sync(client: Any, keys: list[str]) -> list[Any]:
    if isinstance(client, redis.cluster.RedisCluster):
        return client.mget_nonatomic(keys)
    return client.mget(keys)


async def stream_pages(client: Any, key: str, low: str, count: int,
                       timeout: float) -> AsyncIterator[list]:
    """XRANGE from `low` ("-", or "MS-0" for a time) to the end, `count` entries a round
    trip (each within `timeout`), page by page: a long stream is never read in one reply."""
    while True:
        async with asyncio.timeout(timeout):
            page = await client.xrange(key, min=low, max="+", count=count)
        yield page
        if len(page) < count:
            return
        last = page[-1][0]
        low = "(" + (last.decode() if isinstance(last, bytes) else last)
