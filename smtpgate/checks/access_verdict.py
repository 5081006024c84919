"""access_verdict - an access(5) table value turned into a check's verdict.

SYNOPSIS
    TEMPFAIL = "tempfail"
    evaluate(check, value, reply_name, reply_class) -> Verdict | None
    printable(text, ascii_only=False) -> str

DESCRIPTION
    evaluate() reads value with smtpgate.checks.access_value.parse() for the
    checks that consult REV:, HLO: and RECIP:. value None means no key
    matched: None (DUNNO). TEMPFAIL means the lookup itself failed. Result:
      OK, permit, all digits     Verdict PERMIT
      DUNNO, DEFER_IF_REJECT     None: go on (smtpgate has no deferred
                                 "reject" to turn into a defer)
      REJECT, DEFER, DEFER_IF_PERMIT, 4NN/5NN text
                                 Verdict FAIL with the action's code, status
                                 and text after "<reply_name>: <reply_class> rejected"
      INVALID, TEMPFAIL          Verdict FAIL, 451 4.3.0 ... Temporary lookup
                                 failure: a broken key never permits
    e.g. "554 5.7.1 <host.example>: Helo command rejected: Access denied".

    printable() replaces control characters (and non-ASCII when asked) with
    "?", as Postfix's printable() does before echoing client text.
"""

from __future__ import annotations

from smtpgate.checks import access_value
from smtpgate.checks.access_value import Kind
from smtpgate.verdict import Outcome, Reply, Verdict

TEMPFAIL = "tempfail"


def evaluate(check: str, value: str | None, reply_name: str, reply_class: str) -> Verdict | None:
    if value is None:
        return None
    context = f"<{reply_name}>: {reply_class} rejected"
    if value == TEMPFAIL:
        return Verdict(check, Outcome.FAIL, _tempfail(context), "table lookup failed")
    action = access_value.parse(value)
    if action.kind is Kind.OK:
        return Verdict(check, Outcome.PERMIT, reason=f"access {value!r}")
    if action.kind in (Kind.DUNNO, Kind.DEFER_IF_REJECT):
        return None
    if action.kind is Kind.INVALID:
        return Verdict(check, Outcome.FAIL, _tempfail(context),
                       f"bad access value {value!r}: {action.reason}")
    return Verdict(check, Outcome.FAIL, action.reply_for(context), f"access {value!r}")


def _tempfail(context: str) -> Reply:
    failed = access_value.TEMPFAIL
    return Reply(failed.code, failed.status, f"{context}: {failed.text}")


def printable(text: str, ascii_only: bool = False) -> str:
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() and (ch.isascii() or not ascii_only) else "?" for ch in text)
