"""next_hop - one complete message handed to Postfix with XCLIENT, in as few round trips as it can.

SYNOPSIS
    await NextHop.greeted(hop, timeouts, ehlo_name) -> NextHop    banner read, EHLO said
    await next_hop.deliver(identity, envelope, chunks, size, end=None) -> HopReply
    Envelope(mail_line, rcpt_lines)
    HopReply(code, raw) ; reply.ok
    next_hop.abort() ; next_hop.close_quietly() ; next_hop.peer_closed()
    RelayError ; HandOffOverdue (a RelayError: the hand-off's deadline `end` passed)

DESCRIPTION
    The session calls deliver() only once it holds the whole message, so a
    Postfix smtpd process is busy for the hand-off alone, never while a
    client types (Postfix's own before-queue proxy calls that
    speed_adjust). The connection speaks for one client (one XCLIENT per
    connection in Postfix 3.x) and is closed with QUIT after the message.

    Round trips, each one write: XCLIENT; EHLO as the client's HELO name;
    then, for a message to one recipient (the usual case), MAIL, RCPT and
    `BDAT n LAST` with the message and QUIT together when Postfix offers
    PIPELINING and CHUNKING (three round trips in all), or MAIL, RCPT and
    DATA together and, after 354, the dot-stuffed message, the final dot
    and QUIT. XCLIENT and EHLO each end a group (Postfix starts the
    session over after XCLIENT and checks that nothing came before its
    220; EHLO is a command after which RFC 2920 lets nothing follow), so
    only RFC-conforming pipelining is used and a Postfix with
    smtpd_forbid_unauth_pipelining keeps working. With one recipient a
    refusal cannot lose part of the message: a refused MAIL or RCPT leaves
    no valid recipient, Postfix refuses BDAT or DATA (skipping BDAT's
    payload, which RFC 3030 lets a client send pipelined) and queues
    nothing, and the client hears the first refusal. With several, MAIL
    and every RCPT go first, and the message is sent only when Postfix
    accepted the sender and every recipient: a recipient refused here,
    though smtpgate had accepted it, makes the whole message fail with
    Postfix's refusal (its code and text), so the client never hears 250
    for a message that lost a recipient; the transaction is reset and
    nothing is queued.

    Postfix's answer to the message (an rspamd milter reject included) is
    returned whole, to be passed to the client unchanged. Any failure to
    talk to Postfix (refused, closed, timed out, a 4xx/5xx to XCLIENT or
    EHLO, a malformed reply) raises RelayError: the session answers 451
    4.3.0 and never 250.

    Each step has its own time limit (smtpgate.relay.hop_timeouts: the
    connect, each reply, the reply to the end of the message); the
    RelayError of one missed names the step. The limits are deadlines
    followed by one timer per connection, re-armed only when it fires
    early, so a reply costs no timer of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import NamedTuple

from smtpgate.config import HostPort
from smtpgate.flow_control import WriteFlow
from smtpgate.relay.hop_timeouts import HopTimeouts
from smtpgate.relay.xclient import ClientIdentity, xclient_command

READ_HIGH = 1 << 20  # a reply longer than this is not Postfix talking


class RelayError(Exception):
    """Postfix could not take the message now."""


class HandOffOverdue(RelayError):
    """The whole hand-off's deadline passed (next_hop_total_timeout), whatever step it was."""


class HopReply(NamedTuple):
    code: int
    raw: bytes  # every line with its CRLF, ready to pass on

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace").strip()


class Envelope(NamedTuple):
    mail_line: bytes  # "MAIL FROM:<...> params\r\n" as the client's parameters allow
    rcpt_lines: tuple[bytes, ...]


class _HopWire(asyncio.Protocol):
    """Bytes from Postfix, cut into replies; one waiter at a time, one deadline."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.replies: list[HopReply] = []
        self.lost: str | None = None
        self.waiter: asyncio.Future | None = None
        self.wanted = 0
        self.flow = WriteFlow()  # paused while the kernel buffer is full
        # the wait under way: until when, and what its RelayError says if it is missed
        self.deadline = 0.0
        self.step = ""
        self.limit = 0.0
        self.overdue = False  # the deadline is the hand-off's end, not the step's own limit
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._cut()
        if len(self.buf) > READ_HIGH:
            self.lost = "next hop sent an over-long reply"
            self.transport.abort()
        self._wake()

    def eof_received(self) -> bool:
        self.lost = self.lost or "next hop closed the connection"
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or f"next hop: {exc or 'connection closed'}"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()

    def _cut(self) -> None:
        buf = self.buf
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line_start = start
            start = end + 1
            if end - line_start >= 3 and buf[line_start + 3] == 45:  # "-": a continuation line
                continue  # the reply ends with its last line
            raw = bytes(buf[:start])
            del buf[:start]
            start = 0
            if raw.count(b"\n") != raw.count(b"\r\n"):  # bare LF: pass it on as CRLF
                raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            code = raw[:3]
            if not code.isdigit():
                self.lost = f"next hop sent a malformed reply {raw[:40]!r}"
                self.transport.abort()
                return
            self.replies.append(HopReply(int(code), raw))

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done() and (
                len(self.replies) >= self.wanted or self.lost):
            self.waiter.set_result(None)

    def next_reply(self, limit: float, step: str, end: float | None = None) -> asyncio.Future:
        """A future done when one more reply is in (or the connection is lost), failed with
        RelayError once `limit` seconds pass (HandOffOverdue at `end`, the loop time the
        whole hand-off must be over by, when that comes first). The timer armed for an
        earlier wait stays when it fires no later than this one's deadline; it re-arms
        itself if early."""
        loop = self.loop
        deadline = loop.time() + limit
        self.overdue = end is not None and end < deadline
        if self.overdue:
            deadline = end
        self.deadline = deadline
        self.step, self.limit = step, limit
        timer = self._timer
        if timer is not None and timer.when() > deadline:
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)
        self.wanted = len(self.replies) + 1
        waiter = self.waiter = loop.create_future()
        return waiter

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # not waiting now: the next wait arms it again
        if self.loop.time() < self.deadline:
            self._timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        if self.overdue:
            waiter.set_exception(HandOffOverdue(f"next hop: no time left for {self.step}"))
        else:
            waiter.set_exception(RelayError(
                f"next hop: timed out waiting for {self.step} ({self.limit:g} s)"))


class NextHop:
    def __init__(self, wire: _HopWire, timeouts: HopTimeouts) -> None:
        self._wire = wire
        self._timeouts = timeouts
        self.closed = False
        self.offered: frozenset[str] = frozenset()  # XCLIENT attributes
        self.features: dict[str, str] = {}
        self.greeted_at = 0.0
        self.use_chunking = True  # BDAT where Postfix offers CHUNKING; False forces DATA
        self.quit_sent = False
        self.end: float | None = None  # loop time the hand-off must be over by

    @classmethod
    async def greeted(cls, hop: HostPort, timeout: float | HopTimeouts, ehlo_name: str,
                      offered: frozenset[str] | None = None) -> NextHop:
        """A connection that has read the banner, ready for XCLIENT.

        Without `offered` (the XCLIENT attributes, as an earlier connection learned them) it
        says EHLO to learn them; with them, XCLIENT follows the banner directly (Postfix
        takes it at any time outside a transaction), which saves Postfix a round trip.
        """
        loop = asyncio.get_running_loop()
        timeouts = HopTimeouts.of(timeout)
        try:
            async with asyncio.timeout(timeouts.connect):  # no task of its own, as wait_for's
                _, wire = await loop.create_connection(_HopWire, hop.host, hop.port)
        except (OSError, TimeoutError) as exc:
            reason = (f"timed out after {timeouts.connect:g} s" if isinstance(exc, TimeoutError)
                      else exc)
            raise RelayError(f"connect to {hop}: {reason}") from None
        self = cls(wire, timeouts)
        try:
            (banner,) = await self._replies(1, "the banner")
            self._expect(banner, 220, "banner")
            if offered:
                self.offered = offered
            else:
                self.features = await self._ehlo(ehlo_name)
                self.offered = _xclient_attributes(self.features)
            if not self.offered:
                raise RelayError(f"{hop} does not offer XCLIENT to this host"
                                 " (smtpd_authorized_xclient_hosts)")
        except BaseException:
            self.abort()
            raise
        self.greeted_at = time.monotonic()
        return self

    # --- the transaction -------------------------------------------------------------------

    async def deliver(self, identity: ClientIdentity, envelope: Envelope,
                      chunks: Iterable[bytes], size: int, end: float | None = None) -> HopReply:
        """The whole hand-off; Postfix's reply to the message, or RelayError (HandOffOverdue
        once the loop's time passes `end`)."""
        self.end = end
        try:
            # each command written and its reply awaited here, not through _send() and _ehlo():
            # two coroutines fewer per message
            self._write(xclient_command(identity, self.offered))
            (reply,) = await self._replies(1, "the reply to XCLIENT")
            self._expect(reply, 220, "XCLIENT")
            self._write(_ehlo_command(identity.helo or "unknown"))
            (reply,) = await self._replies(1, "the reply to EHLO")
            self._expect(reply, 250, "EHLO")
            features = self.features = ehlo_features(reply.raw)
            chunking = self.use_chunking and "CHUNKING" in features
            if "PIPELINING" in features and len(envelope.rcpt_lines) == 1:
                return await self._pipelined(envelope, chunks, size, chunking)
            commands = [envelope.mail_line, *envelope.rcpt_lines]
            if "PIPELINING" in features:
                answers = await self._send(commands, "MAIL and RCPT")
            else:
                answers = [(await self._send([line], "MAIL and RCPT"))[0] for line in commands]
            refused = next((a for a in answers if not a.ok), None)
            if refused is not None:
                await self._send([b"RSET\r\n"], "RSET")
                return refused
            if chunking:
                return await self._bdat(chunks, size)
            return await self._data(chunks)
        except BaseException:
            self.abort()
            raise

    async def _pipelined(self, envelope: Envelope, chunks: Iterable[bytes], size: int,
                         chunking: bool) -> HopReply:
        """One recipient: MAIL, RCPT and the message's command in one write (BDAT with the
        message and QUIT; DATA alone, the message after its 354). The first refusal is the
        answer: with no valid recipient Postfix refuses the message and queues nothing."""
        head = envelope.mail_line + envelope.rcpt_lines[0]
        if chunking:
            await self._stream(head + b"BDAT %d LAST\r\n" % size, chunks, b"", wait=False)
            # Postfix holds replies while pipelined input waits (it flushes when it must read):
            # MAIL's and RCPT's may come only with BDAT's, after its milters saw the message
            mail, rcpt = await self._replies(2, "the replies to MAIL, RCPT and the message",
                                             self._timeouts.data_done)
        else:
            self._write(head + b"DATA\r\n")
            mail, rcpt = await self._replies(2, "the reply to MAIL and RCPT")
            (data,) = await self._replies(1, "the reply to DATA")
            if mail.ok and rcpt.ok and data.code == 354:
                await self._stream(b"", dot_stuffed(chunks), b".\r\n", wait=False)
            elif data.code == 354:  # a refusal with DATA taken: the message must not start
                self.abort()
        refused = mail if not mail.ok else rcpt if not rcpt.ok else None
        if refused is not None:
            return refused
        if not chunking and data.code != 354:
            return data
        (reply,) = await self._replies(1, "the end of the message", self._timeouts.data_done)
        return reply

    async def _bdat(self, chunks: Iterable[bytes], size: int) -> HopReply:
        return await self._stream(b"BDAT %d LAST\r\n" % size, chunks, b"")

    async def _data(self, chunks: Iterable[bytes]) -> HopReply:
        (reply,) = await self._send([b"DATA\r\n"], "DATA")
        if reply.code != 354:
            return reply
        return await self._stream(b"", dot_stuffed(chunks), b".\r\n")

    async def _stream(self, head: bytes, chunks: Iterable[bytes], tail: bytes,
                      wait: bool = True) -> HopReply | None:
        """The message in as few writes as its size allows, with QUIT pipelined behind it;
        the reply to the end of the message, unless not `wait`.

        QUIT may end a pipelined group (RFC 2920), so a small message costs one write.
        The last chunk always goes in the final write, with the end of data and QUIT: with
        BDAT the last payload byte ends the message, and until quit_sent Postfix cannot
        have queued it, so a failure before then may move the message to another next
        hop (smtpgate.relay.hops) without a second copy.
        """
        transport = self._wire.transport
        pending, held = [head], len(head)
        for chunk in chunks:
            if held >= 262144:  # before adding this chunk, which may be the last
                transport.write(b"".join(pending))
                pending, held = [], 0
                await self._drained()
            pending.append(chunk)
            held += len(chunk)
        pending.append(tail + b"QUIT\r\n")
        transport.write(b"".join(pending))
        self.quit_sent = True
        if not wait:
            return None
        (reply,) = await self._replies(1, "the end of the message", self._timeouts.data_done)
        return reply

    async def _drained(self) -> None:
        # the spool may hold megabytes: let the kernel take them before reading more
        limit = self._timeouts.reply
        left = None if self.end is None else self.end - self._wire.loop.time()
        try:
            await self._wire.flow.drained(limit if left is None else max(min(limit, left), 0))
        except TimeoutError:
            if left is not None and left < limit:
                raise HandOffOverdue("next hop: no time left taking the message") from None
            raise RelayError(f"next hop: timed out after {limit:g} s "
                             "taking the message") from None
        if self._wire.lost:
            raise RelayError(self._wire.lost)

    # --- the wire --------------------------------------------------------------------------

    async def _ehlo(self, name: str) -> dict[str, str]:
        (reply,) = await self._send([_ehlo_command(name)], "EHLO")
        self._expect(reply, 250, "EHLO")
        return ehlo_features(reply.raw)

    @staticmethod
    def _expect(reply: HopReply, code: int, what: str) -> None:
        if reply.code != code:
            raise RelayError(f"{what}: {reply.text}")

    def _write(self, data: bytes) -> None:
        if self.closed:
            raise RelayError("connection to the next hop is closed")
        self._wire.transport.write(data)

    async def _send(self, lines: list[bytes], step: str) -> list[HopReply]:
        self._write(b"".join(lines) if len(lines) > 1 else lines[0])
        return await self._replies(len(lines), f"the reply to {step}")

    async def _replies(self, count: int, step: str, timeout: float | None = None
                       ) -> list[HopReply]:
        """count replies; each within the limit (a pipelined batch of many RCPTs, each
        checked by Postfix's milters, gets the limit per reply, not for all of them)."""
        wire = self._wire
        limit = self._timeouts.reply if timeout is None else timeout
        while len(wire.replies) < count and not wire.lost:
            try:
                await wire.next_reply(limit, step, self.end)
            finally:
                wire.waiter = None
        if len(wire.replies) < count:
            raise RelayError(wire.lost or "next hop: no reply")
        got = wire.replies[:count]
        del wire.replies[:count]
        return got

    # --- the end ---------------------------------------------------------------------------

    def peer_closed(self) -> bool:
        # a stray byte from an idle Postfix is its goodbye (421 timeout): not one to use
        wire = self._wire
        return bool(wire.lost or wire.buf or wire.replies)

    def close_quietly(self) -> None:
        """QUIT without waiting for the answer, so Postfix logs no "lost connection"."""
        if not self.closed:
            self.closed = True
            transport = self._wire.transport
            if not transport.is_closing():
                if not self.quit_sent:
                    transport.write(b"QUIT\r\n")
                transport.close()

    def abort(self) -> None:
        """Close without QUIT: Postfix throws away a transaction it did not finish."""
        if not self.closed:
            self.closed = True
            self._wire.transport.abort()


def dot_stuffed(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """The message as DATA needs it: a "." that starts a line doubled; chunks may cut lines."""
    at_line_start, after_cr = True, False
    for chunk in chunks:
        if not chunk:
            continue
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        if at_line_start and chunk[:1] == b".":
            chunk = b"." + chunk
        elif after_cr and chunk[:2] == b"\n.":
            chunk = b"\n.." + chunk[2:]
        at_line_start = chunk.endswith(b"\r\n") or (after_cr and chunk == b"\n")
        after_cr = chunk.endswith(b"\r")
        yield chunk


def _ehlo_command(name: str) -> bytes:
    return b"EHLO " + name.encode("utf-8", "replace") + b"\r\n"


def ehlo_features(raw: bytes) -> dict[str, str]:
    """The keywords of an EHLO reply (upper case) and their parameters. Postfix answers
    every hand-off's EHLO alike, so a reply seen before is parsed once."""
    features = _FEATURES.get(raw)
    if features is None:
        features = {}
        for line in raw.split(b"\r\n")[1:]:
            keyword, _, params = line[4:].decode("ascii", "replace").partition(" ")
            if keyword:
                features[keyword.upper()] = params
        if len(_FEATURES) >= 64:  # a next hop whose replies vary: keep the cache small
            _FEATURES.clear()
        _FEATURES[raw] = features
    return features


_FEATURES: dict[bytes, dict[str, str]] = {}


def _xclient_attributes(features: dict[str, str]) -> frozenset[str]:
    if "XCLIENT" not in features:
        return frozenset()
    return frozenset(features["XCLIENT"].upper().split())
