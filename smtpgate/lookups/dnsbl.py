"""dnsbl - the DNSBL engine: all zones in parallel, shared per client, cached for the TTL.

SYNOPSIS
    query_name(ip, zone) -> str
    DnsblQuerier(resolver, sites, timeout=10.0, *, threshold=1,
                 allowlist_threshold=0, cache_size=10000, clock=time.monotonic)
        await .query(ip) -> DnsblResult
        .start(ip) -> asyncio.Future[DnsblResult]
        .settling(ip) -> asyncio.Future[DnsblResult]
        await .settle(ip) -> DnsblResult
        .snapshot(ip) -> DnsblResult | None
        .health() -> dict[str, dict[str, int]]
        .unhealthy -> frozenset[str]
        .zones -> tuple[str, ...]

DESCRIPTION
    query() asks every zone named in `sites` (smtpgate.dnsbl_sites, each
    zone once however many sites name it) for the client's A records, all
    at once, through the shared resolver (smtpgate.lookups.resolver:
    `resolver.ask(name, "A", callback, keep=False)`: the result per client is
    cached here, the zones' answers not in the resolver). Query names are the reversed
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
    - start() returns the running (or finished) query as a future, shared
      by every caller while it runs;
    - settling() (starting the query if needed) returns a future of the
      caller's own, done as soon as the outcome is fixed whatever the zones
      still running answer (smtpgate.checks.dnsbl.settled with `threshold`
      and `allowlist_threshold`): a listed client can be dropped, an
      allowlisted one can skip the rest of the wait, before a slow zone
      answers. Its result may hold zones with status "pending"; the full
      query goes on and fills the cache. Cancelling it cancels nothing
      else. settle() awaits it.
    - snapshot() is what is known now (pending zones "pending"; None while
      no zone has answered, or nothing was started): at the end of the
      greet wait postscreen takes the score as it stands rather than
      waiting for a slow zone. A score of no answer at all is no score:
      a caller asking at once (the aiosmtpd front end, which has no greet
      wait) gets no verdict, not a pass.

    health() counts, per zone, the answers seen: ok, listed (at least one A
    record), nxdomain, nodata, tempfail, timeout, error (an error answer
    such as 127.255.255.254, or one outside 127/8: smtpgate.dnsbl_sites.
    is_error_answer). `unhealthy` is the set of zones whose latest answer
    was an error answer or a failure, for /metrics and the log.

    A query in flight is driven by callbacks (each zone's answer comes
    straight from the resolver, without a future): no task per client, none
    per zone, and the client's address parsed once. The time limit is the
    same for every client, so the lookups' deadlines come in the order they
    were begun: one timer, armed for the oldest lookup still running, ends
    them all in turn.

    A client text that is not an IP address raises ValueError.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections import Counter
from collections.abc import Sequence

from smtpgate.address import client_address, client_text
from smtpgate.checks.dnsbl import DnsblResult, ZoneResult, cache_ttl, settled
from smtpgate.dnsbl_sites import DnsblSite, is_error_answer
from smtpgate.lookups.expiring_cache import ExpiringCache
from smtpgate.lookups.ordered_deadlines import OrderedDeadlines
from smtpgate.lookups.resolver import DnsAnswer

HEALTH_KEYS = ("ok", "listed", "nxdomain", "nodata", "tempfail", "timeout", "error")


def query_name(ip: str, zone: str) -> str:
    return f"{_reversed(client_address(ip))}.{zone}"


def _reversed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


class _Lookup:
    """One client's query in flight: the zones' answers so far and who waits for what."""

    __slots__ = ("answers", "deadline", "done", "future", "ip", "loop", "result", "settlers")

    def __init__(self, ip: str, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.ip = ip
        self.loop = loop
        self.future: asyncio.Future | None = None  # the full result, made for start()'s callers
        self.result: DnsblResult | None = None  # that result, once every zone is in
        self.answers: dict[str, ZoneResult] = {}
        self.settlers: list[asyncio.Future] = []  # settling()'s futures, one per caller
        self.deadline = deadline
        self.done = False


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
        self._pending = {zone: ZoneResult(zone, "pending") for zone in self.zones}
        # whether a lookup is settled before any zone answers: a property of the sites and
        # thresholds alone (false but for a threshold no listing can miss)
        self._settled_unanswered = settled(
            self._sites, DnsblResult("", tuple(self._pending.values())), **self._thresholds)
        self._timeout = timeout
        self._clock = clock
        # a score leaves when its TTL ends: most clients are never seen again
        self._cache = ExpiringCache(cache_size, clock)
        self._inflight: dict[str, _Lookup] = {}
        self._deadlines = OrderedDeadlines(self._expired)  # lookups in the order begun
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
        loop = asyncio.get_running_loop()
        cached = self._cache.get(key)
        if cached is not None:
            return _done(cached, loop)
        lookup = self._inflight.get(key) or self._begin(key, loop)
        if lookup.result is not None:  # every zone answered from the resolver's cache
            return _done(lookup.result, loop)
        if lookup.future is None:
            lookup.future = loop.create_future()
        return lookup.future

    def settling(self, ip: str) -> asyncio.Future[DnsblResult]:
        key = _normal(ip)
        loop = asyncio.get_running_loop()
        cached = self._cache.get(key)
        if cached is not None:
            return _done(cached, loop)
        lookup = self._inflight.get(key) or self._begin(key, loop)
        if lookup.result is not None:  # every zone answered from the resolver's cache
            return _done(lookup.result, loop)
        if lookup.answers:
            partial = self._snapshot_of(lookup)
            if settled(self._sites, partial, **self._thresholds):
                return _done(partial, loop)
        elif self._settled_unanswered:
            return _done(self._snapshot_of(lookup), loop)
        waiter = loop.create_future()
        lookup.settlers.append(waiter)
        return waiter

    async def settle(self, ip: str) -> DnsblResult:
        return await self.settling(ip)

    def snapshot(self, ip: str) -> DnsblResult | None:
        key = _normal(ip)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        lookup = self._inflight.get(key)
        if lookup is None or not lookup.answers:
            return None
        return self._snapshot_of(lookup)

    def _snapshot_of(self, lookup: _Lookup) -> DnsblResult:
        answers, pending = lookup.answers, self._pending
        zones = tuple(answers.get(zone) or pending[zone] for zone in self.zones)
        return DnsblResult(lookup.ip, zones, cache_ttl(zones))

    def _begin(self, ip: str, loop: asyncio.AbstractEventLoop) -> _Lookup:
        """Ask every zone at once, one time limit for all (postscreen_dnsbl_timeout)."""
        lookup = self._inflight[ip] = _Lookup(ip, loop, loop.time() + self._timeout)
        reversed_ip = _reversed(client_address(ip))
        ask = self._resolver.ask
        for zone in self.zones:
            # not kept by the resolver: the client's score is, here
            ask(f"{reversed_ip}.{zone}", "A", functools.partial(self._answered, lookup, zone),
                loop, keep=False)
        if not self.zones:
            self._finish(lookup)
        if not lookup.done:
            self._deadlines.add(lookup, loop)
        return lookup

    def _answered(self, lookup: _Lookup, zone: str, answer: DnsAnswer) -> None:
        if lookup.done or zone in lookup.answers:
            return  # past the time limit, which noted the timeout
        self._note(lookup, ZoneResult(zone, answer.status, tuple(answer.values), int(answer.ttl)))
        if len(lookup.answers) == len(self.zones):
            self._finish(lookup)
        elif lookup.settlers:
            partial = self._snapshot_of(lookup)
            if settled(self._sites, partial, **self._thresholds):
                self._wake(lookup, partial)

    def _expired(self, lookup: _Lookup) -> None:
        """The time limit: the zones that have not answered are "timeout" (the resolver's
        query goes on, its answer cached for others)."""
        for zone in self.zones:
            if zone not in lookup.answers:
                self._note(lookup, ZoneResult(zone, "timeout"))
        self._finish(lookup)

    def _note(self, lookup: _Lookup, result: ZoneResult) -> None:
        """A zone's result, once: counted in its health, seen by settling() and snapshot()."""
        lookup.answers[result.zone] = result
        self._count(result)

    def _finish(self, lookup: _Lookup) -> None:
        if lookup.done:
            return
        lookup.done = True
        if self._inflight.get(lookup.ip) is lookup:
            del self._inflight[lookup.ip]
        zones = tuple(lookup.answers[zone] for zone in self.zones)
        result = lookup.result = DnsblResult(lookup.ip, zones, cache_ttl(zones))
        self._store(lookup.ip, result)
        if lookup.future is not None and not lookup.future.done():
            lookup.future.set_result(result)
        self._wake(lookup, result)

    @staticmethod
    def _wake(lookup: _Lookup, result: DnsblResult) -> None:
        for waiter in lookup.settlers:
            if not waiter.done():
                waiter.set_result(result)
        lookup.settlers.clear()

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


def _done(result: DnsblResult, loop: asyncio.AbstractEventLoop) -> asyncio.Future[DnsblResult]:
    future = loop.create_future()
    future.set_result(result)
    return future


def _normal(ip: str) -> str:
    return client_text(ip)
