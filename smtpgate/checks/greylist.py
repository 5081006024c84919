"""greylist - greylisting at RCPT, for every client or only for doubtful ones.

SYNOPSIS
    SIGNALS = ("no_fcrdns", "dnsbl_low", "dynamic_name", "protocol_failed")
    MODES = ("off", "selective", "all")
    Suspicion(no_fcrdns, names, dnsbl_score, dnsbl_threshold, failed_tests)
    doubts(ip, suspicion, signals, dynamic_pattern) -> tuple[str, ...]
    looks_dynamic(name, ip, pattern) -> bool
    client_network(ip) -> str           the /24 (IPv4) or /64 (IPv6) a key is made of
    triplet(ip, sender, recipient=None) -> tuple[str, str]    (network, "domain[/rcpt]")
    exempt(mode, *, listener_mx, trusted, permitted, dnswl) -> str | None   why not, or None
    Seen(state, waited)                 what the store found: state "passed" (earlier),
                                        "new", "early", "retried" (passed now)
    decide(ip, recipient, network, tail, seen, why, delay, retry_window) -> Verdict
    DEFER_STATUS = "4.7.1"

DESCRIPTION
    postgrey's idea, kept narrow: a first contact from a network with a
    sender domain (and the recipient, when greylist_recipient is on) is
    deferred; the same retried after `delay` seconds (greylist_delay, 300
    as postgrey) and within `retry_window` passes, and the network is
    remembered as passed (greylist_pass_ttl, postgrey's 35 days): later
    sessions from it are not greylisted at all, on any node.

    Who is greylisted (exempt(), then doubts()): nobody when the mode is
    "off"; never submission, mynetworks, a permitted client (PSA permit, a
    timed allow, a DNSWL score at the allowlist threshold) or a client any
    DNSWL listed (a negative DNSBL score). With "all" everyone else; with
    "selective" only a client showing one of the configured signals:

    no_fcrdns        no forward-confirmed reverse name (one REV excused,
                     or the FCrDNS lookup had no answer yet)
    dnsbl_low        a DNSBL score above 0 and under the threshold
                     (known when the DNSBL was asked in this session; a
                     client whose DNSBL pass is cached has no score)
    dynamic_name     a reverse name that looks like a home or dial-up
                     line: three of the IPv4 address's numbers in it, or
                     dynamic_pattern (greylist_dynamic_pattern) matching
    protocol_failed  a screening or protocol test failed under `ignore`
                     (under enforce or drop it refused already)

    The reply is Postfix's for a policy DEFER_IF_PERMIT (postgrey's):
        450 4.7.1 <rcpt>: Recipient address rejected: Greylisted, try again
        in N seconds
    and the reason, kept in the decision record and printed by explain,
    says which signals made the client doubtful, the key, and how long it
    has waited.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from smtpgate.address import client_address
from smtpgate.config import GREYLIST_DYNAMIC_PATTERN, GREYLIST_MODES, GREYLIST_SIGNALS
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "greylist"
SIGNALS = GREYLIST_SIGNALS
MODES = GREYLIST_MODES
DYNAMIC_PATTERN = GREYLIST_DYNAMIC_PATTERN
DEFER_STATUS = "4.7.1"
NULL_SENDER = "<>"


@dataclass(frozen=True, slots=True)
class Suspicion:
    """What the earlier stages found about a client, for doubts()."""

    no_fcrdns: bool = False
    names: tuple[str, ...] = ()  # its reverse names, confirmed or not
    dnsbl_score: int | None = None  # None: the DNSBL was not asked in this session
    dnsbl_threshold: int = 1
    failed_tests: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Seen:
    state: str  # "passed", "new", "early", "retried"
    waited: float = 0.0


def looks_dynamic(name: str, ip: str, pattern: str = DYNAMIC_PATTERN) -> bool:
    host = name.lower().rstrip(".")
    labels = host.split(".")
    local = ".".join(labels[:-2]) if len(labels) > 2 else labels[0]
    if pattern and re.search(pattern, local):
        return True
    address = client_address(ip)
    if address.version != 4:
        return False
    octets = str(address).split(".")
    numbers = re.findall(r"\d+", local)
    hits = sum(1 for octet in octets if octet in numbers)
    if hits >= 3:
        return True
    return f"{int(address):08x}" in local  # the address in hex (cb00710a)


def doubts(ip: str, suspicion: Suspicion, signals: tuple[str, ...],
           dynamic_pattern: str = DYNAMIC_PATTERN) -> tuple[str, ...]:
    """The configured signals the client shows, each with its evidence ("name: why")."""
    found = []
    if "no_fcrdns" in signals and suspicion.no_fcrdns:
        found.append("no_fcrdns: no forward-confirmed reverse name")
    score = suspicion.dnsbl_score
    if "dnsbl_low" in signals and score is not None and 0 < score < suspicion.dnsbl_threshold:
        found.append(f"dnsbl_low: DNSBL score {score} under the threshold "
                     f"{suspicion.dnsbl_threshold}")
    if "dynamic_name" in signals:
        dynamic = [n for n in suspicion.names if looks_dynamic(n, ip, dynamic_pattern)]
        if dynamic:
            found.append(f"dynamic_name: {dynamic[0]} looks dynamic")
    if "protocol_failed" in signals and suspicion.failed_tests:
        found.append(f"protocol_failed: {', '.join(suspicion.failed_tests)} failed")
    return tuple(found)


def exempt(mode: str, *, listener_mx: bool, trusted: bool, permitted: bool,
           dnswl: bool) -> str | None:
    """Why this client is never greylisted, or None when it may be."""
    if mode == "off":
        return "greylisting is off"
    if not listener_mx:
        return "submission"
    if trusted:
        return "mynetworks"
    if permitted:
        return "allowlisted (PSA permit, a timed allow or the DNSWL)"
    if dnswl:
        return "listed by a DNSWL"
    return None


def client_network(ip: str) -> str:
    address = client_address(ip)
    length = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{length}", strict=False))


def triplet(ip: str, sender: str, recipient: str | None = None) -> tuple[str, str]:
    """The key's parts: the client's network, and the sender's domain (the null sender as
    "<>"), with "/recipient" when recipients are part of the key."""
    domain = sender.rpartition("@")[2].lower().rstrip(".") if sender else NULL_SENDER
    tail = f"{domain or NULL_SENDER}/{recipient.lower()}" if recipient else domain or NULL_SENDER
    return client_network(ip), tail


def decide(ip: str, recipient: str, network: str, tail: str, seen: Seen,
           why: tuple[str, ...] | str, delay: float, retry_window: float) -> Verdict:
    """The verdict once the store has answered for network + tail; `why` is doubts() (or
    "all" for mode all)."""
    reasons = why if isinstance(why, str) else "; ".join(why)
    key = f"{network} {tail}"
    if seen.state == "passed":
        return Verdict(CHECK, Outcome.PASS, reason=f"[{ip}] {network} passed greylisting "
                       f"before ({reasons})")
    if seen.state == "retried":
        return Verdict(CHECK, Outcome.PASS, reason=f"[{ip}] {key} retried after "
                       f"{seen.waited:.0f} s: passed ({reasons})")
    left = max(1, int(delay - seen.waited + 0.999))
    reply = Reply(450, DEFER_STATUS, f"<{recipient}>: Recipient address rejected: "
                  f"Greylisted, try again in {left} seconds")
    first = "first seen now" if seen.state == "new" else \
        f"first seen {seen.waited:.0f} s ago"
    return Verdict(CHECK, Outcome.FAIL, reply, reason=(
        f"greylisted [{ip}] {key} ({reasons}); {first}, a retry after {delay:.0f} s and "
        f"within {retry_window / 3600:g} h passes"))
