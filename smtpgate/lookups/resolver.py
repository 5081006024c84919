"""resolver - asynchronous DNS lookups with a TTL cache and shared in-flight queries.

SYNOPSIS
    DnsAnswer(status: str, values: tuple[str, ...] = (), ttl: int = 0)
    Resolver(nameservers: tuple[HostPort, ...], timeout: float, cache_size: int = 10000,
             *, min_ttl: int = 0, max_ttl: int = 3600, negative_ttl: int = 60)
        async lookup(name: str, rdtype: str) -> DnsAnswer
        async ptr(ip: str) -> DnsAnswer
        cached(name: str, rdtype: str) -> DnsAnswer | None     no await: the cache only
        clear() -> None
        .stats: dict[str, int]     queries, cache_hits, shared, tempfail, errors

DESCRIPTION
    A thin layer over dnspython's dns.asyncresolver. nameservers are the
    resolvers to ask (Config.nameservers, each host and port); empty means
    the system's /etc/resolv.conf (if that cannot be read, every lookup is
    "tempfail"). timeout bounds one lookup, all retries included.

    lookup() never raises for a DNS condition; the status says what
    happened:
      "ok"        values hold the answer
      "nxdomain"  the name does not exist (also for a name that cannot exist)
      "nodata"    the name exists, without records of that type
      "tempfail"  timeout, SERVFAIL, REFUSED, no usable nameserver, network error
    values: addresses as text; names (PTR, CNAME, NS) lower-cased without
    the trailing dot; MX as "pref name" (a null MX is "0 "); TXT as the
    joined strings of each record; other types as dnspython prints them.
    A CNAME chain in the answer is followed (chasing one the server left
    unresolved is the recursive resolver's job). ttl is the answer's TTL clamped to
    [min_ttl, max_ttl]; for nxdomain/nodata it is the zone's negative TTL
    (SOA) when given, else negative_ttl, clamped the same way; 0 for
    tempfail. ok, nxdomain and nodata answers are cached for their ttl
    (LRU, cache_size entries); tempfail is not. Concurrent lookups of one
    (name, type) share one query; a caller cancelled while waiting does not
    cancel it for the others. Names are matched case-insensitively. A bad
    rdtype raises ValueError.

    ptr(ip) looks up the in-addr.arpa / ip6.arpa name of ip (an IPv4-mapped
    IPv6 address as its IPv4 address); a value that is not an IP address
    raises ValueError.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from smtpgate.address import client_address
from smtpgate.config import HostPort
from smtpgate.lookups.expiring_cache import ExpiringCache

__all__ = ["DnsAnswer", "Resolver"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    status: str  # "ok" | "nxdomain" | "nodata" | "tempfail"
    values: tuple[str, ...] = ()
    ttl: int = 0


_TEMPFAIL = DnsAnswer("tempfail")


class Resolver:
    def __init__(self, nameservers: tuple[HostPort, ...], timeout: float,
                 cache_size: int = 10000, *, min_ttl: int = 0, max_ttl: int = 3600,
                 negative_ttl: int = 60) -> None:
        self.timeout = float(timeout)
        self.cache_size = max(0, int(cache_size))
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._resolver = _make_resolver(nameservers, self.timeout)
        # answers leave when their TTL ends: first contacts' names are rarely asked again
        self._cache = ExpiringCache(self.cache_size)
        self._inflight: dict[tuple[str, int], asyncio.Future[DnsAnswer]] = {}
        self.stats = {"queries": 0, "cache_hits": 0, "shared": 0, "tempfail": 0, "errors": 0}

    def clear(self) -> None:
        self._cache.clear()

    async def ptr(self, ip: str) -> DnsAnswer:
        return await self.lookup(ptr_name(ip), "PTR")

    def cached(self, name: str, rdtype: str) -> DnsAnswer | None:
        """The answer if the cache has it, without a task or an await: the common case."""
        key = (name.lower().rstrip("."), _qtype(rdtype))
        found = self._cache.get(key)
        if found is None:
            return None
        self.stats["cache_hits"] += 1
        return found

    async def lookup(self, name: str, rdtype: str) -> DnsAnswer:
        hit = self.cached(name, rdtype)
        if hit is not None:
            return hit
        key = (name.lower().rstrip("."), _qtype(rdtype))
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._query(key))
            self._inflight[key] = future
            future.add_done_callback(lambda _f, k=key: self._inflight.pop(k, None))
        else:
            self.stats["shared"] += 1
        # shield: one waiter's cancellation must not cancel the shared query.
        return await asyncio.shield(future)

    async def _query(self, key: tuple[str, int]) -> DnsAnswer:
        name, qtype = key
        self.stats["queries"] += 1
        try:
            # dnspython bounds the lookup by its lifetime; the outer limit
            # is a guard against a hang in the library itself.
            async with asyncio.timeout(self.timeout + 1.0):
                answer = await self._resolve(name, qtype)
        except TimeoutError:
            answer = _TEMPFAIL
        except Exception:
            # A library bug must not fail every session waiting on this query.
            log.exception("DNS lookup %s/%s failed unexpectedly", name,
                          dns.rdatatype.to_text(qtype))
            self.stats["errors"] += 1
            answer = _TEMPFAIL
        if answer.status == "tempfail":
            self.stats["tempfail"] += 1
        else:
            self._store(key, answer)
        return answer

    async def _resolve(self, name: str, qtype: int) -> DnsAnswer:
        if self._resolver is None:
            return _TEMPFAIL
        try:
            qname = dns.name.from_text(name) if name else dns.name.root
            answer = await self._resolver.resolve(
                qname, qtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            return DnsAnswer("nxdomain", (), self._negative_ttl(_nx_response(exc)))
        except (dns.resolver.NoNameservers, dns.exception.Timeout,
                dns.resolver.NoResolverConfiguration):
            return _TEMPFAIL
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel,
                dns.name.BadEscape, dns.name.IDNAException, dns.resolver.YXDOMAIN,
                UnicodeError):
            return DnsAnswer("nxdomain", (), self._clamp(self.negative_ttl))
        except (dns.exception.DNSException, OSError, ValueError):
            return _TEMPFAIL
        if answer.rrset is None:
            return DnsAnswer("nodata", (), self._negative_ttl(answer.response))
        values = tuple(_text(rdata, qtype) for rdata in answer.rrset)
        ttl = max(0, int(answer.expiration - time.time() + 0.5))
        return DnsAnswer("ok", values, self._clamp(min(ttl, answer.rrset.ttl)))

    def _store(self, key: tuple[str, int], answer: DnsAnswer) -> None:
        if answer.ttl <= 0 or self.cache_size == 0:
            return
        self._cache.put(key, answer, answer.ttl)

    def _clamp(self, ttl: int) -> int:
        return max(self.min_ttl, min(self.max_ttl, int(ttl)))

    def _negative_ttl(self, response: dns.message.Message | None) -> int:
        # RFC 2308: a negative answer lives min(SOA TTL, SOA MINIMUM).
        if response is not None:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                    return self._clamp(min(rrset.ttl, rrset[0].minimum))
        return self._clamp(self.negative_ttl)


@functools.lru_cache(maxsize=64)
def _qtype(rdtype: str) -> int:
    try:
        return int(dns.rdatatype.from_text(rdtype))
    except dns.exception.DNSException:
        raise ValueError(f"unknown DNS record type: {rdtype!r}") from None


@functools.lru_cache(maxsize=4096)
def ptr_name(ip: str) -> str:
    """The reverse-lookup name of an address (IPv4-mapped IPv6 as IPv4)."""
    address = client_address(ip)
    if address.version == 4:
        return ".".join(reversed(str(address).split("."))) + ".in-addr.arpa"
    return dns.reversename.from_address(str(address)).to_text(omit_final_dot=True)


def _make_resolver(nameservers: tuple[HostPort, ...],
                   timeout: float) -> dns.asyncresolver.Resolver | None:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except (dns.resolver.NoResolverConfiguration, OSError):
            return None
    resolver.cache = None  # ours keeps negative answers too, and shares queries
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def _nx_response(exc: dns.resolver.NXDOMAIN) -> dns.message.Message | None:
    try:
        responses = exc.responses()
    except (AttributeError, KeyError, TypeError):
        return None
    for response in responses.values():
        return response
    return None


def _text(rdata, qtype: int) -> str:
    if qtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rdata.address
    if qtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS):
        return rdata.target.to_text(omit_final_dot=True).lower()
    if qtype == dns.rdatatype.MX:
        exchange = rdata.exchange.to_text(omit_final_dot=True).lower()
        return f"{rdata.preference} {'' if exchange in ('@', '.') else exchange}"
    if qtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return rdata.to_text()
