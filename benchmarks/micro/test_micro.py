"""test_micro - micro benchmarks of smtpgate's hot path: parsing, decisions, table lookups.

SYNOPSIS
    python -m pytest benchmarks/micro [--benchmark-json FILE]

DESCRIPTION
    Each benchmark also asserts the result, so a benchmark that measures a
    broken path fails instead of reporting a fast number. The table lookups
    run against a real redis-server: "hit" answers from the in-process cache
    (no round trip), "miss" makes the one MGET round trip of its phase. The
    connection counters: one server's single script against the pipeline a
    Redis Cluster needs.
    A module not written yet is skipped, not failed.
"""

from __future__ import annotations

import pytest

from smtpgate.verdict import Outcome

address = pytest.importorskip("smtpgate.address")


# --- SMTP command parsing ------------------------------------------------------------------------


@pytest.mark.parametrize("arg", [
    "FROM:<sender@client.bench.test>",
    "FROM:<sender@client.bench.test> SIZE=2048 BODY=8BITMIME",
    'FROM:<"odd user"@[192.0.2.1]>',
], ids=["plain", "params", "quoted-literal"])
def test_parse_mail_arg(benchmark, arg):
    path = benchmark(address.parse_mail_arg, arg)
    assert path.address and not path.null


def test_parse_rcpt_arg(benchmark):
    path = benchmark(address.parse_rcpt_arg, "TO:<user@bench.test>")
    assert (path.local, path.domain) == ("user", "bench.test")


def test_command_line_split(benchmark):
    """What a session does with each line before a hook runs: decode, split verb, upper-case."""
    line = b"RCPT TO:<user@bench.test>\r\n"

    def split(raw: bytes) -> tuple[str, str]:
        text = raw.rstrip(b"\r\n").decode("ascii", "surrogateescape")
        verb, _, arg = text.partition(" ")
        return verb.upper(), arg

    assert benchmark(split, line) == ("RCPT", "TO:<user@bench.test>")


# --- policy decisions (pure) ---------------------------------------------------------------------


def test_access_list_decide(benchmark):
    access_list = pytest.importorskip("smtpgate.checks.access_list")
    verdict = benchmark(access_list.decide, "127.0.2.7", "reject", psa_key="PSA:127.0.2.0/24")
    assert verdict.outcome is Outcome.FAIL and verdict.reply.code == 521


@pytest.mark.parametrize("count", [1, 2], ids=["one-hop", "two-hops"])
def test_hop_choice_order(benchmark, count):
    from smtpgate.relay.hop_choice import HopChoice

    choice = HopChoice(count, 10)
    assert sorted(benchmark(choice.order, 0.0)) == list(range(count))


def test_dnsbl_decide_listed(benchmark):
    dnsbl = pytest.importorskip("smtpgate.checks.dnsbl")
    sites_mod = pytest.importorskip("smtpgate.dnsbl_sites")
    sites = sites_mod.parse_sites("bl1.bench.test*2 bl2.bench.test*2")
    result = dnsbl.DnsblResult("127.0.1.1", (
        dnsbl.ZoneResult("bl1.bench.test", "ok", ("127.0.0.2",), 3600),
        dnsbl.ZoneResult("bl2.bench.test", "ok", ("127.0.0.2",), 3600)))
    verdict = benchmark(dnsbl.decide, result, sites, threshold=3)
    assert verdict.outcome is Outcome.FAIL and verdict.reply.code == 521


def test_helo_decide(benchmark):
    helo = pytest.importorskip("smtpgate.checks.helo")
    dns = helo.HeloDns("ok", 3600, ("127.0.0.1",))
    verdict = benchmark(helo.decide, "client.bench.test", dns=dns)
    assert verdict.outcome is Outcome.PASS


def test_destination_decide(benchmark):
    destination = pytest.importorskip("smtpgate.checks.destination")
    rcpt = address.parse_rcpt_arg("TO:<user@bench.test>")
    verdict = benchmark(destination.decide, rcpt, local=True, trusted=False)
    assert verdict.outcome is Outcome.PASS


def test_recipient_decide(benchmark):
    recipient = pytest.importorskip("smtpgate.checks.recipient")
    verdict = benchmark(recipient.decide, "user@bench.test", local=True, listed=True)
    assert verdict.outcome is Outcome.PASS


# --- table lookups -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tables_pair(redis_url, loop):
    tables_mod = pytest.importorskip("smtpgate.lookups.tables")
    cached = tables_mod.Tables(redis_url, cache=True)
    uncached = tables_mod.Tables(redis_url, cache=False)
    loop.run_until_complete(cached.start(wait_for_cache=5.0))
    loop.run_until_complete(uncached.start())
    yield cached, uncached
    loop.run_until_complete(cached.close())
    loop.run_until_complete(uncached.close())


def test_rcpt_facts_cache_hit(benchmark, tables_pair, loop, world):
    cached, _ = tables_pair
    assert cached.cache_ready
    loop.run_until_complete(cached.rcpt_facts(world.rcpt))  # load the point key once
    facts = benchmark(lambda: loop.run_until_complete(cached.rcpt_facts(world.rcpt)))
    assert facts.vdom is not None and facts.vali is not None


def test_rcpt_facts_cache_miss(benchmark, tables_pair, loop, world):
    _, uncached = tables_pair
    facts = benchmark(lambda: loop.run_until_complete(uncached.rcpt_facts(world.rcpt)))
    assert facts.vdom is not None and facts.vali is not None


def test_connect_facts_cache_hit(benchmark, tables_pair, loop):
    cached, _ = tables_pair
    facts = benchmark(lambda: loop.run_until_complete(cached.connect_facts("127.0.2.7")))
    assert facts.psa is not None and facts.psa.value == "reject"


def test_connect_facts_cache_miss(benchmark, tables_pair, loop):
    _, uncached = tables_pair
    facts = benchmark(lambda: loop.run_until_complete(uncached.connect_facts("127.0.2.7")))
    assert facts.psa is not None and facts.psa.value == "reject"


def test_loop_round_trip_baseline(benchmark, loop):
    """The cost of run_until_complete itself, to subtract from the async lookups above."""

    async def nothing() -> int:
        return 1

    assert benchmark(lambda: loop.run_until_complete(nothing())) == 1


# --- connection counters -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["one-script", "cluster-pipeline"])
def test_connection_count(benchmark, redis_url, loop, path):
    """A connect and its release: one server's single script, or the pipeline a Redis Cluster
    needs (forced here on one server, to compare the client's cost of the two)."""
    redis_client = pytest.importorskip("smtpgate.lookups.redis_client")
    from smtpgate.lookups.screening_cache import ConnectionCounter

    client = redis_client.connect(redis_url, 2.0, decode=False)
    counter = ConnectionCounter(client)
    counter._cluster = path == "cluster-pipeline"

    async def connect_release() -> int:
        lease = await counter.connect("192.0.2.9")
        await counter.release(lease)
        return lease.client_count

    try:
        assert benchmark(lambda: loop.run_until_complete(connect_release())) == 1
    finally:
        loop.run_until_complete(client.aclose())


# --- event rate counters -------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [1, 2], ids=["client", "client-and-login"])
def test_event_rate_count(benchmark, redis_url, loop, keys):
    """A RCPT's rate counts with a limit on (the client's, and on submission the login's
    too): one script, one round trip; against the miss of test_rcpt_facts_cache_miss."""
    from smtpgate.lookups import redis_client
    from smtpgate.lookups.event_rates import EventRates
    from smtpgate.lookups.keys import event_rate_key

    client = redis_client.connect(redis_url, 2.0, decode=False)
    rates = EventRates(client)
    counters = [(event_rate_key("recipient", "192.0.2.9"), 3600.0),
                (event_rate_key("login_recipient", "user@bench.test"), 3600.0)][:keys]
    try:
        counts = benchmark(lambda: loop.run_until_complete(rates.count(counters)))
        assert len(counts) == keys and all(n > 0 for n in counts)
    finally:
        loop.run_until_complete(client.aclose())
