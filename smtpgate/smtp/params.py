"""params - MAIL and RCPT parameters, split and checked word by word as Postfix 3.7's smtpd does.

SYNOPSIS
    BLANKS                          the characters that separate parameters
    split_words(text) -> list[str]
    declares_smtputf8(words) -> bool
    mail_params_reply(words, size_limit, offered=ALL_OFFERED, room=None) -> Reply | None
    rcpt_params_reply(words, offered=ALL_OFFERED) -> Reply | None

DESCRIPTION
    Postfix receives the envelope only when the message is complete, and it
    gets the client's MAIL and RCPT lines as they came; so a parameter it
    would refuse must be refused here, at MAIL or RCPT, with its words,
    or the client hears 250 and the refusal comes after the whole message.
    What follows is Postfix 3.7's smtpd.c (smtpd_token(), mail_cmd(),
    rcpt_cmd()), rule for rule:

    - Words are separated by Postfix's ISSPACE in the C locale: SP, HT, LF,
      VT, FF, CR (BLANKS). Nothing else separates: \\x1c-\\x1f, NBSP and
      other Unicode spaces are part of a word, so `SIZE=1\\x1fBODY=7BIT` is
      one SIZE word and gets "501 5.5.4 Bad message size syntax".
    - SMTPUTF8 counts only as a parameter word of its own (any case), never
      as text elsewhere in the line, and only while SMTPUTF8 is offered.
    - A word is matched by its prefix and checked in order, the first
      refusal wins; keywords are not checked for syntax, repeats are
      allowed where Postfix allows them (SIZE, BODY, NOTIFY's words) and
      refused where it refuses them (RET, ENVID, NOTIFY, ORCPT: their
      syntax reply; AUTH: "503 5.5.4 Error: multiple AUTH= options").

    MAIL:
    BODY=7BIT | BODY=8BITMIME    (whole word, any case)
    SIZE=digits                  else 501 5.5.4 Bad message size syntax;
                                 the last one counts
    SMTPUTF8                     when offered
    AUTH=anything                Postfix (built with SASL) takes it with SASL
                                 off as well, and ignores "<>"; a second
                                 other one: 503 5.5.4 Error: multiple AUTH= options
    RET=FULL|HDRS                once; else 501 5.5.4 Bad RET parameter syntax
    ENVID=xtext                  once, decoding to printable ASCII; else
                                 501 5.5.4 Bad ENVID parameter syntax
    anything else                555 5.5.4 Unsupported option: WORD
    then: SIZE over size_limit   552 5.3.4 Message size exceeds fixed limit
          SIZE over room         452 4.3.1 Insufficient system storage
                                 (room: what the worker's spool budget has
                                 left, smtpgate.smtp.spool_budget; Postfix's
                                 words for a queue without space)

    RCPT:
    NOTIFY=NEVER | any of SUCCESS,FAILURE,DELAY    once; else
                                 501 5.5.4 Error: Bad NOTIFY parameter syntax
    ORCPT=type;xtext             once, a type, xtext (uxtext for utf-8);
                                 else 501 5.5.4 Error: Bad ORCPT parameter syntax
    anything else                555 5.5.4 Unsupported option: WORD

    A DSN parameter while DSN is not offered (the next hop does not carry
    it, smtpgate.smtp.gate) gets "501 5.7.1 DSN support is disabled", and
    SMTPUTF8 while it is not offered is an unsupported option, as Postfix
    says when it does not offer them either. BODY=8BITMIME stays accepted
    without 8BITMIME offered, as in Postfix.

    A word shown in a reply has its control characters replaced by "?"
    (smtpgate.verdict.Reply), so a reply stays one line.
"""

from __future__ import annotations

import re

from smtpgate import replies
from smtpgate.verdict import Reply

BLANKS = " \t\n\v\f\r"
_SPLIT = re.compile(r"[ \t\n\v\f\r]+")
_UXTEXT_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]*)\}")
_HEX = frozenset("0123456789abcdefABCDEF")
NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
OFF_T_MAX = 2 ** 63 - 1

BAD_SIZE = Reply(501, "5.5.4", "Bad message size syntax")
SIZE_OVERFLOW = Reply(552, "5.3.4", "Message size exceeds file system imposed limit")
BAD_RET = Reply(501, "5.5.4", "Bad RET parameter syntax")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter syntax")
BAD_NOTIFY = Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
BAD_ORCPT = Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax")
DSN_DISABLED = Reply(501, "5.7.1", "DSN support is disabled")
MULTIPLE_AUTH = Reply(503, "5.5.4", "Error: multiple AUTH= options")
ALL_OFFERED = frozenset({"8BITMIME", "DSN", "SMTPUTF8"})


def split_words(text: str) -> list[str]:
    """The words of `text` as Postfix's smtpd_token() separates them."""
    return [word for word in _SPLIT.split(text) if word]


def declares_smtputf8(words: list[str] | tuple[str, ...]) -> bool:
    return any(word.upper() == "SMTPUTF8" for word in words)


def xtext_decode(value: str) -> str | None:
    """Postfix's xtext_unquote(): "+XX" (hex, any case) decoded, any other character kept;
    None for a "+" without two hex digits."""
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            pair = value[i + 1:i + 3]
            if len(pair) != 2 or not _HEX.issuperset(pair):
                return None
            out.append(chr(int(pair, 16)))
            i += 3
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def uxtext_valid(value: str) -> bool:
    """Postfix's uxtext_unquote() succeeds: every "\\x{" is closed by "}" after hex digits
    worth at most U+10FFFF."""
    start = 0
    while (at := value.find("\\x{", start)) >= 0:
        found = _UXTEXT_ESCAPE.match(value, at)
        if found is None or int(found.group(1) or "0", 16) > 0x10FFFF:
            return False
        start = found.end()
    return True


def _unsupported(word: str) -> Reply:
    return replies.unsupported_option(word)  # shown with "?" for controls (verdict.Reply)


def mail_params_reply(words: list[str] | tuple[str, ...], size_limit: int,
                      offered: frozenset[str] = ALL_OFFERED,
                      room: int | None = None) -> Reply | None:
    dsn = "DSN" in offered
    size = 0
    seen: set[str] = set()
    for word in words:
        upper = word.upper()
        if upper in ("BODY=8BITMIME", "BODY=7BIT"):
            continue
        if upper.startswith("SIZE="):
            if not word[5:].isascii() or not word[5:].isdigit():
                return BAD_SIZE
            size = int(word[5:])
            if size > OFF_T_MAX:
                return SIZE_OVERFLOW
        elif upper == "SMTPUTF8" and "SMTPUTF8" in offered:
            continue
        elif upper.startswith("AUTH="):
            if word[5:] != "<>":
                if "AUTH" in seen:
                    return MULTIPLE_AUTH
                seen.add("AUTH")
        elif upper.startswith("RET="):
            if not dsn:
                return DSN_DISABLED
            if "RET" in seen or upper[4:] not in ("FULL", "HDRS"):
                return BAD_RET
            seen.add("RET")
        elif upper.startswith("ENVID="):
            if not dsn:
                return DSN_DISABLED
            decoded = xtext_decode(word[6:])
            if "ENVID" in seen or not decoded or not _printable_ascii(decoded):
                return BAD_ENVID
            seen.add("ENVID")
        else:
            return _unsupported(word)
    if size_limit and size > size_limit:
        return replies.SIZE_TOO_BIG
    if room is not None and size > room:
        return replies.INSUFFICIENT_STORAGE
    return None


def rcpt_params_reply(words: list[str] | tuple[str, ...],
                      offered: frozenset[str] = ALL_OFFERED) -> Reply | None:
    dsn = "DSN" in offered
    seen: set[str] = set()
    for word in words:
        upper = word.upper()
        if upper.startswith("NOTIFY="):
            if not dsn:
                return DSN_DISABLED
            if "NOTIFY" in seen or not _notify_valid(upper[7:]):
                return BAD_NOTIFY
            seen.add("NOTIFY")
        elif upper.startswith("ORCPT="):
            if not dsn:
                return DSN_DISABLED
            kind, sep, address = word[6:].partition(";")
            decodes = (uxtext_valid(address) if kind.lower() == "utf-8"
                       else xtext_decode(address) is not None)
            if "ORCPT" in seen or not sep or not kind or not decodes:
                return BAD_ORCPT
            seen.add("ORCPT")
        else:
            return _unsupported(word)
    return None


def _notify_valid(value: str) -> bool:
    """dsn_notify_mask(): names split at commas and blanks, NEVER alone, at least one."""
    names = {name for name in re.split(r"[, \t\r\n]+", value) if name}
    if not names or not names <= NOTIFY_WORDS | {"NEVER"}:
        return False
    return names == {"NEVER"} or "NEVER" not in names


def _printable_ascii(text: str) -> bool:
    return all(" " <= ch < "\x7f" for ch in text)
