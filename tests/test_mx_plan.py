"""test_mx_plan - who the benchmark's MX traffic clients are (benchmarks.mx_plan, pure).

DESCRIPTION
    The address pools hand out every address once and keep targets apart;
    the mix spreads its kinds evenly in the shares asked for, sends a
    "returning" client only once someone was accepted, and bad shares are
    refused with a message naming the fault.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is no package

from benchmarks.mx_plan import (
    EXPECTED,
    AddressPool,
    FirstContacts,
    Mix,
    Returning,
    TargetPools,
    interleave,
    parse_shares,
)
from benchmarks.stack import World


def test_pool_hands_out_each_address_once_then_none():
    pool = AddressPool("127.20", part=3, parts=128)  # two third octets: 508 addresses
    got = [pool.take() for _ in range(pool.size)]
    assert len(set(got)) == pool.size == 508
    assert got[0] == "127.20.6.1" and got[-1] == "127.20.7.254"
    assert pool.take() is None


def test_pool_over_several_nets_takes_them_one_after_the_other():
    pool = AddressPool(("127.21", "127.23"), part=1, parts=128)  # 508 addresses of each /16
    got = [pool.take() for _ in range(pool.size)]
    assert len(set(got)) == pool.size == 1016
    assert got[0] == "127.21.2.1" and got[507] == "127.21.3.254"
    assert got[508] == "127.23.2.1" and got[-1] == "127.23.3.254"
    assert pool.take() is None


def test_listed_clients_outlast_what_the_listed_cases_take():
    """Half of one /16 (32,512) ran out in the full run: the mix took 13,624 listed
    addresses and the listed case 18,888 before its window had begun."""
    pools = TargetPools(World(), 0, 2)
    assert pools.listed.size >= 4 * 32512
    assert {pools.listed.take()[:6] for _ in range(pools.listed.size)} == {
        "127.21", "127.23", "127.24", "127.25"}


def test_targets_never_share_an_address():
    a, b = TargetPools(World(), 0, 2), TargetPools(World(), 1, 2)
    first = {a.new.take() for _ in range(300)} | {a.listed.take() for _ in range(300)}
    second = {b.new.take() for _ in range(300)} | {b.listed.take() for _ in range(300)}
    assert not first & second and len(first) == len(second) == 600


def test_interleave_spreads_each_kind():
    assert interleave({"a": 3, "b": 1}) == ["a", "a", "b", "a"]
    cycle = interleave({"dnsbl": 60, "access": 10, "unknown": 10, "new": 10, "returning": 10})
    assert Counter(cycle) == {"dnsbl": 6, "access": 1, "unknown": 1, "new": 1, "returning": 1}
    assert interleave({"a": 2, "b": 2}) == ["a", "b"]  # reduced to its smallest cycle
    assert interleave({"a": 2, "b": 1, "c": 1}) == ["a", "b", "c", "a"]
    assert interleave({"new": 5, "dnsbl": 0}) == ["new"]


@pytest.mark.parametrize("text, fault", [
    ("dnsbl=60,bogus=5", "KIND one of"), ("dnsbl", "KIND=PERCENT"), ("new=x", "whole number"),
    ("new=120", "0..100"), ("new=0", "nothing"), ("new=5,new=5", "each once"),
])
def test_bad_shares_are_refused(text, fault):
    with pytest.raises(ValueError, match=fault):
        parse_shares(text)


def test_mix_returns_only_accepted_clients_and_names_them_forward_confirmed():
    world = World()
    mix = Mix(world, TargetPools(world), {"new": 1, "returning": 1})
    first, second = mix.next(), mix.next()
    assert first.kind == "new" and second.kind == "new"  # nobody accepted yet
    mix.done(first, EXPECTED["new"])
    mix.done(second, "550@rcpt")
    back = [mix.next() for _ in range(4)]
    returning = [c for c in back if c.kind == "returning"]
    assert returning and {c.source for c in returning} == {first.source}
    assert first.helo == world.pool_name(first.source) == f"c-{first.source.replace('.', '-')}" \
        ".pool.bench.test"
    assert first.sender == f"sender@{first.helo}" and first.rcpt == world.rcpt


def test_mix_kinds_use_their_own_networks():
    world = World()
    mix = Mix(world, TargetPools(world), {"dnsbl": 1, "access": 1, "unknown": 1})
    clients = {c.kind: c for c in (mix.next() for _ in range(3))}
    assert clients["dnsbl"].source.startswith(world.pool_listed_net + ".")
    assert clients["access"].source.startswith(world.pool_denied_net + ".")
    assert clients["unknown"].source.startswith(world.pool_net + ".")
    assert clients["unknown"].rcpt == world.unknown_rcpt


def test_first_contacts_remember_the_accepted_and_returning_cycles_them():
    world = World()
    plan = FirstContacts(world, TargetPools(world))
    a, b = plan.next(), plan.next()
    plan.done(a, "250")
    plan.done(b, "timeout@banner")
    assert plan.accepted == [a.source]
    again = Returning(world, plan.accepted)
    assert [again.next().source for _ in range(3)] == [a.source] * 3
    assert Returning(world, []).next() is None
