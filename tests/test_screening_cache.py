"""The screening cache and the connection counters against a real redis-server."""

import asyncio
import os
import signal
import time

import pytest
import redis.asyncio
from services.waiting import no_hang

from smtpgate.lookups import keys
from smtpgate.lookups.screening_cache import (
    ConnectionCounter,
    ScreeningCache,
    ScreeningStoreError,
    allowlisted,
    passed,
)


@pytest.fixture
async def aredis(redis, redis_server):
    client = _async_client(redis_server)
    yield client
    await client.aclose()


def _async_client(server):
    return redis.asyncio.Redis(host=server.host, port=server.port, decode_responses=True)


async def test_pass_is_read_back_with_its_expiry(redis, aredis):
    cache = ScreeningCache(aredis)
    before = time.time()
    await cache.record_pass("192.0.2.10", "pregreet", 86400)
    entries = await cache.get("192.0.2.10")
    assert set(entries) == {"pregreet"}
    assert before + 86400 - 1 <= entries["pregreet"] <= time.time() + 86400 + 1
    assert passed(entries, "pregreet", time.time())
    assert not passed(entries, "pregreet", time.time() + 86401)
    assert await cache.get("192.0.2.11") == {}


async def test_key_expires_with_the_longest_pass(redis, aredis):
    cache = ScreeningCache(aredis)
    await cache.record_passes("192.0.2.12", {"pregreet": 86400, "dnsbl": 300})
    key = keys.screening_key("192.0.2.12")
    assert 86000 < redis.ttl(key) <= 86400
    await cache.record_pass("192.0.2.12", "dnsbl", 60)  # a shorter pass never shortens the key
    assert 86000 < redis.ttl(key) <= 86400
    assert redis.hget(key, "dnsbl") is not None


async def test_entries_vanish_by_themselves(redis, aredis):
    cache = ScreeningCache(aredis)
    await cache.record_pass("192.0.2.13", "dnsbl", 0.3)
    assert await cache.get("192.0.2.13")
    deadline = time.monotonic() + 5
    while redis.exists(keys.screening_key("192.0.2.13")):
        assert time.monotonic() < deadline, "Redis did not expire the entry"
        await asyncio.sleep(0.05)
    assert await cache.get("192.0.2.13") == {}


async def test_failure_removes_passes_and_is_never_allowlisted(redis, aredis):
    cache = ScreeningCache(aredis, fail_ttl=3600)
    tests = ("pregreet", "dnsbl")
    await cache.record_passes("192.0.2.14", {"pregreet": 86400, "dnsbl": 3600})
    assert allowlisted(await cache.get("192.0.2.14"), tests, time.time())
    await cache.record_fail("192.0.2.14", "pipelining")
    entries = await cache.get("192.0.2.14")
    assert entries == {"pipelining": 0.0}
    assert not allowlisted(entries, tests, time.time())
    assert not allowlisted(entries, (*tests, "pipelining"), time.time())
    assert 3500 < redis.ttl(keys.screening_key("192.0.2.14")) <= 3600
    # passing the other tests again still leaves the failed one failed
    await cache.record_passes("192.0.2.14", {"pregreet": 86400, "dnsbl": 3600})
    entries = await cache.get("192.0.2.14")
    assert allowlisted(entries, tests, time.time())
    assert not allowlisted(entries, (*tests, "pipelining"), time.time())


async def test_unknown_test_and_zero_ttl(redis, aredis):
    cache = ScreeningCache(aredis)
    with pytest.raises(ValueError, match="'greylist' is not a screening test"):
        await cache.record_pass("192.0.2.15", "greylist", 60)
    await cache.record_pass("192.0.2.15", "dnsbl", 0)
    assert await cache.get("192.0.2.15") == {}
    assert not allowlisted({}, (), time.time())


async def test_ipv6_client(redis, aredis):
    cache = ScreeningCache(aredis)
    await cache.record_pass("2001:db8::25", "pregreet", 600)
    assert passed(await cache.get("2001:db8::25"), "pregreet", time.time())


# --- counters ------------------------------------------------------------------------------


async def test_counts_per_client_and_global_across_processes(redis, aredis):
    one = ConnectionCounter(aredis, instance="hostA:1")
    two = ConnectionCounter(aredis, instance="hostB:2")
    a1 = await one.connect("192.0.2.20")
    a2 = await two.connect("192.0.2.20")
    b1 = await one.connect("192.0.2.21")
    assert (a1.client_count, a1.total) == (1, 1)
    assert (a2.client_count, a2.client_rate, a2.total) == (2, 2, 2)
    assert (b1.client_count, b1.client_rate, b1.total) == (1, 1, 3)
    await one.release(a1)
    await one.release(a1)  # twice is harmless
    a3 = await one.connect("192.0.2.20")
    assert (a3.client_count, a3.client_rate, a3.total) == (2, 3, 3)
    for lease in (a2,):
        await two.release(lease)
    for lease in (a3, b1):
        await one.release(lease)
    assert redis.zcard(keys.SESSIONS_ALL) == 0
    assert one.live == two.live == 0


async def test_ipv6_counted_per_64(redis, aredis):
    counter = ConnectionCounter(aredis)
    first = await counter.connect("2001:db8:1:2::1")
    second = await counter.connect("2001:db8:1:2:ffff::9")
    other = await counter.connect("2001:db8:1:3::1")
    assert second.client == "2001:db8:1:2::/64"
    assert (first.client_count, second.client_count, other.client_count) == (1, 2, 1)
    assert redis.zcard(keys.sessions_key("2001:db8:1:2::/64")) == 2


async def test_crashed_process_sessions_fall_out_and_live_ones_are_renewed(redis, aredis):
    crashed = ConnectionCounter(aredis, lease=0.5, instance="dead")
    alive = ConnectionCounter(aredis, lease=0.5, instance="alive")
    await crashed.connect("192.0.2.30")
    await alive.connect("192.0.2.30")
    deadline = time.monotonic() + 5
    while True:
        await alive.refresh()
        lease = await alive.connect("192.0.2.31")
        await alive.release(lease)
        if lease.total == 2:  # only alive's 192.0.2.30 session, plus this one
            break
        assert time.monotonic() < deadline, "the crashed process's session never expired"
        await asyncio.sleep(0.1)
    check = await alive.connect("192.0.2.30")
    assert check.client_count == 2  # the renewed session and this one; the dead one is gone


async def test_rate_is_a_sliding_window(redis, aredis):
    counter = ConnectionCounter(aredis)
    leases = [await counter.connect("192.0.2.40") for _ in range(5)]
    for lease in leases:
        await counter.release(lease)
    again = await counter.connect("192.0.2.40")
    assert (again.client_count, again.client_rate) == (1, 6)
    assert 0 < redis.ttl(keys.rate_key("192.0.2.40")) <= 60
    # connects older than the window are trimmed
    redis.zadd(keys.rate_key("192.0.2.41"), {"old": time.time() - 61})
    fresh = await counter.connect("192.0.2.41")
    assert fresh.client_rate == 1


async def test_redis_down_raises_one_error_type(redis, redis_server, aredis):
    counter = ConnectionCounter(aredis, timeout=0.5)
    cache = ScreeningCache(aredis, timeout=0.5)
    lease = await counter.connect("192.0.2.50")
    redis_server.stop()
    try:
        async with no_hang():  # bounded by the 0.5 s timeouts, never a hang
            with pytest.raises(ScreeningStoreError, match=r"192\.0\.2\.51"):
                await counter.connect("192.0.2.51")
            with pytest.raises(ScreeningStoreError):
                await cache.get("192.0.2.50")
            with pytest.raises(ScreeningStoreError):
                await cache.record_fail("192.0.2.50", "pregreet")
            with pytest.raises(ScreeningStoreError):
                await counter.release(lease)
    finally:
        redis_server.start()
    assert (await counter.connect("192.0.2.52")).total == 1  # back, and empty


async def test_releases_are_batched_into_one_round_trip(redis, redis_server):
    import redis.asyncio as aioredis

    from smtpgate.lookups import keys as key_formats
    from smtpgate.lookups.screening_cache import RELEASE_BATCH, ConnectionCounter

    client = aioredis.Redis.from_url(redis_server.url)
    counter = ConnectionCounter(client)
    try:
        leases = [await counter.connect(f"192.0.2.{n}") for n in range(1, 6)]
        assert redis.zcard(key_formats.SESSIONS_ALL) == 5
        before = redis.info("commandstats").get("cmdstat_zrem", {}).get("calls", 0)
        for lease in leases:
            counter.release_soon(lease)
        assert redis.zcard(key_formats.SESSIONS_ALL) == 5  # not yet: waiting for the batch
        async with asyncio.timeout(2):  # the batch goes out after RELEASE_BATCH seconds
            while redis.zcard(key_formats.SESSIONS_ALL):
                await asyncio.sleep(RELEASE_BATCH / 5)
        after = redis.info("commandstats")["cmdstat_zrem"]["calls"]
        assert after - before == 6  # five client sets and one ZREM for the global set
    finally:
        await counter.flush()
        await client.aclose()


async def test_a_stalled_redis_is_named_as_such(redis, redis_server):
    """A Redis that accepts but does not answer: the error says so, not an empty reason."""
    client = _async_client(redis_server)
    counter = ConnectionCounter(client, timeout=0.2)
    try:
        await counter.release(await counter.connect("192.0.2.40"))  # connected and warm
        pid = redis_server._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            async with no_hang():
                with pytest.raises(ScreeningStoreError) as raised:
                    await counter.connect("192.0.2.41")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert str(raised.value) == "connection count for 192.0.2.41: no answer from Redis in 0.2s"
    finally:
        await client.aclose()
