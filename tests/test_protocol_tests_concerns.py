"""ProtocolTests.concerns: the session skips of_command() only where it could find nothing."""

from __future__ import annotations

import pytest

from smtpgate.smtp.dialogue import VERBS, Command
from smtpgate.smtp.protocol_tests import NON_SMTP_COMMANDS, ProtocolTests


class State:
    def __init__(self) -> None:
        self.protocol_failed: set[str] = set()


class Policy:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def protocol(self, state, test, line, pending, after, esmtp):
        self.asked.append(test)
        return None


def command(line: bytes) -> Command:
    verb, _, arg = line.partition(b" ")
    return Command(verb.decode().upper(), arg, line)


@pytest.mark.parametrize("verb", sorted(VERBS))
async def test_a_known_verb_with_nothing_pipelined_is_no_evidence(verb):
    policy = Policy()
    tests = ProtocolTests(policy, State(), lambda event: None, "mx")
    line = command(f"{verb} x".encode())
    assert not tests.concerns(line, bytearray())
    assert await tests.of_command(line, bytearray(), "", True) is None
    assert policy.asked == []  # what concerns() skips, of_command() would not have asked


@pytest.mark.parametrize(("line", "pending", "test"), [
    (b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.com>\r\n", "pipelining"),
    (b"GET / HTTP/1.1", b"", "non_smtp_command"),
    (b"Subject: hello", b"", "non_smtp_command"),
    (b"XYZZY", b"", None),  # an unknown verb: asked, and no test applies
])
async def test_what_may_be_evidence_is_looked_at(line, pending, test):
    policy = Policy()
    tests = ProtocolTests(policy, State(), lambda event: None, "mx")
    assert tests.concerns(command(line), bytearray(pending))
    await tests.of_command(command(line), bytearray(pending), "", True)
    assert policy.asked == ([test] if test else [])
    assert "GET" in NON_SMTP_COMMANDS
