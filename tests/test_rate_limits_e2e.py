"""anvil's event limits and the per-login limits, counted across two gates sharing one Redis.

Two `smtpgate serve` processes (one worker each) in front of the harness's Postfix and
Dovecot, with small limits; each test's events alternate between the gates, so a limit
holds only if the count lives in the shared Redis. Every client address is a test's own,
and the `world` fixture empties Redis before each test (the counters included). The replies
are Postfix 3.7's (smtpd.c); the session must go on after a 450 and a 454, and end after
the 421 of a new TLS session too many.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families
from services.smtp_talk import Talk, untag

pytestmark = pytest.mark.slow

HOSTNAME = "mx.rate.test"
LIMITS = {
    "HOSTNAME": HOSTNAME,
    "SMTPGATE_CLIENT_MESSAGE_RATE_LIMIT": "2",
    "SMTPGATE_CLIENT_RECIPIENT_RATE_LIMIT": "3",
    "SMTPGATE_CLIENT_NEW_TLS_SESSION_RATE_LIMIT": "2",
    "SMTPGATE_CLIENT_AUTH_RATE_LIMIT": "2",
    "SMTPGATE_CLIENT_EVENT_LIMIT_EXCEPTIONS": "127.0.9.0/24",
    "SMTPGATE_LOGIN_MESSAGE_RATE_LIMIT": "2",
    "SMTPGATE_LOGIN_RECIPIENT_RATE_LIMIT": "3",
}
SPARED = "127.0.9.1"  # in the exception network
USER, PASSWORD = "user1@example.com", "secret1"


@pytest.fixture(scope="module")
def gates(start_gate):
    first = start_gate(listeners=("mx", "submission", "submissions", "metrics"), **LIMITS)
    try:
        second = start_gate(listeners=("mx", "submission", "submissions"), **LIMITS)
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def logins(world):
    world.set(f"LOGMAP:{USER}", USER)
    return world


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def mx(gate, source: str) -> Talk:
    talk = Talk("127.0.0.1", gate.mx_port, source=source)
    assert talk.banner()[0] == 220
    assert talk.cmd("EHLO client.example.test")[0] == 250
    return talk


def submission(gate, source: str, login: bool = True) -> Talk:
    """A client on 587 after STARTTLS and EHLO, logged in as USER unless told not to."""
    talk = Talk("127.0.0.1", gate.submission_port, source=source)
    try:
        talk.banner()
        talk.cmd("EHLO laptop")
        assert talk.cmd("STARTTLS")[0] == 220
        talk.starttls()
        assert talk.cmd("EHLO laptop")[0] == 250
        if login:
            assert talk.cmd("AUTH PLAIN " + plain(USER, PASSWORD))[0] == 235
    except BaseException:
        talk.close()
        raise
    return talk


def rate_keys(redis) -> list[str]:
    return sorted(redis.scan_iter("smtpgate:rate:*"))


def test_messages_over_the_client_limit_are_450_on_either_gate(gates, world):
    first, second = gates
    client = "127.0.10.1"
    with mx(first, client) as a, mx(second, client) as b:
        assert a.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert a.cmd("RSET")[0] == 250
        assert b.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert b.cmd("RSET")[0] == 250
        assert untag(a.cmd("MAIL FROM:<a@example.net>")) == (
            450, "450 4.7.1 Error: too much mail from 127.0.10.1")
        assert a.cmd("NOOP")[0] == 250  # the session goes on
        assert a.cmd("QUIT")[0] == 221
    first.wait_for_log(r"NOQUEUE: reject: MAIL from unknown\[127\.0\.10\.1\]: 450 4\.7\.1 "
                       r"Error: too much mail from 127\.0\.10\.1")
    assert world.pttl("smtpgate:rate:message:{127.0.10.1}") <= 60_000  # a window, not forever
    # the rejection metric counts it by limit and stage
    with urllib.request.urlopen(f"http://127.0.0.1:{first.metrics_port}/metrics",
                                timeout=10) as answer:
        text = answer.read().decode()
    counted = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert counted[("smtpgate_rejections_total",
                    (("check", "message_rate_limit"), ("stage", "mail")))] >= 1


def test_recipients_over_the_client_limit_are_450_and_the_rest_is_unchanged(gates, world):
    first, second = gates
    client = "127.0.0.71"  # FCrDNS passes: its recipients are accepted on their own merit
    with mx(first, client) as a, mx(second, client) as b:
        assert a.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert a.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert a.cmd("RCPT TO:<nobody@example.com>")[0] == 550  # refused, but counted
        assert b.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert b.cmd("RCPT TO:<user2@example.com>")[0] == 250
        assert untag(b.cmd("RCPT TO:<user2@example.com>")) == (
            450, "450 4.7.1 Error: too many recipients from 127.0.0.71")
        assert untag(a.cmd("RCPT TO:<user1@example.com>")) == (
            450, "450 4.7.1 Error: too many recipients from 127.0.0.71")
        # the transaction with its accepted recipient goes on and delivers
        mark = f"rate-{uuid.uuid4().hex}"
        assert a.cmd("DATA")[0] == 354
        assert a.cmd(f"Subject: {mark}\r\n\r\nhello\r\n.")[0] == 250
        assert a.cmd("QUIT")[0] == 221
        assert b.cmd("QUIT")[0] == 221


def test_auth_commands_over_the_client_limit_are_450(gates, logins):
    first, second = gates
    client = "127.0.10.3"
    with submission(first, client, login=False) as a, \
            submission(second, client, login=False) as b:
        for talk in (a, b):  # two AUTH commands, cancelled: each counts
            assert talk.cmd("AUTH PLAIN")[0] == 334
            assert talk.cmd("*")[0] == 501
        assert untag(a.cmd("AUTH PLAIN " + plain(USER, PASSWORD))) == (
            450, "450 4.7.1 Error: too many AUTH commands from 127.0.10.3")
        assert a.cmd("NOOP")[0] == 250  # the session goes on
        assert a.cmd("QUIT")[0] == 221
        assert b.cmd("QUIT")[0] == 221


def test_new_tls_sessions_over_the_limit_421_after_the_handshake_then_454_before(gates, world):
    first, second = gates
    client = "127.0.10.4"
    for gate in (first, second):  # two new TLS sessions: at the limit
        with submission(gate, client, login=False) as talk:
            assert talk.cmd("QUIT")[0] == 221
    with Talk("127.0.0.1", first.submission_port, source=client) as talk:
        talk.banner()
        talk.cmd("EHLO laptop")
        assert talk.cmd("STARTTLS")[0] == 220  # read, not counted: 2 is not over 2
        talk.starttls()  # the third new session: over
        assert untag(talk.reply()) == (421, f"421 4.7.0 {HOSTNAME} Error: too many new TLS "
                                            "sessions from unknown[127.0.10.4]")
        assert talk.closed()
    with Talk("127.0.0.1", second.submission_port, source=client) as talk:
        talk.banner()
        talk.cmd("EHLO laptop")
        assert untag(talk.cmd("STARTTLS")) == (
            454, "454 4.7.0 Error: too many new TLS sessions from unknown[127.0.10.4]")
        assert talk.cmd("EHLO laptop")[0] == 250  # it goes on in plain text
        assert talk.cmd("QUIT")[0] == 221


def test_implicit_tls_sessions_count_the_one_over_hears_421_and_then_no_handshake(
        gates, world):
    first, second = gates
    client = "127.0.10.5"
    for gate in (first, second):
        with Talk("127.0.0.1", gate.submissions_port, source=client) as talk:
            talk.starttls()  # 465: the handshake first
            assert talk.reply()[0] == 220
            assert talk.cmd("QUIT")[0] == 221
    with Talk("127.0.0.1", first.submissions_port, source=client) as talk:
        talk.starttls()
        assert untag(talk.reply()) == (421, f"421 4.7.0 {HOSTNAME} Error: too many new TLS "
                                            "sessions from unknown[127.0.10.5]")
        assert talk.closed()
    # now over it: the next one gets no handshake at all, on either gate
    with socket.create_connection(("127.0.0.1", second.submissions_port),
                                  source_address=(client, 0), timeout=10) as sock, \
            pytest.raises((ssl.SSLError, ConnectionError)):
        ssl._create_unverified_context().wrap_socket(sock)
    second.wait_for_log(r"warning: Refusing TLS service request from unknown\[127\.0\.10\.5\] "
                        r"for service submissions \(too many new TLS sessions\)")


def test_the_login_limits_count_its_messages_from_every_client_and_gate(gates, logins,
                                                                        dovecot_server):
    first, second = gates
    mark = f"login-{uuid.uuid4().hex}"
    # a real client's message, through the first gate: the login's first
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(first.submission_port),
         "--local-interface", "127.0.10.6", "--helo", "laptop", "--timeout", "30", "--tls",
         "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
         "--from", USER, "--to", "user2@example.com", "--header", f"Subject: {mark}"],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    dovecot_server.wait_for_message("user2@example.com", lambda raw: mark.encode() in raw)
    # its second from another client on the other gate; the third, from a third client
    with submission(second, "127.0.10.7") as b, submission(first, "127.0.10.8") as a:
        assert b.cmd(f"MAIL FROM:<{USER}>")[0] == 250
        assert untag(a.cmd(f"MAIL FROM:<{USER}>")) == (
            450, f"450 4.7.1 Error: too much mail from login {USER}")
        assert a.cmd("QUIT")[0] == 221
        assert b.cmd("QUIT")[0] == 221


def test_the_login_recipient_limit(gates, logins):
    first, second = gates
    with submission(first, "127.0.10.9") as a, submission(second, "127.0.10.10") as b:
        assert a.cmd(f"MAIL FROM:<{USER}>")[0] == 250
        assert a.cmd("RCPT TO:<user2@example.com>")[0] == 250
        assert a.cmd("RCPT TO:<someone@example.org>")[0] == 250
        assert b.cmd(f"MAIL FROM:<{USER}>")[0] == 250
        assert b.cmd("RCPT TO:<user2@example.com>")[0] == 250
        assert untag(b.cmd("RCPT TO:<other@example.org>")) == (
            450, f"450 4.7.1 Error: too many recipients from login {USER}")
        assert a.cmd("QUIT")[0] == 221
        assert b.cmd("QUIT")[0] == 221
    assert f"smtpgate:rate:login_recipient:{{{USER}}}" in rate_keys(logins)


def test_the_exception_network_is_neither_limited_nor_counted(gates, logins):
    first, second = gates
    with mx(first, SPARED) as a, mx(second, SPARED) as b:
        for _ in range(3):  # over the message limit, on both gates
            for talk in (a, b):
                assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
                assert talk.cmd("RSET")[0] == 250
        assert a.cmd("QUIT")[0] == 221
        assert b.cmd("QUIT")[0] == 221
    for _ in range(3):  # new TLS sessions and AUTH commands over their limits
        with submission(first, SPARED, login=False) as talk:
            for _ in range(3):
                assert talk.cmd("AUTH PLAIN")[0] == 334
                assert talk.cmd("*")[0] == 501
            assert talk.cmd("QUIT")[0] == 221
    assert rate_keys(logins) == []
