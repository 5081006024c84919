"""Random, hostile input against the real server: every answer is an SMTP reply, it never hangs.

Hypothesis writes sessions from a mix of real commands, truncated ones, binary junk,
bare LF and CR, and over-long lines; each is sent in one burst (pipelined, so the
pipelining and protocol tests fire too), followed by QUIT.

Each test has its own smtpgate and checks its own log: none depends on another having
run first, or on the order they run in.
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


FAILED_INSIDE = ("error: session", "Traceback")


def start_hostile_gate(start_gate, redis_server, dns_server):
    from services.world import populate

    populate(redis_server.client(), dns_server)
    return start_gate(SMTPGATE_SMTPD_TIMEOUT="5", SMTPGATE_NON_SMTP_COMMAND_ACTION="ignore")


@pytest.fixture(scope="module")
def fuzz_gate(start_gate, redis_server, dns_server):
    """The hypothesis test's own smtpgate; it must still stop cleanly after the examples."""
    gate = start_hostile_gate(start_gate, redis_server, dns_server)
    yield gate
    gate.stop()


def hostile_session(port: int, lines) -> bytes:
    """Send the lines in one burst, then a lone dot and QUIT; everything heard until EOF."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=15,
                                  source_address=("127.0.0.97", 0)) as sock:
        sock.sendall(b"".join(text + end for text, end in lines) + b"\r\n.\r\nQUIT\r\n")
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def assert_replies_only(received: bytes) -> None:
    replies = [r for r in received.split(b"\r\n") if r]
    assert replies, "no answer at all"
    assert all(REPLY.match(r) for r in replies), replies
    assert b"Traceback" not in received


@settings(max_examples=10, deadline=None,  # 300 more in memory: test_dialogue.py
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(session)
def test_hostile_sessions_get_replies_only(fuzz_gate, lines):
    since = len(fuzz_gate.log_text())
    assert_replies_only(hostile_session(fuzz_gate.mx_port, lines))
    logged = fuzz_gate.log_text()[since:]  # the session has ended: the server closed first
    for sign in FAILED_INSIDE:
        assert sign not in logged, logged


FIXED_SESSIONS = [  # STARTTLS and then junk waits out the handshake timeout: hypothesis has it
    [(command, ending)] for command in COMMANDS if command != b"STARTTLS"
    for ending in (b"\r\n", b"\n", b"\r")
] + [
    [(b"A" * 3000, b"\r\n"), (b"EHLO x", b"\n")],
    [(b"\x00\xff\xfe", b"\r"), (b"MAIL FROM:<a@example.net>", b"\r\n"), (b"DATA", b"\n")],
    [(b"EHLO client.example.test", b"\r\n"), (b"MAIL FROM:<a@example.net>", b"\r\n"),
     (b"RCPT TO:<user1@example.com>", b"\r\n"), (b"DATA", b"\r\n"), (b"Subject: x", b"\n")],
]


def test_fixed_hostile_sessions_leave_no_error_in_the_log(start_gate, redis_server, dns_server):
    """A fixed set of hostile sessions on a fresh smtpgate: replies only, and its whole log,
    read after it has stopped (every line written), names no failure inside a session."""
    gate = start_hostile_gate(start_gate, redis_server, dns_server)
    try:
        for lines in FIXED_SESSIONS:
            assert_replies_only(hostile_session(gate.mx_port, lines))
    finally:
        gate.stop()
    log = gate.log_text()
    assert "connect from" in log  # the sessions were logged at all
    for sign in FAILED_INSIDE:
        assert sign not in log, log[-3000:]
