"""The message intake in memory: DATA relayed, Postfix's answers passed on, the spool budget, the
size limit, the drain around the final dot, and the intake on its seam alone.

A fake transport, a stub policy and a stub next hop (tests/memory_session.py); Postfix's own
answers over a real connection are the end-to-end tests' (test_engine_e2e, test_passed_on_e2e,
test_spool_budget_e2e, test_drain).
"""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest
from memory_session import StubHop, memory_session

from smtpgate import config as config_module
from smtpgate import replies
from smtpgate.policy.state import MX, Client, ClientState
from smtpgate.relay.next_hop import HopReply, RelayError
from smtpgate.relay.pool import TransactionLimit
from smtpgate.smtp import spool as spool_module
from smtpgate.smtp.closing import Closing
from smtpgate.smtp.dialogue import Dialogue, Limits, Stage, Transaction
from smtpgate.smtp.events import Refused, Relayed
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.intake import Intake, Receiving
from smtpgate.smtp.spool_budget import SpoolBudget

BODY = b"Subject: hi\r\n\r\nhello\r\n..dot\r\n"
MESSAGE = BODY + b".\r\n"


async def to_data(talk, recipients: int = 1) -> None:
    """EHLO, MAIL and the recipients, each answered 250."""
    await talk.send(b"EHLO client.test\r\n")
    await talk.reply()
    await talk.send(b"MAIL FROM:<a@sender.test>\r\n")
    for i in range(recipients):
        await talk.send(f"RCPT TO:<u{i}@gate.test>\r\n".encode())
    assert await talk.codes(1 + recipients) == [250] * (1 + recipients)


def relayed(talk) -> list[Relayed]:
    return [e for e in talk.metrics.events if isinstance(e, Relayed)]


def refused(talk) -> list[Refused]:
    return [e for e in talk.metrics.events if isinstance(e, Refused)]


# --- accepted and relayed ----------------------------------------------------------------------


async def test_a_message_goes_to_postfix_whole_with_our_received_header(caplog):
    with caplog.at_level(logging.INFO, logger="smtpgate"):
        async with memory_session() as talk:
            await to_data(talk)
            await talk.send(b"DATA\r\n")
            assert await talk.reply() == b"354 End data with <CR><LF>.<CR><LF>\r\n"
            await talk.send(MESSAGE)
            assert await talk.reply() == b"250 2.0.0 Ok: queued as 4XyZ1\r\n"  # Postfix's words
            session = talk.session
            assert session.queued == 1 and session.intake is None
            # the transaction is over: a RCPT now needs a new MAIL
            await talk.send(b"RCPT TO:<u@gate.test>\r\n")
            assert (await talk.reply()).startswith(b"503 5.5.1 Error: need MAIL")
            sid = session.id
    envelope, sent, size = talk.hop.messages[0]
    assert sent.startswith(b"Received: from client.test (unknown [192.0.2.7])\r\n"
                           b"\tby mx.gate.test (smtpgate) with ESMTP\r\n\tfor <u0@gate.test>;")
    # the header first, then the body dot-unstuffed
    assert sent.endswith(b" +0000\r\nSubject: hi\r\n\r\nhello\r\n.dot\r\n")
    assert size == len(sent)  # the next hop is told the header's bytes too
    assert envelope.rcpt_lines == (b"RCPT TO:<u0@gate.test>\r\n",)
    [event] = relayed(talk)
    body_size = len(b"Subject: hi\r\n\r\nhello\r\n.dot\r\n")  # the log's: without the header
    assert (event.result, event.size) == (250, body_size) and event.seconds is not None
    assert f"4XyZ1: client=unknown[192.0.2.7], from=<a@sender.test>, nrcpt=1, " \
           f"size={body_size}, session={sid}" in caplog.text
    assert talk.gate.spool_budget.used == 0


async def test_postfix_refusing_the_message_is_passed_on_with_the_session_id(caplog):
    hop = StubHop(b"550-5.7.1 rejected by rspamd\r\n550 5.7.1 spam\r\n")
    with caplog.at_level(logging.INFO, logger="smtpgate"):
        async with memory_session(hop=hop) as talk:
            await to_data(talk)
            await talk.send(b"DATA\r\n" + MESSAGE + b"NOOP\r\n")
            got = await talk.replies(3)
            sid = talk.session.id
            assert talk.session.queued == 0
    assert got[1] == (b"550-5.7.1 rejected by rspamd\r\n550 5.7.1 spam; session="
                      + sid.encode() + b"\r\n")
    assert got[2].startswith(b"250 2.0.0 Ok")  # in step: the next command is answered
    [event] = refused(talk)
    assert event.reply is None and "rejected by rspamd" in event.text
    assert "NOQUEUE: reject: DATA from unknown[192.0.2.7]: 550-5.7.1 rejected by rspamd " \
           "550 5.7.1 spam; from=<a@sender.test> nrcpt=1" in caplog.text


class FailingHop(StubHop):
    async def deliver(self, identity, envelope, chunks, size, label) -> HopReply:
        raise RelayError("stub: connection refused")


async def test_postfix_unreachable_is_451_430_and_the_session_goes_on(caplog):
    with caplog.at_level(logging.WARNING, logger="smtpgate"):
        async with memory_session(hop=FailingHop()) as talk:
            await to_data(talk)
            await talk.send(b"DATA\r\n" + MESSAGE + b"NOOP\r\n")
            got = await talk.replies(3)
    assert got[1].startswith(b"451 4.3.0 Error: queue file write error; session=")
    assert got[2].startswith(b"250 2.0.0 Ok")
    assert [e.result for e in relayed(talk)] == ["tempfail"]
    assert "warning: next hop stub: connection refused" in caplog.text


async def test_no_free_hand_off_slot_is_451_432():
    async with memory_session() as talk:
        talk.gate.relay_limit = TransactionLimit(0, 0.01)  # every slot taken, a short wait
        await to_data(talk)
        await talk.send(b"DATA\r\n" + MESSAGE)
        got = await talk.replies(2)
    assert got[1].startswith(b"451 4.3.2 Error: too many messages in flight")
    assert [e.result for e in relayed(talk)] == ["busy"]
    assert not talk.hop.messages


# --- the spool budget --------------------------------------------------------------------------


async def test_a_spent_spool_budget_refuses_data_before_354():
    async with memory_session() as talk:
        talk.gate.spool_budget = budget = SpoolBudget(1000)
        budget.take(1000)  # other sessions' messages hold it all
        await to_data(talk)
        await talk.send(b"DATA\r\n")
        assert (await talk.reply()).startswith(b"452 4.3.1 Insufficient system storage")
        budget.give(1000)
        await talk.send(b"DATA\r\n")  # the transaction stayed: it may try again
        assert await talk.codes(1) == [354]
        await talk.send(MESSAGE)
        assert await talk.codes(1) == [250]
    assert len(talk.hop.messages) == 1


async def test_a_message_outgrowing_the_budget_is_read_to_its_end_and_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="smtpgate"):
        async with memory_session() as talk:
            talk.gate.spool_budget = budget = SpoolBudget(2000)
            await to_data(talk)
            await talk.send(b"DATA\r\n")
            assert await talk.codes(1) == [354]
            await talk.send(b"X" * 998 + b"\r\n")
            await talk.send(b"Y" * 1998 + b"\r\n")
            assert budget.spent  # it took what was left: other sessions hear 452 at DATA now
            await talk.send(b".\r\nNOOP\r\n")
            got = await talk.replies(2)
    assert got[0].startswith(b"452 4.3.1 Insufficient system storage; session=")
    assert got[1].startswith(b"250 2.0.0 Ok")
    assert "spool budget of 2000 bytes spent; 452 4.3.1" in caplog.text
    assert not talk.hop.messages
    assert (budget.used, budget.refused) == (0, 1)  # all given back when the message ended


async def test_a_spool_file_that_cannot_be_written_is_451_and_the_end(monkeypatch, caplog):
    def full_disk(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.tempfile, "TemporaryFile", full_disk)
    with caplog.at_level(logging.WARNING, logger="smtpgate"):
        async with memory_session({"SMTPGATE_SPOOL_MEMORY_LIMIT": "100"}) as talk:
            await to_data(talk)
            await talk.send(b"DATA\r\n")
            assert await talk.codes(1) == [354]
            await talk.send(b"X" * 500 + b"\r\n")  # past memory: to a file, which fails
            assert (await talk.reply()).startswith(b"451 4.3.0 Error: queue file write error")
            await talk.closed()
    assert "spool: [Errno 28] No space left on device" in caplog.text
    assert not talk.hop.messages and talk.gate.spool_budget.used == 0


# --- the size limit ----------------------------------------------------------------------------


async def test_an_oversize_message_is_read_to_its_end_and_refused_552(caplog):
    with caplog.at_level(logging.INFO, logger="smtpgate"):
        async with memory_session({"SMTPGATE_MESSAGE_SIZE_LIMIT": "2000"}) as talk:
            await to_data(talk)
            await talk.send(b"DATA\r\n")
            assert await talk.codes(1) == [354]
            for _ in range(10):
                await talk.send(b"Z" * 998 + b"\r\n")
            assert not talk.transport.writes[-1].startswith(b"552")  # not before the dot
            await talk.send(b".\r\nNOOP\r\n")
            got = await talk.replies(2)
            sid = talk.session.id
    assert got[0] == b"552 5.3.4 Error: message file too big; session=" + sid.encode() + b"\r\n"
    assert got[1].startswith(b"250 2.0.0 Ok")  # the rest was read: the dialogue is in step
    assert not talk.hop.messages
    [event] = refused(talk)
    assert event.noqueue == "DATA"
    assert "NOQUEUE: reject: DATA from unknown[192.0.2.7]: 552 5.3.4" in caplog.text


async def test_a_client_gone_mid_data_leaves_nothing_at_postfix(caplog):
    with caplog.at_level(logging.INFO, logger="smtpgate"):
        async with memory_session() as talk:
            await to_data(talk)
            await talk.send(b"DATA\r\n")
            assert await talk.codes(1) == [354]
            await talk.send(b"Subject: cut\r\n\r\nhalf")  # 16 bytes of whole lines
            talk.wire.eof_received()
            await talk.closed()
    assert not talk.hop.messages
    assert "lost connection after DATA (16 bytes) from unknown[192.0.2.7]" in caplog.text
    assert talk.gate.spool_budget.used == 0


# --- the drain ---------------------------------------------------------------------------------


async def test_a_message_still_coming_is_cut_by_the_drain_at_once():
    async with memory_session() as talk:
        await to_data(talk)
        await talk.send(b"DATA\r\n")
        assert await talk.codes(1) == [354]
        await talk.send(b"Subject: half\r\n")
        assert not talk.session.intake.hold_drain()
        talk.session.shut_down()
        assert (await talk.reply()).startswith(b"421 4.3.2 mx.gate.test Service shutting down")
        await talk.closed()
    assert not talk.hop.messages


async def test_after_the_final_dot_the_drain_waits_for_postfixs_answer():
    hop = StubHop()
    hop.release = asyncio.Event()
    async with memory_session(hop=hop) as talk:
        await to_data(talk)
        await talk.send(b"DATA\r\n")
        assert await talk.codes(1) == [354]
        await talk.send(MESSAGE)
        await hop.started.wait()
        session = talk.session
        session.shut_down()  # the drain's last word, while Postfix has the message
        assert b"421" not in talk.transport.out and not talk.transport.closed  # held, not said
        hop.release.set()
        assert await talk.codes(2) == [250, 421]
        await talk.closed()
    assert len(hop.messages) == 1


# --- the intake on its seam alone --------------------------------------------------------------


class FedWire:
    """A MessageWire: the client's bytes handed to the sink in one piece."""

    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)

    async def feed_until(self, sink, timeout: float) -> bool:
        return sink(self.buf)

    def extra(self, name: str, default=None):
        return default


class Lines:
    """An IntakeLog that keeps what it was told."""

    def __init__(self) -> None:
        self.told: list[tuple] = []

    def lost_in_data(self, size: int) -> None:
        self.told.append(("lost", size))

    def spool_failed(self, exc: OSError) -> None:
        self.told.append(("spool_failed", exc))

    def spool_spent(self, limit: int) -> None:
        self.told.append(("spool_spent", limit))


class StandIn:
    """A Receiving and nothing more: the intake reaching past its seam fails here (slots)."""

    __slots__ = ("answers", "client", "config", "dialogue", "events", "gate", "log", "queued",
                 "state", "wire")

    def __init__(self, gate: Gate, data: bytes) -> None:
        self.gate, self.config = gate, gate.config
        self.wire = FedWire(data)
        self.dialogue = Dialogue(MX, Limits(), stage=Stage.MAIL, helo="client.test", esmtp=True)
        self.dialogue.tx = Transaction("a@b.test", False, b"MAIL FROM:<a@b.test>\r\n",
                                       (b"RCPT TO:<u@gate.test>\r\n",), ("u@gate.test",))
        self.log = Lines()
        self.client = Client("192.0.2.9", 40000, "192.0.2.1", 25, MX)
        self.state = ClientState(self.client)
        self.queued = 0
        self.answers: list = []
        self.events: list = []

    helo = property(lambda self: self.dialogue.helo)
    login = property(lambda self: self.dialogue.login)
    tx = property(lambda self: self.dialogue.tx)
    recipients = property(lambda self: self.dialogue.tx.recipients)
    proto = property(lambda self: "ESMTP")
    client_label = property(lambda self: "unknown[192.0.2.9]")

    def reply(self, reply, counted=True, noqueue=None) -> None:
        self.answers.append(str(reply))

    def reply_raw(self, answer: HopReply) -> None:
        self.answers.append(answer.raw)

    def publish(self, event) -> None:
        self.events.append(event)

    async def bare_newline(self, line: bytes) -> None:
        self.answers.append(("bare newline", line))


def seam_names(protocol: type) -> set[str]:
    own = {n for n in vars(protocol) if not n.startswith("_")}
    return own | set(protocol.__annotations__)


def test_the_stand_in_is_exactly_the_receiving_seam():
    stand_in = {n for n in dir(StandIn) if not n.startswith("_")}
    assert stand_in == seam_names(Receiving) | {"answers", "events"}


def stand_in_gate(**environ) -> Gate:
    config = config_module.load({"HOSTNAME": "mx.gate.test", **environ})
    return Gate(config, None, None, TransactionLimit(1, 1.0), StubHop())


async def test_the_intake_needs_only_its_seam_to_relay_a_message():
    gate = stand_in_gate()
    session = StandIn(gate, b"hello\r\n.\r\nQUIT\r\n")
    intake = Intake(session)
    await intake.run()
    assert session.answers == [str(replies.START_DATA), b"250 2.0.0 Ok: queued as 4XyZ1\r\n"]
    assert session.queued == 1 and session.dialogue.tx is None
    assert session.wire.buf == b"QUIT\r\n"  # what came after the dot is the commands'
    [(_envelope, sent, size)] = gate.hops.messages
    assert sent.startswith(b"Received: from client.test (unknown [192.0.2.9])")
    assert sent.endswith(b" +0000\r\nhello\r\n") and size == len(sent)
    assert [type(e) for e in session.events] == [Relayed]


async def test_the_final_dot_commits_the_message_in_the_sink():
    """hold_drain() is True from the moment the body reader sees the dot, before the
    hand-off starts, and the 421 follows Postfix's answer."""
    gate = stand_in_gate()
    hop = gate.hops
    hop.release = asyncio.Event()
    session = StandIn(gate, b"hello\r\n.\r\n")
    intake = Intake(session)
    assert not intake.hold_drain()
    task = asyncio.create_task(intake.run())
    await hop.started.wait()
    assert intake.hold_drain()
    hop.release.set()
    with pytest.raises(Closing):  # the drain's 421 is the last word
        await task
    assert session.answers[1:] == [b"250 2.0.0 Ok: queued as 4XyZ1\r\n",
                                   str(replies.shutting_down("mx.gate.test"))]
    assert not intake.committed


async def test_the_intake_tells_its_log_of_a_client_gone():
    gate = stand_in_gate()
    session = StandIn(gate, b"")
    session.wire.feed_until = _ended  # the stream ends before the dot
    with pytest.raises(Closing):
        await Intake(session).run()
    assert session.log.told == [("lost", 0)]
    assert session.dialogue.tx is None and not gate.hops.messages


async def _ended(sink, timeout: float) -> bool:
    return False
