"""session - one client connection: the SMTP dialogue, translated to the policy and the relay.

SYNOPSIS
    protocol_factory(gate, listener, proxied=None) -> Callable[[], Wire]
                                                    for loop.create_server()
    Session(gate, wire, listener) ; await session.run()
    session.shut_down()                                       the drain's last word

DESCRIPTION
    The session owns the protocol state and all I/O of one connection
    (smtpgate.smtp.wire): the banner and postscreen's greet wait, the
    commands, pipelining detection, STARTTLS, AUTH's challenges and DATA.
    It decides nothing itself: at each stage it hands the facts to the
    policy (smtpgate.policy.stages) and sends the reply it gets, and it
    hands each complete message to Postfix (smtpgate.relay).

    Before-queue guarantees:
    - The whole message is received (smtpgate.smtp.body into a Spool)
      before a Postfix connection is used, so a slow client never holds a
      Postfix process. The final reply is Postfix's reply to the message,
      in its words (an rspamd reject included; a refusal gets the session
      id at its end): 250 only when Postfix queued it.
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
    - A message over message_size_limit is read to its end and refused
      with 552 5.3.4; a client that vanishes mid-DATA leaves nothing at
      Postfix.

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
from smtpgate.address import AddressError, parse_mail_arg, parse_rcpt_arg, plain_ip
from smtpgate.policy.state import MX, SUBMISSION, SUBMISSIONS, Client, ClientState, GreetWait
from smtpgate.relay.next_hop import Envelope, HopReply, RelayError
from smtpgate.relay.passed_on import passed_on
from smtpgate.relay.pool import RelayBusy
from smtpgate.relay.xclient import ClientIdentity
from smtpgate.smtp.body import BodyReader
from smtpgate.smtp.evidence import SHOWN_ARGUMENTS, Refusal, refused_alike, session_record
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.params import mail_params_reply, rcpt_params_reply
from smtpgate.smtp.proxy_header import ProxiedAddresses, expects_header, read_header
from smtpgate.smtp.received import received_header
from smtpgate.smtp.spool import Spool
from smtpgate.smtp.tls import handshake_error
from smtpgate.smtp.wire import TOO_LONG, Wire, WireTimeout
from smtpgate.verdict import Reply

log = logging.getLogger("smtpgate.smtpd")

__all__ = ["MX", "SUBMISSION", "SUBMISSIONS", "Session", "protocol_factory"]

NON_SMTP_COMMANDS = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD", "USER", "PASS"})
BEFORE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "RSET"})
RELAY_BUSY = Reply(451, "4.3.2", "Error: too many messages in flight to the mail system; "
                                 "try again later")


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


class Session:
    __slots__ = (
        "bare_newline",
        "client",
        "config",
        "counts",
        "ended",
        "errors",
        "esmtp",
        "failed",
        "gate",
        "helo",
        "id",
        "last_arg",
        "last_command",
        "listener",
        "login",
        "mail_line",
        "policy",
        "protocol_tests",
        "rcpt_lines",
        "recipients",
        "refusals",
        "relaying",
        "sender",
        "shutting_down",
        "smtputf8",
        "state",
        "tls",
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
        self.helo: str | None = None
        self.esmtp = False
        self.tls = listener == SUBMISSIONS
        self.login: str | None = None
        self.errors = 0
        self.counts: dict[str, int] = {}  # commands given, per verb
        self.failed: dict[str, int] | None = None  # of those, the ones answered 4xx or 5xx
        self.last_command = ""
        self.last_arg = ""  # shown in the evidence for SHOWN_ARGUMENTS only (never AUTH's)
        self.refusals: list[Refusal] | None = None  # the 4xx/5xx replies given, as evidence
        self.ended: float | None = None
        self.bare_newline = False
        self.protocol_tests = False
        self.relaying = False
        self.shutting_down = False
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.sender: str | None = None
        self.smtputf8 = False
        self.mail_line = b""
        # tuples: an idle session holds no list (there may be thousands of them)
        self.rcpt_lines: tuple[bytes, ...] = ()
        self.recipients: tuple[str, ...] = ()

    @property
    def client_label(self) -> str:
        if self.state is not None:
            return self.state.label
        return f"unknown[{self.client.ip}]"

    @property
    def proto(self) -> str:
        return "ESMTP" if self.esmtp else "SMTP"

    # --- output ----------------------------------------------------------------------------

    def reply(self, reply: Reply | str) -> None:
        refused = isinstance(reply, Reply) and reply.code >= 400
        text = self.tagged(reply) if refused else str(reply)
        self.wire.reply(text.encode("utf-8", "replace") + b"\r\n")
        if refused:
            self._count_failure()
            self._refused(text)
            self.gate.metrics.rejected(self.state, reply, self.last_command)

    def reply_raw(self, answer: HopReply) -> None:
        """Postfix's answer to the message, in Postfix's words; a refusal (an rspamd reject,
        a recipient refused at relay time) ends with the session id as smtpgate's own do,
        so the sender can quote it and `explain --session` finds the record."""
        if answer.code < 400:  # bounds: well-formed whatever the next hop sent
            self.wire.reply(passed_on(answer.code, answer.raw))
            return
        self.wire.reply(passed_on(answer.code, answer.raw, self.tag()))  # bounds
        self._count_failure()
        self._refused(answer.text.replace("\r\n", " "))

    def tagged(self, reply: Reply) -> str:
        """A refusal as smtpgate writes it: the session id at the end, where Postfix's
        fail2ban filters, which match the start, do not see it."""
        return f"{reply}{self.tag()}"

    def tag(self) -> str:
        """What ends every refusal, smtpgate's own and Postfix's passed on."""
        return f"; session={self.id}"

    def _refused(self, text: str) -> None:
        """Keep the refusal as evidence and have the record written (after the reply)."""
        verb = self.last_command or "CONNECT"
        refusal = Refusal(time.time(), f"{verb} {self.last_arg}" if self.last_arg else verb,
                          text, len(self.state.record) if self.state is not None else 0)
        if self.refusals is None:
            self.refusals = [refusal]
        else:
            self.refusals.append(refusal)
        self.policy.evidence.keep(self.id, self.evidence, self.repeat)

    def evidence(self) -> dict:
        return session_record(self)

    def repeat(self) -> tuple | None:
        return refused_alike(self)

    def _count_failure(self) -> None:
        self.errors += 1
        verb = self.last_command
        if verb:
            failed = self.failed if self.failed is not None else {}
            if failed.get(verb, 0) < self.counts.get(verb, 0):
                failed[verb] = failed.get(verb, 0) + 1
                self.failed = failed

    def command_counts(self) -> str:
        """Postfix's disconnect summary: `ehlo=1 mail=1 rcpt=0/1 data=0/1 quit=1 commands=3/5`."""
        words, ok, total = [], 0, 0
        for verb in sorted(self.counts, key=_COUNT_ORDER.get):
            given, failed = self.counts[verb], (self.failed or {}).get(verb, 0)
            words.append(f"{verb.lower()}={given - failed}/{given}" if failed
                         else f"{verb.lower()}={given}")
            ok, total = ok + given - failed, total + given
        words.append(f"commands={ok}/{total}" if ok != total else f"commands={total}")
        return " ".join(words)

    def shut_down(self) -> None:
        """The drain's last word: 421, then the connection closes.

        Nothing is at Postfix before a message is complete, so a client cut off here, having
        heard no 250, sends its message again later. A hand-off in progress is let finish
        first: the client hears Postfix's answer, then the 421, and sends nothing twice.
        """
        if self.relaying:
            self.shutting_down = True
            return
        self.wire.write_now(str(replies.shutting_down(self.config.hostname)).encode() + b"\r\n")
        self.wire.close()

    # --- the dialogue ----------------------------------------------------------------------

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
                await self._dialogue()
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
            self.gate.metrics.session_ended(self, ended)  # counted before the client hears the end
            with contextlib.suppress(ConnectionError, OSError, WireTimeout):
                await wire.flush()
            wire.close()
            if self.state is not None:
                self.policy.close_session(self.state)
                log.info("disconnect from %s %s session=%s", self.client_label,
                         self.command_counts(), self.id)
            if self.refusals is not None:
                self.ended = time.time()
                self.policy.evidence.keep(self.id, self.evidence, self.repeat)

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
                f"220-{banner[4:]}\r\n".encode(), outcome.seconds, outcome.decided)
            outcome = await self.policy.screened(self.state, received, delay)
        if outcome is not None:  # refused at connect: the reply is the last word
            log.info("NOQUEUE: reject: CONNECT from %s: %s; proto=SMTP", self.client_label,
                     self.tagged(outcome))
            self.reply(outcome)
            return False
        self.protocol_tests = self.policy.wants_protocol_tests(self.state)
        self.reply(banner)
        return True

    async def _dialogue(self) -> None:
        wire = self.wire
        timeout, limit = self.config.smtpd_timeout, self.config.line_length_limit
        hard_limit = self.config.smtpd_hard_error_limit
        while True:
            line = await wire.line(timeout, limit)
            if line is None:  # Postfix's words for a client that left without QUIT
                log.info("lost connection after %s from %s", self.last_command or "CONNECT",
                         self.client_label)
                return
            if line is TOO_LONG:
                self._count("UNKNOWN")
                self.reply(replies.LINE_TOO_LONG)
            elif line[-2:-1] == b"\r":
                await self._dispatch(line[:-2])
            else:
                await self._dispatch(line[:-1])
                await self._bare_newline(line)  # "after" the command that carried it
            if self.errors >= hard_limit:
                self.reply(replies.too_many_errors(self.config.hostname))
                log.info("too many errors after %s from %s", self.last_command or "CONNECT",
                         self.client_label)
                return

    async def _dispatch(self, line: bytes) -> None:
        if not line:
            self._count("UNKNOWN")
            self.reply(replies.BAD_SYNTAX)
            return
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.decode("ascii").upper()
        except UnicodeDecodeError:
            self._count("UNKNOWN")
            self.reply(replies.BAD_SYNTAX)
            return
        handler = _HANDLERS.get(verb)
        if handler is None:
            await self._unknown(verb, line)
            return
        if self.protocol_tests and self.wire.buf:
            await self._protocol_test("pipelining", line, bytes(self.wire.buf))
        self._count(verb)
        try:
            arg = arg_bytes.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.reply(replies.BAD_UTF8)
            return
        if verb in SHOWN_ARGUMENTS:
            self.last_arg = arg
        if self.listener == SUBMISSION and not self.tls and verb not in BEFORE_TLS:
            self.reply(replies.MUST_STARTTLS)
            return
        await handler(self, arg)

    async def _unknown(self, verb: str, line: bytes) -> None:
        looks_like_header = verb.endswith(":") or b":" in line.split(b" ", 1)[0]
        if self.protocol_tests and (verb in NON_SMTP_COMMANDS or looks_like_header):
            await self._protocol_test("non_smtp_command", line, b"")
        self._count("UNKNOWN")  # and its 502 as failed, as Postfix counts it
        self.reply(replies.UNKNOWN_COMMAND)

    def _count(self, verb: str) -> None:
        self.last_command, self.last_arg = verb, ""
        self.counts[verb] = self.counts.get(verb, 0) + 1

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
        hang_up = await self.policy.protocol(self.state, test, line, pending,
                                             self.last_command, self.esmtp)
        if hang_up is not None:
            self._log_reject(self.last_command or "CONNECT", hang_up)
            self.reply(hang_up)
            raise Closing

    # --- commands --------------------------------------------------------------------------

    async def smtp_HELO(self, arg: str) -> None:
        await self._hello(arg, esmtp=False)

    async def smtp_EHLO(self, arg: str) -> None:
        await self._hello(arg, esmtp=True)

    async def _hello(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg:
            self.reply(replies.EHLO_SYNTAX if esmtp else replies.HELO_SYNTAX)
            return
        self._reset_transaction()
        self.helo, self.esmtp = arg, esmtp
        verdict = await self.policy.helo(self.state, arg)
        if verdict is not None:
            self._log_reject("EHLO" if esmtp else "HELO", verdict)
            self.reply(verdict)
            self.helo = None
            return
        if not esmtp:
            self.reply(f"250 {self.config.hostname}")
            return
        lines = self._ehlo_lines()
        self.reply("\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def _ehlo_lines(self) -> list[str]:
        lines = [self.config.hostname, "PIPELINING"]
        if self.config.message_size_limit:
            lines.append(f"SIZE {self.config.message_size_limit}")
        if not self.tls and self.gate.tls is not None:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        lines += self.gate.ehlo_tail[self.listener]  # what the next hop carries
        return lines

    def _auth_offered(self) -> bool:
        return (self.listener != MX and self.tls and self.login is None
                and self.gate.auth is not None)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.reply(replies.NO_ARGS)
            return
        if self.tls:
            self.reply(replies.TLS_ACTIVE)
            return
        if self.gate.tls is None:
            self.reply(replies.NOT_IMPLEMENTED)
            return
        self.reply(replies.START_TLS)
        try:
            await self.wire.start_tls(self.gate.tls.context(self.listener),  # bounds: ciphers
                                      self.config.smtpd_timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.info("SSL_accept error from %s: %s", self.client_label, handshake_error(exc))
            raise Closing from None
        self.tls = True
        self.helo, self.esmtp = None, False
        self._reset_transaction()
        log.info("%s", tls_established(self.client_label, self.wire.extra("ssl_object")))

    async def smtp_AUTH(self, arg: str) -> None:
        if not self._auth_offered():
            self.reply(replies.AUTH_ALREADY if self.login is not None
                       else replies.AUTH_NOT_ENABLED)
            return
        if self.helo is None:
            self.reply(replies.NEED_HELO)
            return
        if self.sender is not None:
            self.reply(replies.AUTH_IN_MAIL)
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        refusal = await self.policy.auth_allowed(self.state)
        if refusal is not None:
            self.reply(refusal)
            raise Closing
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
        outcome = await self.policy.authenticate(self.state, mechanism, plain, login, self.tls)
        self.reply(outcome.reply)
        if outcome.user is not None:
            self.login = outcome.user
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
                self._count("UNKNOWN")
                self.reply(replies.LINE_TOO_LONG)
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

    async def smtp_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self.reply(replies.NEED_HELO)
            return
        if self.sender is not None:
            self.reply(replies.NESTED_MAIL)
            return
        offered = self.gate.offered[self.listener]  # bounds: SMTPUTF8 as a parameter, offered
        try:
            path = parse_mail_arg(arg, smtputf8=None if "SMTPUTF8" in offered else False)
        except AddressError as exc:
            self.reply(exc.reply)
            return
        refusal = mail_params_reply(path.words, self.config.message_size_limit, offered,
                                    self.gate.spool_budget.room())  # bounds: SIZE= over room
        if refusal is None:
            refusal = await self.policy.mail(self.state, path, self.login)
        if refusal is not None:
            self._log_reject("MAIL", refusal)
            self.reply(refusal)
            return
        self.sender = path.address
        self.smtputf8 = "SMTPUTF8" in path.params
        self.mail_line = b"MAIL FROM:" + arg[5:].strip().encode("utf-8") + b"\r\n"
        self.reply(replies.MAIL_OK)

    async def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            self.reply(replies.NEED_MAIL)
            return
        try:
            path = parse_rcpt_arg(arg, smtputf8=self.smtputf8)
        except AddressError as exc:
            self.reply(exc.reply)
            return
        refusal = rcpt_params_reply(path.words, self.gate.offered[self.listener])  # bounds
        if refusal is not None:
            self.reply(refusal)
            return
        if len(self.recipients) >= self.config.smtpd_recipient_limit:
            self.reply(replies.TOO_MANY_RECIPIENTS)
            return
        verdict = await self.policy.rcpt(self.state, path, self.login, self.smtputf8)
        if verdict is not None:
            self.reply(verdict)
            self._log_reject("RCPT", verdict, path.address)
            return
        self.rcpt_lines += (b"RCPT TO:" + arg[3:].strip().encode("utf-8") + b"\r\n",)
        self.recipients += (path.address,)
        self.reply(replies.RCPT_OK)

    async def smtp_DATA(self, arg: str) -> None:
        if arg:
            self.reply(replies.NO_ARGS)
            return
        if self.sender is None:
            self.reply(replies.NEED_MAIL)
            return
        if not self.recipients:
            self.reply(replies.NEED_RCPT)
            return
        if self.gate.spool_budget.spent:  # bounds: the worker's spool budget
            self.reply(replies.INSUFFICIENT_STORAGE)
            return
        self.reply(replies.START_DATA)
        spool = Spool(self.config.spool_memory_limit, self.gate.spool_budget)  # bounds
        try:
            try:
                body = await self._receive(spool)
            except OSError as exc:  # the spool's file: a full disk, say
                log.warning("warning: %s: spool: %s", self.client_label, exc)
                self.reply(replies.RELAY_UNAVAILABLE)
                raise Closing from None  # the rest of the message is still on its way
            if body.too_big:
                log.info("NOQUEUE: reject: DATA from %s: %s; from=<%s> proto=%s helo=<%s>",
                         self.client_label, self.tagged(replies.MESSAGE_TOO_BIG), self.sender,
                         self.proto, self.helo or "")
                self.reply(replies.MESSAGE_TOO_BIG)
                return
            if spool.full:  # bounds: the message outgrew the worker's spool budget
                log.warning("warning: %s: spool budget of %d bytes spent; 452 4.3.1",
                            self.client_label, self.gate.spool_budget.limit)
                self.reply(replies.INSUFFICIENT_STORAGE)
                return
            if body.bare_newline:
                await self._bare_newline(b"\n")  # the body's evidence: a line ended by LF
            self.relaying = True
            try:
                await self._relay(spool, body.size)
            finally:
                self.relaying = False
            if self.shutting_down:
                self.reply(replies.shutting_down(self.config.hostname))
                raise Closing
        finally:
            spool.close()
            self._reset_transaction()

    async def _receive(self, spool: Spool) -> BodyReader:
        """The whole message into the spool, reading until CRLF.CRLF."""
        body = BodyReader(spool, self.config.message_size_limit)
        if not await self.wire.feed_until(body.feed, self.config.smtpd_timeout):
            log.info("lost connection after DATA (%d bytes) from %s", body.size,
                     self.client_label)
            raise Closing
        return body

    async def _relay(self, spool: Spool, size: int) -> None:
        """Hand the message to Postfix; its answer is the client's answer."""
        gate = self.gate
        identity = ClientIdentity(
            addr=self.client.ip, port=self.client.port, name=self._xclient_name(),
            helo=self.helo or "", proto=self.proto, login=self.login,
            destaddr=self.client.local_ip, destport=self.client.local_port)
        envelope = Envelope(self.mail_line, self.rcpt_lines)
        header = self._received()
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
            gate.metrics.relayed("busy")
            self.reply(RELAY_BUSY)
            return
        except (RelayError, OSError) as exc:  # OSError: reading the spool back
            log.warning("warning: next hop %s", exc if isinstance(exc, RelayError)
                        else f"{hops.label}: {exc}")
            gate.metrics.relayed("tempfail")
            self.reply(replies.RELAY_UNAVAILABLE)
            return
        gate.metrics.relayed(answer.code, time.monotonic() - started)
        self.reply_raw(answer)
        self._log_relayed(answer, size)

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
            esmtp=self.esmtp, tls=tls, login=self.login is not None,
            recipients=self.recipients, when=datetime.datetime.now(datetime.UTC))

    def _xclient_name(self) -> str:
        name = self.state.client_name
        return name if name != "unknown" else "[UNAVAILABLE]"

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            self.reply(replies.NO_ARGS)
            return
        self._reset_transaction()
        self.reply(replies.OK)

    async def smtp_NOOP(self, arg: str) -> None:
        self.reply(replies.OK)

    async def smtp_QUIT(self, arg: str) -> None:
        self.reply(replies.BYE)
        raise Closing

    async def smtp_VRFY(self, arg: str) -> None:
        self.reply(replies.VRFY_DISABLED)

    def _log_reject(self, stage: str, reply: Reply, recipient: str | None = None) -> None:
        to = f" to=<{recipient}>" if recipient is not None else ""
        log.info("NOQUEUE: reject: %s from %s: %s; from=<%s>%s proto=%s helo=<%s>",
                 stage, self.client_label, self.tagged(reply), self.sender or "", to,
                 self.proto, self.helo or "")


_QUEUE_ID = re.compile(r"queued as ([0-9A-Za-z]+)")
# the order of Postfix's smtpd command table, which its disconnect line follows
_COUNT_ORDER = {verb: i for i, verb in enumerate(
    ("HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "QUIT",
     "UNKNOWN"))}


def tls_established(label: str, ssl_object) -> str:
    """Postfix's line: `Anonymous TLS connection established from name[ip]: TLSv1.3 with
    cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`."""
    if ssl_object is None:
        return f"TLS connection established from {label}"
    name, _, bits = ssl_object.cipher() or ("unknown", "", 0)
    return (f"Anonymous TLS connection established from {label}: {ssl_object.version()} "
            f"with cipher {name} ({bits}/{bits} bits)")


_HANDLERS = {
    name[5:]: getattr(Session, name) for name in dir(Session) if name.startswith("smtp_")
}
