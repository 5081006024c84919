"""limits - per-client concurrency and rate, and the global session cap.

SYNOPSIS
    client_key(ip, ipv6_prefix=64) -> str
    decide(ip, *, client_count, client_rate, total, count_limit=50,
           rate_limit=0, connection_limit=10000, hostname="",
           exempt=False, window=60) -> Verdict

DESCRIPTION
    client_key() is what a client is counted under: an IPv4 address as is
    (an IPv4-mapped IPv6 address as its IPv4 address), an IPv6 address as
    its network of `ipv6_prefix` bits (/64 by default, since one host
    usually owns a whole /64), e.g. `2001:db8:1:2::/64`. Text that is not
    an address is returned stripped, so a bad peer still gets counted.

    decide() takes the counts after this connection was counted (the limit
    counters in smtpgate.lookups.screening_cache), in postscreen's order:
    - client_count > count_limit (postscreen_client_connection_count_limit):
      `421 4.7.0 Error: too many connections from <ip>` (postscreen's words);
    - total > connection_limit: `421 4.3.2 All server ports are busy`;
    - client_rate > rate_limit (smtpd_client_connection_rate_limit, per
      `window` seconds: anvil_rate_time_unit):
      `421 4.7.0 <hostname> Error: too many connections from <ip>`
      (smtpd's anvil words).
    A limit of 0 is no limit (the global cap always applies). `exempt`
    clients (smtpd_client_event_limit_exceptions, by default mynetworks)
    skip the per-client limits. The reason is Postfix's log text (`NOQUEUE: reject:
    CONNECT from [ip]: too many connections`, `Connection rate limit
    exceeded: 31 from [ip]`). Verdicts are never cached.
"""

from __future__ import annotations

import ipaddress

from smtpgate.address import client_address, client_text
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "limits"
ALL_PORTS_BUSY = Reply(421, "4.3.2", "All server ports are busy")


def client_key(ip: str, ipv6_prefix: int = 64) -> str:
    try:
        address = client_address(ip)
    except ValueError:
        return ip.strip()
    if isinstance(address, ipaddress.IPv4Address) or ipv6_prefix >= 128:
        return client_text(ip)  # the session's own string when it is in that form
    return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))


def decide(
    ip: str,
    *,
    client_count: int,
    client_rate: int,
    total: int,
    count_limit: int = 50,
    rate_limit: int = 0,
    connection_limit: int = 10000,
    hostname: str = "",
    exempt: bool = False,
    window: float = 60,
) -> Verdict:
    if not exempt and count_limit > 0 and client_count > count_limit:
        return Verdict(
            CHECK, Outcome.FAIL,
            Reply(421, "4.7.0", f"Error: too many connections from {ip}"),
            f"NOQUEUE: reject: CONNECT from [{ip}]: too many connections "
            f"({client_count} > {count_limit})",
        )
    if total > connection_limit:
        return Verdict(
            CHECK, Outcome.FAIL, ALL_PORTS_BUSY,
            f"NOQUEUE: reject: CONNECT from [{ip}]: all server ports busy "
            f"({total} > {connection_limit})",
        )
    if not exempt and rate_limit > 0 and client_rate > rate_limit:
        prefix = f"{hostname} " if hostname else ""
        return Verdict(
            CHECK, Outcome.FAIL,
            Reply(421, "4.7.0", f"{prefix}Error: too many connections from {ip}"),
            f"Connection rate limit exceeded: {client_rate} from [{ip}] "
            f"(limit {rate_limit}/{window:g}s)",
        )
    return Verdict(
        CHECK, Outcome.PASS,
        reason=f"[{ip}] {client_count} sessions, {client_rate}/{window:g}s, {total} in total",
    )
