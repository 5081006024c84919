"""Greylisting: who is doubtful, the key, the verdict (pure); the store against a real Redis,
a single server and a Cluster."""

from __future__ import annotations

import asyncio
import time

import pytest
from services.waiting import no_hang

from smtpgate.checks import greylist
from smtpgate.checks.greylist import Seen, Suspicion
from smtpgate.config import GREYLIST_SIGNALS
from smtpgate.lookups import keys, redis_client
from smtpgate.lookups.greylist_store import GreylistStore
from smtpgate.verdict import Outcome

DYNAMIC = [
    ("keyword-dsl", "dsl-pool-17.example.net", "192.0.2.17", True),
    ("keyword-dynamic", "host.dynamic.example.net", "192.0.2.17", True),
    ("address-dashed", "c-192-0-2-17.isp.example.net", "192.0.2.17", True),
    ("address-reversed", "17.2.0.192.in.isp.example", "192.0.2.17", True),
    ("address-hex", "c00002111.isp.example", "192.0.2.17", True),
    ("mail-server", "mail.example.net", "192.0.2.17", False),
    ("numbered-mx", "mx2.example.net", "192.0.2.17", False),
    ("two-numbers-only", "out-2-17.example.net", "192.0.2.17", False),
    ("keyword-in-domain-only", "mail.dsl.example", "192.0.2.17", False),
    ("ipv6-keyword", "dyn.example.net", "2001:db8::1", True),
    ("ipv6-mail", "mail.example.net", "2001:db8::1", False),
    ("ipv6-keyword-deeper", "pool-1.dyn.example.net", "2001:db8::1", True),
]


@pytest.mark.parametrize(("name", "ip", "dynamic"), [c[1:] for c in DYNAMIC],
                         ids=[c[0] for c in DYNAMIC])
def test_looks_dynamic(name, ip, dynamic):
    assert greylist.looks_dynamic(name, ip) is dynamic


def test_no_pattern_leaves_the_address_test():
    assert not greylist.looks_dynamic("dsl-pool.isp.example", "192.0.2.17", "")
    assert greylist.looks_dynamic("192-0-2-17.isp.example", "192.0.2.17", "")


DOUBTS = [
    ("clean", Suspicion(names=("mail.example.net",), dnsbl_score=0, dnsbl_threshold=3), ()),
    ("no-fcrdns", Suspicion(no_fcrdns=True), ("no_fcrdns",)),
    ("dnsbl-low", Suspicion(dnsbl_score=2, dnsbl_threshold=3), ("dnsbl_low",)),
    ("dnsbl-unknown", Suspicion(dnsbl_score=None, dnsbl_threshold=3), ()),
    ("dnsbl-at-threshold-refused-already", Suspicion(dnsbl_score=3, dnsbl_threshold=3), ()),
    ("dnswl-negative", Suspicion(dnsbl_score=-2, dnsbl_threshold=3), ()),
    ("dynamic", Suspicion(names=("adsl-17.isp.example.net",)), ("dynamic_name",)),
    ("protocol", Suspicion(failed_tests=("bare_newline",)), ("protocol_failed",)),
    ("several", Suspicion(no_fcrdns=True, dnsbl_score=1, dnsbl_threshold=2,
                          names=("ppp-9.isp.example.net",)),
     ("no_fcrdns", "dnsbl_low", "dynamic_name")),
]


@pytest.mark.parametrize(("suspicion", "want"), [c[1:] for c in DOUBTS],
                         ids=[c[0] for c in DOUBTS])
def test_doubts(suspicion, want):
    found = greylist.doubts("192.0.2.17", suspicion, GREYLIST_SIGNALS)
    assert tuple(d.split(":")[0] for d in found) == want


def test_only_the_configured_signals_count():
    suspicion = Suspicion(no_fcrdns=True, dnsbl_score=1, dnsbl_threshold=2)
    assert greylist.doubts("192.0.2.17", suspicion, ("dnsbl_low",)) == (
        "dnsbl_low: DNSBL score 1 under the threshold 2",)
    assert greylist.doubts("192.0.2.17", suspicion, ()) == ()


EXEMPT = [
    ("off", dict(mode="off"), "greylisting is off"),
    ("submission", dict(listener_mx=False), "submission"),
    ("mynetworks", dict(trusted=True), "mynetworks"),
    ("permitted", dict(permitted=True), "allowlisted"),
    ("dnswl", dict(dnswl=True), "DNSWL"),
    ("a-stranger", dict(), None),
]


@pytest.mark.parametrize(("given", "why"), [c[1:] for c in EXEMPT], ids=[c[0] for c in EXEMPT])
def test_exempt(given, why):
    args = dict(mode="selective", listener_mx=True, trusted=False, permitted=False,
                dnswl=False) | given
    mode = args.pop("mode")
    found = greylist.exempt(mode, **args)
    assert (found is None) if why is None else (why in found)


TRIPLETS = [
    ("ipv4-24", ("192.0.2.17", "A@Example.NET", None), ("192.0.2.0/24", "example.net")),
    ("ipv6-64", ("2001:db8:1:2::5", "a@example.net", None), ("2001:db8:1:2::/64", "example.net")),
    ("mapped", ("::ffff:192.0.2.17", "a@example.net", None), ("192.0.2.0/24", "example.net")),
    ("null-sender", ("192.0.2.17", "", None), ("192.0.2.0/24", "<>")),
    ("with-recipient", ("192.0.2.17", "a@example.net", "User1@Example.com"),
     ("192.0.2.0/24", "example.net/user1@example.com")),
]


@pytest.mark.parametrize(("given", "want"), [c[1:] for c in TRIPLETS],
                         ids=[c[0] for c in TRIPLETS])
def test_triplet(given, want):
    assert greylist.triplet(*given) == want


DECIDE = [
    ("new", Seen("new"), Outcome.FAIL,
     "450 4.7.1 <user1@example.com>: Recipient address rejected: Greylisted, try again in "
     "300 seconds", "first seen now, a retry after 300 s and within 48 h passes"),
    ("early", Seen("early", 120.2), Outcome.FAIL,
     "450 4.7.1 <user1@example.com>: Recipient address rejected: Greylisted, try again in "
     "180 seconds", "first seen 120 s ago"),
    ("retried", Seen("retried", 301.0), None, None, "retried after 301 s: passed"),
    ("passed-before", Seen("passed"), None, None, "192.0.2.0/24 passed greylisting before"),
]


@pytest.mark.parametrize(("seen", "outcome", "reply", "reason"), [c[1:] for c in DECIDE],
                         ids=[c[0] for c in DECIDE])
def test_decide(seen, outcome, reply, reason):
    verdict = greylist.decide("192.0.2.17", "user1@example.com", "192.0.2.0/24", "example.net",
                              seen, ("dnsbl_low: DNSBL score 1 under the threshold 3",),
                              300.0, 172800.0)
    assert verdict.outcome is (outcome or Outcome.PASS)
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert reason in verdict.reason and "dnsbl_low: DNSBL score 1" in verdict.reason


# --- the store, against real Redis ------------------------------------------------------------


@pytest.fixture(params=["server", "cluster"])
async def store_redis(request):
    """(a flushed sync client, an async client for the store) on the server and the Cluster."""
    if request.param == "server":
        server, sync = request.getfixturevalue("redis_server"), request.getfixturevalue("redis")
    else:
        server = request.getfixturevalue("redis_cluster")
        sync = request.getfixturevalue("cluster_redis")
    client = redis_client.connect(server.url, 5.0, decode=False)
    yield sync, client
    await client.aclose()


async def test_a_triplet_is_deferred_then_passes_and_its_network_is_remembered(store_redis):
    sync, client = store_redis
    store = GreylistStore(client, delay=1.0, retry_window=3600, pass_ttl=3024000)
    async with no_hang(20):
        # the dry run writes nothing
        assert (await store.see("192.0.2.0/24", "example.net", write=False)).state == "new"
        assert sync.keys("smtpgate:grey*") == []
        assert (await store.see("192.0.2.0/24", "example.net")).state == "new"
        first_try = time.monotonic()
        early = await store.see("192.0.2.0/24", "example.net")
        assert early.state == "early" and 0 <= early.waited < 1.0
        assert 3590_000 < sync.pttl(keys.greylist_key("192.0.2.0/24", "example.net")) <= 3600_000
        while (seen := await store.see("192.0.2.0/24", "example.net")).state == "early":
            assert time.monotonic() - first_try < 10, "never passed"
            await asyncio.sleep(0.05)
        assert seen.state == "retried" and seen.waited >= 1.0
        # the network passed: another sender domain, or the dry run, passes at once
        assert (await store.see("192.0.2.0/24", "example.org")).state == "passed"
        assert (await store.see("192.0.2.0/24", "other.example", write=False)).state == "passed"
        assert sync.get(keys.greylist_key("192.0.2.0/24", "example.net")) is None
        assert 3023_000_000 < sync.pttl(keys.greylist_pass_key("192.0.2.0/24")) <= 3024_000_000
        # another network is a stranger still
        assert (await store.see("198.51.100.0/24", "example.net")).state == "new"


async def test_a_retry_after_the_window_starts_over(store_redis):
    sync, client = store_redis
    store = GreylistStore(client, delay=0.2, retry_window=0.5, pass_ttl=60)
    async with no_hang(20):
        assert (await store.see("2001:db8::/64", "<>")).state == "new"
        deadline = time.monotonic() + 10
        while sync.exists(keys.greylist_key("2001:db8::/64", "<>")):
            assert time.monotonic() < deadline, "the triplet never expired"
            await asyncio.sleep(0.05)
        assert (await store.see("2001:db8::/64", "<>")).state == "new"


def test_a_networks_keys_share_a_cluster_slot():
    from redis.crc import key_slot

    assert key_slot(keys.greylist_pass_key("192.0.2.0/24").encode()) == \
        key_slot(keys.greylist_key("192.0.2.0/24", "example.net/u@example.com").encode())
