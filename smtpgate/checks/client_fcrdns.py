"""client_fcrdns - reject_unknown_client_hostname with the REV: access table.

SYNOPSIS
    Forward(name: str, status: str, addresses: tuple[str, ...] = ())
    FcrdnsFacts(ip: str, status: str, ptr_names: tuple[str, ...] = (),
                forward: tuple[Forward, ...] = (), ttl: int = 0)
        .hostname -> str | None      the forward-confirmed name
        .temporary -> bool           a lookup failed temporarily
    rev_names(facts: FcrdnsFacts) -> tuple[str, ...]
    decide(facts: FcrdnsFacts, *, rev_ip: str | None = None,
           rev_by_name: Mapping[str, str] | None = None, trusted: bool = False,
           unknown_code: int = 450) -> Verdict

DESCRIPTION
    The image's smtpd_client_restrictions: permit_mynetworks (trusted:
    PERMIT), check_client_access REV:, reject_unknown_client_hostname.

    facts come from smtpgate.lookups.client_dns.client_hostname(): the PTR lookup status
    ("ok", "nxdomain", "nodata", "tempfail"), the PTR names, and for each
    name the forward (A or AAAA) lookup. The client's hostname is the first
    PTR name with a syntactically valid name whose addresses include the
    client's address; otherwise it is "unknown", as in Postfix logs.

    REV: is read as an access(5) action. rev_by_name maps the names that
    rev_names(facts) lists (the confirmed name, else the unconfirmed PTR
    names, so that REV:<name> permit can excuse a host whose forward DNS
    is broken) to their values; rev_ip is the value for the client address
    (CIDR matching is the tables layer's). A name's entry wins over the
    address's, as in Postfix's check_client_access. permit skips the test;
    reject is "554 5.7.1 <name[ip]>: Client host rejected: Access denied".

    Without a confirmed name the reply is
      450 4.7.25 Client host rejected: cannot find your hostname, [ip]
    with unknown_code (Config.unknown_client_reject_code) in place of 450
    when every lookup gave a definite answer; any temporary DNS failure
    keeps it 450, never a 5xx. A pass carries the DNS TTL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from smtpgate.address import IPAddress, client_address, is_valid_hostname
from smtpgate.checks import access_verdict
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "client_fcrdns"
CLASS = "Client host"


@dataclass(frozen=True, slots=True)
class Forward:
    name: str
    status: str  # "ok" | "nxdomain" | "nodata" | "tempfail"
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FcrdnsFacts:
    ip: str
    status: str  # the PTR lookup: "ok" | "nxdomain" | "nodata" | "tempfail"
    ptr_names: tuple[str, ...] = ()
    forward: tuple[Forward, ...] = ()
    ttl: int = 0
    # the answer of hostname, found once: a session asks for it at every step that names
    # the client (its label, RCPT's checks, XCLIENT NAME)
    _hostname: str | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hostname", self._confirmed())

    @property
    def hostname(self) -> str | None:
        return self._hostname

    def _confirmed(self) -> str | None:
        client = _ip(self.ip)
        if client is None:
            return None
        for fwd in self.forward:
            if fwd.status != "ok" or not is_valid_hostname(fwd.name):
                continue
            if any(_ip(a) == client for a in fwd.addresses):
                return fwd.name
        return None

    @property
    def temporary(self) -> bool:
        return self.status == "tempfail" or any(f.status == "tempfail" for f in self.forward)


def rev_names(facts: FcrdnsFacts) -> tuple[str, ...]:
    name = facts.hostname
    if name is not None:
        return (name,)
    return tuple(n for n in facts.ptr_names if is_valid_hostname(n))


def decide(facts: FcrdnsFacts, *, rev_ip: str | None = None,
           rev_by_name: Mapping[str, str] | None = None, trusted: bool = False,
           unknown_code: int = 450) -> Verdict:
    if trusted:
        return Verdict(CHECK, Outcome.PERMIT, reason="permit_mynetworks")
    hostname = facts.hostname
    namaddr = f"{hostname or 'unknown'}[{facts.ip}]"
    by_name = rev_by_name or {}
    for name in rev_names(facts):
        if name not in by_name:
            continue
        table = access_verdict.evaluate(CHECK, by_name[name], namaddr, CLASS)
        if table is not None and table.outcome is not Outcome.PASS:
            return _tag(table, f"REV:{name}")
    table = access_verdict.evaluate(CHECK, rev_ip, namaddr, CLASS)
    if table is not None and table.outcome is not Outcome.PASS:
        return _tag(table, f"REV:{facts.ip}")
    if hostname is not None:
        return Verdict(CHECK, Outcome.PASS, reason=f"{hostname} confirms {facts.ip}",
                       ttl=float(facts.ttl))
    code = 450 if facts.temporary else unknown_code
    reply = Reply(code, f"{str(code)[0]}.7.25",
                  f"Client host rejected: cannot find your hostname, [{facts.ip}]")
    return Verdict(CHECK, Outcome.FAIL, reply, _why(facts))


def _tag(verdict: Verdict, key: str) -> Verdict:
    return Verdict(verdict.check, verdict.outcome, verdict.reply, f"{key}: {verdict.reason}",
                   verdict.ttl)


def _why(facts: FcrdnsFacts) -> str:
    if facts.status == "tempfail":
        return f"PTR lookup for {facts.ip} failed temporarily"
    if facts.status != "ok" or not facts.ptr_names:
        return f"no PTR for {facts.ip} ({facts.status})"
    parts = []
    for fwd in facts.forward:
        if fwd.status == "ok":
            shown = " ".join(fwd.addresses) or "nothing"
            parts.append(f"{fwd.name} resolves to {shown}")
        else:
            parts.append(f"{fwd.name}: {fwd.status}")
    checked = "; ".join(parts) or "no valid PTR name"
    return f"PTR {' '.join(facts.ptr_names)} does not confirm {facts.ip}: {checked}"


def _ip(text: str) -> IPAddress | None:
    try:
        return client_address(text)
    except ValueError:
        return None
