"""Timed overrides: the operator's input (pure), the decision (pure), the CLI and the lookups
against a real Redis, a single server and a Cluster, with and without the table cache."""

from __future__ import annotations

import asyncio
import time

import pytest
from services.waiting import no_hang

from smtpgate.checks import override as override_check
from smtpgate.lookups import keys
from smtpgate.lookups.tables import Tables
from smtpgate.override_record import (
    Override,
    decode,
    parse_duration,
    parse_network,
    parse_reason,
    parse_reply,
    show_left,
)
from smtpgate.verdict import Outcome, Reply

# --- what the operator types ------------------------------------------------------------------

NETWORK_OK = [
    ("ipv4", "192.0.2.7", "192.0.2.7"),
    ("ipv4-cidr", "192.0.2.0/24", "192.0.2.0/24"),
    ("host-route", "192.0.2.7/32", "192.0.2.7"),
    ("ipv6-cidr-case", "2001:DB8::/32", "2001:db8::/32"),
    ("bracketed-ipv6", "[2001:db8::1]", "2001:db8::1"),
    ("ipv4-mapped", "::ffff:192.0.2.7", "192.0.2.7"),
]
NETWORK_BAD = [
    ("hostname", "mail.example.com", "not an IP address or CIDR network"),
    ("short", "192.0.2", "not an IP address or CIDR network"),
    ("bad-mask", "192.0.2.0/33", "not an IP address or CIDR network"),
    ("host-bits", "192.0.2.7/24", "did you mean 192.0.2.0/24"),
    ("empty", "", "not an IP address"),
]
DURATION_OK = [("seconds", "90s", 90), ("minutes", "30m", 1800), ("hours", "2h", 7200),
               ("days", "7d", 604800), ("mixed", "1h30m", 5400), ("upper", "2H", 7200)]
DURATION_BAD = [
    ("no-unit", "90", "has no unit: write 90s, 90m, 90h or 90d"),
    ("space", "2 h", "not a duration"),
    ("word", "soon", "not a duration"),
    ("zero", "0s", "is zero"),
    ("too-long", "366d", "longer than 365d"),
    ("negative", "-5m", "not a duration"),
]
REPLY_OK = [
    ("full", "550 5.7.1 Call us", Reply(550, "5.7.1", "Call us")),
    ("no-status", "450 Try later", Reply(450, "4.7.1", "Try later")),
    ("spaces-kept", "554 5.7.0 a  b", Reply(554, "5.7.0", "a  b")),
]
REPLY_BAD = [
    ("success-code", "250 2.0.0 Ok", "4xx or 5xx"),
    ("two-digits", "55 x", "4xx or 5xx"),
    ("class-mismatch", "550 4.7.1 x", "not of the code's class 5xx"),
    ("no-text", "550 5.7.1", "no text"),
    ("bare-code", "554", "no text"),
    ("continuation", "550-5.7.1 x", "4xx or 5xx"),
    ("newline", "550 5.7.1 a\r\n250 ok", "one line"),
]


@pytest.mark.parametrize(("text", "want"), [c[1:] for c in NETWORK_OK],
                         ids=[c[0] for c in NETWORK_OK])
def test_network(text, want):
    assert parse_network(text) == want


@pytest.mark.parametrize(("text", "why"), [c[1:] for c in NETWORK_BAD],
                         ids=[c[0] for c in NETWORK_BAD])
def test_network_refused(text, why):
    with pytest.raises(ValueError, match=why):
        parse_network(text)


@pytest.mark.parametrize(("text", "want"), [c[1:] for c in DURATION_OK],
                         ids=[c[0] for c in DURATION_OK])
def test_duration(text, want):
    assert parse_duration(text) == want


@pytest.mark.parametrize(("text", "why"), [c[1:] for c in DURATION_BAD],
                         ids=[c[0] for c in DURATION_BAD])
def test_duration_refused(text, why):
    with pytest.raises(ValueError, match=why):
        parse_duration(text)


@pytest.mark.parametrize(("text", "want"), [c[1:] for c in REPLY_OK],
                         ids=[c[0] for c in REPLY_OK])
def test_reply(text, want):
    assert parse_reply(text) == want


@pytest.mark.parametrize(("text", "why"), [c[1:] for c in REPLY_BAD],
                         ids=[c[0] for c in REPLY_BAD])
def test_reply_refused(text, why):
    with pytest.raises(ValueError, match=why):
        parse_reply(text)


@pytest.mark.parametrize("text", ["", "   ", "two\nlines"])
def test_reason_refused(text):
    with pytest.raises(ValueError, match=r"empty|one line"):
        parse_reason(text)


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.2, "1s"), (59, "59s"), (60, "1m"), (7199.5, "2h"), (5400, "1h30m"), (86400 * 7, "7d"),
    (86400 + 3600 * 23 + 5, "1d23h")])
def test_time_left(seconds, shown):
    assert show_left(seconds) == shown


def test_stored_value_round_trip_and_unreadable_values():
    deny = Override("192.0.2.0/24", "deny", "spam run", "alice", 1000.0, 8200.0,
                    Reply(550, "5.7.1", "Call us"))
    assert decode(deny.encode()) == deny
    for junk in ("", "permit", "{}", '{"v": 2, "action": "allow"}', '{"v": 1, "action": "x"}',
                 deny.encode().replace('"until":8200.0', '"until":"soon"')):
        assert decode(junk) is None, junk


# --- the decision ------------------------------------------------------------------------------

NOW = 1_800_000_000.0
ALLOW = Override("192.0.2.0/24", "allow", "owner called", "alice", NOW - 60, NOW + 7140)
DENY = Override("192.0.2.7", "deny", "spam run", "bob", NOW - 60, NOW + 30)
DECIDE = [
    ("none", None, Outcome.PASS, None, "no override"),
    ("allow", ALLOW, Outcome.PERMIT, None,
     "ALLOWLISTED [192.0.2.7] (override allow 192.0.2.0/24 by alice at 2027-01-15 07:59:00 "
     "UTC, 1h59m left: owner called)"),
    ("deny-default-reply", DENY, Outcome.FAIL,
     "554 5.7.1 <unknown[192.0.2.7]>: Client host rejected: Access denied",
     "DENYLISTED [192.0.2.7] (override deny 192.0.2.7 by bob"),
    ("deny-own-reply", Override("192.0.2.7", "deny", "r", "bob", NOW, NOW + 1,
                                Reply(421, "4.7.0", "Come back later")), Outcome.FAIL,
     "421 4.7.0 Come back later", "DENYLISTED"),
    ("ended-before-redis-removed-it", Override("192.0.2.7", "deny", "r", "bob", NOW - 90, NOW),
     Outcome.PASS, None, "ended at"),
]


@pytest.mark.parametrize(("found", "outcome", "reply", "reason"), [c[1:] for c in DECIDE],
                         ids=[c[0] for c in DECIDE])
def test_decide(found, outcome, reply, reason):
    verdict = override_check.decide("192.0.2.7", found, NOW)
    assert verdict.check == "override" and verdict.outcome is outcome and verdict.ttl == 0
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert reason in verdict.reason


# --- the CLI and the lookups, against real Redis --------------------------------------------


BAD_INPUT = [
    ("not-an-address", ["allow", "mail.example.com", "--for", "1h", "--reason", "x"],
     "'mail.example.com' is not an IP address or CIDR network"),
    ("no-unit", ["deny", "192.0.2.7", "--for", "90", "--reason", "x"], "has no unit"),
    ("empty-reason", ["allow", "192.0.2.7", "--for", "1h", "--reason", " "], "reason is empty"),
    ("bad-reply", ["deny", "192.0.2.7", "--for", "1h", "--reason", "x", "--reply", "250 ok"],
     "4xx or 5xx"),
    ("no-duration", ["allow", "192.0.2.7", "--reason", "x"], "required: --for"),
    ("reply-on-allow", ["allow", "192.0.2.7", "--for", "1h", "--reason", "x", "--reply",
                        "550 5.7.1 x"], "unrecognized arguments"),
    ("remove-what", ["overrides", "remove"], "is not a command here"),
    ("remove-not-an-address", ["overrides", "remove", "x"], "'x' is not an IP address"),
]


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_refused_with_status_2_and_nothing_stored(cli, redis_server, redis, args,
                                                                 message):
    status, out, err = cli(redis_server.url, *args)
    assert status == 2 and message in err and "Traceback" not in err, err
    assert out == "" and not redis.keys("smtpgate:override*")


def test_set_list_replace_remove(cli, redis_server, redis):
    url = redis_server.url
    status, out, err = cli(url, "allow", "192.0.2.7", "--for", "2h", "--reason", "owner called")
    assert status == 0 and out.startswith("allow 192.0.2.7 for 2h, until "), (out, err)
    assert out.rstrip().endswith("by alice: owner called")
    assert 7190_000 < redis.pttl("smtpgate:override:192.0.2.7") <= 7200_000
    status, out, err = cli(url, "deny", "2001:db8::/32", "--for", "30m", "--reason", "spam run",
                           "--reply", "550 5.7.1 Call +1 555 0100")
    assert status == 0, err

    status, out, err = cli(url, "overrides")
    assert status == 0 and err.rstrip().endswith("2 overrides in force"), err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("allow 192.0.2.7 by alice, set "), out
    assert lines[0].endswith("left: owner called") and ", 2h left" in lines[0]
    assert lines[1].startswith("deny 2001:db8::/32 by alice") and \
        lines[1].endswith("left: spam run; reply 550 5.7.1 Call +1 555 0100"), out

    # the same network again: replaced, and said so
    status, out, err = cli(url, "deny", "192.0.2.7/32", "--for", "10m", "--reason", "changed")
    assert status == 0 and "note: replaces allow 192.0.2.7 by alice" in err, err
    assert decode(redis.get("smtpgate:override:192.0.2.7")).action == "deny"

    status, out, err = cli(url, "overrides", "remove", "192.0.2.7")
    assert status == 0 and out.startswith("removed deny 192.0.2.7 by alice"), (out, err)
    assert redis.get("smtpgate:override:192.0.2.7") is None
    status, out, err = cli(url, "overrides", "remove", "192.0.2.7")
    assert status == 1 and "no override for 192.0.2.7" in err, err


def test_the_unix_user_when_not_under_sudo(cli, monkeypatch, redis_server, redis):
    import os
    import pwd

    monkeypatch.delenv("SUDO_USER")
    assert cli(redis_server.url, "allow", "192.0.2.8", "--for", "1m", "--reason", "x")[0] == 0
    stored = decode(redis.get("smtpgate:override:192.0.2.8"))
    assert stored.by == pwd.getpwuid(os.getuid()).pw_name


def test_redis_down_is_status_1_with_a_sentence(cli):
    status, _, err = cli("redis://127.0.0.1:1/0", "allow", "192.0.2.7", "--for", "1m",
                         "--reason", "x")
    assert status == 1 and "Redis at redis://127.0.0.1:1/0 failed" in err, err


@pytest.fixture(params=["server", "cluster"])
def target(request):
    """(REDIS url, a client on it, flushed): the single server and the three-master Cluster."""
    if request.param == "server":
        server = request.getfixturevalue("redis_server")
        return server.url, request.getfixturevalue("redis")
    cluster = request.getfixturevalue("redis_cluster")
    return cluster.url, request.getfixturevalue("cluster_redis")


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cached"])
async def test_an_override_is_found_and_ends_by_itself(cli, target, cached):
    """Most specific override first; gone after its time, from Redis and from the cache,
    without anyone removing it."""
    url, redis = target
    tables = Tables(url, timeout=2.0, cache=cached)
    await tables.start()
    try:
        async with no_hang(30):
            if cached:
                assert await tables.wait_cache_ready(10), "cache never loaded"
            assert cli(url, "deny", "198.51.100.0/24", "--for", "1h", "--reason", "net")[0] == 0
            assert cli(url, "allow", "198.51.100.9", "--for", "2s", "--reason", "short")[0] == 0
            facts = {}

            async def found(ip: str):
                facts[ip] = await tables.connect_facts(ip)
                return facts[ip].override

            async def allowed() -> bool:
                hit = await found("198.51.100.9")
                return hit is not None and hit.action == "allow"

            await _until(allowed, "the allow seen")
            assert (await found("198.51.100.10")).network == "198.51.100.0/24"
            assert (await found("::ffff:198.51.100.10")).network == "198.51.100.0/24"
            assert await found("203.0.113.1") is None
            assert cli(url, "deny", "2001:db8::/32", "--for", "1h", "--reason", "v6")[0] == 0

            async def ipv6_denied() -> bool:
                return await found("2001:db8:1::25") is not None

            await _until(ipv6_denied, "the IPv6 deny seen")
            assert await found("2001:db9::25") is None
            if cached:
                assert tables.overrides_in_force(time.time()) == {"allow": 1, "deny": 2}
                assert tables.stats.round_trips == 1  # the start's PING: none per lookup

            async def denied_again() -> bool:  # the /24's deny decides once the allow is gone
                hit = await found("198.51.100.9")
                return hit is not None and hit.action == "deny"

            set_at = time.monotonic()
            await _until(denied_again, "the allow ended", timeout=15)
            assert redis.get("smtpgate:override:198.51.100.9") is None  # Redis removed it
            assert time.monotonic() - set_at < 10
            if cached:  # the expiry's invalidation reached the index too
                await _until(lambda: len(tables.cache.overrides()) == 2, "index")
                assert tables.overrides_in_force(time.time()) == {"allow": 0, "deny": 2}
    finally:
        await tables.close()


async def _until(check, what: str, timeout: float = 10.0) -> None:
    """check() (a coroutine function or a plain one) until true, with a deadline:
    invalidations and expiry are asynchronous."""
    deadline = time.monotonic() + timeout
    while not await _value(check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _value(result):
    return await result if asyncio.iscoroutine(result) else result


def test_override_keys():
    assert keys.override_key("192.0.2.0/24") == "smtpgate:override:192.0.2.0/24"
    assert keys.override_network("smtpgate:override:2001:db8::/32") == "2001:db8::/32"
    assert keys.override_network("PSA:192.0.2.1") is None
