"""resolver - asynchronous DNS lookups with a TTL cache and shared in-flight queries.

SYNOPSIS
    DnsAnswer(status: str, values: tuple[str, ...] = (), ttl: int = 0)
    Resolver(nameservers: tuple[HostPort, ...], timeout: float, cache_size: int = 10000,
             *, min_ttl: int = 0, max_ttl: int = 3600, negative_ttl: int = 60)
        async lookup(name: str, rdtype: str) -> DnsAnswer
        start(name: str, rdtype: str) -> asyncio.Future[DnsAnswer]
        ask(name: str, rdtype: str, callback, loop=None, keep=True) -> DnsAnswer | None
        async ptr(ip: str) -> DnsAnswer
        cached(name: str, rdtype: str) -> DnsAnswer | None     no await: the cache only
        clear() -> None
        close() -> None
        .stats: dict[str, int]     queries, cache_hits, shared, tempfail, errors
    ptr_name(ip: str) -> str
    answer_from(status, records, soa_ttl, qtype, name, clamp, negative_ttl) -> DnsAnswer

DESCRIPTION
    The queries go through c-ares (smtpgate.lookups.dns_channel: one
    channel, so one UDP socket per name server, for all lookups of the
    process, made in the running loop at the first query). nameservers are
    the resolvers to ask (Config.nameservers, each host and port); empty
    means the system's /etc/resolv.conf (if it names no server, every
    lookup is "tempfail"); a host that is not an IP address raises
    ValueError. timeout bounds one lookup, all retries included:
    c-ares gives the first try a third of it and retries (a truncated answer
    is asked again over TCP); what has no answer when timeout is up is
    "tempfail".

    lookup() never raises for a DNS condition; the status says what
    happened:
      "ok"        values hold the answer
      "nxdomain"  the name does not exist (also for a name that cannot exist)
      "nodata"    the name exists, without records of that type
      "tempfail"  timeout, SERVFAIL, REFUSED, no usable nameserver, network error
    values: addresses as text; names (PTR, CNAME, NS) lower-cased without
    the trailing dot; MX as "pref name" (a null MX is "0 "); TXT as the
    joined strings of each record; SRV "prio weight port target", SOA
    "mname rname serial refresh retry expire minimum", TLSA "usage selector
    type hex", CAA 'flags tag "value"', NAPTR as its six fields. A CNAME
    chain in the answer is followed (chasing one the server left unresolved
    is the recursive resolver's job). ttl is the smallest TTL of the records
    used (the chain's too), clamped to [min_ttl, max_ttl]; for nxdomain and
    nodata it is the zone's negative TTL (SOA) when given, else
    negative_ttl, clamped the same way; 0 for tempfail. ok, nxdomain and nodata
    answers are cached for their ttl (at most cache_size entries, each gone
    when its ttl ends); tempfail is not. Concurrent lookups of one (name,
    type) share one query; a caller cancelled while waiting does not cancel
    it for the others. Names are matched case-insensitively. A bad rdtype
    raises ValueError.

    start() is lookup() as a future of the caller's own, already done on a
    cache hit: a caller asking several questions gathers the futures
    without a task each.

    ask() is lookup() without a future: a cache hit is returned at once
    (callback not called), else None, and callback(answer) is called once,
    in the loop, when the answer is there, or with "tempfail" when timeout
    is up (the DNSBL engine asks every zone this way: one callback each,
    no future, no hop through the loop). A callback that raises is logged
    and does not keep the other callers of the query from their answers.
    keep=False: the caller keeps what it makes of the answer itself, so the
    answer is neither looked up in nor written to the cache (unless a
    caller sharing the query wants it kept): the DNSBL engine caches each
    client's score, and a zone's answer for one client is asked for by no
    one else, so it would only push answers worth keeping out of the cache.

    Each query in flight is bounded by one timer for all of them: the
    timeout is the same for every query, so the queries' deadlines come in
    the order the queries were sent, and one timer, armed for the oldest
    still unanswered, ends them in turn.

    ptr(ip) looks up ptr_name(ip): the in-addr.arpa / ip6.arpa name of ip
    (an IPv4-mapped IPv6 address as its IPv4 address); a value that is not
    an IP address raises ValueError.

    close() lets go of the channel (its sockets): at once when no query is
    in flight, else when the last one ends (within timeout). A lookup after
    close() still works: it opens a channel, let go of in the same way.

    answer_from() is the pure conversion of what DnsChannel reports (its
    status, answer records and negative TTL) to a DnsAnswer.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pycares import errno as ares_errno

from smtpgate.address import client_address
from smtpgate.config import HostPort
from smtpgate.lookups.dns_channel import QTYPES, ChannelError, DnsChannel
from smtpgate.lookups.expiring_cache import ExpiringCache
from smtpgate.lookups.ordered_deadlines import OrderedDeadlines

__all__ = ["DnsAnswer", "Resolver", "answer_from", "ptr_name"]

log = logging.getLogger(__name__)

TRIES = 3


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    status: str  # "ok" | "nxdomain" | "nodata" | "tempfail"
    values: tuple[str, ...] = ()
    ttl: int = 0


_TEMPFAIL = DnsAnswer("tempfail")
_NEGATIVE = {ares_errno.ARES_ENOTFOUND: "nxdomain", ares_errno.ARES_ENODATA: "nodata",
             ares_errno.ARES_EBADNAME: "nxdomain"}


class _Query:
    """One query on the wire and the callers waiting for it: futures (start(), lookup())
    and callbacks (ask())."""

    __slots__ = ("callbacks", "deadline", "done", "keep", "key", "waiters")

    def __init__(self, key: tuple[str, int], keep: bool = True) -> None:
        self.key = key
        self.keep = keep  # the answer goes into the cache
        self.waiters: list[asyncio.Future] = []
        self.callbacks: list[Callable[[DnsAnswer], None]] = []
        self.deadline = 0.0
        self.done = False


class Resolver:
    def __init__(self, nameservers: tuple[HostPort, ...], timeout: float,
                 cache_size: int = 10000, *, min_ttl: int = 0, max_ttl: int = 3600,
                 negative_ttl: int = 60) -> None:
        for ns in nameservers:
            try:
                ipaddress.ip_address(ns.host)
            except ValueError:
                raise ValueError(f"DNS server {ns} is not an IP address") from None
        self.nameservers = tuple(nameservers)
        self.timeout = float(timeout)
        self.cache_size = max(0, int(cache_size))
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        # answers leave when their TTL ends: first contacts' names are rarely asked again
        self._cache: ExpiringCache = ExpiringCache(self.cache_size)
        self._inflight: dict[tuple[str, int], _Query] = {}
        # queries in sending order, "tempfail" at their deadline
        self._deadlines = OrderedDeadlines(lambda query: self._finish(query, _TEMPFAIL))
        self._channel: DnsChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.stats = {"queries": 0, "cache_hits": 0, "shared": 0, "tempfail": 0, "errors": 0}

    def clear(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._closing = True
        if not self._inflight:
            self._drop_channel()

    async def ptr(self, ip: str) -> DnsAnswer:
        return await self.lookup(ptr_name(ip), "PTR")

    def cached(self, name: str, rdtype: str) -> DnsAnswer | None:
        """The answer if the cache has it, without a task or an await: the common case."""
        return self._cached((name.lower().rstrip("."), _qtype(rdtype)))

    def _cached(self, key: tuple[str, int]) -> DnsAnswer | None:
        found = self._cache.get(key)
        if found is None:
            return None
        self.stats["cache_hits"] += 1
        return found

    async def lookup(self, name: str, rdtype: str) -> DnsAnswer:
        key = (name.lower().rstrip("."), _qtype(rdtype))
        hit = self._cached(key)
        if hit is not None:
            return hit
        return await self._ask(key)

    def start(self, name: str, rdtype: str) -> asyncio.Future[DnsAnswer]:
        """lookup() as a future of the caller's own (done at once on a cache hit): several
        can be gathered without a task each."""
        key = (name.lower().rstrip("."), _qtype(rdtype))
        hit = self._cached(key)
        if hit is None:
            return self._ask(key)
        done = asyncio.get_running_loop().create_future()
        done.set_result(hit)
        return done

    def ask(self, name: str, rdtype: str, callback: Callable[[DnsAnswer], None],
            loop: asyncio.AbstractEventLoop | None = None, keep: bool = True
            ) -> DnsAnswer | None:
        """The cached answer, or None and callback(answer) once it comes (see DESCRIPTION).
        `loop`: the running loop, when the caller has it at hand (asking Python 3.11 for it
        costs a getpid() each time)."""
        key = (name.lower().rstrip("."), _qtype(rdtype))
        if keep:
            hit = self._cached(key)
            if hit is not None:
                return hit
        loop = loop or asyncio.get_running_loop()
        query, new = self._join(key, keep)
        query.callbacks.append(callback)
        if new:
            self._start(loop, query)
        return None

    def _ask(self, key: tuple[str, int]) -> asyncio.Future[DnsAnswer]:
        # each caller waits on a future of its own: cancelling it leaves the query to the others
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        query, new = self._join(key, keep=True)  # asked through the cache: the answer goes in
        query.waiters.append(waiter)
        if new:
            self._start(loop, query)
        return waiter

    def _join(self, key: tuple[str, int], keep: bool) -> tuple[_Query, bool]:
        """The query in flight for key, shared, or a new one (True) for the caller to start
        once it waits on it (a query may end at once: an impossible name, no channel)."""
        query = self._inflight.get(key)
        if query is None:
            query = self._inflight[key] = _Query(key, keep)
            return query, True
        self.stats["shared"] += 1
        query.keep = query.keep or keep
        return query, False

    def _start(self, loop: asyncio.AbstractEventLoop, query: _Query) -> None:
        name, qtype = query.key
        self.stats["queries"] += 1
        if not _possible(name):
            self._finish(query, DnsAnswer("nxdomain", (), self._clamp(self.negative_ttl)))
            return
        channel = self._channel_in(loop)
        if channel is None:
            self._finish(query, _TEMPFAIL)
            return
        query.deadline = loop.time() + self.timeout
        self._deadlines.add(query, loop)
        channel.query(name or ".", qtype, functools.partial(self._answered, query))

    def _answered(self, query: _Query, status: int, records: list,
                  negative_ttl: int | None) -> None:
        if self._inflight.get(query.key) is not query:
            return  # timed out already
        try:
            answer = answer_from(status, records, negative_ttl, query.key[1], query.key[0],
                                 self._clamp, self.negative_ttl)
        except Exception:
            # a bug here must not leave every session waiting on this query hanging
            log.exception("DNS answer for %s/%s could not be read", *query.key)
            self.stats["errors"] += 1
            answer = _TEMPFAIL
        self._finish(query, answer)

    def _finish(self, query: _Query, answer: DnsAnswer) -> None:
        if query.done:
            return
        query.done = True
        if self._inflight.get(query.key) is query:
            del self._inflight[query.key]
        if answer.status == "tempfail":
            self.stats["tempfail"] += 1
        elif query.keep:
            self._store(query.key, answer)
        waiters, callbacks = query.waiters, query.callbacks
        query.waiters = query.callbacks = []  # let go of them: the guard may keep the query
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(answer)
        for callback in callbacks:
            try:
                callback(answer)
            except Exception:  # the caller's bug: the other callers still get their answer
                log.exception("DNS answer for %s/%s not taken", *query.key)
        if self._closing and not self._inflight:
            self._drop_channel()

    def _channel_in(self, loop: asyncio.AbstractEventLoop) -> DnsChannel | None:
        if self._channel is not None and self._loop is loop:
            return self._channel
        self._drop_channel()  # made in another loop (or before a fork): not ours to use
        try:
            self._channel = DnsChannel(loop, self.nameservers, self.timeout / TRIES, TRIES)
        except ChannelError as exc:
            log.error("DNS lookups fail: %s", exc)
            return None
        self._loop = loop
        return self._channel

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._loop = None
        self._deadlines.clear()  # nothing in flight is left to guard

    def _store(self, key: tuple[str, int], answer: DnsAnswer) -> None:
        if answer.ttl <= 0 or self.cache_size == 0:
            return
        self._cache.put(key, answer, answer.ttl)

    def _clamp(self, ttl: int) -> int:
        return max(self.min_ttl, min(self.max_ttl, int(ttl)))


# --- pure parts ----------------------------------------------------------------------------------


def answer_from(status: int, records: list, soa_ttl: int | None, qtype: int, name: str,
                clamp: Callable[[int], int], negative_ttl: int) -> DnsAnswer:
    """What DnsChannel reported for the question (name, qtype), as a DnsAnswer."""
    if status:
        negative = _NEGATIVE.get(status)
        if negative is None:
            return _TEMPFAIL
        return _no_records(negative, clamp(negative_ttl if soa_ttl is None else soa_ttl))
    found, ttl = _chain(records, name, qtype)
    if not found:  # only a CNAME chain that ends elsewhere
        return _no_records("nodata", clamp(negative_ttl))
    return DnsAnswer("ok", tuple(_FORMATS[qtype](data) for data in found), clamp(ttl))


@functools.lru_cache(maxsize=256)
def _no_records(status: str, ttl: int) -> DnsAnswer:
    """One DnsAnswer per (status, ttl) without records, shared: most answers a first
    contact gets are NXDOMAIN or NODATA with a zone's negative TTL."""
    return DnsAnswer(status, (), ttl)


def _chain(records: list, name: str, qtype: int) -> tuple[list, int]:
    """The data of the records of qtype at name, following CNAMEs, and the smallest TTL."""
    ttl = 2**31
    for _ in range(16):  # a longer chain is a loop or an abuse
        found = [r for r in records if r[1] == qtype and r[0] == name]
        if found:
            return [r[3] for r in found], min(ttl, *(r[2] for r in found))
        alias = next((r for r in records if r[1] == _CNAME and r[0] == name), None)
        if alias is None:
            break
        ttl = min(ttl, alias[2])
        name = _name(alias[3].cname)
    return [], 0


_CNAME = QTYPES["CNAME"]


def _name(value: str) -> str:
    return value.lower().rstrip(".")


_FORMATS: dict[int, Callable] = {
    QTYPES["A"]: lambda d: d.addr,
    QTYPES["AAAA"]: lambda d: d.addr,
    QTYPES["PTR"]: lambda d: _name(d.dname),
    QTYPES["CNAME"]: lambda d: _name(d.cname),
    QTYPES["NS"]: lambda d: _name(d.nsdname),
    QTYPES["MX"]: lambda d: f"{d.priority} {_name(d.exchange)}",
    QTYPES["TXT"]: lambda d: d.data.decode("utf-8", "replace"),
    QTYPES["SRV"]: lambda d: f"{d.priority} {d.weight} {d.port} {_name(d.target)}",
    QTYPES["SOA"]: lambda d: (f"{_name(d.mname)} {_name(d.rname)} {d.serial} {d.refresh} "
                              f"{d.retry} {d.expire} {d.minimum}"),
    QTYPES["TLSA"]: lambda d: (f"{d.cert_usage} {d.selector} {d.matching_type} "
                               f"{d.cert_association_data.hex()}"),
    QTYPES["CAA"]: lambda d: f'{d.critical} {d.tag} "{d.value}"',
    QTYPES["NAPTR"]: lambda d: (f'{d.order} {d.preference} "{d.flags}" "{d.service}" '
                                f'"{d.regexp}" {_name(d.replacement)}'),
}


def _possible(name: str) -> bool:
    """Whether a (lower-cased, final-dot-less) name can exist: labels of 1..63, 253 at most."""
    if not name:
        return True  # the root
    lengths = tuple(map(len, name.split(".")))
    return len(name) <= 253 and min(lengths) > 0 and max(lengths) <= 63


@functools.lru_cache(maxsize=64)
def _qtype(rdtype: str) -> int:
    try:
        return QTYPES[rdtype.upper()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown DNS record type: {rdtype!r}") from None


@functools.lru_cache(maxsize=4096)
def ptr_name(ip: str) -> str:
    """The reverse-lookup name of an address (IPv4-mapped IPv6 as IPv4)."""
    address = client_address(ip)
    if address.version == 4:
        return ".".join(reversed(str(address).split("."))) + ".in-addr.arpa"
    return ".".join(reversed(address.exploded.replace(":", ""))) + ".ip6.arpa"
