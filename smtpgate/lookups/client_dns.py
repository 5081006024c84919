"""client_dns - gather the DNS facts of the client and HELO checks.

SYNOPSIS
    MAX_NAMES = 10
    HELO_TYPES = ("A", "AAAA", "MX")
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

    helo_facts() looks up A, then AAAA, then MX of name, one after the
    other and only until one has records, as Postfix's
    reject_unknown_helo_hostname does (dns_lookup_l with
    DNS_REQ_FLAG_STOP_OK, which also stops at NXDOMAIN): a HELO name with
    an address costs one query, not three. "ok" when a type has records (a
    null MX counts, as Postfix lets MTA names have one; the facts keep
    that type's values only), else "tempfail" when a lookup failed
    temporarily, else "notfound". A trailing dot is ignored. Each lookup
    is bounded by the resolver's timeout.
"""

from __future__ import annotations

import asyncio

from smtpgate.address import client_address, is_valid_hostname
from smtpgate.checks.client_fcrdns import FcrdnsFacts, Forward
from smtpgate.checks.helo import HeloDns
from smtpgate.lookups.resolver import DnsAnswer, Resolver

MAX_NAMES = 10
HELO_TYPES = ("A", "AAAA", "MX")  # Postfix's order


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
    answers = []
    for rdtype in HELO_TYPES:
        answer = resolver.cached(name, rdtype) or await resolver.start(name, rdtype)
        if answer.status == "ok":
            mx = answer.values if rdtype == "MX" else ()
            return HeloDns("ok", answer.ttl, () if rdtype == "MX" else answer.values, mx)
        if answer.status == "nxdomain":  # no other type can exist: stop, as Postfix does
            return HeloDns("notfound", answer.ttl)
        answers.append(answer)
    if any(x.status == "tempfail" for x in answers):
        return HeloDns("tempfail")
    return HeloDns("notfound", min(x.ttl for x in answers))


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
