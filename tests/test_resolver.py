"""The DNS layer and the FCrDNS / HELO facts, against the real DNS server fixture."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import uvloop
from pycares import errno as ares_errno
from services.ports import free_port
from services.waiting import no_hang

from smtpgate.checks import client_fcrdns, helo
from smtpgate.config import HostPort
from smtpgate.lookups.client_dns import (
    MAX_NAMES,
    client_hostname,
    client_hostname_soon,
    helo_facts,
)
from smtpgate.lookups.dns_channel import QTYPES
from smtpgate.lookups.resolver import DnsAnswer, Resolver, answer_from
from smtpgate.verdict import Outcome

_made: list[Resolver] = []


@pytest.fixture(autouse=True)
def _close_resolvers():
    yield
    while _made:
        _made.pop().close()


def kept(resolver: Resolver) -> Resolver:
    _made.append(resolver)  # closed after the test: its channel's socket is let go
    return resolver


def make(dns, timeout: float = 2.0, **kwargs) -> Resolver:
    host, port = dns.nameserver.rsplit(":", 1)
    return kept(Resolver((HostPort(host, int(port)),), timeout, **kwargs))


def dead_resolver(timeout: float = 0.5) -> Resolver:
    # Nothing listens there: what smtpgate sees when its DNS server is down.
    return kept(Resolver((HostPort("127.0.0.1", free_port(udp=True)),), timeout))


@pytest.fixture
def silent_server():
    """A UDP socket that takes queries and never answers: a resolver that hangs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def datagrams(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(4096)
        except BlockingIOError:
            return count
        count += 1


# --- lookup(): statuses and value formats ---------------------------------------------------


async def test_a_record(dns):
    dns.set([("host.test", "A", "192.0.2.1", 120), ("host.test", "A", "192.0.2.2", 120)])
    answer = await make(dns).lookup("host.test", "A")
    assert answer.status == "ok"
    assert sorted(answer.values) == ["192.0.2.1", "192.0.2.2"]
    assert 0 < answer.ttl <= 120


@pytest.mark.parametrize("records,name,rdtype,expected", [
    ([("h.test", "AAAA", "2001:db8::1")], "h.test", "AAAA", ("2001:db8::1",)),
    ([("d.test", "MX", "10 Mail.D.Test.")], "d.test", "MX", ("10 mail.d.test",)),
    ([("d.test", "MX", "0 .")], "d.test", "MX", ("0 ",)),
    ([("t.test", "TXT", '"v=spf1" " -all"')], "t.test", "TXT", ("v=spf1 -all",)),
    ([("alias.test", "CNAME", "Real.test.")], "alias.test", "CNAME", ("real.test",)),
    ([("h.test", "A", "192.0.2.1")], "H.TEST.", "A", ("192.0.2.1",)),
], ids=["aaaa", "mx lower-cased", "null mx", "txt joined", "cname",
        "case and trailing dot"])
async def test_value_formats(dns, records, name, rdtype, expected):
    dns.set(records)
    answer = await make(dns).lookup(name, rdtype)
    assert answer.status == "ok"
    assert answer.values == expected


async def test_nxdomain_and_nodata(dns):
    dns.set([("host.test", "A", "192.0.2.1")])
    resolver = make(dns)
    assert (await resolver.lookup("missing.test", "A")).status == "nxdomain"
    nodata = await resolver.lookup("host.test", "MX")
    assert nodata.status == "nodata"
    assert nodata.values == ()


async def test_impossible_name_is_nxdomain_without_a_query(dns):
    resolver = make(dns)
    answer = await resolver.lookup(f"{'a' * 64}.test", "A")
    assert answer.status == "nxdomain"
    assert (await resolver.lookup("a..test", "A")).status == "nxdomain"
    assert resolver.stats["tempfail"] == 0


def test_nameserver_must_be_an_address():
    with pytest.raises(ValueError, match=r"dns\.example\.test:53 is not an IP address"):
        Resolver((HostPort("dns.example.test", 53),), 1.0)


async def test_bad_input_raises_value_error(dns):
    resolver = make(dns)
    with pytest.raises(ValueError, match="record type"):
        await resolver.lookup("host.test", "NOTATYPE")
    with pytest.raises(ValueError, match="not an IP address"):
        await resolver.ptr("300.1.2.3")


@pytest.mark.parametrize("ip,query_ip", [
    ("192.0.2.33", "192.0.2.33"),
    ("::ffff:192.0.2.33", "192.0.2.33"),
    ("2001:db8::33", "2001:db8::33"),
], ids=["ipv4", "ipv4-mapped", "ipv6"])
async def test_ptr(dns, ip, query_ip):
    dns.add_ptr(query_ip, "Client.Example.Test")
    answer = await make(dns).ptr(ip)
    assert answer == DnsAnswer("ok", ("client.example.test",), answer.ttl)


# --- temporary failures: never an exception, never cached -----------------------------------


async def test_servfail_is_tempfail(dns):
    dns.set_servfail_zone("broken.test")
    answer = await make(dns).lookup("x.broken.test", "A")
    assert answer == DnsAnswer("tempfail", (), 0)


async def test_timeout_is_tempfail_within_the_limit(dns):
    dns.set_timeout_zone("slow.test")
    async with no_hang():  # the resolver's own timeout ends it
        answer = await make(dns, timeout=0.5).lookup("x.slow.test", "A")
    assert answer.status == "tempfail"


async def test_dns_server_down_is_tempfail():
    async with no_hang():
        answer = await dead_resolver(0.5).lookup("anything.test", "A")
    assert answer.status == "tempfail"


async def test_silent_server_times_out_after_retries(silent_server):
    port = silent_server.getsockname()[1]
    resolver = kept(Resolver((HostPort("127.0.0.1", port),), 0.9))
    started = time.monotonic()
    async with no_hang():
        answer = await resolver.lookup("quiet.test", "A")
    assert answer == DnsAnswer("tempfail", (), 0)
    assert 0.5 < time.monotonic() - started < 1.5  # the lookup's limit, not a try's
    assert datagrams(silent_server) >= 2  # asked again before giving up
    assert resolver.stats["tempfail"] == 1


async def test_next_nameserver_answers_when_the_first_is_down(dns):
    host, port = dns.nameserver.rsplit(":", 1)
    dns.set([("two.test", "A", "192.0.2.2")])
    down = HostPort("127.0.0.1", free_port(udp=True))
    resolver = kept(Resolver((down, HostPort(host, int(port))), 2.0))
    async with no_hang():
        assert (await resolver.lookup("two.test", "A")).values == ("192.0.2.2",)


async def test_truncated_answer_is_asked_again_over_tcp(dns):
    # 30 TXT records of 200 bytes: far more than a UDP answer carries (1232 bytes with EDNS)
    texts = [f"{i:02d}" + "x" * 198 for i in range(30)]
    dns.set([("big.test", "TXT", f'"{text}"') for text in texts])
    answer = await make(dns).lookup("big.test", "TXT")
    assert answer.status == "ok"
    assert sorted(answer.values) == texts


async def test_tempfail_is_not_cached(dns):
    dns.set_servfail_zone("flaky.test")
    resolver = make(dns)
    assert (await resolver.lookup("x.flaky.test", "A")).status == "tempfail"
    dns.clear()
    dns.set([("x.flaky.test", "A", "192.0.2.5")])
    assert (await resolver.lookup("x.flaky.test", "A")).values == ("192.0.2.5",)


async def test_system_resolver_answers_within_its_timeout():
    resolver = kept(Resolver((), 1.0))
    async with no_hang():
        answer = await resolver.lookup("smtpgate-test.invalid", "A")
    assert answer.status in ("nxdomain", "nodata", "tempfail")


# --- cache and shared queries ------------------------------------------------------------------


async def test_positive_answers_are_cached(dns):
    dns.set([("c.test", "A", "192.0.2.1", 300)])
    resolver = make(dns)
    assert (await resolver.lookup("c.test", "A")).values == ("192.0.2.1",)
    dns.set([("c.test", "A", "192.0.2.99", 300)])
    assert (await resolver.lookup("C.test", "A")).values == ("192.0.2.1",)
    assert resolver.stats["cache_hits"] == 1
    resolver.clear()
    assert (await resolver.lookup("c.test", "A")).values == ("192.0.2.99",)


async def test_no_cache_but_ours(dns):
    # c-ares keeps answers of its own (an empty one for up to an hour) unless told not to
    dns.set([("grows.test", "A", "192.0.2.1", 300)])
    resolver = make(dns)
    assert (await resolver.lookup("grows.test", "MX")).status == "nodata"
    dns.set([("grows.test", "MX", "10 mx.grows.test.", 300)])
    resolver.clear()
    assert (await resolver.lookup("grows.test", "MX")).values == ("10 mx.grows.test",)


async def test_negative_answers_are_cached(dns):
    resolver = make(dns, negative_ttl=60)
    first = await resolver.lookup("later.test", "A")
    assert first.status == "nxdomain" and first.ttl > 0
    dns.set([("later.test", "A", "192.0.2.1")])
    assert (await resolver.lookup("later.test", "A")).status == "nxdomain"
    assert resolver.stats["queries"] == 1


async def test_negative_ttl_is_the_zones_soa(dns):
    # unbound's SOA for its local zone "." says 10800: the NXDOMAIN lives that long
    answer = await make(dns, negative_ttl=60, max_ttl=86400).lookup("absent.test", "A")
    assert answer == DnsAnswer("nxdomain", (), 10800)


async def test_zero_ttl_is_not_cached(dns):
    dns.set([("z.test", "A", "192.0.2.1", 0)])
    resolver = make(dns)
    await resolver.lookup("z.test", "A")
    await resolver.lookup("z.test", "A")
    assert resolver.stats["queries"] == 2


@pytest.mark.parametrize("ttl,kwargs,expected", [
    (5, {"min_ttl": 30}, 30),
    (86400, {"max_ttl": 3600}, 3600),
], ids=["raised to min", "lowered to max"])
async def test_ttl_clamped(dns, ttl, kwargs, expected):
    dns.set([("ttl.test", "A", "192.0.2.1", ttl)])
    assert (await make(dns, **kwargs).lookup("ttl.test", "A")).ttl == expected


async def test_cache_is_bounded(dns):
    dns.set([(f"n{i}.test", "A", "192.0.2.1") for i in range(5)])
    resolver = make(dns, cache_size=2)
    for i in range(5):
        await resolver.lookup(f"n{i}.test", "A")
    await resolver.lookup("n4.test", "A")
    await resolver.lookup("n0.test", "A")
    assert resolver.stats["cache_hits"] == 1
    assert resolver.stats["queries"] == 6


async def test_concurrent_lookups_share_one_query(dns):
    dns.set([("shared.test", "A", "192.0.2.1")])
    resolver = make(dns)
    answers = await asyncio.gather(*(resolver.lookup("shared.test", "A") for _ in range(20)))
    assert {a.values for a in answers} == {("192.0.2.1",)}
    assert resolver.stats["queries"] == 1
    assert resolver.stats["shared"] == 19


async def test_cancelled_waiter_does_not_cancel_the_shared_query(dns):
    dns.set_timeout_zone("slow.test")
    resolver = make(dns, timeout=0.5)
    first = asyncio.ensure_future(resolver.lookup("x.slow.test", "A"))
    second = asyncio.ensure_future(resolver.lookup("x.slow.test", "A"))
    await asyncio.sleep(0)  # let both reach the shared query
    first.cancel()
    assert (await second).status == "tempfail"
    assert first.cancelled()
    assert resolver.stats["queries"] == 1


async def test_a_query_asked_without_keeping_is_kept_when_a_cached_lookup_shares_it(dns):
    dns.set([("shared.test", "A", "192.0.2.9")])
    resolver = make(dns)
    got: list[DnsAnswer] = []
    assert resolver.ask("shared.test", "A", got.append, keep=False) is None
    assert resolver.cached("shared.test", "A") is None
    async with no_hang():
        answer = await resolver.lookup("shared.test", "A")  # joins the query in flight
    assert answer.values == ("192.0.2.9",) and resolver.stats["queries"] == 1
    assert resolver.cached("shared.test", "A") == answer  # the lookup wanted it kept
    resolver.ask("alone.test", "A", got.append, keep=False)
    async with no_hang():
        while len(got) < 2:
            await asyncio.sleep(0.01)
    assert resolver.cached("alone.test", "A") is None  # nobody wanted that one kept


async def test_ask_calls_back_once_and_answers_a_cache_hit_at_once(dns):
    """The DNSBL engine's way in: no future, the answer handed to a callback in the loop; a
    cached answer comes back at once, the callback not called."""
    dns.set([("asked.test", "A", "192.0.2.8")])
    resolver = make(dns)
    got: list[DnsAnswer] = []
    came = asyncio.Event()

    def answered(answer: DnsAnswer) -> None:
        got.append(answer)
        came.set()

    assert resolver.ask("asked.test", "A", answered) is None
    assert resolver.ask("Asked.test.", "A", answered) is None  # the same query, shared
    async with no_hang():
        await came.wait()
    await asyncio.sleep(0.05)
    assert [a.values for a in got] == [("192.0.2.8",)] * 2
    assert resolver.ask("asked.test", "A", answered).values == ("192.0.2.8",)
    assert len(got) == 2 and resolver.stats["queries"] == 1


async def test_one_guard_ends_each_query_at_its_own_deadline(silent_server):
    """One timer for every query in flight: each still ends at its own limit, the later
    one after the earlier, and an answered one is no longer guarded."""
    port = silent_server.getsockname()[1]
    resolver = kept(Resolver((HostPort("127.0.0.1", port),), 0.6))
    loop = asyncio.get_running_loop()
    ended: dict[str, float] = {}
    started = loop.time()
    resolver.ask("one.quiet.test", "A", lambda a: ended.setdefault("one", loop.time()))
    await asyncio.sleep(0.3)
    resolver.ask("two.quiet.test", "A", lambda a: ended.setdefault("two", loop.time()))
    async with no_hang():
        while len(ended) < 2:
            await asyncio.sleep(0.02)
    assert 0.5 < ended["one"] - started < 0.9
    assert 0.8 < ended["two"] - started < 1.2
    assert resolver.stats["tempfail"] == 2 and resolver._deadlines._timer is None


async def test_a_query_timing_out_after_close_lets_go_of_the_channel(silent_server):
    """The guard ends the last query in flight after close(): the channel goes with it, and
    nothing fails in the loop."""
    port = silent_server.getsockname()[1]
    resolver = kept(Resolver((HostPort("127.0.0.1", port),), 0.4))
    loop = asyncio.get_running_loop()
    failures: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    got: list[DnsAnswer] = []
    try:
        resolver.ask("late.quiet.test", "A", got.append)
        resolver.close()
        async with no_hang():
            while not got:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    assert got == [DnsAnswer("tempfail", (), 0)]
    assert failures == [] and resolver._channel is None


async def test_lookup_in_flight_survives_close(dns):
    dns.set([("closing.test", "A", "192.0.2.7")])
    resolver = make(dns)
    pending = asyncio.ensure_future(resolver.lookup("closing.test", "A"))
    await asyncio.sleep(0)
    resolver.close()
    assert (await pending).values == ("192.0.2.7",)
    resolver.clear()
    assert (await resolver.lookup("closing.test", "A")).values == ("192.0.2.7",)
    assert resolver.stats["queries"] == 2


def test_each_event_loop_gets_a_channel_of_its_own(dns):
    # a worker's loop after fork, or uvloop beside asyncio: the channel is made where it is used
    dns.set([("loops.test", "A", "192.0.2.8", 0)])
    resolver = make(dns)
    answers = []

    def run(runner) -> None:
        answers.append(runner(resolver.lookup("loops.test", "A")))

    for runner in (asyncio.run, uvloop.run, asyncio.run):
        thread = threading.Thread(target=run, args=(runner,))
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
    assert [a.values for a in answers] == [("192.0.2.8",)] * 3
    assert resolver.stats["queries"] == 3


# --- answer_from(): c-ares' report as a DnsAnswer (pure) --------------------------------------


def record(name: str, rdtype: str, ttl: int, **data):
    return (name, QTYPES[rdtype], ttl, SimpleNamespace(**data))


@pytest.mark.parametrize("status,records,soa_ttl,expected", [
    (0, [record("a.test", "A", 50, addr="192.0.2.1"), record("a.test", "A", 40, addr="192.0.2.2")],
     None, DnsAnswer("ok", ("192.0.2.1", "192.0.2.2"), 40)),
    (0, [record("a.test", "CNAME", 30, cname="B.test."),
         record("b.test", "A", 90, addr="192.0.2.3")], None, DnsAnswer("ok", ("192.0.2.3",), 30)),
    (0, [record("a.test", "CNAME", 30, cname="elsewhere.test")], None, DnsAnswer("nodata", (), 60)),
    (0, [record("other.test", "A", 30, addr="192.0.2.9")], None, DnsAnswer("nodata", (), 60)),
    (ares_errno.ARES_ENOTFOUND, [], 900, DnsAnswer("nxdomain", (), 900)),
    (ares_errno.ARES_ENOTFOUND, [], None, DnsAnswer("nxdomain", (), 60)),
    (ares_errno.ARES_ENODATA, [], 5, DnsAnswer("nodata", (), 10)),
    (ares_errno.ARES_ESERVFAIL, [], None, DnsAnswer("tempfail")),
    (ares_errno.ARES_ETIMEOUT, [], None, DnsAnswer("tempfail")),
    (ares_errno.ARES_ECONNREFUSED, [], None, DnsAnswer("tempfail")),
], ids=["rrset min ttl", "cname chain", "chain ends elsewhere", "other name only", "nxdomain soa",
        "nxdomain no soa", "nodata clamped", "servfail", "timeout", "refused"])
def test_answer_from(status, records, soa_ttl, expected):
    def clamp(ttl: int) -> int:
        return max(10, min(3600, ttl))

    assert answer_from(status, records, soa_ttl, QTYPES["A"], "a.test", clamp, 60) == expected


# --- FCrDNS facts and decisions with real DNS ----------------------------------------------


async def verdict_for(resolver: Resolver, ip: str, **kwargs):
    facts = await client_hostname(resolver, ip)
    return facts, client_fcrdns.decide(facts, **kwargs)


async def test_client_without_ptr_gets_450(dns):
    facts, verdict = await verdict_for(make(dns), "192.0.2.50")
    assert facts.status == "nxdomain"
    assert str(verdict.reply) == (
        "450 4.7.25 Client host rejected: cannot find your hostname, [192.0.2.50]")


async def test_client_ptr_not_confirming_gets_configured_code(dns):
    dns.add_ptr("192.0.2.51", "liar.test")
    dns.set([("liar.test", "A", "198.51.100.1")])
    facts, verdict = await verdict_for(make(dns), "192.0.2.51", unknown_code=550)
    assert facts.ptr_names == ("liar.test",)
    assert facts.hostname is None
    assert str(verdict.reply) == (
        "550 5.7.25 Client host rejected: cannot find your hostname, [192.0.2.51]")


async def test_client_ptr_without_forward_record(dns):
    dns.add_ptr("192.0.2.52", "noforward.test")
    facts, verdict = await verdict_for(make(dns), "192.0.2.52")
    assert facts.forward[0].status == "nxdomain"
    assert verdict.reply.code == 450


async def test_client_confirmed(dns):
    dns.add_ptr("192.0.2.53", "good.test", ttl=200)
    dns.set([("good.test", "A", "192.0.2.53", 100)])
    facts, verdict = await verdict_for(make(dns), "192.0.2.53")
    assert facts.hostname == "good.test"
    assert verdict.outcome is Outcome.PASS
    assert 0 < verdict.ttl <= 100


async def test_client_ipv6_confirmed_with_aaaa(dns):
    dns.add_ptr("2001:db8::53", "six.test")
    dns.set([("six.test", "AAAA", "2001:db8::53"), ("six.test", "A", "192.0.2.1")])
    facts, verdict = await verdict_for(make(dns), "2001:db8::53")
    assert verdict.outcome is Outcome.PASS
    assert facts.forward[0].addresses == ("2001:db8::53",)


async def test_client_rev_permit_by_unconfirmed_name(dns):
    dns.add_ptr("192.0.2.54", "legacy.test")
    facts = await client_hostname(make(dns), "192.0.2.54")
    assert client_fcrdns.rev_names(facts) == ("legacy.test",)
    verdict = client_fcrdns.decide(facts, rev_by_name={"legacy.test": "permit"})
    assert verdict.outcome is Outcome.PERMIT


async def test_client_rev_permit_by_ip(dns):
    _, verdict = await verdict_for(make(dns), "192.0.2.55", rev_ip="permit")
    assert verdict.outcome is Outcome.PERMIT


async def test_client_forward_lookups_are_bounded(dns):
    names = [f"n{i}.many.test" for i in range(MAX_NAMES + 3)]
    dns.set([("55.2.0.192.in-addr.arpa", "PTR", f"{n}.") for n in names])
    facts = await client_hostname(make(dns), "192.0.2.55")
    assert len(facts.ptr_names) == MAX_NAMES
    assert len(facts.forward) == MAX_NAMES


async def test_client_dns_down_is_4xx_never_5xx():
    facts, verdict = await verdict_for(dead_resolver(), "192.0.2.56", unknown_code=550)
    assert facts.status == "tempfail"
    assert str(verdict.reply).startswith("450 4.7.25 ")


async def test_client_forward_tempfail_is_4xx(dns):
    dns.add_ptr("192.0.2.57", "host.slow.test")
    dns.set_timeout_zone("slow.test")
    facts, verdict = await verdict_for(make(dns, timeout=0.5), "192.0.2.57", unknown_code=550)
    assert facts.forward[0].status == "tempfail"
    assert facts.ttl == 0
    assert verdict.reply.code == 450


async def test_client_hostname_rejects_bad_ip(dns):
    with pytest.raises(ValueError):
        await client_hostname(make(dns), "not-an-ip")


async def test_client_hostname_soon_is_done_at_once_from_the_cache(dns):
    dns.add_ptr("192.0.2.58", "cached.test", ttl=200)
    dns.set([("cached.test", "A", "192.0.2.58", 100)])
    resolver = make(dns)
    first = await client_hostname(resolver, "192.0.2.58")
    again = client_hostname_soon(resolver, "192.0.2.58", asyncio.get_running_loop())
    assert again.done()  # the PTR and A from the cache: no query, no turn of the loop
    assert again.result() == first
    assert first.hostname == "cached.test" and 0 < first.ttl <= 100


async def test_client_hostname_soon_with_no_name_to_look_up(dns):
    dns.add_ptr("192.0.2.59", "192.0.2.59", ttl=200)  # numeric: not a host name
    facts = await client_hostname_soon(make(dns), "192.0.2.59", asyncio.get_running_loop())
    assert facts.status == "ok"
    assert facts.ptr_names == ("192.0.2.59",)
    assert facts.forward == ()
    assert 0 < facts.ttl <= 200


async def test_client_hostname_soon_cancelled_leaves_the_queries_to_finish(dns, caplog):
    dns.add_ptr("192.0.2.60", "gone.test")
    dns.set([("gone.test", "A", "192.0.2.60")])
    resolver = make(dns)
    soon = client_hostname_soon(resolver, "192.0.2.60", asyncio.get_running_loop())
    soon.cancel()
    ptr = await resolver.ptr("192.0.2.60")  # shares the PTR query the cancelled one sent
    assert ptr.values == ("gone.test",)
    assert resolver.stats["errors"] == 0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]


# --- HELO facts ------------------------------------------------------------------------------


@pytest.mark.parametrize("records,name,status", [
    ([("mx.test", "A", "192.0.2.1")], "mx.test", "ok"),
    ([("mx.test", "AAAA", "2001:db8::1")], "mx.test.", "ok"),
    ([("mx.test", "MX", "10 mail.mx.test.")], "mx.test", "ok"),
    ([("mx.test", "MX", "0 .")], "mx.test", "ok"),
    ([("mx.test", "TXT", "only text")], "mx.test", "notfound"),
    ([], "nowhere.test", "notfound"),
], ids=["a", "aaaa trailing dot", "mx", "null mx", "txt only", "nxdomain"])
async def test_helo_facts(dns, records, name, status):
    if records:
        dns.set(records)
    facts = await helo_facts(make(dns), name)
    assert facts.status == status


@pytest.mark.parametrize("records,name,queries", [
    ([("one.test", "A", "192.0.2.1"), ("one.test", "MX", "10 mail.one.test.")], "one.test", 1),
    ([], "gone.test", 1),
    ([("six.test", "AAAA", "2001:db8::1")], "six.test", 3),
    ([("mxonly.test", "MX", "10 mail.mxonly.test.")], "mxonly.test", 3),
], ids=["a stops", "nxdomain stops", "aaaa and mx after a", "mx after a"])
async def test_helo_facts_ask_in_postfix_order_until_found(dns, records, name, queries):
    # reject_unknown_helo_hostname stops at the first type with records, A first; smtpgate
    # also stops at NXDOMAIN: a HELO name with an address costs one query, not three.
    if records:
        dns.set(records)
    resolver = make(dns)
    facts = await helo_facts(resolver, name)
    assert resolver.stats["queries"] == queries
    assert facts.status == ("notfound" if not records else "ok")
    assert (facts.mx != ()) == (name == "mxonly.test")


async def test_helo_unknown_and_known_through_decide(dns):
    dns.set([("known.test", "A", "192.0.2.1")])
    resolver = make(dns)
    known = helo.decide("known.test", dns=await helo_facts(resolver, "known.test"))
    assert known.outcome is Outcome.PASS
    unknown = helo.decide("unknown.test", dns=await helo_facts(resolver, "unknown.test"))
    assert str(unknown.reply) == "450 4.7.1 <unknown.test>: Helo command rejected: Host not found"


async def test_helo_dns_down_defers():
    facts = await helo_facts(dead_resolver(), "mail.example.test")
    assert facts.status == "tempfail"
    verdict = helo.decide("mail.example.test", dns=facts, unknown_code=550)
    assert verdict.reply.code == 450
