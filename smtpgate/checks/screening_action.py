"""screening_action - postscreen's ignore / enforce / drop, applied to a finding.

SYNOPSIS
    act(check, action, reason, drop, enforce) -> Verdict
    passed(check, reason="", ttl=0.0) -> Verdict
    hangs_up(verdict) -> bool
    escape(data: bytes | str, limit=100) -> str
    format_delay(seconds: float) -> str

DESCRIPTION
    A screening test only says what it found; the configured action says
    what happens, as in postscreen (finding a problem is separate from
    acting on it):

    ignore   the finding is logged and the session goes on: PASS with the
             reason kept, `ignored` set and ttl 0, so an ignored failure is
             never cached as a pass.
    enforce  FAIL with the `enforce` reply (550 ...): the session keeps
             talking and answers every RCPT with it, so the log line names
             sender and recipient.
    drop     FAIL with the `drop` reply (521 ...): sent at once, then the
             connection is closed.

    hangs_up() tells the session which kind of FAIL it holds: true for the
    replies that end the session at once (521, and 421 for limits), false
    for an enforce reply, which waits for RCPT.

    escape() renders client bytes as postscreen logs them: printable ASCII
    as is, \\r \\n \\t \\\\ as C escapes, other bytes as \\ooo octal, at most
    `limit` input bytes. format_delay() writes a delay as postscreen's
    psc_format_delta_time does: two significant digits, e.g. 0.1, 0.12, 1.2,
    12.
"""

from __future__ import annotations

import math

from smtpgate.verdict import Outcome, Reply, Verdict

ACTIONS = ("ignore", "enforce", "drop")
_HANGUP_CODES = frozenset({421, 521})
_ESCAPES = {0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t", 0x5C: "\\\\"}


def act(check: str, action: str, reason: str, drop: Reply, enforce: Reply) -> Verdict:
    if action == "ignore":
        return Verdict(check, Outcome.PASS, None, reason, 0.0, ignored=True)
    if action == "enforce":
        return Verdict(check, Outcome.FAIL, enforce, reason)
    if action == "drop":
        return Verdict(check, Outcome.FAIL, drop, reason)
    raise ValueError(f"{action!r} is not one of {', '.join(ACTIONS)}")


def passed(check: str, reason: str = "", ttl: float = 0.0) -> Verdict:
    return Verdict(check, Outcome.PASS, None, reason, ttl)


def hangs_up(verdict: Verdict) -> bool:
    return verdict.failed and verdict.reply is not None and verdict.reply.code in _HANGUP_CODES


def escape(data: bytes | str, limit: int = 100) -> str:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    out = []
    for byte in raw[:limit]:
        if byte in _ESCAPES:
            out.append(_ESCAPES[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def format_delay(seconds: float, significant: int = 2, most_decimals: int = 6) -> str:
    seconds = max(0.0, seconds)
    if seconds == 0:
        return "0"
    magnitude = math.floor(math.log10(seconds)) + 1  # digits before the point (<= 0 below 1)
    decimals = min(most_decimals, max(0, significant - magnitude))
    text = f"{seconds:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
