"""protocol_tests - postscreen's deep protocol tests as one session meets them.

SYNOPSIS
    ProtocolTests(policy, state, publish, listener)
    tests.concerns(command, pending) -> bool      False: of_command() would find nothing
    await tests.of_command(command, pending, after, esmtp) -> Reply | None
    await tests.of_bare_newline(line, after, esmtp) -> Reply | None
    NON_SMTP_COMMANDS ; PENDING_SHOWN

DESCRIPTION
    Which line is evidence for which test: a known command with more
    already pipelined behind it (pipelining, shown at most PENDING_SHOWN
    bytes of what follows), an HTTP or POP verb or a header line given as
    a command (non_smtp_command), the first line of the session, command
    or body, that ends in a bare LF (bare_newline). The policy decides
    (smtpgate.policy.stages.Policy.protocol); each test is reported once
    per session, the first finding deciding as in postscreen, and a
    failure is published as a ProtocolTestFailed event. A reply returned
    means hang up with it (the test's action is drop).

    The session asks only when the policy wants the tests for this
    client (Policy.wants_protocol_tests: port 25, not allowlisted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smtpgate.smtp.dialogue import VERBS, Command
from smtpgate.smtp.events import Event, ProtocolTestFailed
from smtpgate.verdict import Reply

NON_SMTP_COMMANDS = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD", "USER", "PASS"})
PENDING_SHOWN = 100  # bytes of a pipelined batch a protocol test sees (and the log shows)


class ProtocolTests:
    __slots__ = ("bare_newline_seen", "listener", "policy", "publish", "state")

    def __init__(self, policy: Any, state: Any, publish: Callable[[Event], None],
                 listener: str) -> None:
        self.policy = policy  # the session's (smtpgate.smtp.gate.SessionPolicy)
        self.state = state  # smtpgate.policy.state.ClientState
        self.publish = publish
        self.listener = listener
        self.bare_newline_seen = False

    @staticmethod
    def concerns(command: Command, pending: bytes | bytearray) -> bool:
        """Whether of_command() can find anything in this command: a known verb with nothing
        pipelined behind it (almost every command) cannot, and costs no coroutine."""
        return bool(pending) or command.verb not in VERBS

    async def of_command(self, command: Command, pending: bytes | bytearray, after: str,
                         esmtp: bool) -> Reply | None:
        """`pending`: what the client sent after this command, not yet read."""
        if command.verb in VERBS:
            if pending:
                shown = bytes(memoryview(pending)[:PENDING_SHOWN])
                return await self._test("pipelining", command.line, shown, after, esmtp)
            return None
        verb, line = command.verb, command.line
        looks_like_header = verb.endswith(":") or b":" in line.split(b" ", 1)[0]
        if verb in NON_SMTP_COMMANDS or looks_like_header:
            return await self._test("non_smtp_command", line, b"", after, esmtp)
        return None

    async def of_bare_newline(self, line: bytes, after: str, esmtp: bool) -> Reply | None:
        """The first line with a bare LF. The line itself goes to the test: it is the test's
        evidence, and a line without its bare LF would pass it."""
        if self.bare_newline_seen:
            return None
        self.bare_newline_seen = True
        return await self._test("bare_newline", line, b"", after, esmtp)

    async def _test(self, test: str, line: bytes, pending: bytes, after: str,
                    esmtp: bool) -> Reply | None:
        state = self.state
        if test in state.protocol_failed:
            return None
        hang_up = await self.policy.protocol(state, test, line, pending, after, esmtp)
        if test in state.protocol_failed:
            self.publish(ProtocolTestFailed(test, self.listener))
        return hang_up
