"""helo - the HELO/EHLO restrictions of the image's smtpd.

SYNOPSIS
    HeloDns(status: str, ttl: int = 0, addresses: tuple[str, ...] = (), mx: tuple[str, ...] = ())
    decide(helo: str | None, *, access: str | None = None, dns: HeloDns | None = None,
           trusted: bool = False, unknown_code: int = 450) -> Verdict
    needs_dns(helo: str | None) -> bool

DESCRIPTION
    Postfix's smtpd_helo_restrictions of the image, in order:
    permit_mynetworks (trusted: PERMIT), check_helo_access (HLO:),
    reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname,
    reject_unknown_helo_hostname.

    helo is the argument as the client sent it (None: no HELO yet, SKIP).
    access is the HLO: value for the lower-cased name (None: no key;
    "tempfail": the lookup failed), read as an access(5) action: permit
    skips the rest, reject is "554 5.7.1 <helo>: Helo command rejected:
    Access denied", DUNNO goes on. dns holds the A, AAAA and MX lookups of
    the name (status "ok" when any record exists, a null MX included;
    "notfound"; "tempfail"); None means not looked up, and the unknown-host
    test is then skipped. Replies, as Postfix words them:

      501 5.5.2 <helo>: Helo command rejected: Invalid name
      501 5.5.2 <[addr]>: Helo command rejected: invalid ip address
      504 5.5.2 <helo>: Helo command rejected: need fully-qualified hostname
      450 4.7.1 <helo>: Helo command rejected: Host not found

    unknown_code (Config.unknown_helo_reject_code) applies to a name that
    does not exist; a temporary DNS error is always 450. Address literals
    "[1.2.3.4]" and "[IPv6:...]" are only syntax checked. One trailing dot
    is ignored, as Postfix does. needs_dns() tells the caller whether the
    DNS facts matter for this name (skip the lookups otherwise).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from smtpgate.address import (
    is_address_literal,
    is_fqdn,
    is_valid_hostname,
    valid_address_literal,
)
from smtpgate.checks import access_verdict
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "helo"
CLASS = "Helo command"
NO_DNS = "no DNS facts"  # the reason of a pass for want of the name's DNS answer


@dataclass(frozen=True, slots=True)
class HeloDns:
    status: str  # "ok" | "notfound" | "tempfail"
    ttl: int = 0
    addresses: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()


def decide(helo: str | None, *, access: str | None = None, dns: HeloDns | None = None,
           trusted: bool = False, unknown_code: int = 450) -> Verdict:
    if helo is None:
        return Verdict(CHECK, Outcome.SKIP, reason="no HELO/EHLO")
    if trusted:
        return Verdict(CHECK, Outcome.PERMIT, reason="permit_mynetworks")
    helo = access_verdict.printable(helo, ascii_only=True)
    table = access_verdict.evaluate(CHECK, access, helo, CLASS)
    if table is not None and table.outcome is not Outcome.PASS:
        return table
    if is_address_literal(helo):
        if not valid_address_literal(helo):
            return _reject(501, "5.5.2", helo, "invalid ip address", "bad address literal")
        return Verdict(CHECK, Outcome.PASS, reason="address literal")
    name = _truncate(helo)
    if not is_valid_hostname(name) and not _is_ip(name):
        return _reject(501, "5.5.2", helo, "Invalid name", "reject_invalid_helo_hostname")
    if not is_fqdn(name):
        return _reject(504, "5.5.2", helo, "need fully-qualified hostname",
                       "reject_non_fqdn_helo_hostname")
    if dns is None:
        return Verdict(CHECK, Outcome.PASS, reason=NO_DNS)
    if dns.status == "ok":
        return Verdict(CHECK, Outcome.PASS, reason=f"{name} resolves", ttl=float(dns.ttl))
    if dns.status == "tempfail":
        return _reject(450, "4.7.1", helo, "Host not found",
                       f"reject_unknown_helo_hostname: temporary DNS failure for {name}")
    return _reject(unknown_code, f"{str(unknown_code)[0]}.7.1", helo, "Host not found",
                   f"reject_unknown_helo_hostname: no A, AAAA or MX for {name}")


def needs_dns(helo: str | None) -> bool:
    """True when decide() would look at DNS facts for this HELO argument."""
    if not helo or is_address_literal(helo):
        return False
    name = _truncate(helo)
    return is_valid_hostname(name) and is_fqdn(name)


def _truncate(name: str) -> str:
    if len(name) > 1 and name.endswith(".") and not name.endswith(".."):
        return name[:-1]
    return name


def _is_ip(text: str) -> bool:
    # Postfix's reject_invalid_hostname also takes a bare address (back compat).
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _reject(code: int, dsn: str, helo: str, text: str, reason: str) -> Verdict:
    return Verdict(CHECK, Outcome.FAIL, Reply(code, dsn, f"<{helo}>: {CLASS} rejected: {text}"),
                   reason)
