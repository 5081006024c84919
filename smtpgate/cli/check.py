"""check - what `smtpgate check-config` looks at besides the settings: certificate, live services.

SYNOPSIS
    run_checks(config, live, out=sys.stdout) -> int     1 when a finding is an error, else 0
    certificate_check(config, now) -> list[Finding]
    hostname_check(config) -> list[Finding]
    redis_check(config) -> list[Finding]
    await next_hop_check(config) -> list[Finding]

DESCRIPTION
    Printed after the settings, one line per finding: "ok: ...",
    "warning: ..." or "error: ...".

    Always: a warning when HOSTNAME is not a fully qualified name; the
    certificate's names and expiry, a warning when HOSTNAME is not among
    them or the expiry is near or past (smtpgate.smtp.certificate); an
    error when no certificate is configured, a file cannot be read or the
    key does not match the certificate, since `smtpgate serve` refuses to
    start then (a warning with tls_optional, which starts without
    STARTTLS).

    With --live, also: Redis asked PING at the configured URL (one server, a
    Sentinel set's master or a Cluster; shown with the passwords masked);
    every next hop probed as `smtpgate serve` does at start
    (smtpgate.relay.probe): XCLIENT authorized, IPv6 client addresses
    accepted, the extensions offered. A next hop or Redis that
    cannot be reached is an error here: --live asks whether mail would
    flow now.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import sys
from typing import TextIO
from urllib.parse import urlsplit

from smtpgate import redis_url
from smtpgate.config import Config, mask_secret
from smtpgate.relay.probe import hop_findings, probe_next_hop
from smtpgate.service.preflight import PROBE_TIMEOUT, ipv6_clients, listener_hops
from smtpgate.smtp.certificate import CertificateError, certificate_findings, read_certificate
from smtpgate.verdict import Finding


def run_checks(config: Config, live: bool, out: TextIO = sys.stdout) -> int:
    now = datetime.datetime.now(datetime.UTC)
    found = hostname_check(config) + certificate_check(config, now)
    if live:
        found += redis_check(config)
        found += asyncio.run(next_hop_check(config))
    for finding in found:
        print(finding, file=out)
    return 1 if any(f.level == "error" for f in found) else 0


def certificate_check(config: Config, now: datetime.datetime) -> list[Finding]:
    """What `smtpgate serve` would say of the certificate: no certificate, or one it cannot
    read, stops its start (an error here) unless tls_optional (a warning)."""
    paths = config.tls_paths
    refused = "warning" if config.tls_optional else "error"
    consequence = ("STARTTLS is not offered (SMTPGATE_TLS_OPTIONAL)" if config.tls_optional
                   else "`smtpgate serve` refuses to start (set SMTPGATE_TLS_OPTIONAL=yes to "
                        "run without STARTTLS)")
    if paths is None:
        return [Finding(refused, "no TLS certificate configured (LETSENCRYPT, or "
                                 f"SMTPGATE_TLS_CERT and SMTPGATE_TLS_KEY): {consequence}")]
    try:
        info = read_certificate(*paths)
    except CertificateError as exc:
        return [Finding(refused, f"{exc}: {consequence}")]
    return certificate_findings(info, config.hostname, now)


def hostname_check(config: Config) -> list[Finding]:
    """The banner's and EHLO's name: a bare host name (HOSTNAME unset on a host whose
    name has no domain gives `localhost`) makes receivers' HELO checks refuse our mail
    and our own replies look misconfigured."""
    name = config.hostname.rstrip(".")
    if "." not in name:
        return [Finding("warning", f"HOSTNAME {config.hostname!r} is not a fully qualified "
                                   "domain name: set HOSTNAME to the name in the MX record")]
    return []


def redis_check(config: Config) -> list[Finding]:
    from smtpgate.lookups import redis_client

    shown = mask_secret(config.redis)
    try:
        client = redis_client.connect_sync(config.redis, config.redis_timeout)
        try:
            client.ping()
        finally:
            client.close()
    except redis_client.ERRORS as exc:
        reason = " ".join(str(exc).split())
        for secret in _passwords(config.redis):
            reason = reason.replace(secret, "***")
        return [Finding("error", f"Redis at {shown} does not answer PING: {reason}")]
    return [Finding("ok", f"Redis at {shown} answers PING")]


def _passwords(url: str) -> set[str]:
    target = redis_url.parse(url)
    found = {target.password, target.sentinel_password}
    with contextlib.suppress(ValueError):
        found.add(urlsplit(target.url).password)
    return {p for p in found if p}


async def next_hop_check(config: Config) -> list[Finding]:
    hops = sorted({hop for hops in listener_hops(config).values() for hop in hops}, key=str)
    timeout = min(config.next_hop_timeout, PROBE_TIMEOUT)
    probes = await asyncio.gather(*(probe_next_hop(hop, config.hostname, timeout)
                                    for hop in hops))
    found = []
    for probe in probes:
        found += hop_findings(probe, ipv6_clients(config))
    return found
