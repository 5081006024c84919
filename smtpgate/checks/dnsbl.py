"""dnsbl - postscreen's DNSBL/DNSWL score: weighted sites, threshold, allowlist.

SYNOPSIS
    ZoneResult(zone, status, answers=(), ttl=0)
    DnsblResult(ip, zones, ttl)
    Score(total, zone, matched, unhealthy, failed)
    score(sites, result) -> Score
    cache_ttl(zones) -> float
    settled(sites, result, *, threshold=1, allowlist_threshold=0) -> bool
    decide(result, sites, *, threshold=1, allowlist_threshold=0,
           action="drop", reply_map=()) -> Verdict
    MIN_TTL, MAX_TTL

DESCRIPTION
    Facts: a DnsblResult from the DNSBL engine (smtpgate.lookups.dnsbl), one
    ZoneResult per queried zone: status "ok" (answers are the A records),
    "nxdomain", "nodata", "tempfail" (SERVFAIL and the like) or "timeout".

    score() runs every answer past the configured sites as postscreen does:
    each site (zone, filter, weight) whose filter matches at least one answer
    of its zone adds its weight once; several sites may name one zone with
    different filters. Error answers (smtpgate.dnsbl_sites.is_error_answer:
    127.255.255.0/24, anything outside 127.0.0.0/8) never match: the zone is
    reported unhealthy instead, so a blocked resolver cannot reject all mail.
    `zone` is the zone of the matching site with the largest weight (the
    first such site in configuration order on a tie): the one named in the
    reply.

    decide(): no sites is SKIP. A score >= threshold (postscreen_dnsbl_threshold)
    fails under `action` (postscreen_dnsbl_action): drop `521 5.7.1 Service
    unavailable; client [ip] blocked using <zone>`, enforce the same text
    with 550 at RCPT; <zone> is rewritten through `reply_map` (a mapping or
    (zone, shown) pairs, as Config.dnsbl_reply_map) so keys in query names
    stay hidden. A score <= allowlist_threshold, when that is
    negative (postscreen_dnsbl_allowlist_threshold), is PERMIT: the client
    skips the other screening tests for the result's ttl. Anything else
    PASSes for the result's ttl. The reason starts like postscreen's log
    `DNSBL rank 3 for [ip]` and lists what matched, which zones failed and
    which answered with errors.

    cache_ttl() is how long a result may be cached: the smallest answer TTL
    among zones that answered, clamped to [MIN_TTL, MAX_TTL] = [60 s, 1 h];
    MIN_TTL when any zone failed, is still pending or none answered, so a
    broken zone is retried soon.

    settled() tells whether a partial result (zones still running have
    status "pending", which counts as no listing) already fixes the outcome,
    whatever the pending zones answer: listed (the score stays >= threshold
    even if every pending allowlist matches), allowlisted (stays <=
    allowlist_threshold even if every pending blocklist matches), or neither.
    The session may then act before the slowest zone answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from smtpgate.checks.screening_action import act
from smtpgate.dnsbl_sites import DnsblSite, is_error_answer
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "dnsbl"
MIN_TTL = 60.0
MAX_TTL = 3600.0
FAILED_STATUSES = frozenset({"tempfail", "timeout", "pending"})


@dataclass(frozen=True, slots=True)
class ZoneResult:
    zone: str
    status: str
    answers: tuple[str, ...] = ()
    ttl: int = 0

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES


@dataclass(frozen=True, slots=True)
class DnsblResult:
    ip: str
    zones: tuple[ZoneResult, ...]
    ttl: float = MIN_TTL


@dataclass(frozen=True, slots=True)
class Score:
    total: int
    zone: str | None
    matched: tuple[tuple[DnsblSite, str], ...]
    unhealthy: tuple[str, ...]
    failed: tuple[str, ...]


def _matches(sites: Sequence[DnsblSite], zones: Sequence[ZoneResult]):
    """Each site that lists the client, with the first answer that is no error answer and
    matches its filter, in the order of `sites`."""
    by_zone = {z.zone: z for z in zones}
    for site in sites:
        zone = by_zone.get(site.zone)
        if zone is None or zone.status != "ok":
            continue
        for answer in zone.answers:
            if not is_error_answer(answer) and site.matches(answer):
                yield site, answer
                break


def score(sites: Sequence[DnsblSite], result: DnsblResult) -> Score:
    # plain loops: a listed first contact is scored twice (settled, decide)
    zones = result.zones
    total = 0
    best: DnsblSite | None = None
    matched = []
    for site, answer in _matches(sites, zones):
        total += site.weight
        matched.append((site, answer))
        if best is None or site.weight > best.weight:
            best = site
    unhealthy = []
    failed = []
    for z in zones:
        if z.status == "ok":
            for answer in z.answers:
                if is_error_answer(answer):
                    unhealthy.append(z.zone)
                    break
        elif z.status in FAILED_STATUSES:
            failed.append(z.zone)
    return Score(total, best.zone if best else None, tuple(matched), tuple(unhealthy),
                 tuple(failed))


def cache_ttl(zones: Sequence[ZoneResult]) -> float:
    if any(z.failed for z in zones):
        return MIN_TTL
    ttls = [z.ttl for z in zones if z.status in ("ok", "nxdomain", "nodata")]
    if not ttls:
        return MIN_TTL
    return float(min(MAX_TTL, max(MIN_TTL, min(ttls))))


def settled(
    sites: Sequence[DnsblSite],
    result: DnsblResult,
    *,
    threshold: int = 1,
    allowlist_threshold: int = 0,
) -> bool:
    pending = {z.zone for z in result.zones if z.status == "pending"}
    if not pending:
        return True
    known = sum(site.weight for site, _ in _matches(sites, result.zones))  # score()'s total
    weights = [site.weight for site in sites if site.zone in pending]
    highest = known + sum(w for w in weights if w > 0)
    lowest = known + sum(w for w in weights if w < 0)
    allowlisting = allowlist_threshold < 0
    if lowest >= threshold:
        return True
    if allowlisting and highest <= allowlist_threshold:
        return True
    return highest < threshold and (not allowlisting or lowest > allowlist_threshold)


def decide(
    result: DnsblResult,
    sites: Sequence[DnsblSite],
    *,
    threshold: int = 1,
    allowlist_threshold: int = 0,
    action: str = "drop",
    reply_map: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> Verdict:
    if not sites:
        return Verdict(CHECK, Outcome.SKIP, reason="no dnsbl_sites")
    found = score(sites, result)
    reason = _reason(result.ip, found)
    if found.total >= threshold:
        shown = dict(reply_map).get(found.zone or "", found.zone)
        text = f"Service unavailable; client [{result.ip}] blocked using {shown}"
        return act(CHECK, action, reason, Reply(521, "5.7.1", text), Reply(550, "5.7.1", text))
    if allowlist_threshold < 0 and found.total <= allowlist_threshold:
        return Verdict(CHECK, Outcome.PERMIT, reason=f"{reason}: allowlisted", ttl=result.ttl)
    return Verdict(CHECK, Outcome.PASS, reason=reason, ttl=result.ttl)


def _reason(ip: str, found: Score) -> str:
    parts = [f"DNSBL rank {found.total} for [{ip}]"]
    if found.matched:
        parts.append(
            "matched " + ", ".join(f"{site}: {answer}" for site, answer in found.matched)
        )
    if found.failed:
        parts.append("no answer from " + ", ".join(found.failed))
    if found.unhealthy:
        parts.append("error answers from " + ", ".join(found.unhealthy))
    return "; ".join(parts)
