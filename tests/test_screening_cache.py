"""The screening cache and the connection counters against a real redis-server."""

import asyncio
import os
import signal
import time

import pytest
import redis.asyncio
from services.waiting import no_hang

from smtpgate.lookups import keys, redis_client
from smtpgate.lookups.screening_cache import (
    ConnectionCounter,
    ScreeningCache,
    ScreeningStoreError,
    allowlisted,
    passed,
)

# redis-py's client (what tests and a Cluster use), and the hot path's pipelined one
CLIENTS = ["redis-py", "pipelined"]


@pytest.fixture(params=CLIENTS)
async def aredis(request, redis, redis_server):
    client = _async_client(redis_server, request.param)
    yield client
    await client.aclose()


def _async_client(server, kind="redis-py", decode=True, timeout=2.0):
    if kind == "pipelined":
        return redis_client.connect_hot(server.url, timeout, decode=decode)
    return redis.asyncio.Redis(host=server.host, port=server.port, decode_responses=decode)


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


def counted(redis, key: str) -> int:
    """The sessions a count hash holds, all processes' fields together."""
    return sum(int(value.split()[0]) for value in redis.hvals(key))


async def test_counts_per_client_and_global_across_processes(redis, aredis):
    one = ConnectionCounter(aredis, instance="hostA:1")
    two = ConnectionCounter(aredis, instance="hostB:2")
    a1 = await one.connect("192.0.2.20")
    a2 = await two.connect("192.0.2.20")
    b1 = await one.connect("192.0.2.21")
    assert (a1.client_count, a1.total) == (1, 1)
    assert (a2.client_count, a2.client_rate, a2.total) == (2, 2, 2)
    assert (b1.client_count, b1.client_rate, b1.total) == (1, 1, 3)
    assert counted(redis, keys.COUNT_ALL) == 3
    await one.release(a1)
    await one.release(a1)  # twice is harmless
    a3 = await one.connect("192.0.2.20")
    assert (a3.client_count, a3.client_rate, a3.total) == (2, 3, 3)
    for lease in (a2,):
        await two.release(lease)
    for lease in (a3, b1):
        await one.release(lease)
    # every process removed its fields, so the keys are gone
    assert not redis.exists(keys.COUNT_ALL, keys.count_key("192.0.2.20"))
    assert one.live == two.live == 0


async def test_ipv6_counted_per_64(redis, aredis):
    counter = ConnectionCounter(aredis)
    first = await counter.connect("2001:db8:1:2::1")
    second = await counter.connect("2001:db8:1:2:ffff::9")
    other = await counter.connect("2001:db8:1:3::1")
    assert second.client == "2001:db8:1:2::/64"
    assert (first.client_count, second.client_count, other.client_count) == (1, 2, 1)
    assert counted(redis, keys.count_key("2001:db8:1:2::/64")) == 2


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


async def test_a_lost_release_heals_at_the_next_write(redis, aredis):
    """A process writes the count it holds, never an increment: nothing drifts."""
    counter = ConnectionCounter(aredis, instance="hostA:1")
    leases = [await counter.connect("192.0.2.32") for _ in range(3)]
    redis.hset(keys.count_key("192.0.2.32"), "hostA:1", f"7 {int(time.time() * 1000) + 60000}")
    await counter.release(leases[0])
    assert counted(redis, keys.count_key("192.0.2.32")) == 2


async def test_rate_counts_for_a_minute_from_the_first_connect(redis, aredis):
    """anvil's interval: it starts at the client's first connect and is not slid along."""
    counter = ConnectionCounter(aredis)
    leases = [await counter.connect("192.0.2.40") for _ in range(5)]
    ttl = redis.pttl(keys.rate_key("192.0.2.40"))
    for lease in leases:
        await counter.release(lease)
    again = await counter.connect("192.0.2.40")
    assert (again.client_count, again.client_rate) == (1, 6)
    assert 0 < redis.pttl(keys.rate_key("192.0.2.40")) <= ttl <= 60000  # not restarted
    # a new interval once the last one ran out
    redis.set(keys.rate_key("192.0.2.41"), 30, px=20)
    while redis.exists(keys.rate_key("192.0.2.41")):
        await asyncio.sleep(0.01)
    fresh = await counter.connect("192.0.2.41")
    assert fresh.client_rate == 1
    assert 59000 < redis.pttl(keys.rate_key("192.0.2.41")) <= 60000


async def test_redis_down_raises_one_error_type(redis, redis_server, aredis):
    counter = ConnectionCounter(aredis, timeout=0.5)
    cache = ScreeningCache(aredis, timeout=0.5)
    lease = await counter.connect("192.0.2.50")
    redis_server.stop()
    try:
        async with no_hang():  # bounded by the 0.5 s timeouts, never a hang
            with pytest.raises(ScreeningStoreError, match=r"192\.0\.2\.51"):
                await counter.connect("192.0.2.51")
            assert counter.live == 1 and not counter._ended  # an outage queues nothing
            with pytest.raises(ScreeningStoreError):
                await cache.get("192.0.2.50")
            with pytest.raises(ScreeningStoreError):
                await cache.record_fail("192.0.2.50", "pregreet")
            with pytest.raises(ScreeningStoreError):
                await counter.release(lease)
    finally:
        redis_server.start()
    assert (await counter.connect("192.0.2.52")).total == 1  # back, and empty


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_batch_of_session_ends_is_one_round_trip(redis, redis_server, kind):
    """Five sessions' releases and their screening results: one pipeline, scripts by SHA1,
    and the scripts loaded again when the server lost them (SCRIPT FLUSH, a restart)."""
    from smtpgate.lookups.screening_cache import RELEASE_BATCH

    client = _async_client(redis_server, kind, decode=False)
    counter = ConnectionCounter(client)
    cache = ScreeningCache(client)
    try:
        for flush_scripts in (True, False):  # first: as if a new server
            leases = [await counter.connect(f"192.0.2.{n}") for n in range(1, 6)]
            assert counted(redis, keys.COUNT_ALL) == 5
            if flush_scripts:
                redis.script_flush()
            before = redis.info("commandstats")
            reads = redis.info("stats")["total_reads_processed"]
            for lease in leases:
                counter.release_soon(lease, cache.session_write(lease.ip, {"dnsbl": 60}, ()))
            assert counted(redis, keys.COUNT_ALL) == 5  # not yet: waiting for the batch
            polls = 2  # that HVALS, and the INFO that read `reads`
            async with asyncio.timeout(2):  # the batch goes out after RELEASE_BATCH seconds
                while redis.exists(keys.COUNT_ALL):
                    polls += 1
                    await asyncio.sleep(RELEASE_BATCH / 5)
            polls += 2  # the last EXISTS, and the INFO commandstats below
            after = redis.info("commandstats")
            # the batch: one round trip (three when the scripts were lost: the failed
            # pipeline, the SCRIPT LOADs, the pipeline again)
            assert redis.info("stats")["total_reads_processed"] - reads - polls == (
                4 if flush_scripts else 1)
            evalsha = (after["cmdstat_evalsha"]["calls"]
                       - before.get("cmdstat_evalsha", {}).get("calls", 0))
            assert evalsha == (12 if flush_scripts else 6)  # one release, five screening writes
            for n in range(1, 6):
                assert passed(await cache.get(f"192.0.2.{n}"), "dnsbl", time.time())
    finally:
        await counter.flush()
        await client.aclose()


async def test_what_a_process_keeps_per_client_ends_with_the_sessions(redis, aredis):
    """5,000 new addresses through connect and release leave nothing behind in memory,
    and nothing in Redis but the rate counters, which expire by themselves."""
    counter = ConnectionCounter(aredis)
    ips = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(5_000)]
    for start in range(0, len(ips), 50):  # 50 at once: within redis-py's pool of 100
        leases = await asyncio.gather(*(counter.connect(ip) for ip in ips[start:start + 50]))
        for lease in leases:
            counter.release_soon(lease)
        await counter.flush()
    assert counter.live == 0
    assert not counter._clients and not counter._live and not counter._ended
    assert not redis.exists(keys.COUNT_ALL, keys.count_key(ips[0]), keys.count_key(ips[-1]))
    assert 0 < redis.pttl(keys.rate_key(ips[-1])) <= 60000


async def test_connects_of_one_turn_of_the_loop_share_one_round_trip(redis, aredis):
    """Sessions accepted together connect together: one pipeline for all of them, each
    session its own counts; a failure reaches each in its own words."""
    counter = ConnectionCounter(aredis, timeout=0.5)
    await counter.connect("192.0.2.60")  # connected, the script known
    reads = redis.info("stats")["total_reads_processed"]
    leases = await asyncio.gather(*(counter.connect(f"192.0.2.{n}") for n in range(61, 81)))
    # the batch, and this INFO's own read (one each: 20 EVALSHA were 20 reads before)
    assert redis.info("stats")["total_reads_processed"] - reads == 2
    assert sorted(lease.total for lease in leases) == list(range(2, 22))
    assert {lease.client_count for lease in leases} == {1}
    assert [lease.ip for lease in leases] == [f"192.0.2.{n}" for n in range(61, 81)]
    redis.script_flush()  # as after a restart: loaded again, the batch sent again
    again = await asyncio.gather(*(counter.connect(f"192.0.2.{n}") for n in range(81, 84)))
    assert [lease.total for lease in again] == [22, 23, 24]
    redis.set(keys.COUNT_ALL, "not a hash")  # every script of the batch fails: each says so
    results = await asyncio.gather(*(counter.connect(f"192.0.2.{n}") for n in (90, 91)),
                                   return_exceptions=True)
    assert [type(r) for r in results] == [ScreeningStoreError] * 2
    assert str(results[0]).startswith("connection count for 192.0.2.90: ")
    assert str(results[1]).startswith("connection count for 192.0.2.91: ")
    assert counter.live == 24  # the failed two are not counted


async def test_a_burst_of_connects_waits_for_a_pooled_connection(redis, redis_server):
    """More sessions at once than redis-py's default pool holds (100): none is refused
    with 421 for "Too many connections"."""
    from smtpgate.config import load
    from smtpgate.policy.stages import Policy

    # 300 round trips queued on 100 connections: on a busy machine they take longer than the
    # default 2 s per call, which is not what this test is about
    policy = await Policy.create(load({"REDIS": redis_server.url, "HOSTNAME": "mx.example.test",
                                       "SMTPGATE_REDIS_TIMEOUT": "30"}))
    try:
        leases = await asyncio.gather(*(policy.counter.connect(f"10.9.{i >> 8}.{i & 255}")
                                        for i in range(300)))
        assert max(lease.total for lease in leases) == 300
    finally:
        await policy.close()


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_stalled_redis_is_named_as_such(redis, redis_server, kind):
    """A Redis that accepts but does not answer: the error says so, not an empty reason."""
    client = _async_client(redis_server, kind, timeout=0.2)  # the client's timeout too
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


async def test_a_failure_with_no_pass_to_remove_is_not_written(redis, aredis):
    """A refused first contact (no entry read at connect) costs no write; a client that
    held a pass loses it, as before."""
    cache = ScreeningCache(aredis)
    assert cache.session_write("192.0.2.70", {}, ("dnsbl",), held={}) is None
    expired = {"pregreet": time.time() - 1, "dnsbl": 0.0}
    assert cache.session_write("192.0.2.70", {}, ("dnsbl",), held=expired) is None
    await cache.record_passes("192.0.2.71", {"pregreet": 600, "dnsbl": 60})
    held = await cache.get("192.0.2.71")
    await cache._run(cache.session_write("192.0.2.71", {}, ("dnsbl",), held=held), "test")
    entries = await cache.get("192.0.2.71")
    assert entries == {"dnsbl": 0.0}
    assert not allowlisted(entries, ("pregreet", "dnsbl"), time.time())
