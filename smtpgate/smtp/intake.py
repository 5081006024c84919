"""intake - one message, from DATA to the client's final answer: spool, body, Received, hand-off.

SYNOPSIS
    intake = Intake(session)              per DATA command; `session`: a Receiving
    await intake.run()                    raises Closing when the session must end
    intake.hold_drain() -> bool           the drain's question: True once the final dot came
    Receiving, MessageWire, IntakeLog     the seams (Protocols): what the intake uses

DESCRIPTION
    The session (smtpgate.smtp.session) hands a DATA command the dialogue
    accepted (smtpgate.smtp.dialogue.ReceiveBody) to an Intake, which
    answers 354, reads the message into a Spool (smtpgate.smtp.spool,
    bounded by the worker's smtpgate.smtp.spool_budget) through a
    BodyReader (smtpgate.smtp.body), puts smtpgate's Received header
    (smtpgate.smtp.received) before it and hands it to Postfix
    (smtpgate.smtp.hand_off), whose reply is the client's. The replies
    and events go through the session (reply, reply_raw, publish), so the
    log, the evidence and the metrics see them as any other; the
    session's transaction ends with the message (Dialogue.message_done).

    Before-queue guarantees:
    - The whole message is received before a Postfix connection is used,
      so a slow client never holds a Postfix process. The final reply is
      Postfix's reply to the message, in its words (an rspamd reject
      included; a refusal gets the session id at its end): 250 only when
      Postfix queued it. A 421 from Postfix ends the session, as it would
      have ended Postfix's.
    - Any failure to reach or finish with Postfix gives 451 4.3.0; no free
      next-hop slot within next_hop_busy_wait gives 451 4.3.2; the client
      never sees 250 for a message Postfix did not queue, and never waits
      without an answer.
    - End of data is CRLF.CRLF only; a bare LF never ends the message and
      no second message can be smuggled (smtpgate.smtp.body). A body line
      ended by a bare LF is evidence for postscreen's bare newline test
      (the session's protocol tests), asked once the message is whole.
    - A message over message_size_limit, counting the Received header
      smtpgate adds (Postfix counts it against the same limit), is read to
      its end and refused with 552 5.3.4; a client that vanishes mid-DATA
      leaves nothing at Postfix (the lost-connection line gives the bytes
      read).
    - The spool budget: nothing left at DATA gives 452 4.3.1 at once; a
      message that outgrows what was left is read to its end and refused
      with 452 4.3.1, the warning logged; a spool file that cannot be
      written (a full disk) gives 451 4.3.0 and ends the session, as the
      rest of the message is still on its way.
    - The drain: a DATA command that comes while the gate drains gets 421
      and the session ends. The final dot commits the message: from the
      moment the body reader sees it (in data_received, before the drain
      can see the session again) hold_drain() is True, so the session's
      shut_down() lets the hand-off finish; the client hears Postfix's
      answer, then the 421.

    The seams are what the intake uses, as typing.Protocols: the session
    (Receiving: its configuration, gate, dialogue, client facts, replies
    and events), its connection (MessageWire: smtpgate.smtp.wire.Wire) and
    its log lines (IntakeLog: smtpgate.smtp.session_log.SessionLog).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, Protocol

from smtpgate import replies
from smtpgate.config import Config
from smtpgate.policy.state import Client, ClientState
from smtpgate.relay.next_hop import Envelope, HopReply
from smtpgate.smtp.body import BodyReader
from smtpgate.smtp.closing import Closing
from smtpgate.smtp.dialogue import Dialogue, Transaction
from smtpgate.smtp.events import Event, Relayed
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.hand_off import RELAY_BUSY, hand_off, identity_of, tls_facts
from smtpgate.smtp.received import received_header
from smtpgate.smtp.spool import Spool
from smtpgate.verdict import Reply


class MessageWire(Protocol):
    """What the intake uses of the connection (smtpgate.smtp.wire.Wire)."""

    async def feed_until(self, sink: Callable[[bytearray], bool], timeout: float) -> bool: ...
    def extra(self, name: str, default: Any = None) -> Any: ...


class IntakeLog(Protocol):
    """The intake's own log lines (smtpgate.smtp.session_log.SessionLog)."""

    def lost_in_data(self, size: int) -> None: ...
    def spool_failed(self, exc: OSError) -> None: ...
    def spool_spent(self, limit: int) -> None: ...


class Receiving(Protocol):
    """The session as the intake sees it (smtpgate.smtp.session.Session)."""

    gate: Gate
    config: Config  # the session's: read when it started, kept across a reload
    wire: MessageWire
    dialogue: Dialogue
    log: IntakeLog
    client: Client
    state: ClientState | None  # opened by the policy before any command
    queued: int  # messages Postfix took in this session

    @property
    def helo(self) -> str | None: ...
    @property
    def login(self) -> str | None: ...
    @property
    def tx(self) -> Transaction | None: ...
    @property
    def recipients(self) -> tuple[str, ...]: ...
    @property
    def proto(self) -> str: ...
    @property
    def client_label(self) -> str: ...
    def reply(self, reply: Reply | str, counted: bool = True,
              noqueue: str | None = None) -> None: ...
    def reply_raw(self, answer: HopReply) -> None: ...
    def publish(self, event: Event) -> None: ...
    async def bare_newline(self, line: bytes) -> None: ...


class Intake:
    __slots__ = ("committed", "session", "shutting_down")

    def __init__(self, session: Receiving) -> None:
        self.session = session
        self.committed = False  # the final dot came; the hand-off is not over
        self.shutting_down = False  # the drain came meanwhile: 421 after the answer

    def hold_drain(self) -> bool:
        """The drain's last word waits for a committed message: True when it will be said
        here, after Postfix's answer; False when the session may say it now."""
        if self.committed:
            self.shutting_down = True
            return True
        return False

    async def run(self) -> None:
        session = self.session
        gate, config = session.gate, session.config
        if gate.draining:  # a message begun now might not end within the grace
            session.reply(replies.shutting_down(config.hostname))
            raise Closing
        if gate.spool_budget.spent:  # bounds: the worker's spool budget
            session.reply(replies.INSUFFICIENT_STORAGE)
            return
        session.reply(replies.START_DATA)
        header = self._received()
        spool = Spool(config.spool_memory_limit, gate.spool_budget)  # bounds
        queued = False
        try:
            try:
                body = await self._receive(spool, len(header))
            except OSError as exc:  # the spool's file: a full disk, say
                session.log.spool_failed(exc)
                session.reply(replies.RELAY_UNAVAILABLE)
                raise Closing from None  # the rest of the message is still on its way
            if body.too_big:
                session.reply(replies.MESSAGE_TOO_BIG, noqueue="DATA")
            elif spool.full:  # bounds: the message outgrew the worker's spool budget
                session.log.spool_spent(gate.spool_budget.limit)
                session.reply(replies.INSUFFICIENT_STORAGE)
            else:
                if body.bare_newline:
                    await session.bare_newline(b"\n")  # the body's evidence: a line ended by LF
                queued = await self._relay(spool, header, body.size)
        finally:
            spool.close()
            self.committed = False
            session.dialogue.message_done(queued)
        if self.shutting_down:
            session.reply(replies.shutting_down(config.hostname))
            raise Closing

    async def _receive(self, spool: Spool, header_size: int) -> BodyReader:
        """The whole message into the spool, reading until CRLF.CRLF; the Received header
        counts toward the size limit, as it does at Postfix."""
        session = self.session
        limit = session.config.message_size_limit
        body = BodyReader(spool, max(limit - header_size, 1) if limit else 0)

        def feed(buf: bytearray) -> bool:
            done = body.feed(buf)
            if done:  # in data_received: before the drain can see the session again
                self.committed = True
            return done

        if not await session.wire.feed_until(feed, session.config.smtpd_timeout):
            session.log.lost_in_data(body.size)
            raise Closing
        return body

    async def _relay(self, spool: Spool, header: bytes, size: int) -> bool:
        """Hand the message to Postfix; its answer is the client's answer. True: queued."""
        session = self.session
        tx = session.tx
        identity = identity_of(session.client, session.state.client_name, session.helo,
                               session.proto, session.login)
        answer, seconds = await hand_off(session.gate, identity,
                                         Envelope(tx.mail_line, tx.rcpt_lines), header, spool,
                                         size, session.client_label)
        if answer == "busy":
            session.publish(Relayed("busy"))
            session.reply(RELAY_BUSY)
            return False
        if answer == "tempfail":
            session.publish(Relayed("tempfail"))
            session.reply(replies.RELAY_UNAVAILABLE)
            return False
        session.publish(Relayed(answer.code, seconds, answer, size))
        if answer.code == 250:
            session.queued += 1
        session.reply_raw(answer)
        if answer.code == 421:  # Postfix is closing: so does the session, as Postfix's would
            raise Closing
        return answer.code == 250

    def _received(self) -> bytes:
        session = self.session
        return received_header(
            session.helo or "", session.state.client_name, session.client.ip,
            session.config.hostname, esmtp=session.dialogue.esmtp,
            tls=tls_facts(session.wire.extra("ssl_object")), login=session.login is not None,
            recipients=session.recipients, when=datetime.datetime.now(datetime.UTC))
