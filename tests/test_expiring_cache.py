"""The expiring cache, and the per-address caches built on it, fed a stream of new addresses.

In memory, with a clock the test moves: an MX sees mostly addresses it never sees again,
and what it keeps of each must leave when its TTL ends, not only once a count is reached.
"""

from __future__ import annotations

import asyncio

from smtpgate.dnsbl_sites import parse_sites
from smtpgate.lookups.dnsbl import DnsblQuerier
from smtpgate.lookups.expiring_cache import ExpiringCache
from smtpgate.lookups.resolver import DnsAnswer

NEW_ADDRESSES = 20_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def addresses(n: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]


def test_entries_leave_when_they_expire():
    clock = Clock()
    cache = ExpiringCache(10, clock)
    cache.put("a", 1, 60)
    cache.put("b", 2, 300)
    cache.put("zero", 3, 0)  # nothing to keep
    assert (cache.get("a"), cache.get("b"), cache.get("zero")) == (1, 2, None)
    clock.now += 60
    assert cache.get("a") is None
    cache.put("c", 4, 60)  # a put drops what has expired, asked for or not
    assert len(cache) == 2


def test_a_replaced_entry_keeps_its_new_expiry():
    clock = Clock()
    cache = ExpiringCache(10, clock)
    cache.put("a", "old", 10)
    cache.put("a", "new", 100)
    clock.now += 50
    cache.put("b", 1, 10)  # the old expiry's heap item comes due: it must not drop "a"
    assert cache.get("a") == "new"


def test_least_recently_used_goes_first_when_full():
    cache = ExpiringCache(2, Clock())
    cache.put("a", 1, 60)
    cache.put("b", 2, 60)
    cache.get("a")
    cache.put("c", 3, 60)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    assert ExpiringCache(0).get("x") is None


def test_a_stream_of_new_addresses_leaves_it_bounded_by_what_is_alive():
    """1.5 new addresses a second, 300 s TTL: about 450 alive, whatever the size allows."""
    clock = Clock()
    cache = ExpiringCache(10_000, clock)
    peak = 0
    for ip in addresses(NEW_ADDRESSES):
        clock.now += 1 / 1.5
        cache.put(ip, DnsAnswer("ok", ("c.example",), 300), 300)
        peak = max(peak, len(cache))
    assert peak <= 451
    assert cache._filed <= 2 * cache.size + 64
    clock.now += 301
    cache.put("last", 0, 1)
    assert len(cache) == 1


async def test_dnsbl_scores_of_new_addresses_leave_with_their_ttl():
    class Nxdomain:  # every address unlisted, answered in the next turn, TTL 300
        def ask(self, name, rdtype, callback, loop=None, keep=True) -> None:
            (loop or asyncio.get_running_loop()).call_soon(
                callback, DnsAnswer("nxdomain", (), 300))

    clock = Clock()
    querier = DnsblQuerier(Nxdomain(), parse_sites("bl1.test*2 bl2.test*2"), clock=clock)
    peak = 0
    batch = 150  # 100 s of new clients at 1.5 a second
    ips = addresses(NEW_ADDRESSES)
    for start in range(0, len(ips), batch):
        await asyncio.gather(*(querier.query(ip) for ip in ips[start:start + batch]))
        clock.now += 100
        peak = max(peak, len(querier._cache))
    assert peak <= 4 * batch  # three batches' TTL, not 10,000
    assert not querier._inflight  # every lookup ended: nothing held per address
