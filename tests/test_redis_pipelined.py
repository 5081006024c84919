"""The pipelined hot-path client (smtpgate.lookups.redis_pipelined) against a real redis-server:
replies in order to many callers, error replies, NOSCRIPT, timeouts, a restart."""

import asyncio
import os
import signal

import pytest
from redis import exceptions as rexc
from services.waiting import no_hang

from smtpgate.lookups import redis_client
from smtpgate.lookups.redis_pipelined import PipelinedRedis, pack

# busy for ARGV[1] ms inside Redis (no DEBUG SLEEP: the debug command is off by default)
_BUSY = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= stop
return 'done'
"""


@pytest.fixture
async def client(redis, redis_server):
    client = redis_client.connect_hot(redis_server.url, 2.0)
    assert isinstance(client, PipelinedRedis)
    yield client
    await client.aclose()


async def test_concurrent_callers_each_get_their_own_replies(redis, client):
    redis.mset({f"k{i}": f"v{i}" for i in range(300)})
    redis.hset("h", mapping={"a": "1", "b": "2"})

    async def one(i: int):
        if i % 3 == 0:
            return await client.get(f"k{i}")
        if i % 3 == 1:
            async with client.pipeline(transaction=False) as pipe:
                pipe.get(f"k{i}")
                pipe.hgetall("h")
                pipe.incr(f"n{i}")
                return await pipe.execute()
        return await client.mget([f"k{i}", "missing", f"k{i - 1}"])

    async with no_hang():
        answers = await asyncio.gather(*(one(i) for i in range(300)))
    for i, answer in enumerate(answers):
        if i % 3 == 0:
            assert answer == f"v{i}"
        elif i % 3 == 1:
            assert answer == [f"v{i}", {"a": "1", "b": "2"}, 1]
        else:
            assert answer == [f"v{i}", None, f"v{i - 1}"]


async def test_bytes_unless_decoding(redis, redis_server):
    redis.hset("h", mapping={"a": "1"})
    raw = redis_client.connect_hot(redis_server.url, 2.0, decode=False)
    try:
        assert await raw.hgetall("h") == {b"a": b"1"}
        assert await raw.get("missing") is None
    finally:
        await raw.aclose()


async def test_an_error_reply_is_raised_and_the_order_kept(redis, client):
    redis.set("str", "x")
    pipe = client.pipeline(transaction=False)
    pipe.get("str").hgetall("str").get("str")
    with pytest.raises(rexc.ResponseError) as raised:
        await pipe.execute()
    assert "WRONGTYPE" in str(raised.value)
    assert str(raised.value).startswith("Command # 2 (HGETALL str) of pipeline caused error")
    pipe.get("str").hgetall("str")
    first, error = await pipe.execute(raise_on_error=False)
    assert first == "x" and isinstance(error, rexc.ResponseError)
    with pytest.raises(rexc.ResponseError):
        await client.hgetall("str")
    assert await client.get("str") == "x"  # the next caller reads its own reply


async def test_a_reply_that_is_not_utf8_fails_its_caller_alone(redis, client):
    redis.set("latin", "caf\xe9".encode("latin-1"))
    redis.set("fine", "ok")
    bad, good = await asyncio.gather(client.get("latin"), client.get("fine"),
                                     return_exceptions=True)
    assert isinstance(bad, rexc.InvalidResponse) and "UTF-8" in str(bad)
    assert good == "ok"
    connection = client._conn
    assert await client.hgetall("fine2") == {} and client._conn is connection  # not dropped


async def test_a_lost_script_is_loaded_again(redis, client):
    script = client.register_script("return redis.call('INCR', KEYS[1]) + tonumber(ARGV[1])")
    assert await script(keys=["n"], args=[10]) == 11
    redis.script_flush()
    assert await script(keys=["n"], args=[10]) == 12
    with pytest.raises(rexc.NoScriptError):
        await client.evalsha("0" * 40, 1, "n", 10)  # as redis-py raises it


async def test_a_caller_that_stops_waiting_leaves_the_next_its_reply(redis, client):
    redis.set("k", "v")
    busy = client.register_script(_BUSY)
    await busy(args=[1])
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await busy(args=[300])
    async with no_hang():
        assert await client.get("k") == "v"


async def test_no_answer_within_the_timeout_closes_the_connection(redis, redis_server):
    client = redis_client.connect_hot(redis_server.url, 0.3)
    pid = redis_server._proc.pid
    try:
        assert await client.ping()
        os.kill(pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            async with no_hang():
                with pytest.raises(rexc.TimeoutError) as raised:
                    await client.get("k")
            assert 0.25 < loop.time() - start < 1.5
            assert str(raised.value) == f"Timeout reading from 127.0.0.1:{redis_server.port}"
        finally:
            os.kill(pid, signal.SIGCONT)
        async with no_hang():
            assert await client.ping()  # a new connection
    finally:
        await client.aclose()


async def test_reconnects_after_a_restart(redis, redis_server, client):
    redis.set("k", "v")
    assert await client.get("k") == "v"
    redis_server.stop()
    try:
        with pytest.raises(rexc.ConnectionError) as raised:
            await client.get("k")
        assert str(raised.value) == (f"Error 111 connecting to 127.0.0.1:{redis_server.port}. "
                                     "Connect call failed ('127.0.0.1', "
                                     f"{redis_server.port}).")  # redis-py's words
    finally:
        redis_server.start()
    redis_server.client().set("k", "again")
    async with no_hang():
        assert await client.get("k") == "again"


async def test_a_restart_between_calls_costs_no_error(redis, redis_server, client):
    """The connection the restart broke is noticed, and the call goes to a new one."""
    assert await client.ping()
    redis_server.stop()
    redis_server.start()
    redis_server.client().set("k", "v")
    async with no_hang():
        assert await client.get("k") == "v"


async def test_other_commands_go_to_redis_py(redis, client):
    redis.xadd("s", {"a": "1"})
    assert [fields for _, fields in await client.xrange("s")] == [{"a": "1"}]


def test_cluster_and_tls_stay_on_redis_py():
    from redis.asyncio.cluster import RedisCluster
    assert isinstance(redis_client.connect_hot("redis+cluster://127.0.0.1:7000", 1.0),
                      RedisCluster)
    assert not isinstance(redis_client.connect_hot("rediss://127.0.0.1:6379/0", 1.0),
                          PipelinedRedis)


async def test_the_calls_of_one_turn_are_one_write(redis, client):
    """Twenty callers resumed in one turn of the loop: Redis reads their commands at once."""
    redis.set("k", "v")
    assert await client.get("k") == "v"  # connected
    reads = redis.info("stats")["total_reads_processed"]
    answers = await asyncio.gather(*(client.get("k") for _ in range(20)))
    assert answers == ["v"] * 20
    assert redis.info("stats")["total_reads_processed"] - reads == 2  # theirs, and this INFO


async def test_the_connection_counter_carries_on_after_a_restart(redis, redis_server):
    """A burst's connects go out from a callback on the open connection; one the restart
    closed sends them on a new one, with the script loaded again."""
    from smtpgate.lookups.screening_cache import ConnectionCounter

    client = redis_client.connect_hot(redis_server.url, 2.0, decode=False)
    counter = ConnectionCounter(client)
    try:
        first = await counter.connect("192.0.2.1")
        assert (first.client_count, first.total) == (1, 1)
        redis_server.stop()
        redis_server.start()  # empty: no counts, no scripts
        async with no_hang():
            again = await asyncio.gather(*(counter.connect(f"192.0.2.{n}") for n in (2, 3)))
        assert sorted(lease.total for lease in again) == [2, 3]  # this process's count, sent
        assert {lease.client_rate for lease in again} == {1}
    finally:
        await counter.flush()
        await client.aclose()


@pytest.mark.parametrize("args", [
    ("EVALSHA", "a" * 40, 4, "smtpgate:count:192.0.2.7", 30000, -1, 2**70),
    ("SET", "smtpgate:session:X", b'{"a":"\xc3\xa9"}\x00\xff', "EX", 3600),
    ("HSET", "k", "f\u00e9", 1.5, "g", 0.1, "h", 1e20),
])
def test_a_command_is_packed_as_redis_py_packs_it(args):
    """The RESP bytes of a command are redis-py's own, whoever makes them (hiredis in C),
    for a tuple or any other iterable of arguments."""
    from redis.connection import Encoder, PythonRespSerializer

    expected = b"".join(PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
                        .pack(*args))
    out: list[bytes] = []
    pack(args, out)
    assert b"".join(out) == expected
    out = []
    pack(iter(args), out)
    assert b"".join(out) == expected


@pytest.mark.parametrize("value", [True, None, bytearray(b"x"), object()])
def test_a_value_smtpgate_never_sends_is_refused_in_redis_pys_words(value):
    with pytest.raises(rexc.DataError, match="Invalid input of type"):
        pack(("SET", "k", value), [])
