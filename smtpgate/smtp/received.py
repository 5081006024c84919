"""received - the Received header smtpgate writes, so TLS and AUTH facts travel with the message.

SYNOPSIS
    received_header(helo, client_name, client_ip, hostname, *, esmtp, tls, login, recipients,
                    when) -> bytes

DESCRIPTION
    XCLIENT can tell Postfix the client's address, name and HELO, but not
    that the client used TLS or authenticated: Postfix's own Received
    header says `with ESMTP` either way. So smtpgate adds its own, in
    Postfix's shape, before the message goes on:

        Received: from client.example.org (host.example.org [192.0.2.1])
                (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
                by mx.example.com (smtpgate) with ESMTPSA
                for <user@example.com>; Sun, 29 Nov 2026 12:00:00 +0000

    The protocol is RFC 3848's: SMTP or ESMTP, with S for TLS and A for
    AUTH. `for` is given for a single recipient only, as Postfix does, so
    the header never lists a message's other recipients. The login is not
    written (Postfix's smtpd_sasl_authenticated_header is off by default).
"""

from __future__ import annotations

import datetime
import email.utils


def received_header(helo: str, client_name: str, client_ip: str, hostname: str, *, esmtp: bool,
                    tls: tuple[str, str, int] | None, login: bool,
                    recipients: tuple[str, ...], when: datetime.datetime) -> bytes:
    # RFC 3848 names TLS and AUTH on ESMTP only (both need EHLO)
    base = "ESMTP" if esmtp or tls or login else "SMTP"
    protocol = base + ("S" if tls else "") + ("A" if login else "")
    address = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    lines = [f"Received: from {_clean(helo) or 'unknown'} ({client_name} [{address}])"]
    if tls is not None:
        version, cipher, bits = tls
        lines.append(f"\t(using {version} with cipher {cipher} ({bits}/{bits} bits))")
    by = f"\tby {hostname} (smtpgate) with {protocol}"
    if len(recipients) == 1:
        lines.append(by)
        lines.append(f"\tfor <{_clean(recipients[0])}>; {date(when)}")
    else:
        lines.append(f"{by}; {date(when)}")
    return "\r\n".join(lines).encode("utf-8", "replace") + b"\r\n"


def date(when: datetime.datetime) -> str:
    """RFC 5322's date, made once per second: every message of that second has the same."""
    key = (int(when.timestamp()), when.tzinfo)
    if _last_date[0] != key:
        _last_date[:] = [key, email.utils.format_datetime(when.replace(microsecond=0))]
    return _last_date[1]


_last_date: list = [None, ""]


def _clean(text: str) -> str:
    # the header must stay one header: no control characters from the client
    if text.isascii() and text.isprintable():  # a hostname, an address: nothing to replace
        return text
    return "".join(ch if ch >= " " and ch != "\x7f" else "?" for ch in text)
