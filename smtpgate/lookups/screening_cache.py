"""screening_cache - postscreen's temporary allowlist and the connection counters, in Redis.

SYNOPSIS
    ScreeningStoreError                    every Redis failure (the session answers 421 4.3.0)

    ScreeningCache(redis, *, fail_ttl=86400.0, timeout=2.0, clock=time.time, read_only=False)
        await .get(ip) -> dict[str, float]           test -> pass expiry (Unix time; 0 = failed)
        await .record_pass(ip, test, ttl) -> None
        await .record_passes(ip, {test: ttl, ...}) -> None
        await .record_fail(ip, test) -> None
        .session_write(ip, passes, failed, held=None) -> (key, args) | None
                                                     for release_soon()
    passed(entries, test, now) -> bool
    allowlisted(entries, tests, now) -> bool
    TESTS, NO_TESTS

    ConnectionCounter(redis, *, lease=120.0, ipv6_prefix=64, timeout=2.0, instance="",
                      rate_window=60.0)
        await .connect(ip) -> Lease              counts this session in; Lease has the counts
                                                 and the client's screening cache
        await .peek(ip) -> Lease                 the counts connect() would give, nothing
                                                 written (explain's dry run)
        .release_soon(lease, write=None)         counts it out, writes `write`, in a batch
        await .release(lease, write=None)        the same at once (safe to call twice)
        await .flush() -> None                   send what waits for its batch
        await .refresh() -> None                 renews this process's counts
        await .run_refresher() -> None           refresh() every lease/3 s until cancelled
    Lease(ip, client, session_id, client_count, client_rate, total, screening)

DESCRIPTION
    Everything lives under `smtpgate:` (smtpgate.lookups.keys) and is shared by all
    smtpgate processes and hosts that use one Redis. A session costs two
    round trips: connect() (the counts and the screening cache, one script)
    and its end (release_soon(): the count and what screening found, one
    pipeline shared with the sessions that ended in the same RELEASE_BATCH).
    The connect() calls made in one turn of the event loop (a burst of
    connections accepted together) share one pipeline too, sent at the
    loop's next turn: no wait is added, and under load, when the accept
    queue holds many clients, one write and one read serve them all.
    Redis errors, timeouts and lost connections raise ScreeningStoreError and
    nothing else.

    The screening cache is one hash per client IP (`smtpgate:psc:<ip>`),
    one field per test holding the Unix time its pass expires. A pass
    extends the key's own EXPIRE to the longest expiry in it, so Redis
    drops whole entries by itself: no process scans the cache, and there is
    no cleanup to coordinate between processes. A failure removes every
    pass of that client and marks the test failed (0) for at least
    `fail_ttl`: a client that failed a test is never allowlisted until it
    passes that test again. passed() and allowlisted() read get()'s result:
    a test counts only when its expiry is still ahead of `now`. A session's
    passes and failures are written when it ends (session_write() with
    release_soon()), not as they happen: another session of the same client
    in the meantime is judged by what the cache held before (screened again,
    or let through on earlier passes), as it would have been a moment
    earlier. Given `held`, the entry the session read at connect, a session
    whose entry held no unexpired pass writes no failure: there is no pass
    to remove, and a client without passes is screened again anyway (most
    refused first contacts: a DNSBL-listed client costs no write then,
    which is also what postscreen does, caching only clients that passed).
    A read_only cache (explain's dry run) reads and never
    writes: its session_write() is None.

    The counters implement the connect-time limits for smtpgate.checks.limits
    (the comments above the scripts say how they compare with anvil):
    - sessions in flight, per client (client_key: IPv4 as is, IPv6 per
      /ipv6_prefix) and for everyone: a hash per client and one for all,
      one field per process holding its own count and a deadline on Redis's
      clock. A process renews its fields every lease/3 s; if it crashes, its
      sessions fall out of the counts within `lease` seconds.
    - the connection rate per client: a counter that starts with the
      client's first connect and expires `rate_window` seconds later
      (anvil_rate_time_unit, 60 s by default), as anvil's does.
    Refused connections are counted too (anvil counts attempts); the session
    is released when it closes, whatever the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from redis.exceptions import NoScriptError

from smtpgate.checks.limits import client_key
from smtpgate.lookups import keys
from smtpgate.lookups import redis_client as redis_client_module
from smtpgate.lookups.redis_pipelined import PipelinedRedis, pack, raise_first

log = logging.getLogger("smtpgate.screening")

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
    except (TimeoutError, *redis_client_module.ERRORS) as exc:
        raise ScreeningStoreError(f"{what}: {_failure(exc, timeout)}") from exc


def _failure(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):  # first: TimeoutError is an OSError, one of ERRORS
        return f"no answer from Redis in {timeout:g}s"
    return str(exc)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- the screening cache ---------------------------------------------------------------------

# ARGV: now, fail_ttl_ms, then (field, expiry, ttl_ms) triples. Fields with expiry 0 are
# failures: on the first one, every pass in the hash is removed.
_RECORD = """
local key = KEYS[1]
local longest = redis.call('PTTL', key)
local fields = {}
for i = 3, #ARGV, 3 do
    local field, expiry, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    if expiry == '0' and longest ~= 0 then
        local entries = redis.call('HGETALL', key)
        for j = 1, #entries, 2 do
            if entries[j + 1] ~= '0' then redis.call('HDEL', key, entries[j]) end
        end
        longest = 0  -- the removed passes no longer hold the entry
    end
    if expiry == '0' then ttl = tonumber(ARGV[2]) end
    fields[#fields + 1] = field
    fields[#fields + 1] = expiry
    if ttl > longest then longest = ttl end
end
redis.call('HSET', key, unpack(fields))  -- one command for all of a session's tests
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
        await self._run(self.session_write(ip, passes, ()), f"screening cache pass for {ip}")

    async def record_fail(self, ip: str, test: str) -> None:
        await self._run(self.session_write(ip, {}, (test,)), f"screening cache failure for {ip}")

    def session_write(self, ip: str, passes: Mapping[str, float], failed: Iterable[str],
                      held: Mapping[str, float] | None = None) -> tuple[str, list] | None:
        """What a session learnt, as (key, ARGV) of the record script; None if nothing.

        Failures win: a session that failed any test records only its failures, which
        remove the client's passes, so a pass of the same session cannot outlive them;
        with `held` (the entry read at connect) holding no pass, there is nothing to remove.
        """
        failed = tuple(failed)
        for test in (*failed, *passes):
            _check_test(test)
        if self._read_only:
            return None
        now = self._clock()
        if failed and held is not None and not any(v > now for v in held.values()):
            return None
        if failed:
            args = [x for test in failed for x in (test, "0", 0)]
        else:  # a ttl of 0 would read as a failure: nothing to cache
            args = [x for test, ttl in passes.items() if ttl > 0
                    for x in (test, f"{now + ttl:.3f}", int(ttl * 1000))]
        if not args:
            return None
        return keys.screening_key(ip), [f"{now:.3f}", int(self._fail_ttl * 1000), *args]

    async def _run(self, write: tuple[str, list] | None, what: str) -> None:
        if write is None:
            return
        async with _redis_call(what, self._timeout):
            await self._record(keys=[write[0]], args=write[1])


def _entries(raw: Mapping) -> dict[str, float]:
    result = {}
    for name, value in raw.items():
        with contextlib.suppress(ValueError):
            result[_text(name)] = float(_text(value))
    return result


def _live_sum(fields: Mapping, now_ms: float) -> int:
    """A count hash's sessions (_COUNT's fields "<count> <deadline ms>"), the renewed ones."""
    total = 0
    for value in fields.values():
        count, _, deadline = _text(value).partition(" ")
        with contextlib.suppress(ValueError):
            if float(deadline) > now_ms:
                total += int(count)
    return total


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

# Concurrency: each process writes its own count of a client's sessions (and of all its
# sessions) into one hash field, "<count> <deadline ms>", the deadline from Redis's clock
# (TIME) so hosts with skewed clocks agree. A connect sums the fields whose deadline is ahead
# and deletes the others: a crashed process's sessions fall out of everyone's counts within
# one lease, as anvil forgets an smtpd whose connection to it closed. A process only ever
# writes the count it holds in memory, never an increment, so a lost or reordered write is
# corrected by its next connect, release or lease renewal (every lease/3 s) instead of
# drifting; the price is a count that may be one off for that long when a release and a
# connect of one client from one process race over two Redis connections.
#
# Rate: one integer per client, INCR'd by every connect, that expires RATE_WINDOW seconds
# after the first connect counted in it. That is anvil's own bookkeeping, not an
# approximation of it: anvil starts a client's rate interval at its first connection and
# resets the count when anvil_rate_time_unit (60 s) has passed since then (a fixed window per
# client, not a sliding one: ANVIL_REMOTE_INCR_RATE in Postfix's src/anvil/anvil.c). It
# costs one command, where a sorted set of connect times cost three and grew with the rate
# it measured. What does differ from anvil is the concurrency count's bookkeeping above (a
# lease per process instead of anvil's per-connection accounting), and that the counts are
# shared by every process and host instead of held by one anvil per Postfix instance.
#
# On one server (or a Sentinel set's master) a connect is one script over every key
# (_CONNECT, sent by SHA1). On a Redis Cluster the client's count and rate share its hash tag
# and meet in _CLIENT, everyone's count is _ALL and the screening hash an HGETALL, in one
# pipeline (one round trip per node, the nodes at once). The end of a session, its release
# and its screening results, is one pipeline for every session that ended within
# RELEASE_BATCH seconds of it: each session costs at most two round trips, connect and end.

# The count fragment. ARGV[1]: instance, ARGV[2]: lease ms. count(key, n) writes this
# process's n (deleting the field at 0) and returns the sum of the live fields.
_COUNT = """
local instance, lease = ARGV[1], tonumber(ARGV[2])
local now_ms
local function now()  -- asked once, and only when needed: a release to 0 needs no clock
    if not now_ms then
        local t = redis.call('TIME')
        now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    return now_ms
end
local function own(key, n)
    if n > 0 then
        redis.call('HSET', key, instance, string.format('%d %.0f', n, now() + lease))
        redis.call('PEXPIRE', key, lease)
    else
        redis.call('HDEL', key, instance)
    end
end
local function count(key, n)
    own(key, n)
    local fields, total = redis.call('HGETALL', key), 0
    for i = 1, #fields, 2 do
        local c, d = string.match(fields[i + 1], '^(%d+) (%d+)$')
        if c and tonumber(d) > now() then
            total = total + tonumber(c)
        else
            redis.call('HDEL', key, fields[i])  -- a process that stopped renewing
        end
    end
    return total
end
local function rate(key, window)
    local r = redis.call('INCR', key)
    if r == 1 then redis.call('PEXPIRE', key, window) end
    return r
end
"""

# _CONNECT KEYS: client count, client rate, all count, the client's screening hash.
# ARGV: instance, lease ms, this process's sessions of the client, all its sessions, window ms.
# Returns {client count, client rate, total, screening hash}, this session included.
_CONNECT = _COUNT + """
return {count(KEYS[1], tonumber(ARGV[3])), rate(KEYS[2], tonumber(ARGV[5])),
        count(KEYS[3], tonumber(ARGV[4])), redis.call('HGETALL', KEYS[4])}
"""

# _CLIENT KEYS: client count, client rate. ARGV: instance, lease ms, this process's sessions
# of the client, window ms. Returns {client count, client rate}.
_CLIENT = _COUNT + """
return {count(KEYS[1], tonumber(ARGV[3])), rate(KEYS[2], tonumber(ARGV[4]))}
"""

# _ALL KEYS: all count. ARGV: instance, lease ms, this process's sessions. Returns the total.
_ALL = _COUNT + """
return count(KEYS[1], tonumber(ARGV[3]))
"""

# _OWN KEYS: count hashes. ARGV: instance, lease ms, then this process's count for each key.
# Releases and renewals: nobody reads the sum then, so no HGETALL.
_OWN = _COUNT + """
for i = 1, #KEYS do own(KEYS[i], tonumber(ARGV[i + 2])) end
return #KEYS
"""

_SHA = {script: hashlib.sha1(script.encode()).hexdigest()
        for script in (_CONNECT, _OWN, _RECORD)}
_OWN_BATCH = 500  # count hashes per _OWN call at a renewal


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
        rate_window: float = RATE_WINDOW,
    ) -> None:
        self._redis = redis_client
        self.rate_window_ms = max(1, int(rate_window * 1000))  # a reload may change it
        self._cluster = redis_client_module.is_cluster(redis_client)
        self._lease_ms = max(1, int(lease * 1000))
        self._lease = lease
        self._ipv6_prefix = ipv6_prefix
        self._timeout = timeout
        self._instance = instance or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._serial = itertools.count(1)
        self._live: dict[str, str] = {}  # session id -> client key
        self._clients: dict[str, int] = {}  # client key -> its sessions in self._live
        self._ended: set[str] = set()  # clients whose count changed since the last flush
        self._writes: list[tuple[str, list]] = []  # screening hash -> _RECORD ARGV, to send
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task] = set()
        # connect() calls of this turn of the loop: (ip, future, keys, ARGV)
        self._connects: list[tuple[str, asyncio.Future, list, list]] = []

    @property
    def live(self) -> int:
        return len(self._live)

    async def connect(self, ip: str) -> Lease:
        client = client_key(ip, self._ipv6_prefix)
        session_id = f"{self._instance}:{next(self._serial)}"
        self._live[session_id] = client  # counted at once: a concurrent release sees it
        mine = self._clients[client] = self._clients.get(client, 0) + 1
        try:
            if self._cluster:
                async with _redis_call(f"connection count for {ip}", self._timeout):
                    count, rate, total, screening = await self._connect_cluster(ip, client, mine)
            else:
                count, rate, total, screening = await self._connect_soon(
                    ip, [keys.count_key(client), keys.rate_key(client), keys.COUNT_ALL,
                         keys.screening_key(ip)],
                    [self._instance, self._lease_ms, mine, len(self._live), self.rate_window_ms])
                screening = dict(zip(screening[::2], screening[1::2], strict=True))
        except ScreeningStoreError:
            # no lease: the session answers 421 and ends. Its count is not sent again: if the
            # script ran after all, the field is one high until this process next writes it
            # or its lease ends, and a Redis outage leaves no queue of clients to write.
            self._forget(session_id, ended=False)
            raise
        return Lease(ip, client, session_id, int(count), int(rate), int(total),
                     _entries(screening))

    def _connect_soon(self, ip: str, script_keys: list, args: list) -> asyncio.Future:
        """The _CONNECT script's answer for one session, sent with the other sessions that
        connect in this turn of the loop (one pipeline, at the next turn)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._connects.append((ip, future, script_keys, args))
        if len(self._connects) == 1:
            # a context of its own: the batch belongs to no session (nor its log lines)
            loop.call_soon(self._start_connects, context=contextvars.Context())
        return future

    def _start_connects(self) -> None:
        batch, self._connects = self._connects, []
        if isinstance(self._redis, PipelinedRedis):
            self._submit_connects(batch)
            return
        self._connects_task(batch)

    def _connects_task(self, batch: list[tuple[str, asyncio.Future, list, list]]) -> None:
        task = asyncio.get_running_loop().create_task(self._send_connects(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    def _submit_connects(self, batch: list[tuple[str, asyncio.Future, list, list]]) -> None:
        """_send_connects() on the pipelined client, from this callback: written at once,
        answered by a callback (no task or coroutine for the connect of every session); a
        lost script, or connection, takes _send_connects() after all."""
        out: list[bytes] = []
        for _, _, script_keys, args in batch:
            pack(("EVALSHA", _SHA[_CONNECT], len(script_keys), *script_keys, *args), out)
        sent = self._redis.submit(b"".join(out), len(batch))
        timer = asyncio.get_running_loop().call_later(
            self._timeout, self._connects_overdue, batch, sent)
        sent.add_done_callback(functools.partial(self._connects_answered, batch, timer))

    def _connects_overdue(self, batch: list, sent: asyncio.Future) -> None:
        sent.cancel()
        self._connects_failed(batch, TimeoutError())

    def _connects_failed(self, batch: list, exc: BaseException) -> None:
        reason = _failure(exc, self._timeout)
        for ip, future, _, _ in batch:
            if not future.done():
                future.set_exception(ScreeningStoreError(f"connection count for {ip}: {reason}"))

    def _connects_answered(self, batch: list, timer: asyncio.TimerHandle,
                           sent: asyncio.Future) -> None:
        timer.cancel()
        if sent.cancelled():  # overdue: the batch has failed already
            return
        exc = sent.exception()
        if exc is not None:
            self._connects_failed(batch, exc)
            return
        answers = sent.result()
        if any(isinstance(answer, Exception) for answer in answers):
            if any(isinstance(answer, NoScriptError) for answer in answers):
                self._connects_task(batch)  # nothing ran: loaded, and sent again
                return
            try:
                raise_first(answers, [("EVALSHA", _SHA[_CONNECT], len(k), *k, *a)
                                      for _, _, k, a in batch])
            except Exception as error:  # the first error reply, as a pipeline raises it
                self._connects_failed(batch, error)
            return
        for (_, future, _, _), answer in zip(batch, answers, strict=True):
            if not future.done():
                future.set_result(answer)

    async def _send_connects(self, batch: list[tuple[str, asyncio.Future, list, list]]) -> None:
        """One pipeline of _CONNECT calls by SHA1 (loaded again, and the pipeline repeated
        once, if the server lost it: a script that was not found did not run). Each
        session hears its own answer, or the failure in its own words."""
        try:
            async with asyncio.timeout(self._timeout):
                for attempt in (1, 2):
                    try:
                        async with self._redis.pipeline(transaction=False) as pipe:
                            for _, _, script_keys, args in batch:
                                pipe.evalsha(_SHA[_CONNECT], len(script_keys), *script_keys,
                                             *args)
                            answers = await pipe.execute()
                        break
                    except NoScriptError:
                        if attempt == 2:
                            raise
                        await self._redis.script_load(_CONNECT)
        except (TimeoutError, *redis_client_module.ERRORS) as exc:
            reason = _failure(exc, self._timeout)
            for ip, future, _, _ in batch:
                if not future.done():
                    future.set_exception(
                        ScreeningStoreError(f"connection count for {ip}: {reason}"))
            return
        for (_, future, _, _), answer in zip(batch, answers, strict=True):
            if not future.done():
                future.set_result(answer)

    async def peek(self, ip: str) -> Lease:
        """connect()'s counts, this session included, with nothing counted: a dry run must
        not use up the client's connection rate, nor hold a session. (The deadlines are
        read against this host's clock, not Redis's: near enough for a dry run.)"""
        client = client_key(ip, self._ipv6_prefix)
        async with (
            _redis_call(f"connection count for {ip}", self._timeout),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            pipe.hgetall(keys.count_key(client))
            pipe.get(keys.rate_key(client))
            pipe.hgetall(keys.COUNT_ALL)
            pipe.hgetall(keys.screening_key(ip))
            count, rate, total, screening = await pipe.execute()
        now_ms = time.time() * 1000
        return Lease(ip, client, "dry-run", _live_sum(count, now_ms) + 1, int(rate or 0) + 1,
                     _live_sum(total, now_ms) + 1, _entries(screening))

    async def _connect_cluster(self, ip: str, client: str, mine: int) -> tuple:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.eval(_CLIENT, 2, keys.count_key(client), keys.rate_key(client),
                      self._instance, self._lease_ms, mine, self.rate_window_ms)
            pipe.eval(_ALL, 1, keys.COUNT_ALL, self._instance, self._lease_ms, len(self._live))
            pipe.hgetall(keys.screening_key(ip))
            (count, rate), total, screening = await pipe.execute()
        return count, rate, total, screening

    def _forget(self, session_id: str, ended: bool = True) -> str | None:
        client = self._live.pop(session_id, None)
        if client is not None:
            left = self._clients[client] - 1
            if left:
                self._clients[client] = left
            else:
                del self._clients[client]
            if ended:
                self._ended.add(client)
        return client

    async def release(self, lease: Lease, write: tuple[str, list] | None = None) -> None:
        """Count the session out (safe to call twice) and write its screening results."""
        if self._forget(lease.session_id) is not None or write is not None:
            if write is not None:
                self._writes.append(write)
            await self._flush()

    def release_soon(self, lease: Lease, write: tuple[str, list] | None = None) -> None:
        """Release with the others that end within RELEASE_BATCH seconds: one round trip.

        `write` is the session's screening results (ScreeningCache.session_write), sent in
        the same round trip. The session stops counting in this process at once; Redis
        hears of it with the batch, which no limit notices, and a busy worker saves a round
        trip for almost every session.
        """
        if self._forget(lease.session_id) is None and write is None:
            return
        if write is not None:
            self._writes.append(write)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(  # for all sessions
                RELEASE_BATCH, self._start_flush, context=contextvars.Context())

    def _start_flush(self) -> None:
        self._flush_handle = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Send the releases and screening results waiting for their batch (also at shutdown).

        A failed release is not retried: the count heals at the next connect or renewal,
        and at worst the lease runs out. A failed screening write is logged and lost: the
        client is screened again next time.
        """
        try:
            await self._flush()
        except ScreeningStoreError as exc:
            log.warning("warning: connection count and screening cache: %s", exc)

    async def _flush(self) -> None:
        ended, self._ended = self._ended, set()
        writes, self._writes = self._writes, []
        if not ended and not writes:
            return
        counts = [(keys.count_key(c), self._clients.get(c, 0)) for c in ended]
        if ended:
            counts.append((keys.COUNT_ALL, len(self._live)))
        async with _redis_call(f"end of sessions of {len(ended)} clients", self._timeout):
            await self._send(counts, writes)

    async def _send(self, counts: list[tuple[str, int]], writes: list[tuple[str, list]]) -> None:
        """Screening writes, then own counts, in one pipeline (so a count seen gone means
        the screening results of its sessions are in).

        On one server the scripts go by SHA1 (loaded again, and the pipeline repeated once,
        if the server lost them: every call is idempotent). redis-py's Cluster pipeline
        takes no EVALSHA, so there they go as EVAL, one _OWN per slot.
        """
        if self._cluster:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, args in writes:
                    pipe.eval(_RECORD, 1, key, *args)
                for key, n in counts:
                    pipe.eval(_OWN, 1, key, self._instance, self._lease_ms, n)
                await pipe.execute()
            return
        for attempt in (1, 2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, args in writes:
                    pipe.evalsha(_SHA[_RECORD], 1, key, *args)
                if counts:
                    pipe.evalsha(_SHA[_OWN], len(counts), *(k for k, _ in counts),
                                 self._instance, self._lease_ms, *(n for _, n in counts))
                try:
                    await pipe.execute()
                    return
                except NoScriptError:
                    if attempt == 2:
                        raise
            for script in (_OWN, _RECORD):
                await self._redis.script_load(script)

    async def refresh(self) -> None:
        """Renew this process's fields: every client it holds sessions of, and the total."""
        counts = [(keys.count_key(c), n) for c, n in self._clients.items()]
        counts.append((keys.COUNT_ALL, len(self._live)))
        for start in range(0, len(counts), _OWN_BATCH):
            async with _redis_call("connection lease renewal", self._timeout):
                await self._send(counts[start:start + _OWN_BATCH], [])

    async def run_refresher(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            with contextlib.suppress(ScreeningStoreError):
                await self.refresh()  # Redis down now: the next round tries again
