"""override - the operator's timed allow or deny for a client, decided before the access list.

SYNOPSIS
    decide(ip, override, now) -> Verdict
    CHECK = "override"

DESCRIPTION
    `override` is the most specific override the tables found for the
    client (smtpgate.override_record.Override), or None. One in force
    decides:

    allow   PERMIT: the access list, the DNSBL and the protocol tests are
            skipped, as for a PSA permit; the restrictions at RCPT and the
            connection limits still apply.
    deny    FAIL with the override's reply (default: smtpd's "554 5.7.1
            <unknown[ip]>: Client host rejected: Access denied"), given in
            place of the banner; the caller hangs up.

    Without one in force (none, or one whose time ran out before Redis
    removed it) the verdict is PASS: the access list decides. The reason
    names the override's network, action, who set it and when, the time
    left and why, in the shape of postscreen's ALLOWLISTED / DENYLISTED
    lines. Never cached (ttl 0): an override may end or be removed at any
    time.
"""

from __future__ import annotations

from smtpgate.override_record import ALLOW, Override, default_deny_reply, show_left, show_time
from smtpgate.verdict import Outcome, Verdict

CHECK = "override"


def decide(ip: str, override: Override | None, now: float) -> Verdict:
    if override is None:
        return Verdict(CHECK, Outcome.PASS, reason=f"[{ip}] no override")
    if not override.in_force(now):
        return Verdict(CHECK, Outcome.PASS, reason=f"[{ip}] override {override.action} "
                       f"{override.network} ended at {show_time(override.until)}")
    evidence = (f"(override {override.action} {override.network} by {override.by} at "
                f"{show_time(override.set_at)}, {show_left(override.left(now))} left: "
                f"{override.reason})")
    if override.action == ALLOW:
        return Verdict(CHECK, Outcome.PERMIT, reason=f"ALLOWLISTED [{ip}] {evidence}")
    reply = override.reply or default_deny_reply(ip)
    return Verdict(CHECK, Outcome.FAIL, reply, reason=f"DENYLISTED [{ip}] {evidence}")
