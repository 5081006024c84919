"""preflight - what `smtpgate serve` looks at before it is ready: the certificate and the next hops.

SYNOPSIS
    preflight(config) -> dict[HostPort, HopProbe]    once, before the workers; PreflightError
    listener_hops(config) -> dict[str, tuple[HostPort, ...]]   listener kind -> its next hops
    ipv6_clients(config) -> str                      "listener", "proxy" or ""
    carry(gate, probes)                              offer each listener what its hops carry
    mark_reached(gate, probes)                       the hops a probe reached count as up
    start_learning(gate, probes, wait_first=True)    learn_later() as this worker's task
    stop_learning(gate)
    await learn_later(gate, probes, wait_first)      probe the hops not known, until reached
    PreflightError

DESCRIPTION
    preflight() runs in the master process (or the only one), so its
    lines are logged once whatever the number of workers, and the workers
    inherit what it learned. It logs the certificate's names and expiry
    with the warnings of smtpgate.smtp.certificate (a bad pair is left to
    smtpgate.smtp.tls, which stops the start, or runs without STARTTLS
    with tls_optional), and probes each next hop (smtpgate.relay.probe),
    every one of a comma list. A listener's clients are offered what all
    of its next hops that answered carry, since a message may go to any
    of them (everything while none has answered).

    A next hop that cannot be reached is a warning: the image starts its
    containers in any order, so Postfix may come up after smtpgate. Until
    a probe reaches it, clients are offered every extension, and each
    worker probes again every next_hop_probe_interval seconds
    (learn_later), then logs what it found and offers what the hop
    carries.

    A next hop that is reached but refuses XCLIENT, or refuses IPv6
    client addresses when smtpgate listens on IPv6, stops the start
    (PreflightError, exit status 1, the log naming the Postfix setting):
    running would answer 451 to every message (or to every IPv6 client's)
    while looking healthy, and senders would retry quietly for days
    before anyone noticed. With several next hops the same holds for any
    one of them: messages would fail over from it, but it is as
    misconfigured, and the start is the moment to say so. Found later by learn_later(), the same is
    logged as an error and mail is answered 451 until Postfix is fixed.

    A reload (SIGHUP) that names another next hop offers every extension
    again and probes the new hop at once (start_learning(gate, {},
    wait_first=False)). A next hop that changes its settings while
    smtpgate runs is not probed again: restart or reload smtpgate.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

from smtpgate.config import Config, HostPort
from smtpgate.policy.state import MX, SUBMISSION, SUBMISSIONS
from smtpgate.relay.probe import HopProbe, carried_extensions, hop_findings, probe_next_hop
from smtpgate.smtp.certificate import CertificateError, certificate_findings, read_certificate

log = logging.getLogger("smtpgate.master")

PROBE_TIMEOUT = 10.0  # at most, per reply; a start should not wait next_hop_timeout (300 s)


class PreflightError(Exception):
    """The next hop will not take smtpgate's hand-offs; the findings were logged."""


def listener_hops(config: Config) -> dict[str, tuple[HostPort, ...]]:
    """Where each enabled SMTP listener's mail may go."""
    submission = config.submission_next_hop or config.next_hop
    hops = {}
    for kind, listen, hop in ((MX, config.mx_listen, config.next_hop),
                              (SUBMISSION, config.submission_listen, submission),
                              (SUBMISSIONS, config.submissions_listen, submission)):
        if listen:
            hops[kind] = hop
    return hops


def _all_hops(config: Config) -> list[HostPort]:
    return sorted({hop for hops in listener_hops(config).values() for hop in hops}, key=str)


def ipv6_clients(config: Config) -> str:
    """Whether clients have IPv6 addresses: "listener" surely, "proxy" perhaps, "" not."""
    listeners = (*config.mx_listen, *config.submission_listen, *config.submissions_listen)
    if any(":" in address.host for address in listeners):
        return "listener"
    return "proxy" if config.proxy_protocol != "off" else ""


def preflight(config: Config) -> dict[HostPort, HopProbe]:
    _certificate(config)
    hops = _all_hops(config)
    if not hops:
        return {}
    probes = asyncio.run(_probe_all(config, hops))
    fatal = []
    for probe in probes.values():
        fatal += _report(probe, ipv6_clients(config), True, config.next_hop_probe_interval)
    if fatal:
        raise PreflightError("; ".join(fatal))
    return probes


def _certificate(config: Config) -> None:
    paths = config.tls_paths
    if paths is None:
        return
    try:
        info = read_certificate(*paths)
    except CertificateError:
        return  # smtpgate.smtp.tls says what is wrong, and whether that stops the start
    now = datetime.datetime.now(datetime.UTC)
    for finding in certificate_findings(info, config.hostname, now):
        if finding.level == "ok":
            log.info("%s", finding.text)
        elif finding.level == "warning":
            log.warning("warning: %s", finding.text)


async def _probe_all(config: Config, hops) -> dict[HostPort, HopProbe]:
    timeout = min(config.next_hop_timeout, PROBE_TIMEOUT)
    found = await asyncio.gather(*(probe_next_hop(hop, config.hostname, timeout)
                                   for hop in hops))
    return dict(zip(hops, found, strict=True))


def _report(probe: HopProbe, ipv6: str, at_start: bool, interval: float) -> list[str]:
    """Log the findings; the errors' texts (none for a hop not reached: that is a warning)."""
    if not probe.reached:
        log.warning("warning: next hop %s cannot be reached (%s); clients are offered every "
                    "extension until it can, and it is tried again every %g s",
                    probe.hop, probe.error, interval)
        return []
    errors = []
    for finding in hop_findings(probe, ipv6):
        if finding.level == "error":
            log.error("%s: %s", "fatal" if at_start else "error", finding.text)
            errors.append(finding.text)
        elif finding.level == "warning":
            log.warning("warning: %s", finding.text)
        else:
            log.info("%s", finding.text)
    return errors


def carry(gate: Any, probes: dict[HostPort, HopProbe]) -> None:
    """Offer on each listener what all its next hops carry, of those known (all: none known)."""
    for kind, hops in listener_hops(gate.config).items():
        known = [found for found in (carried_extensions(probes[hop]) for hop in hops
                                     if hop in probes) if found is not None]
        gate.carry(kind, frozenset.intersection(*known) if known else None)


def mark_reached(gate: Any, probes: dict[HostPort, HopProbe]) -> None:
    """Count the hops a probe reached as up, so /healthz does not call them untried."""
    for hops in (gate.hops, gate.submission_hops):
        if hops is not None:
            for hop, probe in probes.items():
                if probe.reached:
                    hops.probed(hop)


_learning: dict[int, asyncio.Task] = {}  # id(gate) -> its learn_later task


def start_learning(gate: Any, probes: dict[HostPort, HopProbe], wait_first: bool = True) -> None:
    stop_learning(gate)
    _learning[id(gate)] = asyncio.get_running_loop().create_task(
        learn_later(gate, probes, wait_first))


def stop_learning(gate: Any) -> None:
    task = _learning.pop(id(gate), None)
    if task is not None:
        task.cancel()


async def learn_later(gate: Any, probes: dict[HostPort, HopProbe],
                      wait_first: bool = True) -> None:
    """Probe the hops not known every next_hop_probe_interval seconds, until each answers."""
    probes = dict(probes)
    first = True
    while True:
        waiting = [hop for hop in _all_hops(gate.config)
                   if hop not in probes or not probes[hop].reached]
        if not waiting:
            return
        if wait_first or not first:
            await asyncio.sleep(gate.config.next_hop_probe_interval)
        for hop, probe in (await _probe_all(gate.config, waiting)).items():
            if probe.reached or (first and not wait_first):  # a new hop: reported either way
                _report(probe, ipv6_clients(gate.config), False,
                        gate.config.next_hop_probe_interval)
            if probe.reached:
                probes[hop] = probe
        first = False
        carry(gate, probes)
        mark_reached(gate, probes)
