"""pregreet - postscreen's pregreet test: the client spoke before the final 220.

SYNOPSIS
    decide(received, delay, client, port, *, action="enforce", ttl=86400.0)
        -> Verdict
    DROP_REPLY, ENFORCE_REPLY

DESCRIPTION
    Facts from the session: `received`, the bytes the client sent after the
    teaser `220-` line and before the final `220 ` line (empty when it
    waited), and `delay`, the seconds from the connect to the first of
    them. A client that waited PASSes, cacheable for `ttl`
    (postscreen_greet_ttl, 1 day by default).

    A client that talked fails; the reason is postscreen's log line
    `PREGREET 11 after 0.1 from [ip]:port: EHLO foo\\r\\n` (byte count,
    delay, first 100 bytes escaped), and `action` (postscreen_greet_action)
    decides: drop `521 5.5.1 Protocol error`, enforce `550 5.5.1 Protocol
    error` at RCPT, ignore logs only.
"""

from __future__ import annotations

from smtpgate.checks.screening_action import act, escape, format_delay, passed
from smtpgate.verdict import Reply, Verdict

CHECK = "pregreet"
DROP_REPLY = Reply(521, "5.5.1", "Protocol error")
ENFORCE_REPLY = Reply(550, "5.5.1", "Protocol error")


def decide(
    received: bytes,
    delay: float,
    client: str,
    port: int | str,
    *,
    action: str = "enforce",
    ttl: float = 86400.0,
) -> Verdict:
    if not received:
        return passed(CHECK, f"PASS pregreet [{client}]:{port}", ttl)
    reason = (
        f"PREGREET {len(received)} after {format_delay(delay)} from [{client}]:{port}: "
        f"{escape(received)}"
    )
    return act(CHECK, action, reason, DROP_REPLY, ENFORCE_REPLY)
