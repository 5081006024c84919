"""Tests of auth_limits: the pure decision and delay, then the counters in a real Redis."""

import asyncio
import time
import uuid

import pytest
import redis.asyncio
from services.ports import free_port

from smtpgate.lookups.auth_limits import AuthLimits, decide, failure_delay, ip_key, login_key
from smtpgate.verdict import Outcome

# --- pure parts ---------------------------------------------------------------------------------

DELAYS = [
    ("no-failure", 0, 0.0),
    ("negative", -3, 0.0),
    ("first", 1, 1.0),
    ("second", 2, 2.0),
    ("third", 3, 4.0),
    ("fourth", 4, 8.0),
    ("capped", 5, 10.0),
    ("huge", 10_000, 10.0),
]


@pytest.mark.parametrize(("failures", "delay"), [c[1:] for c in DELAYS], ids=[c[0] for c in DELAYS])
def test_failure_delay(failures, delay):
    assert failure_delay(failures) == delay


DECISIONS = [
    # (id, ip, login, ip_failures, login_failures, limit, outcome, reply)
    ("clean", "192.0.2.1", "u@example.com", 0, 0, 5, Outcome.PASS, None),
    ("below-limit", "192.0.2.1", "u@example.com", 4, 4, 5, Outcome.PASS, None),
    ("ip-at-limit", "192.0.2.1", "u@example.com", 5, 0, 5, Outcome.FAIL,
     "421 4.7.0 Error: too many authentication failures from 192.0.2.1"),
    ("ip-over-limit-no-login", "2001:db8::7", None, 9, 0, 5, Outcome.FAIL,
     "421 4.7.0 Error: too many authentication failures from 2001:db8::7"),
    ("login-at-limit", "192.0.2.1", "u@example.com", 0, 5, 5, Outcome.FAIL,
     "421 4.7.0 Error: too many authentication failures"),
    ("ip-named-first", "192.0.2.1", "u@example.com", 5, 5, 5, Outcome.FAIL,
     "421 4.7.0 Error: too many authentication failures from 192.0.2.1"),
    ("login-count-ignored-without-login", "192.0.2.1", None, 0, 99, 5, Outcome.PASS, None),
    ("limit-one", "192.0.2.1", "u@example.com", 1, 0, 1, Outcome.FAIL,
     "421 4.7.0 Error: too many authentication failures from 192.0.2.1"),
]


@pytest.mark.parametrize(
    ("ip", "login", "ip_failures", "login_failures", "limit", "outcome", "reply"),
    [c[1:] for c in DECISIONS], ids=[c[0] for c in DECISIONS])
def test_decide(ip, login, ip_failures, login_failures, limit, outcome, reply):
    verdict = decide(ip, login, ip_failures, login_failures, limit)
    assert verdict.check == "auth_limit"
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert verdict.reason


def test_login_is_never_echoed_in_the_reply():
    evil = "x\r\n250 ok"
    verdict = decide("192.0.2.1", evil, 0, 5, 5)
    assert evil not in str(verdict.reply)


KEYS = [
    ("ipv4", "192.0.2.9", "smtpgate:authfail:ip:192.0.2.9"),
    ("ipv6-per-64", "2001:db8:1:2:3::9", "smtpgate:authfail:ip:2001:db8:1:2::/64"),
    ("ipv4-mapped", "::ffff:192.0.2.9", "smtpgate:authfail:ip:192.0.2.9"),
    ("xclient-ipv6-form", "IPV6:2001:db8::1", "smtpgate:authfail:ip:2001:db8::/64"),
    ("not-an-address", "unknown", "smtpgate:authfail:ip:unknown"),
]


@pytest.mark.parametrize(("ip", "key"), [c[1:] for c in KEYS], ids=[c[0] for c in KEYS])
def test_ip_key(ip, key):
    assert ip_key(ip) == key


def test_login_key_folds_case():
    assert login_key(" User1@Example.COM ") == "smtpgate:authfail:login:user1@example.com"


# --- counters in Redis --------------------------------------------------------------------------


@pytest.fixture
async def client(redis_server):
    conn = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    yield conn
    await conn.aclose()


def unique_login() -> str:
    return f"u{uuid.uuid4().hex[:12]}@example.com"


def unique_ip() -> str:
    n = uuid.uuid4().int
    return f"10.{n % 250}.{n // 250 % 250}.{n // 62500 % 250 + 1}"


async def test_failures_up_to_the_limit_lock_the_client_out(client):
    limits = AuthLimits(client, 3)
    ip, login = unique_ip(), unique_login()
    assert (await limits.check(ip, login)).outcome is Outcome.PASS
    counts = [await limits.record_failure(ip, login) for _ in range(3)]
    assert counts == [1, 2, 3]
    verdict = await limits.check(ip, unique_login())
    assert verdict.failed
    assert str(verdict.reply) == f"421 4.7.0 Error: too many authentication failures from {ip}"
    assert await client.get(f"smtpgate:authfail:ip:{ip}") == "3"


async def test_one_login_attacked_from_many_addresses_is_locked(client):
    limits = AuthLimits(client, 3)
    login = unique_login()
    for _ in range(3):
        await limits.record_failure(unique_ip(), login)
    fresh_ip = unique_ip()
    verdict = await limits.check(fresh_ip, login.upper())
    assert verdict.failed
    assert str(verdict.reply) == "421 4.7.0 Error: too many authentication failures"
    assert (await limits.check(fresh_ip, unique_login())).outcome is Outcome.PASS


async def test_success_clears_the_login_but_not_the_client(client):
    limits = AuthLimits(client, 3)
    ip, login = unique_ip(), unique_login()
    await limits.record_failure(ip, login)
    await limits.record_failure(ip, login)
    await limits.record_success(ip, login)
    assert await client.exists(login_key(login)) == 0
    assert await client.get(ip_key(ip)) == "2"
    # the client's record survives: one more failure from it reaches the limit
    assert await limits.record_failure(ip, unique_login()) == 3
    assert (await limits.check(ip, login)).failed


async def test_ipv6_clients_are_counted_per_64(client):
    limits = AuthLimits(client, 2)
    net = f"2001:db8:{uuid.uuid4().int % 65535:x}:1"
    await limits.record_failure(f"{net}::1", unique_login())
    await limits.record_failure(f"{net}:ffff::2", unique_login())
    assert (await limits.check(f"{net}::99", None)).failed
    other = f"2001:db8:{uuid.uuid4().int % 65535:x}:2::1"
    assert (await limits.check(other, None)).outcome is Outcome.PASS


async def test_counters_expire_after_the_window(client):
    limits = AuthLimits(client, 1, window=1)
    ip, login = unique_ip(), unique_login()
    await limits.record_failure(ip, login)
    assert 0 < await client.ttl(ip_key(ip)) <= 1
    assert 0 < await client.ttl(login_key(login)) <= 1
    assert (await limits.check(ip, login)).failed
    deadline = time.monotonic() + 5
    while (await limits.check(ip, login)).failed:
        assert time.monotonic() < deadline, "counters did not expire"
        await asyncio.sleep(0.1)
    assert await client.exists(ip_key(ip), login_key(login)) == 0


async def test_each_failure_restarts_the_window(client):
    limits = AuthLimits(client, 5, window=600)
    ip = unique_ip()
    await limits.record_failure(ip, None)
    await client.expire(ip_key(ip), 5)
    await limits.record_failure(ip, None)
    assert await client.ttl(ip_key(ip)) > 500


async def test_redis_down_skips_and_never_raises():
    dead = redis.asyncio.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    limits = AuthLimits(dead, 3, timeout=2)
    verdict = await limits.check("192.0.2.1", "u@example.com")
    assert verdict.outcome is Outcome.SKIP
    assert "unavailable" in verdict.reason
    assert await limits.record_failure("192.0.2.1", "u@example.com") == 1
    await limits.record_success("192.0.2.1", "u@example.com")
    await dead.aclose()
