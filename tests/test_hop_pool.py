"""The pool of greeted Postfix connections and the hand-off, against the real Postfix."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from smtpgate.config import HostPort
from smtpgate.relay.next_hop import Envelope, NextHop, RelayError
from smtpgate.relay.pool import HopPool
from smtpgate.relay.xclient import ClientIdentity

IDENTITY = ClientIdentity(addr="127.0.0.77", port=4000, name="host77.clients.example.test",
                          helo="client.example.test", proto="ESMTP")
ENVELOPE = Envelope(b"MAIL FROM:<a@example.net>\r\n", (b"RCPT TO:<user1@example.com>\r\n",))


async def filled(pool: HopPool, count: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while len(pool._idle) < count:
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_pool_hands_out_greeted_connections_and_survives_a_postfix_restart(postfix_server):
    pool = HopPool(HostPort("127.0.0.1", postfix_server.port), 10, "mx.example.test", size=2)
    message = b"Subject: pool\r\n\r\nvia the pool\r\n"
    try:
        assert pool.take_idle() is None  # empty at first; taking starts the filling
        await filled(pool, 2)
        hop = await pool.take()
        reply = await hop.deliver(IDENTITY, ENVELOPE, [message], len(message))
        assert reply.code == 250 and b"queued as" in reply.raw
        hop.close_quietly()
        await filled(pool, 2)
        # a Postfix restart kills the idle connections; take() must notice and start afresh
        await asyncio.to_thread(postfix_server.stop)
        await asyncio.to_thread(postfix_server.start)
        hop = await pool.take()
        reply = await hop.deliver(IDENTITY, ENVELOPE, [message], len(message))
        assert reply.code == 250
        hop.close_quietly()
    finally:
        pool.close()


@pytest.mark.slow
async def test_without_chunking_the_message_goes_dot_stuffed_by_data(postfix_server,
                                                                     dovecot_server):
    hop = await NextHop.greeted(HostPort("127.0.0.1", postfix_server.port), 10, "mx.example.test")
    hop.use_chunking = False
    message = b"Subject: data-path\r\n\r\n.leading dot\r\n.\r\nlast\r\n"
    try:
        reply = await hop.deliver(IDENTITY, ENVELOPE, [message[:20], message[20:]], len(message))
    finally:
        hop.close_quietly()
    assert reply.code == 250 and b"bytes queued" not in reply.raw  # DATA's reply, not BDAT's
    stored = await asyncio.to_thread(dovecot_server.wait_for_message, "user1@example.com",
                                     lambda raw: b"data-path" in raw)
    assert b"\n.leading dot\n.\nlast\n" in stored  # stuffed for DATA, unstuffed by Postfix


async def test_a_closed_pool_keeps_nothing_idle():
    # nothing listens on this port: a refill would only show as tasks and connections
    pool = HopPool(HostPort("127.0.0.1", 9), 1, "mx.example.test", size=3)
    pool.close()
    assert pool.take_idle() is None
    assert (pool._filling, pool._tasks, pool._idle) == (0, set(), [])


@pytest.mark.slow
async def test_the_end_of_a_big_message_goes_out_only_with_quit(postfix_server):
    """Until quit_sent, Postfix cannot have the whole message: a failure before then may move
    it to another next hop (relay.hops) without a second copy. Here the connection breaks
    right after the spool gave its last chunk: Postfix must queue nothing."""
    hop = await NextHop.greeted(HostPort("127.0.0.1", postfix_server.port), 10, "mx.example.test")
    mark = f"end-{uuid.uuid4().hex}"
    first = f"Message-ID: <{mark}@example.net>\r\nSubject: end\r\n\r\n".encode()
    first += b"x" * (200_000 - len(first) - 2) + b"\r\n"
    last = b"y" * 199_998 + b"\r\n"
    since = postfix_server.log_mark()

    def chunks():
        yield first
        yield last
        assert not hop.quit_sent
        # the connection ends once the last chunk was taken (FIN: what was written arrives)
        hop._wire.transport.close()

    with pytest.raises(RelayError):
        await hop.deliver(IDENTITY, ENVELOPE, chunks(), len(first) + len(last))
    postfix_server.wait_for_log(r"lost connection after BDAT|disconnect from", since=since)
    assert mark not in postfix_server.log_text()[since:]


class CountedWrites:
    """The connection's transport, with its writes counted: one write is one round trip."""

    def __init__(self, transport) -> None:
        self.transport, self.writes = transport, 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.transport.write(data)

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


async def counted_hand_off(postfix_server, envelope: Envelope, message: bytes,
                           chunking: bool) -> tuple[object, int]:
    hop = await NextHop.greeted(HostPort("127.0.0.1", postfix_server.port), 10, "mx.example.test")
    hop.use_chunking = chunking
    counted = hop._wire.transport = CountedWrites(hop._wire.transport)
    try:
        reply = await hop.deliver(IDENTITY, envelope, [message], len(message))
    finally:
        hop.close_quietly()
    return reply, counted.writes


@pytest.mark.slow
@pytest.mark.parametrize(("chunking", "writes"), [(True, 3), (False, 4)])
async def test_one_recipient_goes_with_the_message_in_conforming_pipelining(postfix_server,
                                                                          chunking, writes):
    # XCLIENT; EHLO; MAIL, RCPT and BDAT with the message and QUIT (DATA: its 354 first)
    mark = f"pipelined-{uuid.uuid4().hex}"
    message = f"Message-ID: <{mark}@example.net>\r\nSubject: one\r\n\r\nbody\r\n".encode()
    since = postfix_server.log_mark()
    reply, written = await counted_hand_off(postfix_server, ENVELOPE, message, chunking)
    assert reply.code == 250 and b"queued as" in reply.raw, reply
    assert written == writes
    postfix_server.wait_for_log(rf"message-id=<{mark}@example\.net>", since=since)
    postfix_server.wait_for_log(r"disconnect from host77\.clients", since=since)
    assert "improper command pipelining" not in postfix_server.log_text()[since:]


@pytest.mark.slow
@pytest.mark.parametrize("chunking", [True, False])
async def test_one_recipient_postfix_refuses_is_the_answer_and_nothing_is_queued(
        postfix_server, chunking):
    mark = f"refused-{uuid.uuid4().hex}"
    message = f"Message-ID: <{mark}@example.net>\r\nSubject: ghost\r\n\r\nbody\r\n".encode()
    envelope = Envelope(ENVELOPE.mail_line, (b"RCPT TO:<ghost@example.com>\r\n",))
    since = postfix_server.log_mark()
    reply, _ = await counted_hand_off(postfix_server, envelope, message, chunking)
    # the RCPT's refusal in Postfix's words, not BDAT's or DATA's "no valid recipients"
    assert reply.code == 550 and b"<ghost@example.com>" in reply.raw, reply
    postfix_server.wait_for_log(r"disconnect from host77\.clients", since=since)
    log = postfix_server.log_text()[since:]
    assert "NOQUEUE: reject: RCPT" in log and mark not in log
    assert "improper command pipelining" not in log
