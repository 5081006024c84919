"""verdict - what a check decides, and the SMTP reply that carries it.

SYNOPSIS
    Reply(code, status, text)            str(reply) == "550 5.1.1 text"
    printable_text(text) -> str          control characters as "?"
    Outcome.PERMIT | PASS | FAIL | SKIP
    Verdict(check, outcome, reply=None, reason="", ttl=0.0, ignored=False)
    verdict.failed ; verdict.logged       the reason as the log and explain show it
    Finding(level, text)                 level: "ok", "warning" or "error"

DESCRIPTION
    Every check is a pure function returning a Verdict. PERMIT means an
    explicit allow (a `permit` key): later checks of the same class are
    skipped. PASS means the check found nothing wrong. FAIL carries the
    reply to send; a 4xx reply is a temporary failure. SKIP means the check
    did not apply (not configured, trusted client). `reason` is the evidence
    for the log and `smtpgate explain` (which key, which zone and answer);
    `ttl` is how long a pass may be cached, 0 for not at all. `ignored`
    marks a finding the configured action `ignore` let pass (postscreen's
    flag for it): a PASS that is still a failed test, logged and never
    cached as a pass; `logged` adds "(action ignore)" to its reason.

    A Finding is what a look at the surroundings found (the certificate,
    the next hop): "error" stops `smtpgate serve` at start and makes
    `smtpgate check-config` exit 1; "warning" is logged and served through.

    str(reply) is always one line: control characters in the text (C0 but
    HT, DEL, C1; CR and LF included) are shown as "?", as Postfix's
    printable() shows them, whatever the text came from (a HELO name, a
    table's value, a client's parameter), so no text can end a reply early
    or start a second one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable_text(text: str) -> str:
    return _CONTROL.sub("?", text) if _CONTROL.search(text) else text


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str
    text: str

    def __str__(self) -> str:
        text = printable_text(self.text)
        if self.status:
            return f"{self.code} {self.status} {text}"
        return f"{self.code} {text}"

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


class Outcome(StrEnum):
    PERMIT = "permit"
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Verdict:
    check: str
    outcome: Outcome
    reply: Reply | None = None
    reason: str = ""
    ttl: float = 0.0
    ignored: bool = False

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAIL

    @property
    def logged(self) -> str:
        return f"{self.reason} (action ignore)" if self.ignored else self.reason


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # "ok", "warning" or "error"
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.text}"
