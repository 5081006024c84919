"""relay - the before-queue hand-off of one client session to Postfix, with XCLIENT.

SYNOPSIS
    ClientIdentity(addr, port, name, helo, proto, login, destaddr, destport)
    await NextHop.open(hop, identity, timeout, ehlo_name) -> NextHop
    await next_hop.command(line: bytes) -> HopReply
    await next_hop.commands(lines: list[bytes]) -> list[HopReply]   (pipelined)
    next_hop.send_data(chunk: bytes); await next_hop.drain()
    await next_hop.finish_data() -> HopReply
    next_hop.abort()
    RelayError

DESCRIPTION
    One NextHop is one connection to Postfix that speaks for one client
    session: Postfix 3.x accepts a single XCLIENT per connection, so a
    connection cannot be shared between clients, but it serves every
    transaction of its client.

    open() connects, reads the banner, says EHLO, sends one XCLIENT with the
    attributes Postfix offers (xtext-encoded, the command kept under 512
    bytes), reads Postfix's new 220 and says EHLO again as the client's HELO
    name. Every reply Postfix gives later is returned whole (HopReply.raw)
    so the session can pass it to the client unchanged: that is how an
    rspamd milter reject reaches the client as rspamd wrote it.

    Any failure to talk to Postfix (refused, closed, timed out, a 4xx/5xx to
    XCLIENT) raises RelayError; the session answers 451 4.3.0 and never 250.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from smtpgate.config import HostPort

XCLIENT_MAX = 510  # RFC 5321 command line limit (512) less CRLF


class RelayError(Exception):
    """Postfix could not take the message now."""


@dataclass(frozen=True, slots=True)
class HopReply:
    code: int
    raw: bytes  # every line with its CRLF, ready to pass on

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace").strip()


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
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (43, 61):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xclient_address(addr: str) -> str:
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
    line = "XCLIENT"
    for name, value in wanted:
        if value is None or name not in offered:
            continue
        part = f" {name}={xtext(value)}"
        if len(line) + len(part) > XCLIENT_MAX:
            continue  # a long HELO must not push out what Postfix's checks need
        line += part
    return line.encode("ascii") + b"\r\n"


class NextHop:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self.pipelining = False
        self.closed = False

    @classmethod
    async def open(cls, hop: HostPort, identity: ClientIdentity, timeout: float,
                   ehlo_name: str) -> NextHop:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(hop.host, hop.port, limit=65536), timeout)
        except (OSError, TimeoutError) as exc:
            raise RelayError(f"connect to {hop}: {exc or 'timed out'}") from None
        self = cls(reader, writer, timeout)
        try:
            await self._expect(await self._read_reply(), 220, "banner")
            features = await self._ehlo(ehlo_name)
            offered = _xclient_attributes(features)
            if not offered:
                raise RelayError(f"{hop} does not offer XCLIENT to this host"
                                 " (smtpd_authorized_xclient_hosts)")
            reply = await self.command(xclient_command(identity, offered))
            await self._expect(reply, 220, "XCLIENT")
            features = await self._ehlo(identity.helo or ehlo_name)
            self.pipelining = "PIPELINING" in features
        except BaseException:
            self.abort()
            raise
        return self

    async def _ehlo(self, name: str) -> dict[str, str]:
        reply = await self.command(b"EHLO " + name.encode("utf-8", "replace") + b"\r\n")
        await self._expect(reply, 250, "EHLO")
        features = {}
        for line in reply.raw.split(b"\r\n")[1:]:
            keyword, _, params = line[4:].decode("ascii", "replace").partition(" ")
            if keyword:
                features[keyword.upper()] = params
        return features

    async def _expect(self, reply: HopReply, code: int, what: str) -> None:
        if reply.code != code:
            raise RelayError(f"{what}: {reply.text}")

    async def command(self, line: bytes) -> HopReply:
        return (await self.commands([line]))[0]

    async def commands(self, lines: list[bytes]) -> list[HopReply]:
        """Send several commands at once (PIPELINING) and read a reply for each."""
        if self.closed:
            raise RelayError("connection to the next hop is closed")
        self._writer.write(b"".join(lines))
        return [await self._read_reply() for _ in lines]

    def send_data(self, chunk: bytes) -> None:
        if not self.closed:
            self._writer.write(chunk)

    def needs_drain(self) -> bool:
        return not self.closed and self._writer.transport.get_write_buffer_size() > 262144

    async def drain(self) -> None:
        if self.closed:
            return
        try:
            await asyncio.wait_for(self._writer.drain(), self._timeout)
        except (OSError, TimeoutError):
            self.abort()

    async def finish_data(self) -> HopReply:
        self.send_data(b".\r\n")
        return await self._read_reply()

    async def _read_reply(self) -> HopReply:
        if self.closed:
            raise RelayError("connection to the next hop is closed")
        lines = []
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    line = await self._reader.readuntil(b"\n")
                    if not line.endswith(b"\r\n"):
                        line = line[:-1] + b"\r\n"
                    lines.append(line)
                    if len(line) < 4 or line[3:4] != b"-":
                        break
        except (OSError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            self.abort()
            raise RelayError(f"next hop: {type(exc).__name__}") from None
        code_text = lines[0][:3]
        if not code_text.isdigit():
            self.abort()
            raise RelayError(f"next hop sent a malformed reply {lines[0][:40]!r}")
        return HopReply(int(code_text), b"".join(lines))

    async def quit(self) -> None:
        if self.closed:
            return
        try:
            self._writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self._reader.read(1024), 1.0)
        except (OSError, TimeoutError):
            pass
        self.abort()

    def abort(self) -> None:
        """Close without QUIT: Postfix throws away a transaction it did not finish."""
        if not self.closed:
            self.closed = True
            self._writer.transport.abort()


def _xclient_attributes(features: dict[str, str]) -> frozenset[str]:
    if "XCLIENT" not in features:
        return frozenset()
    return frozenset(features["XCLIENT"].upper().split())
