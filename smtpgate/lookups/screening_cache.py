"""screening_cache - postscreen's temporary allowlist and the connection counters, in Redis.

SYNOPSIS
    ScreeningStoreError                    every Redis failure (the session answers 421 4.3.0)

    ScreeningCache(redis, *, fail_ttl=86400.0, timeout=2.0, clock=time.time, read_only=False)
        await .get(ip) -> dict[str, float]           test -> pass expiry (Unix time; 0 = failed)
        await .record_pass(ip, test, ttl) -> None
        await .record_passes(ip, {test: ttl, ...}) -> None
        await .record_fail(ip, test) -> None
    passed(entries, test, now) -> bool
    allowlisted(entries, tests, now) -> bool
    TESTS, NO_TESTS

    ConnectionCounter(redis, *, lease=120.0, ipv6_prefix=64, timeout=2.0, instance="")
        await .connect(ip) -> Lease              counts this session in; Lease has the counts
        await .peek(ip) -> Lease                 the counts connect() would give, nothing
                                                 written (explain's dry run)
        await .release(lease) -> None            counts it out (safe to call twice)
        await .refresh() -> None                 renews the leases of this process's sessions
        await .run_refresher() -> None           refresh() every lease/3 s until cancelled
    Lease(ip, client, session_id, client_count, client_rate, total)

DESCRIPTION
    Everything lives under `smtpgate:` (smtpgate.lookups.keys) and is shared by all
    smtpgate processes and hosts that use one Redis. Each call is one round
    trip (a Lua script or one pipeline). Redis errors, timeouts and lost
    connections raise ScreeningStoreError and nothing else.

    The screening cache is one hash per client IP (`smtpgate:psc:<ip>`),
    one field per test holding the Unix time its pass expires. A pass
    extends the key's own EXPIRE to the longest expiry in it, so Redis
    drops whole entries by itself: no process scans the cache, and there is
    no cleanup to coordinate between processes. record_fail() removes every
    pass of that client and marks the test failed (0) for at least
    `fail_ttl`: a client that failed a test is never allowlisted until it
    passes that test again. passed() and allowlisted() read get()'s result:
    a test counts only when its expiry is still ahead of `now`. A
    read_only cache (explain's dry run) reads and never writes.

    The counters implement the connect-time limits for smtpgate.checks.limits:
    - sessions in flight, per client (client_key: IPv4 as is, IPv6 per
      /ipv6_prefix) and for everyone, are sorted sets of session ids scored
      by a lease deadline taken from Redis's own clock (TIME), so hosts with
      skewed clocks agree. connect() adds the session, drops members whose
      lease ran out, and returns the counts, including this session.
      release() removes it. A process renews its own sessions' leases with
      refresh() (run_refresher() in the background); if it crashes, its
      sessions fall out of the counts within `lease` seconds.
    - the connection rate is a sorted set of connect times per client,
      trimmed to the last 60 seconds on each connect: an exact sliding
      window, as Postfix's anvil counts, expiring when the client goes quiet.
    Refused connections are counted too (anvil counts attempts); the session
    calls release() when it closes, whatever the verdict.

    On one server (or a Sentinel set's master) a connect is one script over
    all its keys. On a Redis Cluster a client's sessions and rate keys share
    its hash tag and meet in one script; the global set and the screening
    hash are commands of their own in the same pipeline, which the Cluster
    client splits per node. Each key is still updated atomically; the counts
    of one connect are no longer one snapshot (they never needed to be).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from smtpgate.checks.limits import client_key
from smtpgate.lookups import keys
from smtpgate.lookups import redis_client as redis_client_module

# NO_TESTS: the pass of a client screened while every test before the banner was off
# (postscreen's PASS NEW then), so that its next session is PASS OLD, as in postscreen
NO_TESTS = "no_tests"
TESTS = ("pregreet", "dnsbl", "pipelining", "non_smtp_command", "bare_newline", NO_TESTS)
RATE_WINDOW = 60
RELEASE_BATCH = 0.01  # seconds a closed session may stay counted, to share a round trip


class ScreeningStoreError(Exception):
    """Redis could not be used for screening state; the session answers 421 4.3.0."""


@contextlib.asynccontextmanager
async def _redis_call(what: str, timeout: float):
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError as exc:  # first: TimeoutError is an OSError, one of ERRORS
        raise ScreeningStoreError(f"{what}: no answer from Redis in {timeout:g}s") from exc
    except redis_client_module.ERRORS as exc:
        raise ScreeningStoreError(f"{what}: {exc}") from exc


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- the screening cache ---------------------------------------------------------------------

# ARGV: now, fail_ttl_ms, then (field, expiry, ttl_ms) triples. Fields with expiry 0 are
# failures: on the first one, every pass in the hash is removed.
_RECORD = """
local key = KEYS[1]
local longest = redis.call('PTTL', key)
for i = 3, #ARGV, 3 do
    local field, expiry, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    if expiry == '0' then
        local entries = redis.call('HGETALL', key)
        for j = 1, #entries, 2 do
            if entries[j + 1] ~= '0' then redis.call('HDEL', key, entries[j]) end
        end
        ttl = tonumber(ARGV[2])
        longest = 0  -- the removed passes no longer hold the entry
    end
    redis.call('HSET', key, field, expiry)
    if ttl > longest then longest = ttl end
end
if longest > 0 then redis.call('PEXPIRE', key, longest) end
return longest
"""


class ScreeningCache:
    def __init__(
        self,
        redis_client,
        *,
        fail_ttl: float = 86400.0,
        timeout: float = 2.0,
        clock=time.time,
        read_only: bool = False,
    ) -> None:
        self._redis = redis_client
        self._record = redis_client.register_script(_RECORD)
        self._read_only = read_only
        self._fail_ttl = fail_ttl
        self._timeout = timeout
        self._clock = clock

    async def get(self, ip: str) -> dict[str, float]:
        async with _redis_call(f"screening cache read for {ip}", self._timeout):
            raw = await self._redis.hgetall(keys.screening_key(ip))
        return _entries(raw)

    async def record_pass(self, ip: str, test: str, ttl: float) -> None:
        await self.record_passes(ip, {test: ttl})

    async def record_passes(self, ip: str, passes: Mapping[str, float]) -> None:
        now = self._clock()
        args: list = []
        for test, ttl in passes.items():
            _check_test(test)
            if ttl <= 0:
                continue  # nothing to cache; 0 would read as a failure
            args += [test, f"{now + ttl:.3f}", int(ttl * 1000)]
        if args:
            await self._run(ip, args, f"screening cache pass for {ip}")

    async def record_fail(self, ip: str, test: str) -> None:
        _check_test(test)
        await self._run(ip, [test, "0", 0], f"screening cache failure for {ip}")

    async def _run(self, ip: str, args: list, what: str) -> None:
        if self._read_only:
            return
        async with _redis_call(what, self._timeout):
            await self._record(
                keys=[keys.screening_key(ip)],
                args=[f"{self._clock():.3f}", int(self._fail_ttl * 1000), *args],
            )


def _entries(raw: Mapping) -> dict[str, float]:
    result = {}
    for name, value in raw.items():
        with contextlib.suppress(ValueError):
            result[_text(name)] = float(_text(value))
    return result


def _check_test(test: str) -> None:
    if test not in TESTS:
        raise ValueError(f"{test!r} is not a screening test ({', '.join(TESTS)})")


def passed(entries: Mapping[str, float], test: str, now: float) -> bool:
    return entries.get(test, 0.0) > now


def allowlisted(entries: Mapping[str, float], tests: Iterable[str], now: float) -> bool:
    """postscreen's PASS OLD: every enabled test has an unexpired pass, none failed."""
    tests = tuple(tests)
    return bool(tests) and all(passed(entries, t, now) for t in tests)


# --- the connection counters -----------------------------------------------------------------

# One server (or a Sentinel set's master): a connect is one script over all four keys
# (_CONNECT), a lease renewal one script (_REFRESH). On a Cluster those keys live in
# different slots, so a connect is one pipeline instead (still one round trip per node,
# the nodes at once): the client's counts (_CLIENT: its two keys share the client's hash
# tag), everyone's sessions (_ALL) and the screening hash; a renewal is one _RENEW per
# sessions set. Those scripts go as EVAL, not EVALSHA: a pipeline cannot reload a script a
# node lost (restart, failover) without an extra round trip to check, and they are short.
# The single script saves a connect about 35 us of client CPU against the pipeline.

# The client's two counts, shared by _CLIENT and _CONNECT. KEYS[1]: client sessions,
# KEYS[2]: client rate. ARGV: session id, lease s, rate window s.
_CLIENT_COUNTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local id = ARGV[1]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, id)
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZADD', KEYS[2], now, id)
redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000))
"""

# _CLIENT KEYS: client sessions, client rate. ARGV: session id, lease s, rate window s.
# Returns {client count, client rate}, this session included.
_CLIENT = _CLIENT_COUNTS + """
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
"""

# _CONNECT KEYS: client sessions, client rate, all sessions, the client's screening hash.
# ARGV: session id, lease s, rate window s.
# Returns {client count, client rate, total, screening hash}, this session included.
_CONNECT = _CLIENT_COUNTS + """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], now + lease, id)
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
        redis.call('HGETALL', KEYS[4])}
"""

# _REFRESH KEYS: all sessions, then one client-sessions key per session. ARGV: lease, ids.
_REFRESH = """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #KEYS do
    redis.call('ZADD', KEYS[i], deadline, ARGV[i])
    redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[1]) * 1000))
    redis.call('ZADD', KEYS[1], deadline, ARGV[i])
end
return #KEYS - 1
"""

# _ALL KEYS: all sessions. ARGV: session id, lease s. Returns the total, this session included.
_ALL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""

# _RENEW KEYS: one sessions set. ARGV: lease s, "1" to restart the set's expiry, then ids.
_RENEW = """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 3, #ARGV do
    redis.call('ZADD', KEYS[1], deadline, ARGV[i])
end
if ARGV[2] == '1' then redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000)) end
return #ARGV - 2
"""

_REFRESH_BATCH = 500


@dataclass(frozen=True, slots=True)
class Lease:
    ip: str
    client: str
    session_id: str
    client_count: int
    client_rate: int
    total: int
    screening: dict[str, float] = field(default_factory=dict)  # the cache, read in passing


class ConnectionCounter:
    def __init__(
        self,
        redis_client,
        *,
        lease: float = 120.0,
        ipv6_prefix: int = 64,
        timeout: float = 2.0,
        instance: str = "",
    ) -> None:
        self._redis = redis_client
        self._cluster = redis_client_module.is_cluster(redis_client)
        self._connect = redis_client.register_script(_CONNECT)
        self._refresh = redis_client.register_script(_REFRESH)
        self._lease = lease
        self._ipv6_prefix = ipv6_prefix
        self._timeout = timeout
        self._instance = instance or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._serial = itertools.count(1)
        self._live: dict[str, str] = {}  # session id -> client key, for refresh()
        self._released: list[tuple[str, str]] = []  # (client key, session id) to remove
        self._pending: dict[str, int] = {}  # client key -> released, not yet removed in Redis
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task] = set()

    @property
    def live(self) -> int:
        return len(self._live)

    async def connect(self, ip: str) -> Lease:
        client = client_key(ip, self._ipv6_prefix)
        session_id = f"{self._instance}:{next(self._serial)}"
        async with _redis_call(f"connection count for {ip}", self._timeout):
            if self._cluster:
                count, rate, total, screening = await self._connect_cluster(
                    ip, client, session_id)
            else:
                count, rate, total, screening = await self._connect(
                    keys=[keys.sessions_key(client), keys.rate_key(client), keys.SESSIONS_ALL,
                          keys.screening_key(ip)],
                    args=[session_id, self._lease, RATE_WINDOW])
                screening = dict(zip(screening[::2], screening[1::2], strict=True))
        self._live[session_id] = client
        # sessions of this worker that closed but wait for their release batch do not count
        count = int(count) - self._pending.get(client, 0)
        total = int(total) - sum(self._pending.values())
        return Lease(ip, client, session_id, count, int(rate), total, _entries(screening))

    async def peek(self, ip: str) -> Lease:
        """connect()'s counts, this session included, with nothing counted: a dry run must
        not use up the client's connection rate, nor hold a session."""
        client = client_key(ip, self._ipv6_prefix)
        now = time.time()
        async with (
            _redis_call(f"connection count for {ip}", self._timeout),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            pipe.zcount(keys.sessions_key(client), f"({now}", "+inf")
            pipe.zcount(keys.rate_key(client), f"({now - RATE_WINDOW}", "+inf")
            pipe.zcount(keys.SESSIONS_ALL, f"({now}", "+inf")
            pipe.hgetall(keys.screening_key(ip))
            count, rate, total, screening = await pipe.execute()
        return Lease(ip, client, "dry-run", int(count) + 1, int(rate) + 1, int(total) + 1,
                     _entries(screening))

    async def _connect_cluster(self, ip: str, client: str, session_id: str) -> tuple:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.eval(_CLIENT, 2, keys.sessions_key(client), keys.rate_key(client),
                      session_id, self._lease, RATE_WINDOW)
            pipe.eval(_ALL, 1, keys.SESSIONS_ALL, session_id, self._lease)
            pipe.hgetall(keys.screening_key(ip))
            (count, rate), total, screening = await pipe.execute()
        return count, rate, total, screening

    async def release(self, lease: Lease) -> None:
        if self._live.pop(lease.session_id, None) is None:
            return
        await self._remove([(lease.client, lease.session_id)])

    def release_soon(self, lease: Lease) -> None:
        """Release with the others that end within RELEASE_BATCH seconds: one round trip.

        A session's count lingers that long after its connection closed, which no limit
        notices; a busy worker saves a Redis round trip for almost every session.
        """
        if self._live.pop(lease.session_id, None) is None:
            return
        self._released.append((lease.client, lease.session_id))
        self._pending[lease.client] = self._pending.get(lease.client, 0) + 1
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(  # for all sessions
                RELEASE_BATCH, self._start_flush, context=contextvars.Context())

    def _start_flush(self) -> None:
        self._flush_handle = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Send the releases waiting for their batch (also at shutdown)."""
        batch, self._released = self._released, []
        if not batch:
            return
        try:
            with contextlib.suppress(ScreeningStoreError):  # the leases expire on their own
                await self._remove(batch)
        finally:  # until Redis has them removed, connect() keeps discounting them
            for client, _ in batch:
                left = self._pending[client] - 1
                if left:
                    self._pending[client] = left
                else:
                    del self._pending[client]

    async def _remove(self, batch: list[tuple[str, str]]) -> None:
        what = f"connection release for {len(batch)} sessions"
        async with (
            _redis_call(what, self._timeout),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            for client, session_id in batch:
                pipe.zrem(keys.sessions_key(client), session_id)
            pipe.zrem(keys.SESSIONS_ALL, *(session_id for _, session_id in batch))
            await pipe.execute()

    async def refresh(self) -> None:
        # Renewing re-adds members too, so a session whose lease lapsed while this process
        # was stalled counts again; a release racing this call leaves at most one stale
        # member, which expires after one lease.
        live = list(self._live.items())
        for start in range(0, len(live), _REFRESH_BATCH):
            batch = live[start:start + _REFRESH_BATCH]
            async with _redis_call("connection lease renewal", self._timeout):
                if self._cluster:
                    await self._refresh_cluster(batch)
                else:
                    await self._refresh(
                        keys=[keys.SESSIONS_ALL, *(keys.sessions_key(c) for _, c in batch)],
                        args=[self._lease, *(sid for sid, _ in batch)])

    async def _refresh_cluster(self, batch: list[tuple[str, str]]) -> None:
        by_client: dict[str, list[str]] = {}
        for session_id, client in batch:
            by_client.setdefault(client, []).append(session_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for client, ids in by_client.items():
                pipe.eval(_RENEW, 1, keys.sessions_key(client), self._lease, "1", *ids)
            pipe.eval(_RENEW, 1, keys.SESSIONS_ALL, self._lease, "0", *(sid for sid, _ in batch))
            await pipe.execute()

    async def run_refresher(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            with contextlib.suppress(ScreeningStoreError):
                await self.refresh()  # Redis down now: the next round tries again
