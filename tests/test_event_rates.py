"""Tests of lookups/event_rates: the fixed-window event counters in a real Redis.

The same tests run on the three-master Cluster in test_redis_cluster_lookups.py (a client's
and a login's counters live in different slots and are counted in one pipeline).
"""

import asyncio
import time

import pytest
import redis.asyncio
from services.ports import free_port

from smtpgate.lookups.event_rates import EventRateError, EventRates
from smtpgate.lookups.keys import event_rate_key


@pytest.fixture
async def client(redis_server):
    conn = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    yield conn
    await conn.aclose()


async def test_counts_go_up_together_in_one_call_and_each_key_gets_its_window(redis, client):
    rates = EventRates(client)
    mine = event_rate_key("message", "192.0.2.1")
    login = event_rate_key("login_message", "user1@example.com")
    assert await rates.count([(mine, 60), (login, 3600)]) == [1, 1]
    assert await rates.count([(mine, 60), (login, 3600)]) == [2, 2]
    assert await rates.count([(mine, 60)]) == [3]
    assert 59_000 < redis.pttl(mine) <= 60_000
    assert 3_599_000 < redis.pttl(login) <= 3_600_000
    assert await rates.peek(mine) == 3 and await rates.peek(login) == 2
    assert await rates.peek(event_rate_key("auth", "192.0.2.1")) == 0  # none yet
    assert redis.get(mine) == "3"  # peek wrote nothing


async def test_the_window_is_fixed_from_the_first_event_then_starts_again(redis, client):
    rates = EventRates(client)
    key = event_rate_key("recipient", "192.0.2.2")
    assert await rates.count([(key, 1.0)]) == [1]
    first = redis.pttl(key)
    await asyncio.sleep(0.3)
    assert await rates.count([(key, 1.0)]) == [2]
    assert redis.pttl(key) < first  # a later event does not extend the window
    deadline = time.monotonic() + 5
    while redis.exists(key):
        assert time.monotonic() < deadline, "the window did not end"
        await asyncio.sleep(0.05)
    assert await rates.count([(key, 1.0)]) == [1]


async def test_a_counter_that_lost_its_expiry_gets_it_back_at_the_next_event(redis, client):
    key = event_rate_key("auth", "192.0.2.3")
    redis.set(key, 7)  # no expiry: it would limit its client for ever
    assert await EventRates(client).count([(key, 60)]) == [8]
    assert 0 < redis.pttl(key) <= 60_000


async def test_redis_down_is_an_event_rate_error():
    dead = redis.asyncio.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    rates = EventRates(dead, timeout=2)
    try:
        with pytest.raises(EventRateError):
            await rates.count([(event_rate_key("message", "192.0.2.4"), 60)])
        with pytest.raises(EventRateError):
            await rates.peek(event_rate_key("new_tls_session", "192.0.2.4"))
    finally:
        await dead.aclose()
