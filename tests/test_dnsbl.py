"""The DNSBL engine against a real DNS server: listings, allowlists, broken zones."""

import asyncio

import pytest
from services.waiting import no_hang

from smtpgate.checks import dnsbl as dnsbl_check
from smtpgate.config import HostPort
from smtpgate.dnsbl_sites import parse_sites
from smtpgate.lookups.dnsbl import DnsblQuerier, query_name
from smtpgate.lookups.resolver import Resolver
from smtpgate.verdict import Outcome

SITES = parse_sites(
    "zen.test=127.0.0.[2..11]*3 bl.test*2 wl.test=127.0.[0..255].[1..3]*-2 "
    "slow.test*3 broken.test*3"
)


@pytest.fixture
def resolver(dns):
    host, _, port = dns.nameserver.rpartition(":")
    return Resolver((HostPort(host, int(port)),), timeout=3.0)


def decide(result):
    return dnsbl_check.decide(result, SITES, threshold=3, allowlist_threshold=-1, action="drop")


@pytest.mark.parametrize(
    ("ip", "zone", "name"),
    [
        ("192.0.2.1", "zen.test", "1.2.0.192.zen.test"),
        ("::ffff:192.0.2.1", "zen.test", "1.2.0.192.zen.test"),
        ("2001:db8::1", "zen.test",
         "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.test"),
    ],
    ids=["ipv4", "mapped", "ipv6-nibbles"],
)
def test_query_name(ip, zone, name):
    assert query_name(ip, zone) == name


def test_bad_client_is_a_clear_error():
    with pytest.raises(ValueError, match="not-an-ip"):
        query_name("not-an-ip", "zen.test")


async def test_listed_client_is_dropped(dns, resolver):
    dns.set([("10.2.0.192.zen.test", "A", "127.0.0.2", 900),
             ("10.2.0.192.zen.test", "A", "127.0.0.10", 900)])
    querier = DnsblQuerier(resolver, SITES[:3], timeout=2)
    result = await querier.query("192.0.2.10")
    zen = next(z for z in result.zones if z.zone == "zen.test")
    assert (zen.status, sorted(zen.answers)) == ("ok", ["127.0.0.10", "127.0.0.2"])
    assert result.ttl == 900  # the smallest TTL: the listing (the NXDOMAINs say 3600 here)
    verdict = decide(result)
    assert verdict.outcome is Outcome.FAIL
    assert str(verdict.reply) == (
        "521 5.7.1 Service unavailable; client [192.0.2.10] blocked using zen.test")
    assert querier.health()["zen.test"]["listed"] == 1


async def test_allowlisted_client(dns, resolver):
    dns.set([("11.2.0.192.wl.test", "A", "127.0.9.2")])
    result = await DnsblQuerier(resolver, SITES[:3], timeout=2).query("192.0.2.11")
    verdict = decide(result)
    assert verdict.outcome is Outcome.PERMIT
    assert dnsbl_check.score(SITES, result).total == -2
    assert verdict.ttl == result.ttl > 0


async def test_clean_client_passes(dns, resolver):
    result = await DnsblQuerier(resolver, SITES[:3], timeout=2).query("192.0.2.12")
    assert {z.status for z in result.zones} == {"nxdomain"}
    assert decide(result).outcome is Outcome.PASS


async def test_ipv6_client_listed_in_nibble_form(dns, resolver):
    dns.set([(query_name("2001:db8::25", "zen.test"), "A", "127.0.0.4")])
    result = await DnsblQuerier(resolver, SITES[:3], timeout=2).query("2001:db8::25")
    assert decide(result).outcome is Outcome.FAIL


async def test_spamhaus_error_answer_is_not_a_listing(dns, resolver):
    dns.set([("13.2.0.192.zen.test", "A", "127.255.255.254"),
             ("13.2.0.192.bl.test", "A", "10.0.0.1")])
    querier = DnsblQuerier(resolver, SITES[:3], timeout=2)
    result = await querier.query("192.0.2.13")
    verdict = decide(result)
    assert verdict.outcome is Outcome.PASS
    assert "error answers from zen.test, bl.test" in verdict.reason
    assert querier.unhealthy == {"zen.test", "bl.test"}
    assert querier.health()["zen.test"]["error"] == 1


async def test_servfail_zone_counts_as_no_listing(dns, resolver):
    dns.set([("14.2.0.192.zen.test", "A", "127.0.0.2")])
    dns.set_servfail_zone("broken.test")
    querier = DnsblQuerier(resolver, (SITES[0], SITES[4]), timeout=2)
    result = await querier.query("192.0.2.14")
    broken = next(z for z in result.zones if z.zone == "broken.test")
    assert broken.status == "tempfail"
    assert result.ttl == dnsbl_check.MIN_TTL  # retried soon
    assert dnsbl_check.score(SITES, result).total == 3  # zen.test only
    assert querier.unhealthy == {"broken.test"}
    assert querier.health()["broken.test"]["tempfail"] == 1


async def test_timing_out_zone_is_bounded(dns, resolver):
    dns.set([("15.2.0.192.zen.test", "A", "127.0.0.3")])
    dns.set_timeout_zone("slow.test")
    querier = DnsblQuerier(resolver, (SITES[0], SITES[3]), timeout=0.5)
    async with no_hang():  # the querier's own timeout ends it
        result = await querier.query("192.0.2.15")
    slow = next(z for z in result.zones if z.zone == "slow.test")
    assert slow.status == "timeout"
    verdict = decide(result)
    assert verdict.outcome is Outcome.FAIL  # zen.test decided it anyway
    assert "no answer from slow.test" in verdict.reason
    assert querier.health()["slow.test"]["timeout"] == 1


async def test_sessions_from_one_ip_share_one_query_and_the_cache(dns, resolver):
    dns.set([("16.2.0.192.zen.test", "A", "127.0.0.2")])
    querier = DnsblQuerier(resolver, SITES[:3], timeout=2)
    first = querier.start("192.0.2.16")
    assert querier.start("192.0.2.16") is first  # in flight: shared
    results = await asyncio.gather(*(querier.query("192.0.2.16") for _ in range(5)))
    assert all(r is results[0] for r in results)
    assert resolver.stats["queries"] == 3  # one per zone, not per session
    again = await querier.query("192.0.2.16")
    assert again is results[0]  # from the cache
    assert resolver.stats["queries"] == 3


async def test_the_score_is_cached_not_the_zones_answers(dns, resolver):
    """A zone's answer for one client is asked for by no one else: the client's score is
    kept here, and the resolver's cache stays for the names asked again (PTR, A, MX)."""
    dns.set([("18.2.0.192.zen.test", "A", "127.0.0.2")])
    querier = DnsblQuerier(resolver, SITES[:3], timeout=2)
    first = await querier.query("192.0.2.18")
    assert resolver.cached("18.2.0.192.zen.test", "A") is None
    assert resolver.cached("18.2.0.192.bl.test", "A") is None  # nor a negative answer
    assert await querier.query("192.0.2.18") is first
    assert resolver.stats["queries"] == 3
    # a lookup of its own, sharing nothing, is cached as ever
    assert (await resolver.lookup("18.2.0.192.zen.test", "A")).values == ("127.0.0.2",)
    assert resolver.cached("18.2.0.192.zen.test", "A") is not None


async def test_a_cancelled_session_does_not_cancel_the_shared_query(dns, resolver):
    dns.set([("17.2.0.192.zen.test", "A", "127.0.0.2")])
    dns.set_timeout_zone("slow.test")
    querier = DnsblQuerier(resolver, (SITES[0], SITES[3]), timeout=0.5)
    impatient = asyncio.ensure_future(querier.query("192.0.2.17"))
    patient = asyncio.ensure_future(querier.query("192.0.2.17"))
    await asyncio.sleep(0)
    impatient.cancel()
    result = await patient
    assert decide(result).outcome is Outcome.FAIL


async def test_early_decision_before_the_greet_wait_ends(dns, resolver):
    dns.set([("18.2.0.192.wl.test", "A", "127.0.0.3")])
    querier = DnsblQuerier(resolver, SITES[:3], timeout=2)
    greet_wait = asyncio.ensure_future(asyncio.sleep(60))
    lookup = querier.start("192.0.2.18")
    done, _ = await asyncio.wait({greet_wait, lookup}, return_when=asyncio.FIRST_COMPLETED)
    greet_wait.cancel()
    assert done == {lookup}  # the order is the point: the answer came before the wait's end
    assert decide(lookup.result()).outcome is Outcome.PERMIT


async def test_settle_drops_a_listed_client_before_a_slow_zone_answers(dns, resolver):
    dns.set([("19.2.0.192.zen.test", "A", "127.0.0.2")])
    dns.set_timeout_zone("slow.test")
    sites = parse_sites("zen.test*3 slow.test*1")
    querier = DnsblQuerier(resolver, sites, timeout=1, threshold=3)
    async with no_hang():
        partial = await querier.settle("192.0.2.19")
    # settled before slow.test's timeout: it is still pending, not timed out
    assert {z.zone: z.status for z in partial.zones} == {"zen.test": "ok", "slow.test": "pending"}
    verdict = dnsbl_check.decide(partial, sites, threshold=3)
    assert str(verdict.reply).startswith("521 5.7.1 Service unavailable; client [192.0.2.19]")
    snapshot = querier.snapshot("192.0.2.19")  # what the greet wait's end would see
    assert snapshot is not None and snapshot.ttl == dnsbl_check.MIN_TTL
    full = await querier.query("192.0.2.19")
    assert {z.zone: z.status for z in full.zones} == {"zen.test": "ok", "slow.test": "timeout"}


async def test_settle_waits_while_an_allowlist_could_still_rescue(dns, resolver):
    dns.set([("20.2.0.192.zen.test", "A", "127.0.0.2"),
             ("20.2.0.192.wl.test", "A", "127.0.0.2")])
    sites = parse_sites("zen.test*3 wl.test*-2")
    querier = DnsblQuerier(resolver, sites, timeout=2, threshold=3)
    result = await querier.settle("192.0.2.20")
    assert "pending" not in {z.status for z in result.zones}
    assert dnsbl_check.decide(result, sites, threshold=3).outcome is Outcome.PASS
    assert querier.snapshot("192.0.2.99") is None


async def test_a_query_in_flight_runs_no_task_and_a_cancelled_wait_cancels_nothing(dns,
                                                                                   resolver):
    """Callbacks, not tasks: a burst of first contacts costs no task per client or zone;
    a client that hangs up (its settling() future cancelled) leaves the query to others."""
    dns.set([("21.2.0.192.zen.test", "A", "127.0.0.2")])
    querier = DnsblQuerier(resolver, SITES[:3], timeout=2, threshold=3)
    tasks = len(asyncio.all_tasks())
    impatient, patient = querier.settling("192.0.2.21"), querier.settling("192.0.2.21")
    assert len(asyncio.all_tasks()) == tasks
    impatient.cancel()
    async with no_hang():
        result = await patient
    assert decide(result).outcome is Outcome.FAIL
    full = await querier.query("192.0.2.21")
    assert {z.zone: z.status for z in full.zones} == {
        "zen.test": "ok", "bl.test": "nxdomain", "wl.test": "nxdomain"}
    assert resolver.stats["queries"] == 3
    assert querier.settling("192.0.2.21").result() is full  # from the cache, done at once


async def test_no_answer_yet_is_no_score(dns, resolver):
    """Asked at once (a front end without a greet wait), the score is None, not a pass of
    nothing: a listed client must not earn a cached DNSBL pass that way."""
    dns.set([("22.2.0.192.zen.test", "A", "127.0.0.2")])
    querier = DnsblQuerier(resolver, SITES[:3], timeout=2, threshold=3)
    settling = querier.settling("192.0.2.22")
    assert querier.snapshot("192.0.2.22") is None
    await settling
    assert decide(querier.snapshot("192.0.2.22")).outcome is Outcome.FAIL
