"""Submission on 587 (STARTTLS) and 465 (implicit TLS): AUTH through the real Dovecot, LOGMAP."""

from __future__ import annotations

import base64
import socket
import subprocess
import uuid

import pytest
from services.smtp_talk import Talk, untag
from services.waiting import wait_until

pytestmark = pytest.mark.slow


LISTENERS = ("mx", "submission", "submissions")
GATE_ENV = {"SMTPGATE_AUTH_FAILURE_LIMIT": "2"}


@pytest.fixture(scope="module")
def gate(start_gate):
    process = start_gate(listeners=LISTENERS, **GATE_ENV)
    yield process
    process.stop()


@pytest.fixture
def logins(world):
    world.set("LOGMAP:user1@example.com", "user1@example.com")
    world.set("LOGMAP:@example.org", "user2@example.com")
    return world


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def swaks(port: int, *args: str, source: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(port), "--local-interface", source,
         "--helo", "laptop", "--timeout", "30", *args],
        capture_output=True, text=True, timeout=90)


def tls_talk(gate, source: str) -> Talk:
    """A client on submission after STARTTLS; use it in a with statement."""
    talk = Talk("127.0.0.1", gate.submission_port, source=source)
    try:
        assert talk.banner()[0] == 220
        talk.cmd("EHLO laptop")
        assert talk.cmd("STARTTLS")[0] == 220
        talk.starttls()
    except BaseException:
        talk.close()
        raise
    return talk


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_good_login_over_starttls_is_delivered_as_authenticated(gate, logins, dovecot_server,
                                                                postfix_server, mechanism):
    mark = f"sub-{uuid.uuid4().hex}"
    since = postfix_server.log_mark()
    result = swaks(gate.submission_port, "--tls", "--auth", mechanism,
                   "--auth-user", "user1@example.com", "--auth-password", "secret1",
                   "--from", "user1@example.com", "--to", "user2@example.com",
                   "--header", f"Subject: {mark}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "secret1" not in gate.log_text()
    dovecot_server.wait_for_message("user2@example.com", lambda raw: mark.encode() in raw)
    # Postfix saw an authenticated client: XCLIENT LOGIN reached its submission service
    postfix_server.wait_for_log(r"sasl_username=user1@example\.com", since=since)


def test_mail_without_auth_is_refused_on_submission(gate, logins):
    with tls_talk(gate, "127.0.0.1") as talk:
        assert "AUTH PLAIN LOGIN" in talk.cmd("EHLO laptop")[1]
        assert untag(talk.cmd("MAIL FROM:<user1@example.com>")) == (
            530, "530 5.7.0 Authentication required")


def test_wrong_password_then_the_limit(gate, logins):
    source = "127.0.8.1"
    with tls_talk(gate, source) as talk:
        talk.cmd("EHLO laptop")
        assert untag(talk.cmd("AUTH PLAIN " + plain("user1@example.com", "wrong"))) == (
            535, "535 5.7.8 Error: authentication failed: authentication failure")
        assert talk.cmd("AUTH PLAIN " + plain("user1@example.com", "wrong"))[0] == 535
        code, text = talk.cmd("AUTH PLAIN " + plain("user1@example.com", "secret1"))
        assert code == 421 and "too many authentication failures" in text
        assert talk.closed()
        with tls_talk(gate, source) as again:
            again.cmd("EHLO laptop")
            code, _ = again.cmd("AUTH PLAIN " + plain("user1@example.com", "secret1"))
            assert code == 421  # refused before it can try again
            assert "wrong" not in gate.log_text() and plain("user1@example.com", "wrong") \
                not in gate.log_text()


def test_sender_the_login_does_not_own_is_refused(gate, logins):
    with tls_talk(gate, "127.0.8.2") as talk:
        talk.cmd("EHLO laptop")
        assert talk.cmd("AUTH PLAIN " + plain("user1@example.com", "secret1"))[0] == 235
        assert untag(talk.cmd("MAIL FROM:<user2@example.com>")) == (
            553, "553 5.7.1 <user2@example.com>: Sender address rejected: "
                 "not owned by user user1@example.com")
        assert talk.cmd("MAIL FROM:<user1@example.com>")[0] == 250


def test_domain_wide_logmap(gate, logins):
    with tls_talk(gate, "127.0.8.3") as talk:
        talk.cmd("EHLO laptop")
        assert talk.cmd("AUTH PLAIN " + plain("user2@example.com", "secret2"))[0] == 235
        assert talk.cmd("MAIL FROM:<anyone@example.org>")[0] == 250


def test_implicit_tls_on_465(gate, logins, dovecot_server):
    mark = f"smtps-{uuid.uuid4().hex}"
    result = swaks(gate.submissions_port, "--tlsc", "--auth", "PLAIN",
                   "--auth-user", "user1@example.com", "--auth-password", "secret1",
                   "--from", "user1@example.com", "--to", "user1@example.com",
                   "--header", f"Subject: {mark}")
    assert result.returncode == 0, result.stdout + result.stderr
    dovecot_server.wait_for_message("user1@example.com", lambda raw: mark.encode() in raw)


def test_psa_reject_refuses_port_25_only(gate, logins):
    """postscreen only ever guarded port 25: `PSA 127.0.0.0/8 reject` drops MX clients, while
    the same network's users still get 587's banner and can authenticate and send."""
    refusal = "521 5.3.2 Service currently unavailable"

    def mx_greeting() -> str:
        with Talk("127.0.0.1", gate.mx_port, source="127.0.9.25") as talk:
            return untag(talk.reply())[1]

    logins.set("PSA:127.0.0.0/8", "reject")
    try:
        # the gate's table cache learns of the key asynchronously: wait for the refusal
        wait_until(lambda: mx_greeting() == refusal, 10, "port 25 to refuse 127.0.0.0/8")
        with tls_talk(gate, "127.0.9.87") as talk:
            talk.cmd("EHLO laptop")
            assert talk.cmd("AUTH PLAIN " + plain("user1@example.com", "secret1"))[0] == 235
            assert talk.cmd("MAIL FROM:<user1@example.com>")[0] == 250
            assert talk.cmd("RCPT TO:<user2@example.com>")[0] == 250
            talk.cmd("QUIT")
        with Talk("127.0.0.1", gate.submissions_port, source="127.0.9.88") as raw:
            raw.starttls()  # 465: the handshake first, then the banner
            assert raw.reply()[0] == 220
    finally:
        logins.delete("PSA:127.0.0.0/8")
        wait_until(lambda: mx_greeting().startswith("220"), 10, "port 25 to greet again")


def test_a_client_that_leaves_before_the_handshake_is_logged_with_a_reason(gate, logins):
    # connect to 465 and hang up without a ClientHello, as a port scanner does
    with socket.create_connection(("127.0.0.1", gate.submissions_port),
                                  source_address=("127.0.0.93", 0), timeout=10):
        pass
    line = gate.wait_for_log(r"SSL_accept error from \[127\.0\.0\.93\]:\d+: ?(.*)")
    assert line.group(1) == "lost connection", line.group(0)
