"""client_dns - gather the DNS facts of the client and HELO checks.

SYNOPSIS
    MAX_NAMES = 10
    async client_hostname(resolver: Resolver, ip: str) -> FcrdnsFacts
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

from smtpgate.address import client_address, is_valid_hostname
from smtpgate.checks.client_fcrdns import FcrdnsFacts, Forward
from smtpgate.checks.helo import HeloDns
from smtpgate.lookups.resolver import DnsAnswer, Resolver

MAX_NAMES = 10


async def client_hostname(resolver: Resolver, ip: str) -> FcrdnsFacts:
    address = client_address(ip)
    client = str(address)
    client = ip if client == ip else client  # the session's own string, not a copy to keep
    ptr = await resolver.ptr(client)
    if ptr.status != "ok":
        return FcrdnsFacts(client, ptr.status, ttl=ptr.ttl)
    names = tuple(dict.fromkeys(ptr.values))[:MAX_NAMES]
    lookable = [n for n in names if is_valid_hostname(n)]
    rdtype = "A" if address.version == 4 else "AAAA"
    answers = await lookups(resolver, [(n, rdtype) for n in lookable])
    forward = tuple(Forward(n, a.status, a.values) for n, a in zip(lookable, answers, strict=True))
    ttls = [ptr.ttl, *(a.ttl for a in answers)]
    failed = any(a.status == "tempfail" for a in answers)
    return FcrdnsFacts(client, "ok", names, forward, 0 if failed else min(ttls))


async def helo_facts(resolver: Resolver, name: str) -> HeloDns:
    name = name[:-1] if name.endswith(".") and not name.endswith("..") else name
    a = resolver.cached(name, "A") or await resolver.start(name, "A")
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


def _values(answer: DnsAnswer) -> tuple[str, ...]:
    return answer.values if answer.status == "ok" else ()
