"""dialogue - the SMTP dialogue's rules without I/O: command lines in, actions out.

SYNOPSIS
    Dialogue(listener, limits, offers_tls=False, offers_auth=False, tls=False)
    dialogue.parse(line) -> Command | Answer        one command line, without its line end
    dialogue.step(command) -> Action                what the driver does next
    dialogue.too_long() -> Answer
    dialogue.hello_refused() ; dialogue.mail_accepted(path, line) ; dialogue.rcpt_accepted(path,
        line) ; dialogue.tls_started() ; dialogue.authenticated(user) ; dialogue.message_done(
        queued)
    dialogue.refused(counted=True)                  a 4xx/5xx was given for the last command
    dialogue.stage ; dialogue.tx ; dialogue.too_many_errors ; dialogue.command_counts()
    dialogue.ehlo_reply(hostname, size_limit, tail) -> str     the 250 lines EHLO gets now
    Limits(recipients, overshoot, junk, hard_errors, offered)
    Stage.START | GREETED | MAIL | RCPT
    Transaction(sender, smtputf8, mail_line) ; tx.rcpt_lines ; tx.recipients ; tx.overshoot
    Answer(reply, counted=True) | Hello(name, esmtp) | Mail(path, line) | Rcpt(path, line)
        | StartTls() | Authenticate(mechanism, initial) | ReceiveBody() | Quit()

DESCRIPTION
    Everything that decides what a command means at this point of the
    dialogue lives here, as h11 keeps HTTP's: the stage (START before
    HELO, GREETED, MAIL once a sender is accepted, RCPT once a recipient
    is), the transaction in progress, the counts Postfix's disconnect line
    shows, the error and junk counts, and the listener's rules (STARTTLS
    first on submission, AUTH offered only over TLS). It reads no socket
    and asks no policy: it is fed parsed command lines and answers with an
    action. An Answer is written as it is; the other actions need the
    driver (smtpgate.smtp.session) to ask the policy, talk TLS or SASL,
    receive a message or relay it, and it reports back with the methods
    above, which move the stage. MAIL's parameters are the driver's to
    check (SIZE= against what the worker's spool budget has left at that
    moment); RCPT's are checked here.

    A transaction is one object, made at an accepted MAIL and dropped
    whole at RSET, HELO/EHLO, STARTTLS and the end of a message; an idle
    session holds none.

    Bounds, as Postfix's smtpd counts them:
    - every 4xx/5xx counts as an error (refused()), and at
      smtpd_hard_error_limit the driver says 421 and closes;
    - HELO, EHLO, RSET, NOOP and VRFY are junk commands: past
      smtpd_junk_command_limit each one is also an error, so pipelining
      MAIL and RSET, or NOOPs, forever ends with 421 (Postfix's smtpd.c
      command table and its junk_cmds count);
    - both counts start again once a message was queued, as smtpd's
      data_cmd() sets error_count and junk_cmds to 0 when the message was
      taken (Postfix 3.7.22's smtpd.c);
    - past smtpd_recipient_limit a recipient gets 452 4.5.3, an error only
      once smtpd_recipient_overshoot_limit more were refused in the
      transaction, so a client with too many recipients still gets the
      first ones delivered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from smtpgate import replies
from smtpgate.address import BLANKS, AddressError, Path, parse_mail_arg, parse_rcpt_arg
from smtpgate.policy.state import MX, SUBMISSION
from smtpgate.smtp.params import rcpt_params_reply
from smtpgate.verdict import Reply

_BLANK = re.compile(rb"[ \t\n\v\f\r]")

VERBS = frozenset({"HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP",
                   "QUIT", "VRFY"})
_KNOWN = {verb: verb for verb in VERBS}
BEFORE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "RSET"})
JUNK = frozenset({"HELO", "EHLO", "RSET", "NOOP", "VRFY"})
SHOWN_ARGUMENTS = frozenset({"HELO", "EHLO", "MAIL", "RCPT"})  # never AUTH's
# the order of Postfix's smtpd command table, which its disconnect line follows
_COUNT_ORDER = {verb: i for i, verb in enumerate(
    ("HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "QUIT",
     "UNKNOWN"))}


class Stage(Enum):
    START = "start"  # no HELO/EHLO yet (or again, after STARTTLS)
    GREETED = "greeted"
    MAIL = "mail"  # a sender accepted
    RCPT = "rcpt"  # and at least one recipient


@dataclass(frozen=True, slots=True)
class Limits:
    recipients: int = 1000  # smtpd_recipient_limit
    overshoot: int = 1000  # smtpd_recipient_overshoot_limit
    junk: int = 100  # smtpd_junk_command_limit
    hard_errors: int = 20  # smtpd_hard_error_limit
    offered: frozenset[str] = frozenset()  # what MAIL and RCPT parameters may use


@dataclass(slots=True)
class Transaction:
    sender: str
    smtputf8: bool
    mail_line: bytes  # "MAIL FROM:<...> params\r\n", as it goes to Postfix
    # tuples: most messages have one recipient
    rcpt_lines: tuple[bytes, ...] = ()
    recipients: tuple[str, ...] = ()
    overshoot: int = 0  # recipients refused past the limit


# --- actions ------------------------------------------------------------------------------------
# Plain slotted classes, made per command: a frozen dataclass's __init__ costs a call per field.


@dataclass(slots=True)
class Command:
    verb: str  # upper case; not in VERBS: an unknown command
    arg: bytes
    line: bytes


@dataclass(slots=True)
class Answer:
    reply: Reply | str
    counted: bool = True  # a 4xx/5xx that is an error (a 452 within the overshoot is not)


@dataclass(slots=True)
class Hello:
    name: str
    esmtp: bool


@dataclass(slots=True)
class Mail:
    path: Path
    line: bytes


@dataclass(slots=True)
class Rcpt:
    path: Path
    line: bytes


@dataclass(slots=True)
class StartTls:
    pass


@dataclass(slots=True)
class Authenticate:
    mechanism: str
    initial: str


@dataclass(slots=True)
class ReceiveBody:
    pass


@dataclass(slots=True)
class Quit:
    pass


Action = Answer | Hello | Mail | Rcpt | StartTls | Authenticate | ReceiveBody | Quit
_OK, _QUIT, _STARTTLS, _RECEIVE_BODY = Answer(replies.OK), Quit(), StartTls(), ReceiveBody()


@dataclass(slots=True)
class Dialogue:
    listener: str
    limits: Limits = field(default_factory=Limits)
    offers_tls: bool = False  # STARTTLS can be offered (a certificate is loaded)
    offers_auth: bool = False  # an authenticator is configured
    tls: bool = False
    stage: Stage = Stage.START
    helo: str | None = None
    esmtp: bool = False
    login: str | None = None
    tx: Transaction | None = None
    errors: int = 0
    junk: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # commands given, per verb
    failed: dict[str, int] | None = None  # of those, the ones answered 4xx or 5xx
    last_command: str = ""
    last_arg: str = ""  # for SHOWN_ARGUMENTS only

    # --- parsing -------------------------------------------------------------------------------

    def parse(self, line: bytes) -> Command | Answer:
        """A command line (without CRLF) as a Command, or the answer to a line that is none."""
        # the verb ends at any blank Postfix's smtpd_token() splits at (`MAIL\tFROM:` is MAIL)
        blank = _BLANK.search(line)
        verb_bytes, arg = (line, b"") if blank is None else (line[:blank.start()],
                                                             line[blank.end():])
        try:
            verb = verb_bytes.decode("ascii").upper()
            verb = _KNOWN.get(verb, verb)  # the counts keep it: one string a verb, not a session
        except UnicodeDecodeError:
            verb = None
        if not line or verb is None:
            self._count("UNKNOWN")
            return Answer(replies.BAD_SYNTAX)
        return Command(verb, arg, line)

    def too_long(self) -> Answer:
        self._count("UNKNOWN")
        return Answer(replies.LINE_TOO_LONG)

    # --- the rules -----------------------------------------------------------------------------

    def step(self, command: Command) -> Action:
        verb = command.verb
        if verb not in VERBS:
            self._count("UNKNOWN")  # and its 502 as failed, as Postfix counts it
            return Answer(replies.UNKNOWN_COMMAND)
        self._count(verb)
        if verb in JUNK:
            if self.junk > self.limits.junk:
                self.errors += 1
            self.junk += 1
        try:
            # only Postfix's blanks: \x1c-\x1f and NBSP at the end stay part of the last word
            arg = command.arg.decode("utf-8").strip(BLANKS)
        except UnicodeDecodeError:
            return Answer(replies.BAD_UTF8)
        if verb in SHOWN_ARGUMENTS:
            self.last_arg = arg
        if self.listener == SUBMISSION and not self.tls and verb not in BEFORE_TLS:
            return Answer(replies.MUST_STARTTLS)
        return _RULES[verb](self, arg)

    def _hello(self, arg: str, esmtp: bool) -> Action:
        if not arg or " " in arg:
            return Answer(replies.EHLO_SYNTAX if esmtp else replies.HELO_SYNTAX)
        self.tx = None
        self.helo, self.esmtp, self.stage = arg, esmtp, Stage.GREETED
        return Hello(arg, esmtp)

    def _helo(self, arg: str) -> Action:
        return self._hello(arg, esmtp=False)

    def _ehlo(self, arg: str) -> Action:
        return self._hello(arg, esmtp=True)

    def _starttls(self, arg: str) -> Action:
        if arg:
            return Answer(replies.NO_ARGS)
        if self.tls:
            return Answer(replies.TLS_ACTIVE)
        if not self.offers_tls:
            return Answer(replies.NOT_IMPLEMENTED)
        return _STARTTLS

    @property
    def auth_offered(self) -> bool:
        return self.listener != MX and self.tls and self.login is None and self.offers_auth

    def _auth(self, arg: str) -> Action:
        if not self.auth_offered:
            return Answer(replies.AUTH_ALREADY if self.login is not None
                          else replies.AUTH_NOT_ENABLED)
        if self.stage is Stage.START:
            return Answer(replies.NEED_HELO)
        if self.tx is not None:
            return Answer(replies.AUTH_IN_MAIL)
        mechanism, _, initial = arg.partition(" ")
        return Authenticate(mechanism.upper(), initial)

    def _mail(self, arg: str) -> Action:
        if self.stage is Stage.START:
            return Answer(replies.NEED_HELO)
        if self.tx is not None:
            return Answer(replies.NESTED_MAIL)
        # SMTPUTF8 counts as a parameter of its own, and only where it is offered
        smtputf8 = None if "SMTPUTF8" in self.limits.offered else False
        try:
            path = parse_mail_arg(arg, smtputf8=smtputf8)
        except AddressError as exc:
            return Answer(exc.reply)
        # its parameters are the driver's to check: SIZE= against the spool's room now
        return Mail(path, b"MAIL FROM:" + arg[5:].strip(BLANKS).encode("utf-8") + b"\r\n")

    def _rcpt(self, arg: str) -> Action:
        tx = self.tx
        if tx is None:
            return Answer(replies.NEED_MAIL)
        try:
            path = parse_rcpt_arg(arg, smtputf8=tx.smtputf8)
        except AddressError as exc:
            return Answer(exc.reply)
        refusal = rcpt_params_reply(path.words, self.limits.offered)
        if refusal is not None:
            return Answer(refusal)
        if len(tx.recipients) >= self.limits.recipients:
            tx.overshoot += 1
            return Answer(replies.TOO_MANY_RECIPIENTS,
                          counted=tx.overshoot > self.limits.overshoot)
        return Rcpt(path, b"RCPT TO:" + arg[3:].strip(BLANKS).encode("utf-8") + b"\r\n")

    def _data(self, arg: str) -> Action:
        if arg:
            return Answer(replies.NO_ARGS)
        if self.tx is None:
            return Answer(replies.NEED_MAIL)
        if not self.tx.recipients:
            return Answer(replies.NEED_RCPT)
        return _RECEIVE_BODY

    def _rset(self, arg: str) -> Action:
        if arg:
            return Answer(replies.NO_ARGS)
        self._end_transaction()
        return _OK

    def _noop(self, arg: str) -> Action:
        return _OK

    def _quit(self, arg: str) -> Action:
        return _QUIT

    def _vrfy(self, arg: str) -> Action:
        return Answer(replies.VRFY_DISABLED)

    def ehlo_reply(self, hostname: str, size_limit: int, tail: tuple[str, ...]) -> str:
        """EHLO's answer at this point: STARTTLS until TLS is on, AUTH once it is (not on
        port 25), `tail` the keywords the next hop carries. Made once per set of those
        (every session of a listener gets the same few)."""
        starttls, auth = not self.tls and self.offers_tls, self.auth_offered
        key = (hostname, size_limit, starttls, auth, tail)
        reply = _EHLO_REPLIES.get(key)
        if reply is not None:
            return reply
        lines = [hostname, "PIPELINING"]
        if size_limit:
            lines.append(f"SIZE {size_limit}")
        if starttls:
            lines.append("STARTTLS")
        if auth:
            lines.append("AUTH PLAIN LOGIN")
        lines += tail
        reply = "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"
        if len(_EHLO_REPLIES) >= 64:  # reloads that changed the name or the size: start over
            _EHLO_REPLIES.clear()
        _EHLO_REPLIES[key] = reply
        return reply

    # --- what the driver reports back ----------------------------------------------------------

    def hello_refused(self) -> None:
        self.helo, self.stage = None, Stage.START

    def mail_accepted(self, path: Path, line: bytes) -> None:
        self.tx = Transaction(path.address, "SMTPUTF8" in path.params, line)
        self.stage = Stage.MAIL

    def rcpt_accepted(self, path: Path, line: bytes) -> None:
        tx = self.tx
        tx.rcpt_lines += (line,)
        tx.recipients += (path.address,)
        self.stage = Stage.RCPT

    def tls_started(self) -> None:
        """RFC 3207: after the handshake the dialogue starts again, from HELO."""
        self.tls = True
        self.helo, self.esmtp = None, False
        self.tx, self.stage = None, Stage.START

    def authenticated(self, user: str) -> None:
        self.login = user

    def message_done(self, queued: bool) -> None:
        self._end_transaction()
        if queued:  # Postfix's smtpd forgives a client's errors once it took a message
            self.errors = self.junk = 0

    def _end_transaction(self) -> None:
        self.tx = None
        if self.stage is not Stage.START:
            self.stage = Stage.GREETED

    # --- counting ------------------------------------------------------------------------------

    def _count(self, verb: str) -> None:
        self.last_command, self.last_arg = verb, ""
        self.counts[verb] = self.counts.get(verb, 0) + 1

    def refused(self, counted: bool = True) -> None:
        """The last command was answered 4xx/5xx: an error, and failed in the counts."""
        if not counted:
            return
        self.errors += 1
        verb = self.last_command
        if verb:
            failed = self.failed if self.failed is not None else {}
            if failed.get(verb, 0) < self.counts.get(verb, 0):
                failed[verb] = failed.get(verb, 0) + 1
                self.failed = failed

    @property
    def too_many_errors(self) -> bool:
        return self.errors >= self.limits.hard_errors

    def command_counts(self) -> str:
        """Postfix's disconnect summary: `ehlo=1 mail=1 rcpt=0/1 data=0/1 quit=1 commands=3/5`."""
        if not self.counts:  # refused at connect, most sessions of a busy MX: asked thrice
            return "commands=0"
        words, ok, total = [], 0, 0
        for verb in sorted(self.counts, key=_COUNT_ORDER.get):
            given, failed = self.counts[verb], (self.failed or {}).get(verb, 0)
            words.append(f"{verb.lower()}={given - failed}/{given}" if failed
                         else f"{verb.lower()}={given}")
            ok, total = ok + given - failed, total + given
        words.append(f"commands={ok}/{total}" if ok != total else f"commands={total}")
        return " ".join(words)


_EHLO_REPLIES: dict[tuple, str] = {}

_RULES = {
    "HELO": Dialogue._helo, "EHLO": Dialogue._ehlo, "STARTTLS": Dialogue._starttls,
    "AUTH": Dialogue._auth, "MAIL": Dialogue._mail, "RCPT": Dialogue._rcpt,
    "DATA": Dialogue._data, "RSET": Dialogue._rset, "NOOP": Dialogue._noop,
    "QUIT": Dialogue._quit, "VRFY": Dialogue._vrfy,
}
