"""relay - the before-queue hand-off of one client session to Postfix, with XCLIENT.

SYNOPSIS
    ClientIdentity(addr, port, name, helo, proto, login, destaddr, destport)
    await NextHop.open(hop, identity, timeout, ehlo_name, pool=None) -> NextHop
    HopPool(hop, timeout, ehlo_name, size=4, max_age=60.0); pool.close()
    await next_hop.command(line: bytes) -> HopReply
    await next_hop.commands(lines: list[bytes]) -> list[HopReply]   (pipelined)
    next_hop.send_data(chunk: bytes); await next_hop.drain()
    await next_hop.finish_data(rest=b"") -> HopReply
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
import time
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
        self.offered: frozenset[str] = frozenset()
        self.greeted_at = 0.0

    @classmethod
    async def greeted(cls, hop: HostPort, timeout: float, ehlo_name: str) -> NextHop:
        """A connection that has read the banner and said EHLO: ready for XCLIENT."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(hop.host, hop.port, limit=65536), timeout)
        except (OSError, TimeoutError) as exc:
            raise RelayError(f"connect to {hop}: {exc or 'timed out'}") from None
        self = cls(reader, writer, timeout)
        try:
            await self._expect(await self._read_reply(), 220, "banner")
            self.offered = _xclient_attributes(await self._ehlo(ehlo_name))
            if not self.offered:
                raise RelayError(f"{hop} does not offer XCLIENT to this host"
                                 " (smtpd_authorized_xclient_hosts)")
        except BaseException:
            self.abort()
            raise
        self.greeted_at = time.monotonic()
        return self

    @classmethod
    async def open(cls, hop: HostPort, identity: ClientIdentity, timeout: float,
                   ehlo_name: str, pool: HopPool | None = None) -> NextHop:
        self = await pool.take() if pool is not None else None
        if self is not None:
            try:
                await self._impersonate(identity, ehlo_name)
                return self
            except RelayError:
                pass  # Postfix closed the idle connection meanwhile: a fresh one decides
        self = await cls.greeted(hop, timeout, ehlo_name)
        await self._impersonate(identity, ehlo_name)
        return self

    async def _impersonate(self, identity: ClientIdentity, ehlo_name: str) -> None:
        try:
            reply = await self.command(xclient_command(identity, self.offered))
            await self._expect(reply, 220, "XCLIENT")
            features = await self._ehlo(identity.helo or ehlo_name)
            self.pipelining = "PIPELINING" in features
        except BaseException:
            self.abort()
            raise

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

    async def finish_data(self, rest: bytes = b"") -> HopReply:
        self.send_data(rest + b".\r\n")
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

    def peer_closed(self) -> bool:
        # a stray byte from an idle Postfix is its goodbye (421 timeout): not one to use
        return self._reader.at_eof() or bool(self._reader._buffer)

    def close_quietly(self) -> None:
        """QUIT without waiting for the answer: for idle connections, so Postfix logs no
        "lost connection"."""
        if not self.closed:
            self.closed = True
            self._writer.write(b"QUIT\r\n")
            self._writer.close()

    def abort(self) -> None:
        """Close without QUIT: Postfix throws away a transaction it did not finish."""
        if not self.closed:
            self.closed = True
            self._writer.transport.abort()


class HopPool:
    """A few connections to Postfix opened and greeted ahead of need.

    A client session then costs Postfix only XCLIENT and EHLO before MAIL: the connect,
    the banner and the first EHLO happened while nobody waited. Each idle connection holds
    one Postfix smtpd process, so the pool stays small, and a connection older than
    max_age is closed rather than risk Postfix's own idle timeout.
    """

    def __init__(self, hop: HostPort, timeout: float, ehlo_name: str, size: int = 4,
                 max_age: float = 60.0) -> None:
        self.hop, self.timeout, self.ehlo_name = hop, timeout, ehlo_name
        self.size, self.max_age = size, max_age
        self._idle: list[NextHop] = []
        self._filling = 0
        self._tasks: set[asyncio.Task] = set()

    async def take(self) -> NextHop | None:
        now = time.monotonic()
        found = None
        while self._idle and found is None:
            hop = self._idle.pop()
            if hop.closed or hop.peer_closed():
                hop.abort()
            elif now - hop.greeted_at > self.max_age:
                hop.close_quietly()
            else:
                found = hop
        self._refill()
        return found

    def _refill(self) -> None:
        while len(self._idle) + self._filling < self.size:
            self._filling += 1
            task = asyncio.get_running_loop().create_task(self._open_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open_one(self) -> None:
        try:
            self._idle.append(await NextHop.greeted(self.hop, self.timeout, self.ehlo_name))
        except RelayError:
            pass  # Postfix is down: the session that needs it will say 451
        finally:
            self._filling -= 1

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for hop in self._idle:
            hop.close_quietly()
        self._idle.clear()


def _xclient_attributes(features: dict[str, str]) -> frozenset[str]:
    if "XCLIENT" not in features:
        return frozenset()
    return frozenset(features["XCLIENT"].upper().split())
