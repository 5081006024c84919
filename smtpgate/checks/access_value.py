"""access_value - parse an access(5) table value into an action.

SYNOPSIS
    Kind.OK | REJECT | DEFER | DEFER_IF_PERMIT | DEFER_IF_REJECT | DUNNO | INVALID
    Action(kind, reply=None, reason="")
    Action.reply_for(context) -> Reply | None
    parse(value) -> Action

DESCRIPTION
    parse() reads the value of an access table key (PSA, REV, HLO, RECIP) the
    way Postfix's smtpd reads an access(5) result, restricted to what smtpgate
    can honour. It is pure and never raises.

    OK, permit, or an all-numerical value      Kind.OK
    REJECT [text], reject                      Kind.REJECT, 554 5.7.1 text
    DEFER [text], defer                        Kind.DEFER, 450 4.7.1 text
    DEFER_IF_PERMIT [text]                     Kind.DEFER_IF_PERMIT, 450 4.7.1 text
    DEFER_IF_REJECT [text]                     Kind.DEFER_IF_REJECT, 450 4.7.1 text
    4NN [x.y.z] text                           Kind.DEFER with that code
    5NN [x.y.z] text                           Kind.REJECT with that code
    DUNNO, dunno                               Kind.DUNNO (no decision, go on)
    anything else                              Kind.INVALID

    Keywords are case-insensitive. Text defaults to "Access denied"; a text
    starting with an enhanced status code of the reply's class uses it, else
    x.7.1 is used (Postfix's smtpd_dsn_fix). A 4NN/5NN code outside 400..599
    and actions smtpgate does not implement (HOLD, DISCARD, FILTER, PREPEND,
    REDIRECT, restriction names ...) are INVALID, with the reason in
    `reason`. Callers treat INVALID as a temporary lookup error (its reply is
    451 4.3.0 Temporary lookup failure), never as permit.

    reply_for(context) is the reply as Postfix words it after the context,
    e.g. reply_for("<b@y>: Recipient address rejected") ->
    554 5.7.1 <b@y>: Recipient address rejected: Access denied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from smtpgate.verdict import Reply

DEFAULT_TEXT = "Access denied"
REJECT_CODE = 554  # access_map_reject_code
DEFER_CODE = 450  # access_map_defer_code
TEMPFAIL = Reply(451, "4.3.0", "Temporary lookup failure")


class Kind(StrEnum):
    OK = "ok"
    REJECT = "reject"
    DEFER = "defer"
    DEFER_IF_PERMIT = "defer_if_permit"
    DEFER_IF_REJECT = "defer_if_reject"
    DUNNO = "dunno"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    reply: Reply | None = None
    reason: str = ""

    def reply_for(self, context: str) -> Reply | None:
        if self.reply is None:
            return None
        return Reply(self.reply.code, self.reply.status, f"{context}: {self.reply.text}")


_OK = Action(Kind.OK)
_DUNNO = Action(Kind.DUNNO)
_NUMERIC = re.compile(r"^([45]\d\d)(?:[ \t]+(.*))?$", re.S)
_CODE = re.compile(r"^(\d{3})(?:[ \t]|$)")
_DSN = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:[ \t]+|$)")
_UNSUPPORTED = frozenset({
    "hold", "discard", "filter", "prepend", "redirect", "warn", "bcc", "info",
    "reject_unverified_recipient", "reject_unauth_destination",
})


def invalid(reason: str) -> Action:
    return Action(Kind.INVALID, TEMPFAIL, reason)


def _reply(code: int, text: str) -> Reply:
    text = text.strip()
    klass = str(code)[0]
    match = _DSN.match(text)
    if match:
        status = f"{klass}.{match.group(2)}.{match.group(3)}"  # smtpd_dsn_fix: class follows code
        text = text[match.end():]
    else:
        status = f"{klass}.7.1"
    return Reply(code, status, text or DEFAULT_TEXT)


def parse(value: str | None) -> Action:
    if value is None:
        return invalid("no value")
    text = value.strip()
    if not text:
        return invalid("empty value")
    word, _, rest = text.partition(" ")
    if "\t" in word:
        word, _, more = word.partition("\t")
        rest = f"{more} {rest}".strip()
    keyword = word.lower()
    if keyword in ("ok", "permit"):
        return _OK if not rest.strip() else invalid(f"{word} takes no text: {text!r}")
    if keyword == "dunno":
        return _DUNNO if not rest.strip() else invalid(f"{word} takes no text: {text!r}")
    if text.isdigit():
        return _OK  # access(5): an all-numerical result is treated as OK
    if keyword == "reject":
        return Action(Kind.REJECT, _reply(REJECT_CODE, rest))
    if keyword in ("defer", "defer_if_permit", "defer_if_reject"):
        return Action(Kind(keyword), _reply(DEFER_CODE, rest))
    match = _NUMERIC.match(text)
    if match:
        code = int(match.group(1))
        kind = Kind.DEFER if code < 500 else Kind.REJECT
        return Action(kind, _reply(code, match.group(2) or ""))
    if _CODE.match(text):
        return invalid(f"reply code {text[:3]} is not 4NN or 5NN")
    if keyword in _UNSUPPORTED or keyword.startswith(("reject_", "permit_", "check_")):
        return invalid(f"action {word!r} is not supported by smtpgate")
    return invalid(f"unknown action {word!r}")
