"""session - one client connection: the driver joining the wire, dialogue, policy and relay.

SYNOPSIS
    protocol_factory(gate, listener, proxied=None) -> Callable[[], Wire]
                                                    for loop.create_server()
    Session(gate, wire, listener) ; await session.run()
    session.shut_down()                                       the drain's last word
    session.reply(reply, counted=True, noqueue=None, sender=None, recipient=None)
    session.reply_raw(answer) ; session.publish(event)        for the parts it drives
    await session.bare_newline(line)                          postscreen's test, asked

DESCRIPTION
    The session owns the connection (smtpgate.smtp.wire): the banner and
    postscreen's greet wait, the command lines, pipelining detection and
    STARTTLS. What a command means at this point of the dialogue is
    smtpgate.smtp.dialogue's to say (a state machine without I/O); the
    session does what it answers: writes the reply, hands the facts to the
    policy (smtpgate.policy.stages) and sends the reply it gets, gives an
    AUTH command to its exchange (smtpgate.smtp.auth_exchange: the
    challenges, the responses, the policy's outcome) and a DATA command to
    the message intake (smtpgate.smtp.intake), which receives the message,
    hands it to Postfix and answers with Postfix's reply. What follows
    from a reply (the error count, the evidence record, the log line, the
    metrics) is done by the subscribers of the session's events
    (smtpgate.smtp.events).

    Before-queue guarantees, the message's own in smtpgate.smtp.intake
    (received whole before Postfix is used, Postfix's reply passed on, 250
    only for a queued message, end of data CRLF.CRLF only, the size limit,
    the spool budget, the final dot committing the message against the
    drain):
    - Recipients are accepted or refused by the policy at RCPT (unknown
      users included). One that Postfix refuses at relay time makes the
      whole message fail with Postfix's words; nothing is queued.
    - A MAIL or RCPT parameter Postfix would refuse is refused at MAIL or
      RCPT with Postfix's reply (smtpgate.smtp.params).
    - The drain's 421 cuts an idle session, or one still receiving a
      message, at once; one whose message's final dot came hears Postfix's
      answer first (Intake.hold_drain).

    Bounds on what one client can make the session hold or do: the
    dialogue's error, junk-command and recipient counts; replies flushed
    once WRITE_HIGH bytes are queued, with the wire's back-pressure (the
    client's next commands are not read until it reads its replies); each
    deep protocol test reported once per session, with at most
    PENDING_SHOWN bytes of what was pipelined (smtpgate.smtp.protocol_tests);
    the policy's record capped (smtpgate.policy.state).

    Every session has an id (smtpgate.session_id). Each 4xx/5xx reply
    ends with `; session=ID`, Postfix's refusal of a relayed message
    included (its words kept); the connect, disconnect, queue id and
    NOQUEUE lines carry it too (smtpgate.smtp.session_log). A session
    that got any 4xx/5xx leaves its evidence (smtpgate.smtp.evidence)
    with the policy's EvidenceStore, which writes it to Redis after the
    reply; so does, when it ends, one where the shadow rules would have
    decided otherwise (smtpgate.policy.shadow); and with replay_records on,
    every session leaves its replay record (smtpgate.smtp.evidence).

    The driver's parts: the dialogue's rules (smtpgate.smtp.dialogue),
    the protocol tests (smtpgate.smtp.protocol_tests), AUTH's exchange
    (smtpgate.smtp.auth_exchange; the session is its Authenticating), the
    message intake (smtpgate.smtp.intake; the session is its Receiving),
    and the subscribers of its events (smtpgate.smtp.events): the
    dialogue's error count, the evidence, the log lines, the worker's
    metrics. A part ends the session by raising
    smtpgate.smtp.closing.Closing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from smtpgate import replies, session_id
from smtpgate.address import plain_ip
from smtpgate.policy.state import MX, SUBMISSION, SUBMISSIONS, Client, ClientState, GreetWait
from smtpgate.relay.next_hop import HopReply
from smtpgate.relay.passed_on import passed_on
from smtpgate.smtp.auth_exchange import authenticate
from smtpgate.smtp.closing import Closing
from smtpgate.smtp.dialogue import (
    Answer,
    Authenticate,
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
from smtpgate.smtp.events import Ended, Event, Refused
from smtpgate.smtp.evidence import SessionEvidence
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.intake import Intake
from smtpgate.smtp.params import mail_params_reply
from smtpgate.smtp.protocol_tests import ProtocolTests
from smtpgate.smtp.proxy_header import ProxiedAddresses, expects_header, read_header
from smtpgate.smtp.session_log import SessionLog
from smtpgate.smtp.tls import handshake_error
from smtpgate.smtp.wire import TOO_LONG, Wire, WireTimeout
from smtpgate.verdict import Reply

__all__ = ["MX", "SUBMISSION", "SUBMISSIONS", "Session", "protocol_factory"]


def protocol_factory(gate: Gate, listener: str,
                     proxied: ProxiedAddresses | None = None) -> Callable[[], Wire]:
    """One Wire per connection; its session runs as one task. `proxied`: the client's addresses
    from a PROXY header read before TLS (port 465, smtpgate.smtp.implicit_tls)."""
    loop = asyncio.get_running_loop()

    def start(wire: Wire) -> None:
        session = Session(gate, wire, listener)
        if proxied is not None:
            session.take_addresses(proxied)
        # RUF006: what the task waits for holds it (the wire's waiter, a lookup's future), as
        # before; run() takes the session out of gate.sessions when it ends
        loop.create_task(session.run())  # noqa: RUF006
        gate.sessions.add(session)

    return lambda: Wire(start, loop)


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

# the fixed replies of an accepted session as written, by the identity of their Reply (module
# constants that live as long as the process, so no other object can share their id)
_WRITTEN = {id(reply): str(reply).encode("utf-8", "replace") + b"\r\n"
            for reply in (replies.OK, replies.MAIL_OK, replies.RCPT_OK, replies.START_DATA,
                          replies.BYE)}


class Session:
    __slots__ = (
        "client",
        "config",
        "dialogue",
        "evidence",
        "gate",
        "id",
        "intake",
        "listener",
        "log",
        "policy",
        "protocol_tests",
        "queued",
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
        self.evidence = SessionEvidence(self, self.policy.evidence)
        self.log = SessionLog(self)
        self.queued = 0  # messages Postfix took
        self.protocol_tests: ProtocolTests | None = None  # postscreen's, where the policy wants
        self.intake: Intake | None = None  # the message between DATA and its answer

    # --- what the log reads ----------------------------------------------------------------------

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

    def reply(self, reply: Reply | str, counted: bool = True, noqueue: str | None = None,
              sender: str | None = None, recipient: str | None = None) -> None:
        """Write a reply; a refusal is published (Refused), with the stage of its NOQUEUE
        line if it gets one."""
        if isinstance(reply, Reply) and reply.code >= 400:
            text = self.tagged(reply)
            self.wire.reply(text.encode("utf-8", "replace") + b"\r\n")
            self.publish(Refused(self.listener, self.dialogue.last_command, reply, text,
                                 self.state, counted, noqueue, sender, recipient))
        else:
            line = _WRITTEN.get(id(reply))  # the replies every message gets, made once
            self.wire.reply(line if line is not None
                            else str(reply).encode("utf-8", "replace") + b"\r\n")

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
        """What follows from a reply, each its own job: the error count, the evidence record,
        the log lines, the worker's metrics. (Called in turn, not kept as a tuple of bound
        methods: that was 0.3 KB per idle session.)"""
        self._count(event)
        self.evidence.notify(event)
        self.log.notify(event)
        self.gate.metrics.notify(event)

    def _count(self, event: Event) -> None:
        """The dialogue's subscription: a refusal is an error (most are) and failed in the
        disconnect line's counts."""
        if type(event) is Refused:
            self.dialogue.refused(event.counted)

    def shut_down(self) -> None:
        """The drain's last word: 421, then the connection closes.

        Nothing is at Postfix before a message is complete, so a client cut off here, having
        heard no 250, sends its message again later. A message whose final dot has come is
        let finish first: the client hears Postfix's answer, then the 421, and sends nothing
        twice.
        """
        if self.intake is not None and self.intake.hold_drain():
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
            self.log.connected()
            if self.listener == SUBMISSIONS:  # the handshake came first (smtp.implicit_tls)
                self.log.tls(wire.extra("ssl_object"))
            if await self._greet():
                await self._commands()
            else:
                ended = "refused"
        except Closing:
            pass
        except WireTimeout:
            ended = "timeout"
            self.reply(replies.timeout(self.config.hostname))
            self.log.timed_out(self.last_command)
        except (ConnectionError, OSError):
            pass
        except Exception:
            ended = "error"
            self.log.failed()
            self.reply(replies.SERVICE_TEMPFAIL)
        finally:
            try:
                if self.state is not None:  # the client stops counting before the last line
                    self.policy.close_session(self.state)
                # counted before the client hears the end; the disconnect line is the log's
                self.publish(Ended(self.listener, ended, self.last_command, wire.eof,
                                   self.gate.draining,
                                   self.evidence.refusals is not None and not self.queued))
                with contextlib.suppress(ConnectionError, OSError, WireTimeout):
                    if wire.send():
                        await wire.drain()
                wire.close()
            finally:
                # here, not in a done callback of the task: that was a closure, a context
                # copy and a callback entry per idle session (the drain waits for this)
                self.gate.sessions.discard(self)
                self._let_go()

    def _let_go(self) -> None:
        """The session is over: the links back to it from its log, evidence and protocol
        tests go, so that its objects are freed by their reference counts (at once, or when
        the evidence batch has written its record), not left to the cycle collector, which
        at a few hundred refused clients a second walked little else."""
        self.protocol_tests = None
        self.log.session = None  # nothing is logged for it now
        self.evidence = None  # its record (if any) still reads the session, until written

    async def _proxy_header(self) -> bool:
        """Take the client's addresses from a trusted load balancer's PROXY header."""
        config = self.config
        if self.listener == SUBMISSIONS:
            return True  # read before the TLS handshake, by smtpgate.smtp.implicit_tls
        if not expects_header(self.client.ip, config.proxy_protocol, config.proxy_trusted):
            return True
        found = await read_header(self.wire, config.proxy_protocol)
        if isinstance(found, str):
            self.log.bad_proxy_header(found)
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
        if outcome is None and self.listener == SUBMISSIONS:  # its handshake came first
            outcome = await self.policy.tls_started(
                self.state, tls_resumed(self.wire.extra("ssl_object")))
        if isinstance(outcome, GreetWait):
            received, delay = await self.wire.greet_wait(
                f"220-{banner[4:]}\r\n".encode(), outcome.seconds, outcome.decided,
                outcome.hold)
            outcome = await self.policy.screened(self.state, received, delay)
        if outcome is not None:  # refused at connect: the reply is the last word
            self.reply(outcome, noqueue="CONNECT")
            return False
        if self.policy.wants_protocol_tests(self.state):
            self.protocol_tests = ProtocolTests(self.policy, self.state, self.publish,
                                                self.listener)
        self.reply(banner)
        return True

    async def _commands(self) -> None:
        wire, dialogue = self.wire, self.dialogue
        timeout, limit = self.config.smtpd_timeout, self.config.line_length_limit
        while True:
            # an idle client is waited for here, not in a coroutine of the wire's (a frame
            # fewer per idle session); line() reads an over-long line's rest and the end
            line = wire.take_line(limit)
            while line is None and wire.may_wait(limit):
                if wire.send():  # the client reads nothing: wait for it (no coroutine else)
                    await wire.drain()
                if not await wire.more(timeout):
                    break
                line = wire.take_line(limit)
            if line is None:
                line = await wire.line(timeout, limit)
            if line is None:
                self.log.lost(self.last_command)
                return
            if line is TOO_LONG:
                self._answer(dialogue.too_long())
            elif line[-2:-1] == b"\r":
                await self._command(line[:-2])
            else:
                await self._command(line[:-1])
                await self.bare_newline(line)  # "after" the command that carried it
            if dialogue.too_many_errors:
                self.reply(replies.too_many_errors(self.config.hostname))
                self.log.too_many_errors(self.last_command)
                return

    def _answer(self, answer: Answer) -> None:
        self.reply(answer.reply, answer.counted)

    async def _command(self, line: bytes) -> None:
        command = self.dialogue.parse(line)
        if isinstance(command, Answer):
            self._answer(command)
            return
        tests = self.protocol_tests
        if tests is not None and tests.concerns(command, self.wire.buf):
            self._hang_up(await tests.of_command(
                command, self.wire.buf, self.last_command, self.dialogue.esmtp))
        action = self.dialogue.step(command)
        if type(action) is Answer:
            self._answer(action)
        else:
            await _DRIVE[type(action)](self, action)

    async def _quit(self, quit: Quit) -> None:
        self.reply(replies.BYE)
        raise Closing

    # --- postscreen's deep protocol tests (smtpgate.smtp.protocol_tests) -----------------------

    async def bare_newline(self, line: bytes) -> None:
        tests = self.protocol_tests
        if tests is not None:
            self._hang_up(await tests.of_bare_newline(line, self.last_command,
                                                      self.dialogue.esmtp))

    def _hang_up(self, reply: Reply | None) -> None:
        """A protocol test's action was drop: its reply is the last word."""
        if reply is not None:
            self.reply(reply, noqueue=self.last_command or "CONNECT")
            raise Closing

    # --- the commands that need the policy or TLS (AUTH: smtpgate.smtp.auth_exchange) ---------

    async def _hello(self, hello: Hello) -> None:
        verdict = await self.policy.helo(self.state, hello.name)
        if verdict is not None:
            self.reply(verdict, noqueue=self.last_command)
            self.dialogue.hello_refused()
            return
        if not hello.esmtp:
            self.reply(f"250 {self.config.hostname}")
            return
        self.reply(self.dialogue.ehlo_reply(self.config.hostname, self.config.message_size_limit,
                                            self.gate.ehlo_tail[self.listener]))

    async def _starttls(self, start: StartTls | None = None) -> None:
        refusal = await self.policy.starttls(self.state)
        if refusal is not None:  # the session goes on without TLS
            self.reply(refusal)
            return
        self.reply(replies.START_TLS)
        try:
            await self.wire.start_tls(self.gate.tls.context(self.listener),  # bounds: ciphers
                                      self.config.smtpd_timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.log.tls_failed(handshake_error(exc))
            raise Closing from None
        self.dialogue.tls_started()
        ssl_object = self.wire.extra("ssl_object")
        self.log.tls(ssl_object)
        refusal = await self.policy.tls_started(self.state, tls_resumed(ssl_object))
        if refusal is not None:
            self.reply(refusal)
            raise Closing

    async def _mail(self, mail: Mail) -> None:
        refusal = mail_params_reply(mail.path.words, self.config.message_size_limit,
                                    self.dialogue.limits.offered,
                                    self.gate.spool_budget.room())  # bounds: SIZE= over room
        if refusal is None:
            refusal = await self.policy.mail(self.state, mail.path, self.login)
        if refusal is not None:
            self.reply(refusal, noqueue="MAIL", sender=mail.path.address)
            return
        self.dialogue.mail_accepted(mail.path, mail.line)
        self.reply(replies.MAIL_OK)

    async def _rcpt(self, rcpt: Rcpt) -> None:
        verdict = await self.policy.rcpt(self.state, rcpt.path, self.login, self.tx.smtputf8)
        if verdict is not None:
            self.reply(verdict, noqueue="RCPT", recipient=rcpt.path.address)
            return
        self.dialogue.rcpt_accepted(rcpt.path, rcpt.line)
        self.reply(replies.RCPT_OK)

    # --- the message (smtpgate.smtp.intake) ----------------------------------------------------

    async def _data(self, receive: ReceiveBody | None = None) -> None:
        self.intake = Intake(self)  # what the drain asks while the message comes
        try:
            await self.intake.run()
        finally:
            self.intake = None


# what the session does for each of the dialogue's actions but an Answer; AUTH's exchange is
# smtpgate.smtp.auth_exchange's, with the session as its Authenticating
_DRIVE = {Hello: Session._hello, Mail: Session._mail, Rcpt: Session._rcpt,
          ReceiveBody: Session._data, StartTls: Session._starttls, Authenticate: authenticate,
          Quit: Session._quit}



def tls_resumed(ssl_object) -> bool:
    return bool(getattr(ssl_object, "session_reused", False))
