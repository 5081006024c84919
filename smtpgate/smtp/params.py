"""params - the MAIL and RCPT parameters smtpgate offers, checked as Postfix's smtpd checks them.

SYNOPSIS
    mail_params_reply(params, size_limit, offered=ALL_OFFERED) -> Reply | None
    rcpt_params_reply(params, offered=ALL_OFFERED) -> Reply | None

DESCRIPTION
    Postfix receives the envelope only when the message is complete, so a
    parameter it would refuse must be refused here, at MAIL or RCPT, with
    its words; otherwise the client hears 250 and the refusal comes too
    late. smtpgate offers SIZE, 8BITMIME, DSN and SMTPUTF8 (and AUTH=
    after AUTH), not CHUNKING or BINARYMIME; `offered` is the part of
    8BITMIME, DSN and SMTPUTF8 still offered because the next hop carries
    it (smtpgate.smtp.gate). A parameter of an extension not offered is
    refused as Postfix refuses it when it does not offer it either:
    SMTPUTF8 "555 5.5.4 Unsupported option: SMTPUTF8", RET ENVID NOTIFY
    ORCPT "501 5.7.1 DSN support is disabled". BODY=8BITMIME stays
    accepted: Postfix takes it even with 8BITMIME not announced.

    SIZE=n             digits, not over message_size_limit
                         501 5.5.4 Bad message size syntax
                         552 5.3.4 Message size exceeds fixed limit
    BODY=7BIT|8BITMIME   555 5.5.4 Unsupported option: BODY=...
    RET=FULL|HDRS        501 5.5.4 Bad RET parameter syntax
    ENVID=xtext          at most 100 characters once decoded (RFC 3461)
                         501 5.5.4 Bad ENVID parameter syntax
    AUTH=xtext           accepted as Postfix does (the login is ours)
    SMTPUTF8             no value
    NOTIFY=NEVER | SUCCESS,FAILURE,DELAY (any of the three, once each)
                         501 5.5.4 Error: Bad NOTIFY parameter syntax
    ORCPT=type;xtext     type an atom (rfc822, utf-8 ...), xtext valid
                         501 5.5.4 Error: Bad ORCPT parameter syntax
    anything else        555 5.5.4 Unsupported option: NAME
"""

from __future__ import annotations

import re

from smtpgate import replies
from smtpgate.verdict import Reply

_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})

BAD_SIZE = Reply(501, "5.5.4", "Bad message size syntax")
BAD_RET = Reply(501, "5.5.4", "Bad RET parameter syntax")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter syntax")
BAD_NOTIFY = Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
BAD_ORCPT = Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax")
DSN_DISABLED = Reply(501, "5.7.1", "DSN support is disabled")
ALL_OFFERED = frozenset({"8BITMIME", "DSN", "SMTPUTF8"})
DSN_PARAMS = frozenset({"RET", "ENVID", "NOTIFY", "ORCPT"})


def xtext_length(value: str) -> int | None:
    """The decoded length of an RFC 3461 xtext, None when it is not one."""
    raw = value.encode("utf-8", "surrogateescape")
    if _XTEXT.fullmatch(raw) is None:
        return None
    return len(raw) - 2 * raw.count(b"+")


def mail_params_reply(params: dict[str, str | None], size_limit: int,
                      offered: frozenset[str] = ALL_OFFERED) -> Reply | None:
    for name, value in params.items():
        if name in DSN_PARAMS and "DSN" not in offered:
            return DSN_DISABLED
        if name == "SIZE":
            if value is None or not value.isdigit():
                return BAD_SIZE
            if size_limit and int(value) > size_limit:
                return replies.SIZE_TOO_BIG
        elif name == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return replies.unsupported_option(f"BODY={value}" if value else "BODY")
        elif name == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return BAD_RET
        elif name == "ENVID":
            length = xtext_length(value or "")
            if not value or length is None or length > 100:
                return BAD_ENVID
        elif name == "AUTH":
            if not value or xtext_length(value) is None:
                return replies.unsupported_option(name)
        elif name == "SMTPUTF8":
            if value is not None or "SMTPUTF8" not in offered:
                return replies.unsupported_option(name)
        else:
            return replies.unsupported_option(name)
    return None


def rcpt_params_reply(params: dict[str, str | None],
                      offered: frozenset[str] = ALL_OFFERED) -> Reply | None:
    for name, value in params.items():
        if name in DSN_PARAMS and "DSN" not in offered:
            return DSN_DISABLED
        if name == "NOTIFY":
            words = (value or "").upper().split(",")
            if words != ["NEVER"] and (not NOTIFY_WORDS.issuperset(words)
                                       or len(set(words)) != len(words)):
                return BAD_NOTIFY
        elif name == "ORCPT":
            kind, sep, address = (value or "").partition(";")
            if not sep or not _ADDR_TYPE.fullmatch(kind) or not address \
                    or xtext_length(address) is None:
                return BAD_ORCPT
        else:
            return replies.unsupported_option(name)
    return None
