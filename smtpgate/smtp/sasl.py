"""sasl - what AUTH's responses mean: PLAIN and LOGIN, base64, the client's cancel.

SYNOPSIS
    MECHANISMS                                  PLAIN, LOGIN: the challenges each asks
    decode_response(text) -> bytes | Reply      a response, or the reply refusing it
    as_plain(mechanism, responses) -> bytes     what the authenticator is given
    login_of(plain) -> str                      the authentication identity in it

DESCRIPTION
    RFC 4954's responses, read as Postfix's smtpd reads them: `*` cancels
    (501 5.7.0), `=` is an empty initial response, anything else must be
    strict base64 (501 5.5.2 otherwise). PLAIN takes one response (the
    initial one, or one asked for with an empty 334); LOGIN two, asked
    for as `Username:` and `Password:`, and is handed on as the PLAIN
    string it amounts to. Reading the lines is AUTH's exchange's
    (smtpgate.smtp.auth_exchange); nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii

from smtpgate import replies
from smtpgate.verdict import Reply

# each mechanism's challenges, in order; an initial response answers the first
MECHANISMS = {"PLAIN": ("",), "LOGIN": ("VXNlcm5hbWU6", "UGFzc3dvcmQ6")}


def decode_response(text: str) -> bytes | Reply:
    if text == "*":
        return replies.AUTH_CANCELLED
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return replies.AUTH_BAD_BASE64


def as_plain(mechanism: str, responses: list[bytes]) -> bytes:
    if mechanism == "LOGIN":
        user, password = responses
        return b"\0" + user + b"\0" + password
    return responses[0]


def login_of(plain: bytes) -> str:
    """authcid of `authzid NUL authcid NUL password`; empty when it is not that shape."""
    return plain.split(b"\0")[1].decode("utf-8", "replace") if plain.count(b"\0") == 2 else ""
