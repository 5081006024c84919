"""xclient - who the client is, said to Postfix in one XCLIENT command.

SYNOPSIS
    ClientIdentity(addr, port, name, helo, proto, login, destaddr, destport)
    xclient_command(identity, offered: frozenset[str]) -> bytes
    xtext(value) -> str ; xclient_address(addr) -> str

DESCRIPTION
    Postfix 3.x accepts a single XCLIENT per connection (a second one gets
    550 5.7.0 insufficient authorization), so a Postfix connection speaks
    for one client. The command carries only the attributes Postfix
    offered, xtext-encoded, most important first, and stays under the
    512-byte command line limit: a long HELO is left out rather than push
    out what Postfix's checks need.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

XCLIENT_MAX = 510  # RFC 5321 command line limit (512) less CRLF
_AS_IS = re.compile(r"[!-*,-<>-~]*")  # printable ASCII (33-126) but "+" (43) and "=" (61)


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    addr: str
    port: int
    name: str  # verified client hostname, or "[UNAVAILABLE]" / "[TEMPUNAVAIL]"
    helo: str
    proto: str  # SMTP or ESMTP
    login: str | None = None
    destaddr: str | None = None
    destport: int | None = None


def xtext(value: str) -> str:
    """RFC 3461 xtext: printable ASCII except '+' and '=' as is, the rest as +XX."""
    if _AS_IS.fullmatch(value):  # a hostname, an address, a port: every hand-off's case
        return value
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (43, 61):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xclient_address(addr: str) -> str:
    if ":" not in addr:  # IPv4 (or not an address): written as it came
        return addr
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    return f"IPV6:{ip.compressed}" if ip.version == 6 else str(ip)


def xclient_command(identity: ClientIdentity, offered: frozenset[str]) -> bytes:
    """One XCLIENT line with what Postfix offers, most important attributes first."""
    wanted = [
        ("ADDR", xclient_address(identity.addr)),
        ("PORT", str(identity.port)),
        ("NAME", identity.name),
        ("PROTO", identity.proto),
        ("LOGIN", identity.login),
        ("HELO", identity.helo),
        ("DESTADDR", xclient_address(identity.destaddr) if identity.destaddr else None),
        ("DESTPORT", str(identity.destport) if identity.destport else None),
    ]
    # one look at all the values together: a hostname, an address, a port need no xtext
    plain = _AS_IS.fullmatch("".join(value for _, value in wanted if value is not None))
    line = "XCLIENT"
    for name, value in wanted:
        if value is None or name not in offered:
            continue
        part = f" {name}={value if plain else xtext(value)}"
        if len(line) + len(part) > XCLIENT_MAX:
            continue  # a long HELO must not push out what Postfix's checks need
        line += part
    return line.encode("ascii") + b"\r\n"
