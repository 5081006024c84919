"""Each step of a hand-off has its own time limit, and the whole hand-off a total.

The next hop here is a small real TCP server that speaks like Postfix up to a given step and
then says nothing (or answers slowly): it stands in for a stalled Postfix or milter, since what
is tested is smtpgate's timers. The hand-off with the real Postfix is tested elsewhere
(test_hop_pool.py, test_next_hops.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from smtpgate.config import ConfigError, HostPort, load
from smtpgate.relay.hop_timeouts import HopTimeouts
from smtpgate.relay.hops import Hops
from smtpgate.relay.next_hop import Envelope, RelayError
from smtpgate.relay.xclient import ClientIdentity

IDENTITY = ClientIdentity(addr="127.0.0.77", port=4000, name="host77.clients.example.test",
                          helo="client.example.test", proto="ESMTP")
ENVELOPE = Envelope(b"MAIL FROM:<a@example.net>\r\n", (b"RCPT TO:<user1@example.com>\r\n",))
EHLO = (b"250-stub.example.test\r\n250-PIPELINING\r\n"
        b"250 XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n")


class StallingHop:
    """Greets and answers like Postfix until `stall_at` ("banner", "XCLIENT", "DATA",
    "end"), where it says nothing more; each reply waits `delay` seconds first, the reply to
    the end of the message `end_delay`."""

    def __init__(self, stall_at: str = "", delay: float = 0.0, end_delay: float = 0.0) -> None:
        self.stall_at, self.delay, self.end_delay = stall_at, delay, end_delay
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> HostPort:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return HostPort("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())
        try:
            await self._talk(reader, writer)
        finally:
            writer.close()

    async def _say(self, writer: asyncio.StreamWriter, step: str, text: bytes,
                   delay: float | None = None) -> bool:
        if step == self.stall_at:
            return False
        await asyncio.sleep(self.delay if delay is None else delay)
        writer.write(text)
        return True

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent = not await self._say(writer, "banner", b"220 stub.example.test ESMTP\r\n")
        in_data = False
        while line := await reader.readline():
            if silent:
                continue  # read on, answer nothing: a stalled peer
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    silent = not await self._say(writer, "end", b"250 2.0.0 Ok: queued as X\r\n",
                                                 self.end_delay)
                continue
            verb = line.split(b" ", 1)[0].strip().upper().decode()
            if verb == "EHLO":
                silent = not await self._say(writer, verb, EHLO)
            elif verb == "DATA":
                silent = not await self._say(writer, verb, b"354 End data\r\n")
                in_data = True
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                silent = not await self._say(writer, verb, b"250 2.0.0 Ok\r\n" if verb != "XCLIENT"
                                             else b"220 stub.example.test ESMTP\r\n")


async def hand_off(address: HostPort, timeouts: HopTimeouts) -> tuple[str, float]:
    """The hand-off's outcome (the reply, or the RelayError's text) and how long it took."""
    hops = Hops((address,), timeouts, "mx.example.test", 0, 10.0)
    started = time.monotonic()
    try:
        reply = await hops.deliver(IDENTITY, ENVELOPE, lambda: [b"Subject: t\r\n\r\nx\r\n"], 17,
                                   "client[127.0.0.77]")
        outcome = reply.text
    except RelayError as exc:
        outcome = str(exc)
    return outcome, time.monotonic() - started


@pytest.mark.parametrize(("stall_at", "step"), [
    ("banner", "the banner (1 s)"),
    ("XCLIENT", "the reply to XCLIENT (1 s)"),
    ("DATA", "the reply to DATA (1 s)"),
    ("end", "the end of the message (2 s)"),
])
async def test_a_stalled_step_fails_after_its_own_limit(stall_at, step):
    timeouts = HopTimeouts(connect=1.0, reply=1.0, data_done=2.0, total=30.0)
    async with StallingHop(stall_at) as address:
        outcome, took = await hand_off(address, timeouts)
    assert outcome.endswith(f"timed out waiting for {step}"), outcome
    limit = timeouts.data_done if stall_at == "end" else timeouts.reply
    assert limit <= took < limit + 10


async def test_the_reply_to_the_message_may_take_longer_than_any_other():
    # Postfix's milters may take minutes over the message: over next_hop_timeout is fine
    timeouts = HopTimeouts(connect=1.0, reply=1.0, data_done=10.0, total=30.0)
    async with StallingHop(end_delay=2.0) as address:
        outcome, took = await hand_off(address, timeouts)
    assert outcome.startswith("250 2.0.0 Ok: queued as X"), outcome
    assert took >= 2.0


async def test_the_whole_hand_off_ends_within_its_total():
    # every reply in time (1 s of 3), but six of them: the total (4 s) ends it
    timeouts = HopTimeouts(connect=3.0, reply=3.0, data_done=3.0, total=4.0)
    async with StallingHop(delay=1.0) as address:
        outcome, took = await hand_off(address, timeouts)
    assert outcome.endswith("the hand-off took over 4 s (next_hop_total_timeout)"), outcome
    assert 4.0 <= took < 14.0


async def test_a_connect_that_is_not_answered_fails_after_the_connect_limit():
    # a listener whose accept queue is full drops new SYNs: the connect hangs
    with socket.socket() as listener, contextlib.ExitStack() as stack:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(4):
            waiting = stack.enter_context(socket.socket())
            waiting.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                waiting.connect(address)
        timeouts = HopTimeouts(connect=1.0, reply=30.0, data_done=30.0, total=60.0)
        outcome, took = await hand_off(HostPort(*address), timeouts)
    assert outcome.endswith("timed out after 1 s"), outcome
    assert 1.0 <= took < 11.0


def test_the_total_must_leave_each_step_its_time():
    base = {"HOSTNAME": "mx.example.test"}
    assert load(base).next_hop_total_timeout == 540.0
    with pytest.raises(ConfigError, match="SMTPGATE_NEXT_HOP_DATA_DONE_TIMEOUT"):
        load({**base, "SMTPGATE_NEXT_HOP_TOTAL_TIMEOUT": "300"})


async def test_each_reply_of_a_pipelined_batch_has_the_limit():
    # MAIL and three RCPTs pipelined, each answered 0.6 s after the one before: 2.4 s for the
    # batch, over the 1.5 s limit, but no reply is late
    timeouts = HopTimeouts(connect=5.0, reply=1.5, data_done=5.0, total=60.0)
    envelope = Envelope(ENVELOPE.mail_line, (b"RCPT TO:<u1@example.com>\r\n",
                                             b"RCPT TO:<u2@example.com>\r\n",
                                             b"RCPT TO:<u3@example.com>\r\n"))
    async with StallingHop(delay=0.6) as address:
        hops = Hops((address,), timeouts, "mx.example.test", 0, 10.0)
        reply = await hops.deliver(IDENTITY, envelope, lambda: [b"x\r\n"], 3, "client")
    assert reply.text.startswith("250 2.0.0 Ok: queued as X")


class ChunkingHop(StallingHop):
    """Offers CHUNKING and, as Postfix does while pipelined input is waiting, holds its replies
    to MAIL and RCPT until it has read the message and taken `end_delay` over it (a milter)."""

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stub.example.test ESMTP\r\n")
        held = b""
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"XCLIENT":
                writer.write(b"220 stub.example.test ESMTP\r\n")
            elif verb == b"EHLO":
                writer.write(EHLO.replace(b"250-PIPELINING", b"250-PIPELINING\r\n250-CHUNKING"))
            elif verb in (b"MAIL", b"RCPT"):
                held += b"250 2.0.0 Ok\r\n"
            elif verb == b"BDAT":
                await reader.readexactly(int(line.split()[1]))
                await asyncio.sleep(self.end_delay)
                writer.write(held + b"250 2.0.0 Ok: queued as X\r\n")
                held = b""
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                return


async def test_replies_held_back_until_the_message_was_taken_may_take_as_long_as_it():
    # MAIL, RCPT and BDAT go in one write: Postfix may answer all three only once its milter
    # has seen the message, so MAIL's and RCPT's replies get the message's limit
    timeouts = HopTimeouts(connect=5.0, reply=1.0, data_done=10.0, total=30.0)
    async with ChunkingHop(end_delay=2.0) as address:
        outcome, took = await hand_off(address, timeouts)
    assert outcome.startswith("250 2.0.0 Ok: queued as X"), outcome
    assert took >= 2.0
