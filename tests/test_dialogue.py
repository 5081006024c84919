"""The SMTP dialogue in memory: sequencing, pipelining, STARTTLS, drain and the session's bounds.

A fake transport, a stub policy and a stub next hop (tests/memory_session.py): each test runs in
milliseconds. What only real services show (the policy's lookups, Postfix's answers, TLS) is in
the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
import test_fuzz_session as fuzz
from hypothesis import given, settings
from memory_session import StubHop, StubPolicy, memory_session
from prometheus_client import CollectorRegistry, Counter

from smtpgate import config as config_module
from smtpgate import replies
from smtpgate.policy.stages import Policy
from smtpgate.policy.state import MX, SUBMISSION, Client, ClientState
from smtpgate.service import server
from smtpgate.service.metrics import Metrics
from smtpgate.smtp import wire as wire_module
from smtpgate.smtp.dialogue import Answer, Dialogue, Hello, Mail, Rcpt, ReceiveBody, Stage
from smtpgate.smtp.events import ProtocolTestFailed
from smtpgate.smtp.session import Session
from smtpgate.verdict import Outcome, Reply, Verdict

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


async def transaction(talk, recipients: int = 1) -> None:
    await talk.send(b"EHLO client.test\r\n")
    await talk.reply()
    await talk.send(b"MAIL FROM:<a@sender.test>\r\n")
    assert await talk.codes(1) == [250]
    for i in range(recipients):
        await talk.send(f"RCPT TO:<u{i}@gate.test>\r\n".encode())
    await talk.replies(recipients)


# --- sequencing --------------------------------------------------------------------------------


async def test_a_message_is_relayed_and_the_client_hears_postfix():
    async with memory_session() as talk:
        await transaction(talk)
        await talk.send(b"DATA\r\n")
        assert await talk.codes(1) == [354]
        await talk.send(MESSAGE)
        assert (await talk.reply()).startswith(b"250 2.0.0 Ok: queued as 4XyZ1")
        envelope, body, _size = talk.hop.messages[0]
        assert envelope.mail_line == b"MAIL FROM:<a@sender.test>\r\n"
        assert envelope.rcpt_lines == (b"RCPT TO:<u0@gate.test>\r\n",)
        assert body.startswith(b"Received: from client.test") and body.endswith(b"hello\r\n")
        await talk.send(b"QUIT\r\n")
        assert await talk.codes(1) == [221]
        await talk.closed()
    assert talk.metrics.ended == ["quit"]


@pytest.mark.parametrize(("commands", "last"), [
    pytest.param([b"MAIL FROM:<a@b.test>"], b"503 5.5.1 Error: send HELO/EHLO first", id="mail"),
    pytest.param([b"EHLO x", b"RCPT TO:<u@gate.test>"], b"503 5.5.1 Error: need MAIL command",
                 id="rcpt"),
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>", b"DATA"],
                 b"503 5.5.1 Error: need RCPT command", id="data"),
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>", b"MAIL FROM:<a@b.test>"],
                 b"503 5.5.1 Error: nested MAIL command", id="nested"),
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>", b"RSET", b"RCPT TO:<u@gate.test>"],
                 b"503 5.5.1 Error: need MAIL command", id="rset-ends-the-transaction"),
])
async def test_commands_out_of_order_are_refused(commands, last):
    async with memory_session() as talk:
        for command in commands:
            await talk.send(command + b"\r\n")
        got = await talk.replies(len(commands))
        assert got[-1].startswith(last), got


async def test_a_pipelined_batch_is_answered_in_one_write():
    async with memory_session() as talk:
        await talk.send(b"EHLO x\r\n")
        await talk.reply()
        before = len(talk.transport.writes)
        await talk.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u1@gate.test>\r\n"
                        b"RCPT TO:<u2@gate.test>\r\n")
        assert await talk.codes(3) == [250, 250, 250]
        assert len(talk.transport.writes) == before + 1


class NoTls:
    """A TLS provider for a session whose handshake the test replaces (or never starts)."""

    def context(self, listener):
        return None


async def test_starttls_starts_the_dialogue_and_the_transaction_afresh(monkeypatch):
    async def handshake(self, context, timeout):
        self.buf.clear()  # what the real start_tls does with text sent in clear
        await self.flush()

    monkeypatch.setattr(wire_module.Wire, "start_tls", handshake)
    async with memory_session(tls=NoTls()) as talk:
        await talk.send(b"EHLO x\r\n")
        assert b"STARTTLS" in await talk.reply()
        await talk.send(b"MAIL FROM:<a@b.test>\r\n")
        assert await talk.codes(1) == [250]
        await talk.send(b"STARTTLS\r\n")
        assert await talk.codes(1) == [220]
        await talk.send(b"RCPT TO:<u@gate.test>\r\n")
        assert (await talk.reply()).startswith(b"503 5.5.1 Error: need MAIL")
        await talk.send(b"MAIL FROM:<a@b.test>\r\n")
        assert (await talk.reply()).startswith(b"503 5.5.1 Error: send HELO/EHLO first")
        await talk.send(b"EHLO x\r\n")
        assert b"STARTTLS" not in await talk.reply()


@pytest.mark.parametrize(("commands", "last"), [
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>"], b"530 5.7.0 Must issue a STARTTLS",
                 id="starttls-first"),
    pytest.param([b"EHLO x", b"AUTH PLAIN AGEAYg=="], b"530 5.7.0 Must issue a STARTTLS",
                 id="no-auth-in-clear"),
])
async def test_submission_wants_starttls_first(commands, last):
    async with memory_session(listener=SUBMISSION, tls=NoTls(), auth=True) as talk:
        for command in commands:
            await talk.send(command + b"\r\n")
        got = await talk.replies(len(commands))
    assert got[-1].startswith(last), got
    assert b"STARTTLS" in got[0] and b"AUTH" not in got[0]  # AUTH not offered before TLS


async def test_auth_is_not_a_command_on_port_25():
    async with memory_session(tls=NoTls(), auth=True) as talk:
        await talk.send(b"EHLO x\r\nAUTH PLAIN AGEAYg==\r\n")
        got = await talk.replies(2)
    assert b"AUTH" not in got[0]
    assert got[1].startswith(b"503 5.5.1 Error: authentication not enabled"), got


async def test_expn_is_not_a_command_and_vrfy_is_disabled_as_in_postfix():
    async with memory_session() as talk:
        await talk.send(b"EHLO x\r\nEXPN staff\r\nVRFY user1\r\n")
        got = await talk.replies(3)
        sid = talk.session.id.encode()
    assert got[1:] == [b"502 5.5.2 Error: command not recognized; session=" + sid + b"\r\n",
                       b"502 5.5.1 VRFY command is disabled; session=" + sid + b"\r\n"]


async def test_the_disconnect_line_counts_commands_as_postfix_does(caplog):
    policy = StubPolicy()
    policy.rcpt_reply = Reply(550, "5.1.1", "<nobody@gate.test>: Recipient address rejected")
    with caplog.at_level(logging.INFO, logger="smtpgate.smtpd"):
        async with memory_session(policy=policy) as talk:
            sid = talk.session.id
            await talk.send(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@gate.test>\r\n"
                            b"DATA\r\nBOGUS\r\nQUIT\r\n")
            assert await talk.codes(6) == [250, 250, 550, 503, 502, 221]
            await talk.closed()
    assert caplog.records[-1].getMessage() == (
        "disconnect from unknown[192.0.2.7] ehlo=1 mail=1 rcpt=0/1 data=0/1 quit=1 "
        f"unknown=0/1 commands=3/6 session={sid}")


async def test_a_client_leaving_without_quit_is_a_lost_connection(caplog):
    with caplog.at_level(logging.INFO, logger="smtpgate.smtpd"):
        async with memory_session() as talk:
            sid = talk.session.id
            await talk.send(b"EHLO x\r\nMAIL FROM:<a@b.test>\r\n")
            await talk.replies(2)
            talk.wire.connection_lost(None)  # the client closed
            await talk.closed()
    assert [r.getMessage() for r in caplog.records][-2:] == [
        "lost connection after MAIL from unknown[192.0.2.7]",
        f"disconnect from unknown[192.0.2.7] ehlo=1 mail=1 commands=2 session={sid}"]
    assert talk.metrics.ended == ["lost"]


class RealProtocolTests(StubPolicy):
    """The stub, with the real policy's deep protocol tests: their checks, actions (the
    configured defaults: bare newline `ignore`) and log lines."""

    def __init__(self) -> None:
        super().__init__(protocol_tests=True)
        self.real = Policy.__new__(Policy)  # protocol() reads the configuration only
        self.real.config = config_module.load({"HOSTNAME": "mx.gate.test"})
        self.real.watching = False  # no shadow rules, no replay records

    async def protocol(self, state, test, line, pending, after, esmtp):
        return await self.real.protocol(state, test, line, pending, after, esmtp)


@pytest.mark.parametrize(("ehlo", "body", "after"), [
    pytest.param(b"EHLO client.test\n", b"clean body\r\n", "EHLO", id="in-a-command"),
    pytest.param(b"EHLO client.test\r\n", b"bare\nline\r\n", "DATA", id="in-the-body"),
])
async def test_a_bare_newline_is_postscreens_finding_and_the_mail_goes_on(caplog, ehlo, body,
                                                                           after):
    with caplog.at_level(logging.INFO, logger="smtpgate"):
        async with memory_session(policy=RealProtocolTests()) as talk:
            await talk.send(ehlo)
            assert await talk.codes(1) == [250]
            await talk.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@gate.test>\r\nDATA\r\n")
            assert await talk.codes(3) == [250, 250, 354]
            await talk.send(b"Subject: x\r\n\r\n" + body + b".\r\n")
            assert await talk.codes(1) == [250]  # action ignore: logged, and the mail goes on
    found = [r.getMessage() for r in caplog.records if "BARE NEWLINE" in r.getMessage()]
    assert len(found) == 1 and f"BARE NEWLINE from [192.0.2.7]:40000 after {after}" in found[0]
    assert len(talk.hop.messages) == 1


# --- bounds ------------------------------------------------------------------------------------


async def test_junk_commands_count_as_errors_past_the_junk_limit():
    """Postfix's smtpd_junk_command_limit: the 102nd NOOP onward is an error each, so with
    smtpd_hard_error_limit 20 the 121st ends the session with 421."""
    async with memory_session() as talk:
        await talk.send(b"NOOP\r\n" * 130)
        codes = await talk.codes(130)
        await talk.closed()
    assert codes == [250] * 121 + [421]


async def test_a_queued_message_forgives_the_errors_before_it():
    """As Postfix's smtpd does once a message is received (smtpd.c, data_cmd: error_count
    and junk_cmds back to 0): 15 errors, a message, 15 more errors stay under
    smtpd_hard_error_limit (20); the session goes on."""
    async with memory_session() as talk:
        await talk.send(b"EHLO x\r\n" + b"BOGUS\r\n" * 15)
        assert await talk.codes(16) == [250] + [502] * 15
        await talk.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@gate.test>\r\nDATA\r\n")
        assert await talk.codes(3) == [250, 250, 354]
        await talk.send(MESSAGE)
        assert await talk.codes(1) == [250]
        await talk.send(b"BOGUS\r\n" * 15 + b"QUIT\r\n")
        assert await talk.codes(16) == [502] * 15 + [221]


async def test_a_refused_message_forgives_nothing():
    hop = StubHop(b"554 5.7.1 Spam message rejected\r\n")
    async with memory_session(hop=hop) as talk:
        await talk.send(b"EHLO x\r\n" + b"BOGUS\r\n" * 15)
        await talk.replies(16)
        await talk.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@gate.test>\r\nDATA\r\n")
        await talk.replies(3)
        await talk.send(MESSAGE + b"BOGUS\r\n" * 15)
        assert await talk.codes(6) == [554] + [502] * 4 + [421]  # the 20th error: 421


async def test_mail_and_rset_pipelined_forever_are_cut_off():
    async with memory_session() as talk:
        await talk.send(b"EHLO x\r\n")
        await talk.reply()
        await talk.send(b"MAIL FROM:<a@b.test>\r\nRSET\r\n" * 1000)
        await talk.closed()
        record = talk.session and talk.session.state
    assert b"421 4.7.0 mx.gate.test Error: too many errors; session=" in talk.transport.out
    assert talk.transport.out.count(b"250 2.1.0") < 130
    del record


async def test_what_one_session_records_is_capped():
    state = ClientState(Client("192.0.2.7", 40000))
    for i in range(10_000):
        state.note(Verdict("sender", Outcome.PASS, reason=f"#{i}"))
    assert len(state.record) == ClientState.RECORD_LIMIT
    assert state.record[0].reason == "#0"
    assert state.unrecorded == 10_000 - ClientState.RECORD_LIMIT
    assert state.latest.reason == "#9999"  # still known to the metrics


async def test_replies_are_flushed_with_back_pressure(monkeypatch):
    """A client that pipelines and never reads: the replies stop at the write buffer's mark
    and the session reads no more commands; once the client reads, the rest follows."""
    monkeypatch.setattr(wire_module, "WRITE_HIGH", 512)
    async with memory_session(high=512) as talk:
        talk.transport.stalled = True
        await talk.send(b"NOOP\r\n" * 130)  # 121 x "250 2.0.0 Ok", then 421: 1.8 KB
        await asyncio.sleep(0.02)
        assert len(talk.transport.out) < 700  # the banner and one flush of 512 bytes
        assert talk.session is not None and len(talk.wire.buf) > 0  # not read on
        for _ in range(50):  # more and more pipelined: the wire stops reading from the socket
            await talk.send(b"NOOP\r\n" * 1000)
        assert not talk.transport.reading
        assert len(talk.wire.buf) < wire_module.BUFFER_HIGH + 6000
        talk.transport.client_reads()
        await talk.closed()
    assert talk.transport.out.count(b"250 2.0.0 Ok") == 121


async def test_a_protocol_test_is_reported_once_per_session_and_counted_by_its_event():
    policy = StubPolicy(protocol_tests=True)
    async with memory_session(policy=policy) as talk:
        await talk.send(b"EHLO x\r\n")
        await talk.reply()
        await talk.send(b"NOOP\r\n" * 60)
        await talk.replies(60)
    pipelining = [pending for test, pending in policy.protocol_calls if test == "pipelining"]
    assert len(pipelining) == 1
    assert len(pipelining[0]) <= 100  # what the log shows, not the whole buffer
    failed = [e for e in talk.metrics.events if isinstance(e, ProtocolTestFailed)]
    assert failed == [ProtocolTestFailed("pipelining", MX)]
    metrics = Metrics.__new__(Metrics)  # its counter alone: no multiprocess folder needed
    registry = CollectorRegistry()
    metrics.protocol_tests_failed = Counter("t_failed", "", ("test",), registry=registry)
    metrics._protocol_tests = {}
    for event in failed:
        metrics.notify(event)
    assert registry.get_sample_value("t_failed_total", {"test": "pipelining"}) == 1


async def test_the_log_lines_follow_the_events(caplog):
    """connect, the NOQUEUE line of a refusal, the queue id of a message Postfix took and
    disconnect: each once, in that order, with the session id."""
    policy = StubPolicy()
    policy.rcpt_reply = Reply(550, "5.1.1", "<u1@gate.test>: Recipient address rejected")
    with caplog.at_level(logging.INFO, logger="smtpgate.smtpd"):
        async with memory_session(policy=policy) as talk:
            sid = talk.session.id
            await talk.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\n")
            await talk.replies(2)
            policy.rcpt_reply = None
            await talk.send(b"RCPT TO:<u0@gate.test>\r\n")
            await talk.reply()
            policy.rcpt_reply = Reply(550, "5.1.1", "<u1@gate.test>: Recipient address rejected")
            await talk.send(b"RCPT TO:<u1@gate.test>\r\nDATA\r\n")
            assert await talk.codes(2) == [550, 354]
            await talk.send(MESSAGE + b"QUIT\r\n")
            assert await talk.codes(2) == [250, 221]
            await talk.closed()
    lines = [r.getMessage() for r in caplog.records if r.name == "smtpgate.smtpd"]
    assert [line.split(" ", 1)[0] for line in lines] == ["connect", "NOQUEUE:", "4XyZ1:",
                                                         "disconnect"], lines
    assert lines[1] == ("NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 "
                        f"<u1@gate.test>: Recipient address rejected; session={sid}; "
                        "from=<a@sender.test> to=<u1@gate.test> proto=ESMTP helo=<client.test>")
    assert lines[2] == (f"4XyZ1: client=unknown[192.0.2.7], from=<a@sender.test>, nrcpt=1, "
                        f"size={len(MESSAGE) - 3}, session={sid}")
    assert lines[3].endswith(f"rcpt=1/2 data=1 quit=1 commands=5/6 session={sid}")


async def test_recipients_past_the_limit_get_452_without_counting_as_errors():
    async with memory_session({"SMTPGATE_SMTPD_RECIPIENT_LIMIT": "5"}) as talk:
        await transaction(talk, recipients=30)
        await talk.send(b"DATA\r\n")
        assert await talk.codes(1) == [354]
        await talk.send(MESSAGE)
        assert await talk.codes(1) == [250]
    out = bytes(talk.transport.out)
    assert out.count(b"250 2.1.5") == 5
    assert out.count(b"452 4.5.3 Error: too many recipients") == 25
    assert len(talk.hop.messages[0][0].rcpt_lines) == 5


async def test_recipients_past_the_overshoot_count_as_errors():
    async with memory_session({"SMTPGATE_SMTPD_RECIPIENT_LIMIT": "5",
                               "SMTPGATE_SMTPD_RECIPIENT_OVERSHOOT_LIMIT": "3"}) as talk:
        await transaction(talk, recipients=30)
        await talk.closed()
    out = bytes(talk.transport.out)
    assert out.count(b"452 4.5.3") == 23  # 3 free, then 20 errors
    assert out.split(b"\r\n")[-2].startswith(b"421 4.7.0 mx.gate.test Error: too many errors")


async def test_a_421_from_postfix_ends_the_session():
    hop = StubHop(b"421 4.3.0 mx.gate.test Error: queue file write error\r\n")
    async with memory_session(hop=hop) as talk:
        await transaction(talk)
        await talk.send(b"DATA\r\n")
        await talk.reply()
        await talk.send(MESSAGE + b"NOOP\r\n")
        assert (await talk.reply()).startswith(b"421 4.3.0")
        await talk.closed()
    assert b"250 2.0.0 Ok\r\n" not in talk.transport.out  # the NOOP was not answered


async def test_the_received_header_counts_toward_the_size_limit():
    async with memory_session({"SMTPGATE_MESSAGE_SIZE_LIMIT": "1000"}) as talk:
        await transaction(talk)
        await talk.send(b"DATA\r\n")
        await talk.reply()
        await talk.send(b"X" * 900 + b"\r\n.\r\n")  # under the limit alone, over it with ours
        assert (await talk.reply()).startswith(b"552 5.3.4")
    assert not talk.hop.messages


# --- drain -------------------------------------------------------------------------------------


async def test_data_while_draining_gets_421():
    async with memory_session() as talk:
        await transaction(talk)
        talk.gate.draining = True
        await talk.send(b"DATA\r\n")
        assert (await talk.reply()).startswith(b"421 4.3.2 mx.gate.test Service shutting down")
        await talk.closed()
    assert not talk.hop.messages


async def test_the_final_dot_commits_the_message_before_the_drain_cuts():
    """The dot has arrived but the session has not started the hand-off: shut_down() must
    let it finish, so the client hears Postfix's 250, not a 421 it would resend after."""
    async with memory_session() as talk:
        await transaction(talk)
        await talk.send(b"DATA\r\n")
        await talk.reply()
        session = talk.session
        talk.wire.data_received(MESSAGE)  # the dot is here; the session has not run yet
        session.shut_down()
        first = await talk.reply()
        assert first.startswith(b"250 2.0.0 Ok: queued"), first
        assert (await talk.reply()).startswith(b"421 4.3.2")
        await talk.closed()
    assert len(talk.hop.messages) == 1


def test_the_drain_waits_for_a_hand_off_up_to_the_final_reply_within_the_stop_grace():
    """Postfix may be queueing the message: the drain waits up to the next hop's final-reply
    limit, as far as the service manager's stop grace allows (a fixed 10 s cut before)."""
    roomy = config_module.load({"HOSTNAME": "mx.gate.test", "SMTPGATE_STOP_GRACE": "400"})
    assert server.hand_off_wait(roomy, 30.0) == roomy.next_hop_data_done_timeout == 330.0
    default = config_module.load({"HOSTNAME": "mx.gate.test"})
    assert server.hand_off_wait(default, 30.0) == 45.0 - 30.0 - server.STOP_MARGIN
    assert server.hand_off_wait(default, 50.0) == 0.0
    with pytest.raises(config_module.ConfigError, match="SMTPGATE_STOP_GRACE"):
        config_module.load({"HOSTNAME": "mx.gate.test", "SMTPGATE_DRAIN_GRACE": "60"})


async def held_in_hand_off(talk, hop: StubHop) -> None:
    """A message's final dot sent, its hand-off started and held; then SIGTERM."""
    await transaction(talk)
    await talk.send(b"DATA\r\n")
    await talk.reply()
    await talk.send(MESSAGE)
    await hop.started.wait()
    talk.gate.draining = True


async def test_a_draining_gate_lets_a_hand_off_finish_and_answers_with_postfix():
    hop = StubHop()
    hop.release = asyncio.Event()
    async with memory_session({"SMTPGATE_DRAIN_GRACE": "0", "SMTPGATE_STOP_GRACE": "4"},
                              hop=hop) as talk:
        await held_in_hand_off(talk, hop)
        drain = asyncio.create_task(server._drain(talk.gate))
        await asyncio.sleep(0.2)  # the 421s are out; this session is left to finish
        assert not drain.done()
        hop.release.set()
        await asyncio.wait_for(drain, 2.0)
        assert await talk.codes(2) == [250, 421]
    assert len(hop.messages) == 1


async def test_the_drain_ends_within_the_stop_grace_whatever_the_next_hop_does(caplog):
    hop = StubHop()
    hop.release = asyncio.Event()  # never set: Postfix does not answer
    async with memory_session({"SMTPGATE_DRAIN_GRACE": "0", "SMTPGATE_STOP_GRACE": "3"},
                              hop=hop) as talk:
        await held_in_hand_off(talk, hop)
        with caplog.at_level(logging.WARNING, logger="smtpgate"):
            # 3 s of stop grace, less the margin for closing: 1 s for the hand-off
            await asyncio.wait_for(server._drain(talk.gate), 2.5)
        assert talk.gate.sessions  # cut by the stop, not waited for
        assert "1 hand-offs cut at the end of stop_grace" in caplog.text
        hop.release.set()


async def test_an_idle_session_hears_421_at_the_drain():
    async with memory_session() as talk:
        await talk.send(b"EHLO x\r\n")
        await talk.reply()
        talk.session.shut_down()
        assert (await talk.reply()).startswith(b"421 4.3.2")
        await talk.closed()


async def test_a_refusal_ends_with_the_session_id_and_is_kept_as_evidence():
    policy = StubPolicy()
    policy.rcpt_reply = Reply(550, "5.1.1", "<u0@gate.test>: Recipient address rejected")
    async with memory_session(policy=policy) as talk:
        await transaction(talk)
        sid = talk.session.id
    assert f"Recipient address rejected; session={sid}\r\n".encode() in talk.transport.out
    assert policy.evidence.kept and set(policy.evidence.kept) == {sid}
    assert talk.metrics.rejections == 1


async def test_a_finished_session_is_freed_without_the_cycle_collector():
    """Once over, a session is held by nothing of its own (its subscribers, log and evidence
    link back to it): it goes with its last outside reference, here the evidence record
    waiting for its batch, not at the cycle collector's next full pass, which at a few
    hundred refused clients a second walked little else."""
    policy = StubPolicy()
    policy.rcpt_reply = Reply(550, "5.1.1", "<u0@gate.test>: Recipient address rejected")
    def sessions() -> int:  # those alive: with the collector off, freed ones are gone
        return sum(1 for o in gc.get_objects() if type(o) is Session)

    gc.collect()
    gc.disable()
    try:
        async with memory_session(policy=policy) as talk:
            await transaction(talk)
            await talk.send(b"QUIT\r\n")
        del talk
        assert sessions() == 1  # its record is still to be written
        policy.evidence.producers.clear()  # written
        assert sessions() == 0
    finally:
        gc.enable()


async def test_a_sender_refused_at_mail_is_named_in_the_noqueue_line(caplog):
    """Postfix logs the sender it refused (from=<...>), not an empty one."""
    policy = StubPolicy()
    policy.mail_reply = Reply(530, "5.7.0", "Authentication required")
    with caplog.at_level(logging.INFO, logger="smtpgate"):
        async with memory_session(policy=policy) as talk:
            await talk.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\n")
            assert await talk.codes(2) == [250, 530]
    (line,) = [r.getMessage() for r in caplog.records if "NOQUEUE: reject: MAIL" in r.getMessage()]
    assert "; from=<a@sender.test> proto=ESMTP helo=<client.test>" in line, line


async def test_a_refusal_after_the_dot_keeps_its_envelope_in_the_record():
    """The record is written after the reply, when the transaction has ended: it must still
    name the sender and recipients the refused message had (explain --session shows them)."""
    policy = StubPolicy()
    hop = StubHop(b"554 5.7.1 Spam message rejected\r\n")
    async with memory_session(policy=policy, hop=hop) as talk:
        await transaction(talk)
        await talk.send(b"DATA\r\n")
        assert await talk.codes(1) == [354]
        await talk.send(MESSAGE)
        assert (await talk.reply()).startswith(b"554 5.7.1 Spam message rejected")
        await talk.send(b"RSET\r\n")
        assert await talk.codes(1) == [250]
        sid = talk.session.id
        record = policy.evidence.producers[sid]()
    assert record["sender"] == "a@sender.test"
    assert record["recipients"] == ["u0@gate.test"]


async def test_a_client_refused_after_the_banner_ends_as_rejected_not_quit():
    """The dashboard's rejected share counts refusals at RCPT too, not only at connect."""
    policy = StubPolicy()
    policy.rcpt_reply = Reply(550, "5.1.1", "<u0@gate.test>: Recipient address rejected")
    async with memory_session(policy=policy) as talk:
        await transaction(talk)
        await talk.send(b"QUIT\r\n")
        assert await talk.codes(1) == [221]
        await talk.closed()
    assert talk.metrics.ended == ["rejected"]


# --- hostile input -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(fuzz.session)
async def test_hostile_sessions_get_replies_only_in_memory(lines):
    """test_fuzz_session's sessions, many more of them: replies only, the session ends, and
    nothing fails inside it. (The real server's run there keeps what only it shows.)"""
    policy = StubPolicy(protocol_tests=True)
    async with memory_session(policy=policy) as talk:
        await talk.send(b"".join(text + end for text, end in lines) + b"\r\n.\r\nQUIT\r\n")
        await talk.until(lambda: talk.transport.closed or talk.session is None
                         or (talk.session.dialogue.last_command == "QUIT"), "the end")
        talk.transport.close()
    fuzz.assert_replies_only(bytes(talk.transport.out))
    assert "error" not in talk.metrics.ended


# --- the rules alone: no session, no loop ------------------------------------------------------


def run_lines(dialogue: Dialogue, lines: list[bytes]) -> list:
    """The lines through the dialogue, a policy that accepts everything standing in."""
    actions = []
    for line in lines:
        command = dialogue.parse(line)
        action = command if isinstance(command, Answer) else dialogue.step(command)
        if isinstance(action, Mail):
            dialogue.mail_accepted(action.path, action.line)
        elif isinstance(action, Rcpt):
            dialogue.rcpt_accepted(action.path, action.line)
        actions.append(action)
    return actions


@pytest.mark.parametrize(("lines", "stage", "last"), [
    pytest.param([], Stage.START, None, id="start"),
    pytest.param([b"EHLO x"], Stage.GREETED, Hello("x", True), id="ehlo"),
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>"], Stage.MAIL, None, id="mail"),
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>", b"RCPT TO:<u@c.test>"], Stage.RCPT,
                 None, id="rcpt"),
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>", b"RCPT TO:<u@c.test>", b"DATA"],
                 Stage.RCPT, ReceiveBody(), id="data"),
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>", b"RSET"], Stage.GREETED,
                 Answer(replies.OK), id="rset"),
    pytest.param([b"EHLO x", b"MAIL FROM:<a@b.test>", b"EHLO y"], Stage.GREETED,
                 Hello("y", True), id="ehlo-again"),
    pytest.param([b"MAIL FROM:<a@b.test>"], Stage.START, Answer(replies.NEED_HELO),
                 id="mail-first"),
    pytest.param([b"\xff\xfe"], Stage.START, Answer(replies.BAD_SYNTAX), id="binary"),
    pytest.param([b"EXPN root"], Stage.START, Answer(replies.UNKNOWN_COMMAND), id="unknown"),
])
def test_stages_and_actions(lines, stage, last):
    dialogue = Dialogue(MX)
    actions = run_lines(dialogue, lines)
    assert dialogue.stage is stage
    if last is not None:
        assert actions[-1] == last


def test_a_transaction_is_replaced_whole_not_reset():
    dialogue = Dialogue(MX)
    run_lines(dialogue, [b"EHLO x", b"MAIL FROM:<a@b.test>", b"RCPT TO:<u@c.test>"])
    first = dialogue.tx
    run_lines(dialogue, [b"RSET", b"MAIL FROM:<d@b.test>"])
    assert dialogue.tx is not first and dialogue.tx.recipients == ()
    assert first.recipients == ("u@c.test",)  # the old one untouched
    dialogue.tls_started()
    assert dialogue.tx is None and dialogue.stage is Stage.START and dialogue.helo is None


def test_the_disconnect_counts_follow_postfix():
    dialogue = Dialogue(MX)
    for action in run_lines(dialogue, [b"EHLO x", b"MAIL FROM:<a@b.test>", b"RCPT TO:<u@c.test>",
                                       b"DATA", b"NOOP", b"BOGUS"]):
        if isinstance(action, Answer) and isinstance(action.reply, Reply) \
                and action.reply.code >= 400:
            dialogue.refused(action.counted)
    assert dialogue.command_counts() == \
        "ehlo=1 mail=1 rcpt=1 data=1 noop=1 unknown=0/1 commands=5/6"
    # a client refused at connect gave none: Postfix's "commands=0"
    assert Dialogue(MX).command_counts() == "commands=0"
