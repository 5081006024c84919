"""access_list - postscreen_access_list: static networks, then the PSA key.

SYNOPSIS
    decide(ip, psa_value, *, mynetworks=(), denied=(), action="drop",
           psa_key="") -> Verdict
    network_of(ip, networks) -> network | None    the first that holds the client
    DROP_REPLY, ENFORCE_REPLY

DESCRIPTION
    The first match wins, in the order of the image's
    `postscreen_access_list = permit_mynetworks, redis:PSA`:

    1. `mynetworks` (config mynetworks): PERMIT, every screening test skipped.
    2. `denied` networks (a static deny list, if the caller has one): as a
       PSA `reject`.
    3. `psa_value`, the value of the most specific PSA key the tables layer
       found for the client (CIDR welcome), or None: `permit` is PERMIT,
       `reject` applies `action` (postscreen_denylist_action), `dunno`,
       None and anything else are PASS (the other tests decide).

    A reject under `drop` is `521 5.3.2 Service currently unavailable`
    (close at once); under `enforce` it is `550 5.3.2 Service currently
    unavailable`, answered to every RCPT; under `ignore` it is only logged.
    The reason names what matched, like postscreen's `DENYLISTED [ip]:port`
    and `ALLOWLISTED [ip]:port` log lines (`psa_key` names the PSA key).
    An `ip` that is not an address is never in a network: only the PSA value
    can decide for it. Access-list verdicts are never cached (ttl 0): the
    list is read on every connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from smtpgate.address import IPAddress, client_address
from smtpgate.checks.screening_action import act
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "access_list"
DROP_REPLY = Reply(521, "5.3.2", "Service currently unavailable")
ENFORCE_REPLY = Reply(550, "5.3.2", "Service currently unavailable")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def decide(
    ip: str,
    psa_value: str | None,
    *,
    mynetworks: Iterable[Network] = (),
    denied: Iterable[Network] = (),
    action: str = "drop",
    psa_key: str = "",
) -> Verdict:
    address = _address(ip)
    if (net := _find(address, mynetworks)) is not None:
        return Verdict(CHECK, Outcome.PERMIT, reason=f"ALLOWLISTED [{ip}] (mynetworks {net})")
    if (net := _find(address, denied)) is not None:
        return act(CHECK, action, f"DENYLISTED [{ip}] (static {net})", DROP_REPLY, ENFORCE_REPLY)
    value = (psa_value or "").strip().lower()
    source = f"PSA:{psa_key}" if psa_key else "PSA"
    if value == "permit":
        return Verdict(CHECK, Outcome.PERMIT, reason=f"ALLOWLISTED [{ip}] ({source} permit)")
    if value == "reject":
        return act(CHECK, action, f"DENYLISTED [{ip}] ({source} reject)", DROP_REPLY, ENFORCE_REPLY)
    shown = f"{source} {value}" if value else "no match"
    return Verdict(CHECK, Outcome.PASS, reason=f"[{ip}] {shown}")


def network_of(ip: str, networks: Iterable[Network]) -> Network | None:
    """The first of `networks` that holds the client (an IPv4-mapped address as its IPv4
    address); None for none, and for an `ip` that is not an address."""
    return _find(_address(ip), networks)


def _address(ip: str) -> IPAddress | None:
    try:
        return client_address(ip)
    except ValueError:
        return None


def _find(address, networks: Iterable[Network]) -> Network | None:
    if address is None:
        return None
    for net in networks:
        if address.version == net.version and address in net:
            return net
    return None
