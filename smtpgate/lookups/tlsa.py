"""tlsa - the TLSA records of this host's SMTP service, and whether the resolver validated them.

SYNOPSIS
    tlsa_name(hostname, port=25) -> str                "_25._tcp.mx.example.com"
    await lookup_tlsa(hostname, nameservers, timeout, port=25) -> TlsaAnswer
    TlsaAnswer(name, status, values=(), ttl=0, validated=False, error="")

DESCRIPTION
    lookup_tlsa() asks the resolvers (Config.nameservers, each host and
    port; empty: the system's /etc/resolv.conf) for the TLSA records of
    tlsa_name(hostname, port), with the AD and DO bits set in the query:
    a validating resolver sets AD in its answer only when the query asks
    for it (RFC 6840 5.7), and only when it validated the answer's
    DNSSEC signatures. validated is the answer's AD bit: false from a
    resolver that does not validate, and for a zone that is not signed.

    status is "ok" (values hold "usage selector matching hex" each, the
    hex in lower case), "nxdomain", "nodata" or "tempfail" (timeout,
    SERVFAIL, as for a bogus signature, no usable server; error says
    which). ttl is the records' TTL (0 for the others). It never raises
    for a DNS condition.

    This lookup runs at start, on reload, when the certificate files
    change and now and then after (smtpgate.service.dane_watch), never
    per session, so it uses dnspython, whose queries show the header
    flags, rather than the sessions' c-ares channel
    (smtpgate.lookups.dns_channel), whose pycares binding does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.nameserver
import dns.rdatatype
import dns.resolver

from smtpgate.config import HostPort

__all__ = ["TlsaAnswer", "lookup_tlsa", "tlsa_name"]


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    name: str
    status: str  # "ok" | "nxdomain" | "nodata" | "tempfail"
    values: tuple[str, ...] = ()
    ttl: int = 0
    validated: bool = False
    error: str = ""


def tlsa_name(hostname: str, port: int = 25) -> str:
    return f"_{port}._tcp.{hostname.rstrip('.').lower()}"


def _resolver(nameservers: tuple[HostPort, ...], timeout: float) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ns.host, ns.port)
                                for ns in nameservers]
    resolver.timeout = resolver.lifetime = timeout
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.use_edns(0, dns.flags.DO, 1232)
    return resolver


async def lookup_tlsa(hostname: str, nameservers: tuple[HostPort, ...], timeout: float,
                      port: int = 25) -> TlsaAnswer:
    name = tlsa_name(hostname, port)
    try:
        resolver = _resolver(nameservers, timeout)
        answer = await resolver.resolve(name + ".", "TLSA", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as exc:
        response = exc.response(exc.qnames()[0]) if exc.qnames() else None
        return TlsaAnswer(name, "nxdomain", validated=_validated(response))
    except dns.resolver.NoResolverConfiguration:
        return TlsaAnswer(name, "tempfail", error="no DNS server configured")
    except dns.resolver.LifetimeTimeout:
        return TlsaAnswer(name, "tempfail", error=f"no answer in {timeout:g} s")
    except dns.resolver.NoNameservers as exc:
        return TlsaAnswer(name, "tempfail", error=_first_line(exc))
    except (dns.exception.DNSException, OSError) as exc:
        return TlsaAnswer(name, "tempfail", error=_first_line(exc))
    validated = _validated(answer.response)
    if answer.rrset is None:
        return TlsaAnswer(name, "nodata", validated=validated)
    values = tuple(f"{r.usage} {r.selector} {r.mtype} {r.cert.hex()}" for r in answer.rrset)
    return TlsaAnswer(name, "ok", values, answer.rrset.ttl, validated)


def _validated(response) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
