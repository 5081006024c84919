"""proxy_header - the PROXY protocol header a load balancer puts before the SMTP dialogue.

SYNOPSIS
    expects_header(peer_ip, mode, trusted) -> bool
    await read_header(reader, mode, timeout=5.0) -> ProxiedAddresses | str | None
    SocketReader(sock)          a reader that takes from the socket exactly what is asked

DESCRIPTION
    Behind a load balancer (HAProxy, nginx, AWS NLB) every connection comes
    from the balancer; the PROXY header (v1 text or v2 binary) says who the
    client really is. Only peers in proxy_trusted may send one, and they
    must: mode `v1` or `v2` accepts that version only, `auto` either. Other
    peers are ordinary clients; a PROXY line from them is just an unknown
    command. A v2 LOCAL header (the balancer's own health check) keeps the
    balancer's address. The parser is aiosmtpd's (both versions, with TLVs);
    the 5 s timeout is postscreen's postscreen_upstream_proxy_timeout.

    On 25 and 587 the reader is the session's Wire. On 465 the header comes
    before the TLS handshake, so it is read from the bare socket with
    SocketReader, which never reads past the header: what follows is the
    handshake, for TLS to read whole (smtpgate.smtp.implicit_tls).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import V2_CMD, get_proxy


@dataclass(frozen=True, slots=True)
class ProxiedAddresses:
    client_ip: str
    client_port: int
    local_ip: str
    local_port: int


def expects_header(peer_ip: str, mode: str, trusted: Sequence) -> bool:
    if mode == "off":
        return False
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    return any(address in network for network in trusted)


async def read_header(reader: asyncio.StreamReader, mode: str,
                      timeout: float = 5.0) -> ProxiedAddresses | str | None:
    """The client's addresses; None to keep the peer's (LOCAL); a str says what was wrong."""
    try:
        async with asyncio.timeout(timeout):
            data = await get_proxy(reader)
    except TimeoutError:
        return "no PROXY header within the timeout"
    except asyncio.IncompleteReadError:
        return "connection closed before the PROXY header"
    if not data.valid:
        return data.error or "malformed PROXY header"
    if mode in ("v1", "v2") and data.version != int(mode[1]):
        return f"PROXY v{data.version} header where {mode} is configured"
    if data.version == 2 and data.command == V2_CMD.LOCAL:
        return None
    if data.src_addr is None or data.src_port is None:
        return "PROXY header without a client address (UNKNOWN or UNIX)"
    return ProxiedAddresses(str(data.src_addr), int(data.src_port), str(data.dst_addr),
                            int(data.dst_port or 0))


PROXY_V1_LONGEST = 107  # the v1 line's longest, CRLF included


class SocketReader:
    """aiosmtpd's AsyncReader over a non-blocking socket, reading no byte it was not asked for."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def readexactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = await self.read(n - len(data))
            if not piece:
                raise asyncio.IncompleteReadError(data, n)
            data += piece
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = b""
        while not data.endswith(separator):  # a byte at a time: the kernel keeps the rest
            if len(data) >= PROXY_V1_LONGEST:
                raise asyncio.IncompleteReadError(data, None)
            data += await self.readexactly(1)
        return data

    async def read(self, n: int = -1) -> bytes:
        if n <= 0:
            raise ValueError("SocketReader reads a known number of bytes")
        try:
            return await self._loop.sock_recv(self.sock, n)
        except OSError:
            return b""  # reset: the parser reports the header as cut short
