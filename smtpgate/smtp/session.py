"""session - one client connection: the driver joining the wire, dialogue, policy and relay.

SYNOPSIS
    protocol_factory(gate, listener, proxied=None) -> Callable[[], Wire]
                                                    for loop.create_server()
    Session(gate, wire, listener) ; await session.run()
    session.shut_down()                                       the drain's last word

DESCRIPTION
    The session owns all I/O of one connection (smtpgate.smtp.wire): the
    banner and postscreen's greet wait, the command lines, pipelining
    detection, STARTTLS, AUTH's challenges and DATA. What a command means
    at this point of the dialogue is smtpgate.smtp.dialogue's to say (a
    state machine without I/O); the session does what it answers: writes
    the reply, hands the facts to the policy (smtpgate.policy.stages) and
    sends the reply it gets, and hands each complete message to Postfix
    (smtpgate.relay). What follows from a reply (the error count, the
    evidence record, the metrics) is done by the subscribers of the
    session's events (smtpgate.smtp.events).

    Before-queue guarantees:
    - The whole message is received (smtpgate.smtp.body into a Spool)
      before a Postfix connection is used, so a slow client never holds a
      Postfix process. The final reply is Postfix's reply to the message,
      in its words (an rspamd reject included; a refusal gets the session
      id at its end): 250 only when Postfix queued it. A 421 from Postfix
      ends the session, as it would have ended Postfix's.
    - Any failure to reach or finish with Postfix gives 451 4.3.0; no free
      next-hop slot within next_hop_busy_wait gives 451 4.3.2; the client
      never sees 250 for a message Postfix did not queue, and never waits
      without an answer.
    - Recipients are accepted or refused by the policy at RCPT (unknown
      users included). One that Postfix refuses at relay time makes the
      whole message fail with Postfix's words; nothing is queued.
    - A MAIL or RCPT parameter Postfix would refuse is refused at MAIL or
      RCPT with Postfix's reply (smtpgate.smtp.params).
    - End of data is CRLF.CRLF only; a bare LF never ends the message and
      no second message can be smuggled (smtpgate.smtp.body).
    - A message over message_size_limit, counting the Received header
      smtpgate adds (Postfix counts it against the same limit), is read to
      its end and refused with 552 5.3.4; a client that vanishes mid-DATA
      leaves nothing at Postfix.
    - The final dot commits the message: from then on the drain lets the
      hand-off finish and the client hears Postfix's answer before the
      421. A DATA command that comes while the gate drains gets 421.

    Bounds on what one client can make the session hold or do: the
    dialogue's error, junk-command and recipient counts; replies flushed
    once WRITE_HIGH bytes are queued, with the wire's back-pressure (the
    client's next commands are not read until it reads its replies); each
    deep protocol test reported once per session, with at most
    PENDING_SHOWN bytes of what was pipelined; the policy's record capped
    (smtpgate.policy.state).

    Every session has an id (smtpgate.session_id). Each 4xx/5xx reply
    ends with `; session=ID`, Postfix's refusal of a relayed message
    included (its words kept); the connect,
    disconnect, queue id and NOQUEUE lines carry it too. A session that
    got any 4xx/5xx leaves its evidence (smtpgate.smtp.evidence) with the
    policy's EvidenceStore, which writes it to Redis after the reply.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import itertools
import logging
import re
import time
from collections.abc import Callable

from smtpgate import replies, session_id
from smtpgate.address import plain_ip
from smtpgate.policy.state import MX, SUBMISSION, SUBMISSIONS, Client, ClientState, GreetWait
from smtpgate.relay.next_hop import Envelope, HopReply, RelayError
from smtpgate.relay.passed_on import passed_on
from smtpgate.relay.pool import RelayBusy
from smtpgate.relay.xclient import ClientIdentity
from smtpgate.smtp.body import BodyReader
from smtpgate.smtp.dialogue import VERBS as KNOWN_VERBS
from smtpgate.smtp.dialogue import (
    Answer,
    Authenticate,
    Command,
    Dialogue,
    Hello,
    Limits,
    Mail,
    Quit,
    Rcpt,
    ReceiveBody,
    StartTls,
    Transaction,
)
from smtpgate.smtp.events import Ended, Event, ProtocolTestFailed, Refused, Relayed
from smtpgate.smtp.evidence import Refusal, refused_alike, session_record
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.params import mail_params_reply
from smtpgate.smtp.proxy_header import ProxiedAddresses, expects_header, read_header
from smtpgate.smtp.received import received_header
from smtpgate.smtp.spool import Spool
from smtpgate.smtp.tls import handshake_error
from smtpgate.smtp.wire import TOO_LONG, Wire, WireTimeout
from smtpgate.verdict import Reply

log = logging.getLogger("smtpgate.smtpd")

__all__ = ["MX", "SUBMISSION", "SUBMISSIONS", "Session", "protocol_factory"]

NON_SMTP_COMMANDS = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD", "USER", "PASS"})
RELAY_BUSY = Reply(451, "4.3.2", "Error: too many messages in flight to the mail system; "
                                 "try again later")
PENDING_SHOWN = 100  # bytes of a pipelined batch a protocol test sees (and the log shows)


class Closing(Exception):
    """The session ends after the queued replies are written."""


def protocol_factory(gate: Gate, listener: str,
                     proxied: ProxiedAddresses | None = None) -> Callable[[], Wire]:
    """One Wire per connection; its session runs as one task. `proxied`: the client's addresses
    from a PROXY header read before TLS (port 465, smtpgate.smtp.implicit_tls)."""
    loop = asyncio.get_running_loop()

    def start(wire: Wire) -> None:
        session = Session(gate, wire, listener)
        if proxied is not None:
            session.take_addresses(proxied)
        task = loop.create_task(session.run())
        gate.sessions.add(session)
        task.add_done_callback(lambda _: gate.sessions.discard(session))

    return lambda: Wire(start)


def limits_of(gate: Gate, listener: str) -> Limits:
    """The dialogue's limits for a listener, made once per configuration (not per session)."""
    config, offered = gate.config, gate.offered[listener]
    cached = _LIMITS.get(listener)
    if cached is not None and cached[0] is config and cached[1] is offered:
        return cached[2]
    limits = Limits(recipients=config.smtpd_recipient_limit,
                    overshoot=config.smtpd_recipient_overshoot_limit,
                    junk=config.smtpd_junk_command_limit,
                    hard_errors=config.smtpd_hard_error_limit, offered=offered)
    _LIMITS[listener] = (config, offered, limits)
    return limits


_LIMITS: dict[str, tuple] = {}


class Session:
    __slots__ = (
        "bare_newline",
        "client",
        "committed",
        "config",
        "dialogue",
        "ended",
        "gate",
        "id",
        "listener",
        "policy",
        "protocol_tests",
        "queued",
        "refusals",
        "refused_tx",
        "shutting_down",
        "state",
        "wire",
    )

    def __init__(self, gate: Gate, wire: Wire, listener: str) -> None:
        self.gate = gate
        self.config = gate.config
        self.policy = gate.policy
        self.wire = wire
        self.listener = listener
        self.id = session_id.new()  # ends every refusal; names the evidence record
        peer = wire.extra("peername") or ("0.0.0.0", 0)
        sock = wire.extra("sockname") or ("0.0.0.0", 0)
        self.client = Client(plain_ip(peer[0]), peer[1], plain_ip(sock[0]), sock[1], listener)
        self.state: ClientState | None = None
        self.dialogue = Dialogue(listener, limits_of(gate, listener),
                                 offers_tls=gate.tls is not None,
                                 offers_auth=gate.auth is not None,
                                 tls=listener == SUBMISSIONS)
        self.refusals: list[Refusal] | None = None  # the 4xx/5xx replies given, as evidence
        self.queued = 0  # messages Postfix took
        self.ended: float | None = None
        self.bare_newline = False
        self.protocol_tests = False
        self.committed = False  # the final dot came; the hand-off is not over
        self.refused_tx: Transaction | None = None  # the envelope at the latest refusal
        self.shutting_down = False

    # --- what the evidence record and the log read ---------------------------------------------

    @property
    def helo(self) -> str | None:
        return self.dialogue.helo

    @property
    def login(self) -> str | None:
        return self.dialogue.login

    @property
    def tx(self) -> Transaction | None:
        return self.dialogue.tx

    @property
    def sender(self) -> str | None:
        return self.tx.sender if self.tx is not None else None

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.tx.recipients if self.tx is not None else ()

    @property
    def envelope(self) -> tuple[str | None, tuple[str, ...]]:
        """The sender and recipients a refusal's record names: the transaction under way,
        or, once it ended (a refusal after the dot, an RSET after a refused RCPT), the one
        the latest refusal was given in; the record is written after the reply."""
        tx = self.tx
        if (tx is None or tx.sender is None) and self.refused_tx is not None:
            tx = self.refused_tx
        return (tx.sender, tx.recipients) if tx is not None else (None, ())

    @property
    def last_command(self) -> str:
        return self.dialogue.last_command

    def command_counts(self) -> str:
        return self.dialogue.command_counts()

    @property
    def client_label(self) -> str:
        if self.state is not None:
            return self.state.label
        return f"unknown[{self.client.ip}]"

    @property
    def proto(self) -> str:
        return "ESMTP" if self.dialogue.esmtp else "SMTP"

    # --- output and events ---------------------------------------------------------------------

    def reply(self, reply: Reply | str, counted: bool = True) -> None:
        refused = isinstance(reply, Reply) and reply.code >= 400
        text = self.tagged(reply) if refused else str(reply)
        self.wire.reply(text.encode("utf-8", "replace") + b"\r\n")
        if refused:
            self.publish(Refused(self.listener, self.dialogue.last_command, reply, text,
                                 self.state, counted))

    def reply_raw(self, answer: HopReply) -> None:
        """Postfix's answer to the message, in Postfix's words; a refusal (an rspamd reject,
        a recipient refused at relay time) ends with the session id as smtpgate's own do,
        so the sender can quote it and `explain --session` finds the record."""
        if answer.code < 400:  # bounds: well-formed whatever the next hop sent
            self.wire.reply(passed_on(answer.code, answer.raw))
            return
        self.wire.reply(passed_on(answer.code, answer.raw, self.tag()))  # bounds
        self.publish(Refused(self.listener, self.dialogue.last_command, None,
                             answer.text.replace("\r\n", " "), self.state))

    def tagged(self, reply: Reply) -> str:
        """A refusal as smtpgate writes it: the session id at the end, where Postfix's
        fail2ban filters, which match the start, do not see it."""
        return f"{reply}{self.tag()}"

    def tag(self) -> str:
        """What ends every refusal, smtpgate's own and Postfix's passed on."""
        return f"; session={self.id}"

    def publish(self, event: Event) -> None:
        """The session's subscribers: the dialogue's counts, the evidence, the metrics."""
        if isinstance(event, Refused):
            self.dialogue.refused(event.counted)
            if event.counted:
                self._keep_refusal(event.text)
        elif isinstance(event, Ended) and self.refusals is not None:
            self.ended = time.time()
            self.policy.evidence.keep(self.id, self.evidence, self.repeat)
        self.gate.metrics.notify(event)

    def _keep_refusal(self, text: str) -> None:
        """Keep the refusal as evidence and have the record written (after the reply)."""
        dialogue = self.dialogue
        verb = dialogue.last_command or "CONNECT"
        refusal = Refusal(time.time(), f"{verb} {dialogue.last_arg}" if dialogue.last_arg
                          else verb, text, len(self.state.record) if self.state is not None
                          else 0)
        self.refused_tx = dialogue.tx
        if self.refusals is None:
            self.refusals = [refusal]
        else:
            self.refusals.append(refusal)
        self.policy.evidence.keep(self.id, self.evidence, self.repeat)

    def evidence(self) -> dict:
        return session_record(self)

    def repeat(self) -> tuple | None:
        return refused_alike(self)

    def shut_down(self) -> None:
        """The drain's last word: 421, then the connection closes.

        Nothing is at Postfix before a message is complete, so a client cut off here, having
        heard no 250, sends its message again later. A message whose final dot has come is
        let finish first: the client hears Postfix's answer, then the 421, and sends nothing
        twice.
        """
        if self.committed:
            self.shutting_down = True
            return
        self.wire.write_now(str(replies.shutting_down(self.config.hostname)).encode() + b"\r\n")
        self.wire.close()

    # --- the connection ------------------------------------------------------------------------

    async def run(self) -> None:
        wire = self.wire
        session_id.current.set(self.id)  # this task's own context: its log lines carry the id
        ended = "closed"  # the metrics' outcome, told apart further by how it closed
        try:
            if not await self._proxy_header():
                return
            self.state = self.policy.open(self.client)
            log.info("connect from %s to [%s]:%s session=%s", self.client_label,
                     self.client.local_ip, self.client.local_port, self.id)
            if self.listener == SUBMISSIONS:  # the handshake came first (smtp.implicit_tls)
                log.info("%s", tls_established(self.client_label, wire.extra("ssl_object")))
            if await self._greet():
                await self._commands()
            else:
                ended = "refused"
        except Closing:
            pass
        except WireTimeout:
            ended = "timeout"
            self.reply(replies.timeout(self.config.hostname))
            log.info("timeout after %s from %s", self.last_command or "CONNECT",
                     self.client_label)
        except (ConnectionError, OSError):
            pass
        except Exception:
            ended = "error"
            log.exception("error: session with %s failed", self.client_label)
            self.reply(replies.SERVICE_TEMPFAIL)
        finally:
            # counted before the client hears the end
            self.publish(Ended(self.listener, ended, self.last_command, wire.eof,
                               self.gate.draining,
                               self.refusals is not None and not self.queued))
            with contextlib.suppress(ConnectionError, OSError, WireTimeout):
                await wire.flush()
            wire.close()
            if self.state is not None:
                self.policy.close_session(self.state)
                log.info("disconnect from %s %s session=%s", self.client_label,
                         self.command_counts(), self.id)

    async def _proxy_header(self) -> bool:
        """Take the client's addresses from a trusted load balancer's PROXY header."""
        config = self.config
        if self.listener == SUBMISSIONS:
            return True  # read before the TLS handshake, by smtpgate.smtp.implicit_tls
        if not expects_header(self.client.ip, config.proxy_protocol, config.proxy_trusted):
            return True
        found = await read_header(self.wire, config.proxy_protocol)
        if isinstance(found, str):
            log.warning("warning: PROXY from [%s]:%s: %s", self.client.ip, self.client.port,
                        found)
            return False
        if found is not None:
            self.take_addresses(found)
        return True

    def take_addresses(self, found: ProxiedAddresses) -> None:
        self.client = Client(plain_ip(found.client_ip), found.client_port,
                             plain_ip(found.local_ip), found.local_port, self.listener,
                             proxied=True)

    async def _greet(self) -> bool:
        """Banner, with the pregreet wait and the connect-time checks of the policy."""
        banner = f"220 {self.config.hostname} ESMTP smtpgate"
        outcome = await self.policy.connect(self.state)
        if isinstance(outcome, GreetWait):
            received, delay = await self.wire.greet_wait(
                f"220-{banner[4:]}\r\n".encode(), outcome.seconds, outcome.decided,
                outcome.hold)
            outcome = await self.policy.screened(self.state, received, delay)
        if outcome is not None:  # refused at connect: the reply is the last word
            log.info("NOQUEUE: reject: CONNECT from %s: %s; proto=SMTP", self.client_label,
                     self.tagged(outcome))
            self.reply(outcome)
            return False
        self.protocol_tests = self.policy.wants_protocol_tests(self.state)
        self.reply(banner)
        return True

    async def _commands(self) -> None:
        wire, dialogue = self.wire, self.dialogue
        timeout, limit = self.config.smtpd_timeout, self.config.line_length_limit
        while True:
            line = await wire.line(timeout, limit)
            if line is None:  # Postfix's words for a client that left without QUIT
                log.info("lost connection after %s from %s", self.last_command or "CONNECT",
                         self.client_label)
                return
            if line is TOO_LONG:
                self._answer(dialogue.too_long())
            elif line[-2:-1] == b"\r":
                await self._command(line[:-2])
            else:
                await self._command(line[:-1])
                await self._bare_newline(line)  # "after" the command that carried it
            if dialogue.too_many_errors:
                self.reply(replies.too_many_errors(self.config.hostname))
                log.info("too many errors after %s from %s", self.last_command or "CONNECT",
                         self.client_label)
                return

    def _answer(self, answer: Answer) -> None:
        self.reply(answer.reply, answer.counted)

    async def _command(self, line: bytes) -> None:
        command = self.dialogue.parse(line)
        if isinstance(command, Answer):
            self._answer(command)
            return
        await self._protocol_tests_of(command)
        action = self.dialogue.step(command)
        if type(action) is Answer:
            self._answer(action)
        else:
            await _DRIVE[type(action)](self, action)

    async def _quit(self, quit: Quit) -> None:
        self.reply(replies.BYE)
        raise Closing

    # --- postscreen's deep protocol tests ------------------------------------------------------

    async def _protocol_tests_of(self, command: Command) -> None:
        if not self.protocol_tests:
            return
        if command.verb in KNOWN_VERBS:
            if self.wire.buf:
                pending = bytes(memoryview(self.wire.buf)[:PENDING_SHOWN])
                await self._protocol_test("pipelining", command.line, pending)
            return
        verb, line = command.verb, command.line
        looks_like_header = verb.endswith(":") or b":" in line.split(b" ", 1)[0]
        if verb in NON_SMTP_COMMANDS or looks_like_header:
            await self._protocol_test("non_smtp_command", line, b"")

    async def _bare_newline(self, line: bytes) -> None:
        """postscreen's bare newline test, on the first line (command or body) that has one.

        The line itself goes to the test: it is the test's evidence, and a line without its
        bare LF would pass it.
        """
        if self.bare_newline:
            return
        self.bare_newline = True
        if self.protocol_tests:
            await self._protocol_test("bare_newline", line, b"")

    async def _protocol_test(self, test: str, line: bytes, pending: bytes) -> None:
        """One test, reported once per session: the first finding decides (postscreen's)."""
        state = self.state
        if test in state.protocol_failed:
            return
        hang_up = await self.policy.protocol(state, test, line, pending, self.last_command,
                                             self.dialogue.esmtp)
        if test in state.protocol_failed:
            self.publish(ProtocolTestFailed(test, self.listener))
        if hang_up is not None:
            self._log_reject(self.last_command or "CONNECT", hang_up)
            self.reply(hang_up)
            raise Closing

    # --- the commands that need the policy, TLS, SASL or the relay -----------------------------

    async def _hello(self, hello: Hello) -> None:
        verdict = await self.policy.helo(self.state, hello.name)
        if verdict is not None:
            self._log_reject("EHLO" if hello.esmtp else "HELO", verdict)
            self.reply(verdict)
            self.dialogue.hello_refused()
            return
        if not hello.esmtp:
            self.reply(f"250 {self.config.hostname}")
            return
        lines = self._ehlo_lines()
        self.reply("\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def _ehlo_lines(self) -> list[str]:
        lines = [self.config.hostname, "PIPELINING"]
        if self.config.message_size_limit:
            lines.append(f"SIZE {self.config.message_size_limit}")
        if not self.dialogue.tls and self.dialogue.offers_tls:
            lines.append("STARTTLS")
        if self.dialogue.auth_offered:
            lines.append("AUTH PLAIN LOGIN")
        lines += self.gate.ehlo_tail[self.listener]  # what the next hop carries
        return lines

    async def _starttls(self, start: StartTls | None = None) -> None:
        self.reply(replies.START_TLS)
        try:
            await self.wire.start_tls(self.gate.tls.context(self.listener),  # bounds: ciphers
                                      self.config.smtpd_timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.info("SSL_accept error from %s: %s", self.client_label, handshake_error(exc))
            raise Closing from None
        self.dialogue.tls_started()
        log.info("%s", tls_established(self.client_label, self.wire.extra("ssl_object")))

    async def _auth(self, auth: Authenticate) -> None:
        refusal = await self.policy.auth_allowed(self.state)
        if refusal is not None:
            self.reply(refusal)
            raise Closing
        mechanism, initial = auth.mechanism, auth.initial
        if mechanism == "PLAIN":
            plain = await self._auth_read(initial, "")
            if plain is None:
                return
        elif mechanism == "LOGIN":
            user = await self._auth_read(initial, "VXNlcm5hbWU6")
            if user is None:
                return
            password = await self._auth_read("", "UGFzc3dvcmQ6")
            if password is None:
                return
            plain = b"\0" + user + b"\0" + password
        else:
            self.reply(replies.AUTH_MECHANISM)
            return
        login = plain.split(b"\0")[1].decode("utf-8", "replace") if plain.count(b"\0") == 2 else ""
        outcome = await self.policy.authenticate(self.state, mechanism, plain, login,
                                                 self.dialogue.tls)
        self.reply(outcome.reply)
        if outcome.user is not None:
            self.dialogue.authenticated(outcome.user)
        elif outcome.reply.code == 421:
            raise Closing

    async def _auth_read(self, initial: str, challenge: str) -> bytes | None:
        """One SASL response: the initial one if given, else a 334 challenge and a line."""
        if initial:
            text = initial
        else:
            self.reply(f"334 {challenge}")
            line = await self.wire.line(self.config.smtpd_timeout, self.config.line_length_limit)
            if line is None:
                raise Closing
            if line is TOO_LONG:
                self._answer(self.dialogue.too_long())
                return None
            text = line.decode("ascii", "replace").strip()
        if text == "*":
            self.reply(replies.AUTH_CANCELLED)
            return None
        if text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.reply(replies.AUTH_BAD_BASE64)
            return None

    async def _mail(self, mail: Mail) -> None:
        refusal = mail_params_reply(mail.path.words, self.config.message_size_limit,
                                    self.dialogue.limits.offered,
                                    self.gate.spool_budget.room())  # bounds: SIZE= over room
        if refusal is None:
            refusal = await self.policy.mail(self.state, mail.path, self.login)
        if refusal is not None:
            self._log_reject("MAIL", refusal, sender=mail.path.address)
            self.reply(refusal)
            return
        self.dialogue.mail_accepted(mail.path, mail.line)
        self.reply(replies.MAIL_OK)

    async def _rcpt(self, rcpt: Rcpt) -> None:
        verdict = await self.policy.rcpt(self.state, rcpt.path, self.login, self.tx.smtputf8)
        if verdict is not None:
            self.reply(verdict)
            self._log_reject("RCPT", verdict, rcpt.path.address)
            return
        self.dialogue.rcpt_accepted(rcpt.path, rcpt.line)
        self.reply(replies.RCPT_OK)

    async def _data(self, receive: ReceiveBody | None = None) -> None:
        if self.gate.draining:  # a message begun now might not end within the grace
            self.reply(replies.shutting_down(self.config.hostname))
            raise Closing
        if self.gate.spool_budget.spent:  # bounds: the worker's spool budget
            self.reply(replies.INSUFFICIENT_STORAGE)
            return
        self.reply(replies.START_DATA)
        header = self._received()
        spool = Spool(self.config.spool_memory_limit, self.gate.spool_budget)  # bounds
        queued = False
        try:
            try:
                body = await self._receive(spool, len(header))
            except OSError as exc:  # the spool's file: a full disk, say
                log.warning("warning: %s: spool: %s", self.client_label, exc)
                self.reply(replies.RELAY_UNAVAILABLE)
                raise Closing from None  # the rest of the message is still on its way
            if body.too_big:
                log.info("NOQUEUE: reject: DATA from %s: %s; from=<%s> proto=%s helo=<%s>",
                         self.client_label, self.tagged(replies.MESSAGE_TOO_BIG), self.sender,
                         self.proto, self.helo or "")
                self.reply(replies.MESSAGE_TOO_BIG)
            elif spool.full:  # bounds: the message outgrew the worker's spool budget
                log.warning("warning: %s: spool budget of %d bytes spent; 452 4.3.1",
                            self.client_label, self.gate.spool_budget.limit)
                self.reply(replies.INSUFFICIENT_STORAGE)
            else:
                if body.bare_newline:
                    await self._bare_newline(b"\n")  # the body's evidence: a line ended by LF
                queued = await self._relay(spool, header, body.size)
        finally:
            spool.close()
            self.committed = False
            self.dialogue.message_done(queued)
        if self.shutting_down:
            self.reply(replies.shutting_down(self.config.hostname))
            raise Closing

    async def _receive(self, spool: Spool, header_size: int) -> BodyReader:
        """The whole message into the spool, reading until CRLF.CRLF; the Received header
        counts toward the size limit, as it does at Postfix."""
        limit = self.config.message_size_limit
        body = BodyReader(spool, max(limit - header_size, 1) if limit else 0)

        def feed(buf: bytearray) -> bool:
            done = body.feed(buf)
            if done:  # in data_received: before the drain can see the session again
                self.committed = True
            return done

        if not await self.wire.feed_until(feed, self.config.smtpd_timeout):
            log.info("lost connection after DATA (%d bytes) from %s", body.size,
                     self.client_label)
            raise Closing
        return body

    async def _relay(self, spool: Spool, header: bytes, size: int) -> bool:
        """Hand the message to Postfix; its answer is the client's answer. True: queued."""
        gate, tx = self.gate, self.tx
        identity = ClientIdentity(
            addr=self.client.ip, port=self.client.port, name=self._xclient_name(),
            helo=self.helo or "", proto=self.proto, login=self.login,
            destaddr=self.client.local_ip, destport=self.client.local_port)
        envelope = Envelope(tx.mail_line, tx.rcpt_lines)
        hops = gate.hops
        if self.login is not None and gate.submission_hops is not None:
            hops = gate.submission_hops
        started = time.monotonic()
        try:
            async with gate.relay_limit.slot():
                answer = await hops.deliver(
                    identity, envelope, lambda: itertools.chain((header,), spool.chunks()),
                    len(header) + size, self.client_label)
        except RelayBusy:
            log.warning("warning: next hop %s: %d messages in flight; 451 4.3.2 to %s",
                        hops.label, gate.relay_limit.limit, self.client_label)
            self.publish(Relayed("busy"))
            self.reply(RELAY_BUSY)
            return False
        except (RelayError, OSError) as exc:  # OSError: reading the spool back
            log.warning("warning: next hop %s", exc if isinstance(exc, RelayError)
                        else f"{hops.label}: {exc}")
            self.publish(Relayed("tempfail"))
            self.reply(replies.RELAY_UNAVAILABLE)
            return False
        self.publish(Relayed(answer.code, time.monotonic() - started))
        if answer.code == 250:
            self.queued += 1
        self.reply_raw(answer)
        self._log_relayed(answer, size)
        if answer.code == 421:  # Postfix is closing: so does the session, as Postfix's would
            raise Closing
        return answer.code == 250

    def _log_relayed(self, answer: HopReply, size: int) -> None:
        """One line per message, keyed by Postfix's queue id, so its log lines can be found."""
        text = answer.text
        queued = _QUEUE_ID.search(text) if answer.code == 250 else None
        if queued:
            log.info("%s: client=%s, from=<%s>, nrcpt=%d, size=%d, session=%s",
                     queued.group(1), self.client_label, self.sender or "",
                     len(self.recipients), size, self.id)
        else:  # Postfix's words, as the client got them; the id after them
            log.info("NOQUEUE: reject: DATA from %s: %s; from=<%s> nrcpt=%d proto=%s helo=<%s> "
                     "session=%s", self.client_label, text.replace("\r\n", " "),
                     self.sender or "", len(self.recipients), self.proto, self.helo or "",
                     self.id)

    def _received(self) -> bytes:
        ssl_object = self.wire.extra("ssl_object")
        tls = None
        if ssl_object is not None:
            cipher, _, bits = ssl_object.cipher() or ("unknown", "", 0)
            tls = (ssl_object.version() or "TLS", cipher, bits)
        return received_header(
            self.helo or "", self.state.client_name, self.client.ip, self.config.hostname,
            esmtp=self.dialogue.esmtp, tls=tls, login=self.login is not None,
            recipients=self.recipients, when=datetime.datetime.now(datetime.UTC))

    def _xclient_name(self) -> str:
        name = self.state.client_name
        return name if name != "unknown" else "[UNAVAILABLE]"

    def _log_reject(self, stage: str, reply: Reply, recipient: str | None = None,
                    sender: str | None = None) -> None:
        """Postfix's NOQUEUE line; at MAIL the sender refused is named, as Postfix does,
        although the transaction never took it."""
        to = f" to=<{recipient}>" if recipient is not None else ""
        sender = self.sender if sender is None else sender
        log.info("NOQUEUE: reject: %s from %s: %s; from=<%s>%s proto=%s helo=<%s>",
                 stage, self.client_label, self.tagged(reply), sender or "", to,
                 self.proto, self.helo or "")


_QUEUE_ID = re.compile(r"queued as ([0-9A-Za-z]+)")
# what the session does for each of the dialogue's actions but an Answer
_DRIVE = {Hello: Session._hello, Mail: Session._mail, Rcpt: Session._rcpt,
          ReceiveBody: Session._data, StartTls: Session._starttls, Authenticate: Session._auth,
          Quit: Session._quit}


def tls_established(label: str, ssl_object) -> str:
    """Postfix's line: `Anonymous TLS connection established from name[ip]: TLSv1.3 with
    cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`."""
    if ssl_object is None:
        return f"TLS connection established from {label}"
    name, _, bits = ssl_object.cipher() or ("unknown", "", 0)
    return (f"Anonymous TLS connection established from {label}: {ssl_object.version()} "
            f"with cipher {name} ({bits}/{bits} bits)")
