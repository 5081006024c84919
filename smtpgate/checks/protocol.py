"""protocol - postscreen's deep protocol tests, run inline in the session.

SYNOPSIS
    pipelining(command, pending, client, port, *, pipelining_offered=False,
               action="enforce") -> Verdict
    non_smtp_command(line, client, port, *, after="", action="drop",
                     forbidden=FORBIDDEN_COMMANDS) -> Verdict
    bare_newline(line, client, port, *, after="", action="ignore") -> Verdict
    passed(test, client, port, ttl) -> Verdict
    TESTS, FORBIDDEN_COMMANDS, PIPELINABLE

DESCRIPTION
    The session reads a command line and hands each test the facts it saw.
    A test that finds nothing returns PASS with ttl 0: postscreen only
    counts these tests as passed when the client reaches RCPT, and the
    session then calls passed() to get the cacheable verdict.

    pipelining(): `command` is the command line just read and `pending`
    the bytes already buffered behind it (the client did not wait for the
    reply). Talking ahead is a failure before PIPELINING was offered
    (HELO, or before EHLO) and, after it was, behind a command that RFC
    2920 says must end a group (EHLO, DATA, VRFY, EXPN, TURN, QUIT, NOOP,
    STARTTLS, AUTH, ...): only RSET, MAIL, SEND, SOML, SAML and RCPT may be
    followed by more. Log: `COMMAND PIPELINING from [ip]:port after CMD:
    pending`.

    non_smtp_command(): the line's first word is a forbidden command
    (postscreen_forbidden_commands: CONNECT GET POST, any case) or looks
    like a header (`Subject:`): a proxy probe or an HTTP client. Log:
    `NON-SMTP COMMAND from [ip]:port after CMD: line`. Drop is `521 5.7.0
    Error: I can break rules, too. Goodbye.`.

    bare_newline(): the raw line (bytes, with its terminator) ends in LF
    without CR or holds a bare LF. Log: `BARE NEWLINE from [ip]:port after
    CMD`.

    Replies as postscreen's: enforce `550 5.5.1 Protocol error`; drop
    `521 5.5.1 Protocol error` (pipelining, bare newline).
"""

from __future__ import annotations

import re
from collections.abc import Collection

from smtpgate.checks.screening_action import act, escape
from smtpgate.verdict import Outcome, Reply, Verdict

TESTS = ("pipelining", "non_smtp_command", "bare_newline")
FORBIDDEN_COMMANDS = frozenset({"CONNECT", "GET", "POST"})
PIPELINABLE = frozenset({"RSET", "MAIL", "SEND", "SOML", "SAML", "RCPT"})
PROTOCOL_ERROR_DROP = Reply(521, "5.5.1", "Protocol error")
PROTOCOL_ERROR_ENFORCE = Reply(550, "5.5.1", "Protocol error")
BREAK_RULES_DROP = Reply(521, "5.7.0", "Error: I can break rules, too. Goodbye.")
# A header name: printable ASCII except ':' and space, then ':' (RFC 5322 field-name).
_HEADER = re.compile(r"[!-9;-~]+:")
_SMTP_COMMANDS = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
     "HELP", "STARTTLS", "AUTH", "BDAT", "ETRN", "XCLIENT", "XFORWARD", "TURN"}
)


def _verb(line: str) -> str:
    words = line.split(None, 1)
    return words[0].upper() if words else ""


def pipelining(
    command: str,
    pending: bytes,
    client: str,
    port: int | str,
    *,
    pipelining_offered: bool = False,
    action: str = "enforce",
) -> Verdict:
    verb = _verb(command)
    if not pending or (pipelining_offered and verb in PIPELINABLE):
        return Verdict("pipelining", Outcome.PASS)
    reason = (
        f"COMMAND PIPELINING from [{client}]:{port} after {escape(verb or command)}: "
        f"{escape(pending)}"
    )
    return act("pipelining", action, reason, PROTOCOL_ERROR_DROP, PROTOCOL_ERROR_ENFORCE)


def non_smtp_command(
    line: str,
    client: str,
    port: int | str,
    *,
    after: str = "",
    action: str = "drop",
    forbidden: Collection[str] = FORBIDDEN_COMMANDS,
) -> Verdict:
    words = line.split(None, 1)
    first = words[0] if words else ""
    verb = first.upper()
    if verb in _SMTP_COMMANDS or not (
        verb in {f.upper() for f in forbidden} or _HEADER.fullmatch(first)
    ):
        return Verdict("non_smtp_command", Outcome.PASS)
    reason = (
        f"NON-SMTP COMMAND from [{client}]:{port} after {escape(after or 'CONNECT')}: "
        f"{escape(line)}"
    )
    return act("non_smtp_command", action, reason, BREAK_RULES_DROP, PROTOCOL_ERROR_ENFORCE)


def bare_newline(
    line: bytes,
    client: str,
    port: int | str,
    *,
    after: str = "",
    action: str = "ignore",
) -> Verdict:
    if b"\n" not in line.replace(b"\r\n", b""):
        return Verdict("bare_newline", Outcome.PASS)
    reason = f"BARE NEWLINE from [{client}]:{port} after {escape(after or 'CONNECT')}"
    return act("bare_newline", action, reason, PROTOCOL_ERROR_DROP, PROTOCOL_ERROR_ENFORCE)


def passed(test: str, client: str, port: int | str, ttl: float) -> Verdict:
    if test not in TESTS:
        raise ValueError(f"{test!r} is not one of {', '.join(TESTS)}")
    return Verdict(test, Outcome.PASS, reason=f"PASS {test} [{client}]:{port}", ttl=ttl)
