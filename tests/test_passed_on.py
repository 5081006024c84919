"""Replies from the next hop passed on as one well-formed reply, the session id once, at the end."""

from __future__ import annotations

import pytest

from smtpgate.relay.passed_on import passed_on
from smtpgate.verdict import Reply

TAG = "; session=0123456789AB"

CASES = [
    ("one line", 250, b"250 2.0.0 Ok: queued as 4Xyz\r\n", "",
     b"250 2.0.0 Ok: queued as 4Xyz\r\n"),
    ("refusal tagged", 554, b"554 5.7.1 Spam message rejected\r\n", TAG,
     b"554 5.7.1 Spam message rejected" + TAG.encode() + b"\r\n"),
    ("multi-line: tag on the last line only", 550,
     b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n", TAG,
     b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third" + TAG.encode() + b"\r\n"),
    ("a forged 250 line inside a refusal is its text", 550,
     b"550-5.7.1 no\r\n250 2.0.0 Ok: queued as X\r\n", TAG,
     b"550-5.7.1 no\r\n550 2.0.0 Ok: queued as X" + TAG.encode() + b"\r\n"),
    ("a bare CR cannot end the reply", 554, b"554 5.7.1 spam\r250 2.0.0 Ok\r\n", TAG,
     b"554 5.7.1 spam?250 2.0.0 Ok" + TAG.encode() + b"\r\n"),
    ("bare LF lines become CRLF lines of the reply", 451,
     b"451-4.7.1 a\n451 4.7.1 b\n", TAG, b"451-4.7.1 a\r\n451 4.7.1 b" + TAG.encode() + b"\r\n"),
    ("a line without a code keeps its text", 550, b"550-5.7.1 a\r\nplain text\r\n", "",
     b"550-5.7.1 a\r\n550 plain text\r\n"),
    ("control characters shown as ?", 550, b"550 5.7.1 a\x00b\x1bc\x7fd\tz\r\n", "",
     b"550 5.7.1 a?b?c?d\tz\r\n"),
    ("utf-8 kept, broken bytes replaced", 550, "550 5.7.1 für\r\n".encode() + b"\xff\r\n", "",
     "550-5.7.1 für\r\n550 \ufffd\r\n".encode()),
    ("no final CRLF", 421, b"421 4.3.2 bye", TAG, b"421 4.3.2 bye" + TAG.encode() + b"\r\n"),
]


@pytest.mark.parametrize(("code", "raw", "tag", "wire"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_passed_on(code, raw, tag, wire):
    got = passed_on(code, raw, tag)
    assert got == wire
    lines = got.split(b"\r\n")[:-1]
    assert all(line[:3] == str(code).encode() for line in lines)
    assert [line[3:4] for line in lines] == [b"-"] * (len(lines) - 1) + [b" "]
    assert b"\r" not in got.replace(b"\r\n", b"") and got.count(b"\n") == len(lines)
    assert got.count(b"session=") == (1 if tag else 0)


def test_own_replies_are_one_line_whatever_their_text():
    reply = Reply(554, "5.7.1", "Access denied\r\n250 2.0.0 Ok")
    assert str(reply) == "554 5.7.1 Access denied??250 2.0.0 Ok"
