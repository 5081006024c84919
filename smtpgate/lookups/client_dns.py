"""client_dns - gather the DNS facts of the client and HELO checks.

SYNOPSIS
    MAX_NAMES = 10
    async client_hostname(resolver: Resolver, ip: str) -> FcrdnsFacts
    client_hostname_soon(resolver, ip, loop) -> asyncio.Future[FcrdnsFacts]
    async helo_facts(resolver: Resolver, name: str) -> HeloDns

DESCRIPTION
    The I/O edge of smtpgate.checks.client_fcrdns and smtpgate.checks.helo:
    lookups only, no decision.

    client_hostname() looks up the PTR of ip, then, in parallel, the
    forward records of at most MAX_NAMES of its names (Postfix also stops
    at 10): A for an IPv4 client, AAAA for an IPv6 one, since an address
    of the other family can never match. An IPv4-mapped IPv6 address is
    treated as IPv4. Names that are not valid host names are kept in the
    facts (for the log) but not looked up. The facts' ttl is the smallest
    TTL seen (0 when something failed). ip must be an IP address
    (ValueError otherwise).

    client_hostname_soon() is the same as a future of the caller's, done
    by the resolver's answers themselves (Resolver.ask callbacks): no task,
    no coroutine frames and no hop through the loop per answer. Every
    accepted first contact has its name looked up this way, in the
    background; cancelling the future leaves the queries to finish
    unheard. A bug in reading the answers ends the future with its
    exception, as the task it replaces did.

    helo_facts() looks up A first and stops there when it has records, as
    Postfix's reject_unknown_helo_hostname stops at the first type found
    (dns_lookup_l with DNS_REQ_FLAG_STOP_OK, types A, AAAA, MX in that
    order), or when the name does not exist (NXDOMAIN: no other type can,
    RFC 8020; Postfix would still ask the others); a HELO name with an
    address costs one query, not three. Otherwise AAAA and MX are asked
    together, so a slow zone costs at most two timeouts. "ok" when a type
    has records (a null MX counts, as Postfix lets MTA names have one; the
    facts keep the first such type's values, in Postfix's order), else
    "tempfail" when a lookup failed temporarily, else "notfound". A
    trailing dot is ignored.
"""

from __future__ import annotations

import asyncio
import functools

from smtpgate.address import client_address, is_valid_hostname
from smtpgate.checks.client_fcrdns import FcrdnsFacts, Forward
from smtpgate.checks.helo import HeloDns
from smtpgate.lookups.resolver import DnsAnswer, Resolver, ptr_name

MAX_NAMES = 10


async def client_hostname(resolver: Resolver, ip: str) -> FcrdnsFacts:
    return await client_hostname_soon(resolver, ip, asyncio.get_running_loop())


def client_hostname_soon(resolver: Resolver, ip: str,
                         loop: asyncio.AbstractEventLoop) -> asyncio.Future[FcrdnsFacts]:
    address = client_address(ip)
    client = str(address)
    client = ip if client == ip else client  # the session's own string, not a copy to keep
    done: asyncio.Future[FcrdnsFacts] = loop.create_future()
    _Fcrdns(resolver, loop, done, client, "A" if address.version == 4 else "AAAA").start()
    return done


class _Fcrdns:
    """One client's PTR, then the forward lookups of its names, by resolver callbacks."""

    __slots__ = (
        "answers",
        "client",
        "done",
        "lookable",
        "loop",
        "names",
        "ptr",
        "rdtype",
        "resolver",
        "waiting",
    )

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop,
                 done: asyncio.Future, client: str, rdtype: str) -> None:
        self.resolver, self.loop, self.done = resolver, loop, done
        self.client, self.rdtype = client, rdtype
        self.ptr: DnsAnswer | None = None
        self.names: tuple[str, ...] = ()
        self.lookable: list[str] = []
        self.answers: list[DnsAnswer | None] = []
        self.waiting = 0

    def start(self) -> None:
        try:
            answer = self.resolver.ask(ptr_name(self.client), "PTR", self._ptr, self.loop)
            if answer is not None:
                self._ptr(answer)
        except Exception as exc:  # a bug: the caller hears it, as from the task before
            self._fail(exc)

    def _ptr(self, ptr: DnsAnswer) -> None:
        if self.done.done():
            return  # the session let go of it
        try:
            self.ptr = ptr
            if ptr.status != "ok":
                self.done.set_result(FcrdnsFacts(self.client, ptr.status, ttl=ptr.ttl))
                return
            self.names = tuple(dict.fromkeys(ptr.values))[:MAX_NAMES]
            lookable = self.lookable = [n for n in self.names if is_valid_hostname(n)]
            self.answers = [None] * len(lookable)
            self.waiting = len(lookable)
            if not lookable:
                self._finish()
                return
            for i, name in enumerate(lookable):
                answer = self.resolver.ask(name, self.rdtype,
                                           functools.partial(self._forward, i), self.loop)
                if answer is not None:
                    self._forward(i, answer)
        except Exception as exc:
            self._fail(exc)

    def _forward(self, i: int, answer: DnsAnswer) -> None:
        if self.done.done():
            return
        self.answers[i] = answer
        self.waiting -= 1
        if not self.waiting:
            try:
                self._finish()
            except Exception as exc:
                self._fail(exc)

    def _finish(self) -> None:
        answers, ptr = self.answers, self.ptr
        forward = tuple(Forward(n, a.status, a.values)
                        for n, a in zip(self.lookable, answers, strict=True))
        failed = any(a.status == "tempfail" for a in answers)
        ttl = 0 if failed else min([ptr.ttl, *(a.ttl for a in answers)])
        self.done.set_result(FcrdnsFacts(self.client, "ok", self.names, forward, ttl))

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def helo_facts(resolver: Resolver, name: str) -> HeloDns:
    name = name[:-1] if name.endswith(".") and not name.endswith("..") else name
    a = await resolver.lookup(name, "A")  # a cache hit makes no future
    if a.status == "ok":
        return HeloDns("ok", a.ttl, a.values)
    if a.status == "nxdomain":  # the name does not exist: no other type can (RFC 8020)
        return HeloDns("notfound", a.ttl)
    aaaa, mx = await lookups(resolver, [(name, "AAAA"), (name, "MX")])
    if aaaa.status == "ok":
        return HeloDns("ok", aaaa.ttl, aaaa.values)
    if mx.status == "ok":
        return HeloDns("ok", mx.ttl, (), mx.values)
    if any(x.status == "tempfail" for x in (a, aaaa, mx)):
        return HeloDns("tempfail")
    return HeloDns("notfound", min(a.ttl, aaaa.ttl, mx.ttl))


async def lookups(resolver: Resolver, questions: list[tuple[str, str]]) -> list[DnsAnswer]:
    """Answers in order; from the cache without a task each, the rest in parallel (futures,
    not tasks)."""
    answers = [resolver.cached(name, rdtype) for name, rdtype in questions]
    missing = [i for i, answer in enumerate(answers) if answer is None]
    if missing:
        found = await asyncio.gather(*(resolver.start(*questions[i]) for i in missing))
        for i, answer in zip(missing, found, strict=True):
            answers[i] = answer
    return answers

