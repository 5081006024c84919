"""Random, hostile input against the real server: every answer is an SMTP reply, it never hangs.

Hypothesis writes sessions from a mix of real commands, truncated ones, binary junk,
bare LF and CR, and over-long lines; each is sent in one burst (pipelined, so the
pipelining and protocol tests fire too), followed by QUIT.
"""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

REPLY = re.compile(rb"\A[2-5]\d\d[ -]")
COMMANDS = [b"EHLO client.example.test", b"HELO x", b"MAIL FROM:<a@example.net>",
            b"MAIL FROM:<>", b"RCPT TO:<user1@example.com>", b"RCPT TO:<@a:b@c>", b"DATA",
            b"RSET", b"NOOP", b"VRFY x", b"STARTTLS", b"AUTH PLAIN AGFAYgA=", b"BDAT 5",
            b"GET / HTTP/1.0", b"Subject: hi", b"MAIL FROM:", b"RCPT TO:<", b"EHLO",
            b".", b"XCLIENT ADDR=1.2.3.4"]
line = st.one_of(
    st.sampled_from(COMMANDS),
    st.binary(max_size=80),
    st.builds(lambda c, junk: c + b" " + junk, st.sampled_from(COMMANDS), st.binary(max_size=40)),
    st.just(b"A" * 3000),
)
ending = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n"])
session = st.lists(st.tuples(line, ending), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    from services.world import populate

    populate(redis_server.client(), dns_server)
    return start_gate(SMTPGATE_SMTPD_TIMEOUT="5", SMTPGATE_NON_SMTP_COMMAND_ACTION="ignore")


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(session)
def test_hostile_sessions_get_replies_only(gate, lines):
    sock = socket.create_connection(("127.0.0.1", gate.mx_port), timeout=15,
                                    source_address=("127.0.0.97", 0))
    sock.sendall(b"".join(text + end for text, end in lines) + b"\r\n.\r\nQUIT\r\n")
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    replies = [r for r in received.split(b"\r\n") if r]
    assert replies, "no answer at all"
    assert all(REPLY.match(r) for r in replies), replies
    assert b"Traceback" not in received


def test_no_session_failed_inside(gate):
    assert "error: session" not in gate.log_text()
    assert "Traceback" not in gate.log_text()
