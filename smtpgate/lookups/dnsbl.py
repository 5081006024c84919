"""dnsbl - the DNSBL engine: all zones in parallel, shared per client, cached for the TTL.

SYNOPSIS
    query_name(ip, zone) -> str
    DnsblQuerier(resolver, sites, timeout=10.0, *, threshold=1,
                 allowlist_threshold=0, cache_size=10000, clock=time.monotonic)
        await .query(ip) -> DnsblResult
        .start(ip) -> asyncio.Future[DnsblResult]
        await .settle(ip) -> DnsblResult
        .snapshot(ip) -> DnsblResult | None
        .health() -> dict[str, dict[str, int]]
        .unhealthy -> frozenset[str]
        .zones -> tuple[str, ...]

DESCRIPTION
    query() asks every zone named in `sites` (smtpgate.dnsbl_sites, each
    zone once however many sites name it) for the client's A records, all
    at once, through the shared resolver (smtpgate.lookups.resolver: `await
    resolver.start(name, "A") -> Future[DnsAnswer]`). Query names are the reversed
    IPv4 octets (`2.0.0.127.zen.example`) or, for IPv6, the 32 reversed
    nibbles (`1.0.0.0....8.b.d.0.1.0.0.2.zen.example`, as Spamhaus and
    postscreen use); an IPv4-mapped IPv6 client is queried as IPv4. Zones
    without IPv6 data answer NXDOMAIN, which counts as not listed.

    Each zone is bounded by `timeout` (postscreen_dnsbl_timeout): a zone that
    does not answer in time is "timeout", one that answers SERVFAIL or the
    like "tempfail"; both count as no listing, show in the result, and are
    counted in the zone's health. The result (smtpgate.checks.dnsbl
    DnsblResult, judged by smtpgate.checks.dnsbl.decide) is cached in this
    process for its ttl, the answer TTL clamped to [60 s, 1 h] (60 s when a
    zone failed). Sessions of one client that ask while a query is running
    share it (one future per IP); a waiter that is cancelled, e.g. a client
    that hung up, does not cancel the query for the others.

    The early-decision hooks, for the session's greet wait:
    - start() returns the running (or finished) query as a future;
    - settle() (starting the query if needed) returns as soon as the outcome
      is fixed whatever the zones still running answer
      (smtpgate.checks.dnsbl.settled with `threshold` and
      `allowlist_threshold`): a listed client can be dropped, an allowlisted
      one can skip the rest of the wait, before a slow zone answers. Its
      result may hold zones with status "pending"; the full query goes on
      and fills the cache. The session awaits settle() alongside the greet
      wait (asyncio.wait(..., FIRST_COMPLETED)).
    - snapshot() is what is known now (pending zones "pending"; None when
      nothing was started): at the end of the greet wait postscreen takes
      the score as it stands rather than waiting for a slow zone.

    health() counts, per zone, the answers seen: ok, listed (at least one A
    record), nxdomain, nodata, tempfail, timeout, error (an error answer
    such as 127.255.255.254, or one outside 127/8: smtpgate.dnsbl_sites.
    is_error_answer). `unhealthy` is the set of zones whose latest answer
    was an error answer or a failure, for /metrics and the log.

    A client text that is not an IP address raises ValueError.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections import Counter
from collections.abc import Sequence

from smtpgate.address import client_address
from smtpgate.checks.dnsbl import DnsblResult, ZoneResult, cache_ttl, settled
from smtpgate.dnsbl_sites import DnsblSite, is_error_answer
from smtpgate.lookups.expiring_cache import ExpiringCache

HEALTH_KEYS = ("ok", "listed", "nxdomain", "nodata", "tempfail", "timeout", "error")


def query_name(ip: str, zone: str) -> str:
    address = client_address(ip)
    if isinstance(address, ipaddress.IPv4Address):
        reversed_ip = ".".join(reversed(str(address).split(".")))
    else:
        reversed_ip = ".".join(reversed(address.exploded.replace(":", "")))
    return f"{reversed_ip}.{zone}"


class DnsblQuerier:
    def __init__(
        self,
        resolver,
        sites: Sequence[DnsblSite],
        timeout: float = 10.0,
        *,
        threshold: int = 1,
        allowlist_threshold: int = 0,
        cache_size: int = 10000,
        clock=time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._sites = tuple(sites)
        self._thresholds = {"threshold": threshold, "allowlist_threshold": allowlist_threshold}
        self.zones = tuple(dict.fromkeys(site.zone for site in sites))
        self._timeout = timeout
        self._clock = clock
        # a score leaves when its TTL ends: most clients are never seen again
        self._cache = ExpiringCache(cache_size, clock)
        self._inflight: dict[str, asyncio.Future[DnsblResult]] = {}
        self._partial: dict[str, dict[str, ZoneResult]] = {}  # answers so far, per IP in flight
        self._changed: dict[str, asyncio.Future[None]] = {}  # done at each zone's answer
        self._health = {zone: Counter() for zone in self.zones}
        self._unhealthy: set[str] = set()

    @property
    def unhealthy(self) -> frozenset[str]:
        return frozenset(self._unhealthy)

    def health(self) -> dict[str, dict[str, int]]:
        return {zone: {k: c[k] for k in HEALTH_KEYS} for zone, c in self._health.items()}

    async def query(self, ip: str) -> DnsblResult:
        # shield: one session giving up must not cancel the lookup its siblings wait for
        return await asyncio.shield(self.start(ip))

    def start(self, ip: str) -> asyncio.Future[DnsblResult]:
        key = _normal(ip)
        cached = self._cache.get(key)
        if cached is not None:
            future = asyncio.get_running_loop().create_future()
            future.set_result(cached)
            return future
        future = self._inflight.get(key)
        if future is None:
            self._partial[key] = {}
            self._changed[key] = asyncio.get_running_loop().create_future()
            future = asyncio.ensure_future(self._query_all(key))
            self._inflight[key] = future
            future.add_done_callback(lambda _f, k=key: self._forget(k))
        return future

    async def settle(self, ip: str) -> DnsblResult:
        future = self.start(ip)
        key = _normal(ip)
        while not future.done():
            partial = self.snapshot(key)
            if partial is not None and settled(self._sites, partial, **self._thresholds):
                return partial
            # woken by the next zone's answer (or the end): a future each, no task
            await asyncio.wait({future, self._changed[key]}, return_when=asyncio.FIRST_COMPLETED)
        return future.result()

    def snapshot(self, ip: str) -> DnsblResult | None:
        key = _normal(ip)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        partial = self._partial.get(key)
        if partial is None:
            return None
        zones = tuple(partial.get(zone) or ZoneResult(zone, "pending") for zone in self.zones)
        return DnsblResult(key, zones, cache_ttl(zones))

    def _forget(self, key: str) -> None:
        self._inflight.pop(key, None)
        self._partial.pop(key, None)
        self._changed.pop(key, None)

    async def _query_all(self, ip: str) -> DnsblResult:
        # one future per zone from the resolver and one time limit for all: no task per zone
        asked = {zone: self._resolver.start(query_name(ip, zone), "A") for zone in self.zones}
        for zone, future in asked.items():
            future.add_done_callback(functools.partial(self._answered, ip, zone))
        _, late = await asyncio.wait(asked.values(), timeout=self._timeout)
        for future in late:
            future.cancel()  # ours alone: the resolver's query goes on for its other askers
        for zone, future in asked.items():
            if future in late:
                self._note(ip, ZoneResult(zone, "timeout"))
            else:
                self._answered(ip, zone, future)  # if its callback has not run yet
        zones = [self._partial[ip][zone] for zone in self.zones]
        result = DnsblResult(ip, tuple(zones), cache_ttl(zones))
        self._store(ip, result)
        return result

    def _answered(self, ip: str, zone: str, future: asyncio.Future) -> None:
        if not future.cancelled():
            answer = future.result()
            self._note(ip, ZoneResult(zone, answer.status, tuple(answer.values), int(answer.ttl)))

    def _note(self, ip: str, result: ZoneResult) -> None:
        """A zone's result, once: counted in its health, seen by settle() and snapshot()."""
        partial = self._partial.get(ip)
        if partial is None or result.zone in partial:
            return
        partial[result.zone] = result
        self._count(result)
        changed = self._changed.get(ip)
        if changed is not None:  # wake settle(), and give the next answer a future of its own
            changed.set_result(None)
            self._changed[ip] = changed.get_loop().create_future()

    def _count(self, result: ZoneResult) -> None:
        counter = self._health[result.zone]
        counter[result.status] += 1
        errors = any(map(is_error_answer, result.answers))
        if result.answers:
            counter["listed"] += 1
        if errors:
            counter["error"] += 1
        if errors or result.failed:
            self._unhealthy.add(result.zone)
        else:
            self._unhealthy.discard(result.zone)

    def _store(self, ip: str, result: DnsblResult) -> None:
        self._cache.put(ip, result, result.ttl)


def _normal(ip: str) -> str:
    return str(client_address(ip))
