"""The mail path: client -> smtpgate -> Postfix (XCLIENT, rspamd milter) -> Dovecot, for real."""

from __future__ import annotations

import email
import re
import subprocess
import uuid

import pytest
from services.gate_process import GateProcess
from services.smtp_talk import Talk, untag
from services.world import gate_in_world

pytestmark = pytest.mark.slow

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*" + "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def token() -> str:
    return f"mp-{uuid.uuid4().hex}"


def has(text: str):
    return lambda raw: text.encode() in raw


def no_message(dovecot_server, user: str, text: str) -> bool:
    return not any(text.encode() in raw for raw in dovecot_server.messages(user))


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    yield from gate_in_world(start_gate, redis_server, dns_server)


def swaks(gate: GateProcess, *args: str, source: str = "127.0.0.77") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(gate.mx_port),
         "--local-interface", source, "--helo", "client.example.test",
         "--from", "sender@example.net", "--timeout", "30", *args],
        capture_output=True, text=True, timeout=90)


def transcript(stdout: str, arrow: str) -> list[str]:
    """swaks's lines sent (-> in the clear, ~> through TLS) or heard (<-, <~) as `arrow`."""
    return [line.strip() for line in stdout.splitlines() if line.lstrip().startswith(arrow)]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_message_is_delivered_with_the_real_client_identity(gate, dovecot_server, tls):
    mark = token()
    result = swaks(gate, "--to", "user1@example.com", "--header", f"Subject: {mark}",
                   "--body", f"body {mark}", *(["--tls"] if tls else []))
    assert result.returncode == 0, result.stdout + result.stderr
    # the session really was encrypted (or really was not): swaks saw the handshake, sent the
    # envelope and heard Postfix's answer through TLS (~> <~), none of it in the clear
    assert ("=== TLS started with cipher" in result.stdout) == tls, result.stdout
    (sent, heard), (not_sent, not_heard) = ((("~>", "<~"), ("->", "<-")) if tls
                                           else (("->", "<-"), ("~>", "<~")))
    assert any(line.startswith(f"{sent} MAIL FROM:") for line in
               transcript(result.stdout, sent)), result.stdout
    assert any("queued as" in line for line in transcript(result.stdout, heard)), result.stdout
    assert not any("MAIL FROM:" in line for line in transcript(result.stdout, not_sent))
    assert not any("queued as" in line for line in transcript(result.stdout, not_heard))
    # Postfix's own answer to BDAT, passed through
    assert re.search(r"250 2\.0\.0 Ok: \d+ bytes queued as [0-9A-F]+", result.stdout)
    raw = dovecot_server.wait_for_message("user1@example.com", has(mark))
    message = email.message_from_bytes(raw)
    # Postfix writes the Received line from what XCLIENT told it
    received = " ".join(message.get_all("Received"))
    assert "127.0.0.77" in received
    assert "client.example.test" in received


def test_postfix_log_names_the_real_client(gate, postfix_server, dovecot_server):
    mark = token()
    since = postfix_server.log_mark()
    result = swaks(gate, "--to", "user2@example.com", "--header", f"Subject: {mark}",
                   source="127.0.0.78")
    assert result.returncode == 0, result.stdout + result.stderr
    postfix_server.wait_for_log(r"connect from \S*\[127\.0\.0\.78\]", since=since)
    dovecot_server.wait_for_message("user2@example.com", has(mark))


def test_gtube_is_refused_with_rspamds_reply(gate, dovecot_server):
    mark = token()
    result = swaks(gate, "--to", "user1@example.com", "--header", f"Subject: {mark}",
                   "--body", GTUBE)
    assert result.returncode != 0
    assert "<** 5" in result.stdout  # a 5xx to the final dot
    assert "Gtube" in result.stdout or "spam" in result.stdout.lower()
    assert no_message(dovecot_server, "user1@example.com", mark)


def test_unknown_recipient_gets_postfix_answer(gate):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.79") as talk:
        assert talk.banner()[0] == 220
        assert talk.cmd("EHLO client.example.test")[0] == 250
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        code, text = talk.cmd("RCPT TO:<nobody@example.com>")
        assert code == 550 and "5.1.1" in text


def test_ehlo_features_and_basic_protocol_replies(gate):
    with Talk("127.0.0.1", gate.mx_port) as talk:
        assert talk.banner() == (220, "220 mx.example.test ESMTP smtpgate")
        assert untag(talk.cmd("MAIL FROM:<a@example.net>")) == (
            503, "503 5.5.1 Error: send HELO/EHLO first")
        code, text = talk.cmd("EHLO client.example.test")
        assert code == 250
        for feature in ("PIPELINING", "SIZE 26214400", "STARTTLS", "ENHANCEDSTATUSCODES",
                        "8BITMIME", "SMTPUTF8"):
            assert feature in text
        assert "AUTH" not in text and "VRFY" not in text
        assert untag(talk.cmd("VRFY user1@example.com")) == (
            502, "502 5.5.1 VRFY command is disabled")
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 503
        assert talk.cmd("MAIL FROM:<a@example.net> SIZE=99999999999")[:1] == (552,)
        assert talk.cmd("FOO bar")[0] == 502
        assert talk.cmd("QUIT")[0] == 221


def test_pipelined_transaction(gate, dovecot_server):
    mark = token()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.80") as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        talk.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<user1@example.com>\r\n"
                  b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<user2@example.com>\r\nDATA\r\n")
        codes = [talk.reply()[0] for _ in range(5)]
        assert codes == [250, 250, 550, 250, 354]
        talk.send(f"Subject: {mark}\r\n\r\nhello\r\n..dot\r\n.\r\nQUIT\r\n".encode())
        assert talk.reply()[0] == 250
        assert talk.reply()[0] == 221
        message = dovecot_server.wait_for_message("user1@example.com", has(mark))
        assert b"\nhello\n.dot\n" in message  # unstuffed once, by smtpgate, and sent as BDAT
        dovecot_server.wait_for_message("user2@example.com", has(mark))


@pytest.mark.parametrize("ending", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"],
                         ids=["lf-dot-lf", "crlf-dot-lf", "lf-dot-crlf", "cr-dot-crlf"])
def test_no_message_can_be_smuggled(gate, dovecot_server, ending):
    mark, smuggled = token(), token()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.81") as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        talk.send(f"Subject: {mark}\r\n\r\nfirst".encode() + ending
                  + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<user2@example.com>\r\nDATA\r\n"
                  + f"Subject: {smuggled}\r\n\r\nsmuggled\r\n.\r\n".encode())
        code, _ = talk.reply()
        assert code == 250
        assert talk.cmd("QUIT")[0] == 221
        raw = dovecot_server.wait_for_message("user1@example.com", has(mark))
        assert smuggled.encode() in raw  # the "second message" is just body text of the first
        assert no_message(dovecot_server, "user2@example.com", smuggled)


def test_dot_stuffing_round_trips(gate, dovecot_server):
    mark = token()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.82") as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        talk.cmd("MAIL FROM:<a@example.net>")
        talk.cmd("RCPT TO:<user1@example.com>")
        talk.cmd("DATA")
        talk.send(f"Subject: {mark}\r\n\r\n..leading dot\r\n...\r\n".encode() + b"x" * 5000
                  + b"\r\n.\r\n")
        assert talk.reply()[0] == 250
        raw = dovecot_server.wait_for_message("user1@example.com", has(mark))
        assert b"\n.leading dot\r\n..\r\n" in raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") \
            or b"\n.leading dot\n..\n" in raw


def test_postfix_down_gives_451_and_never_250(gate, postfix_server, dovecot_server):
    mark = token()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.83") as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        postfix_server.stop()
        try:
            # the recipient is smtpgate's to judge; Postfix is needed only for the whole message
            assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
            assert talk.cmd("DATA")[0] == 354
            talk.send(f"Subject: {mark}\r\n\r\nbody\r\n.\r\n".encode())
            code, text = talk.reply()
            assert code == 451 and "4.3.0" in text
        finally:
            postfix_server.start()
    assert no_message(dovecot_server, "user1@example.com", mark)


def test_postfix_lost_during_data_gives_451(gate, postfix_server, dovecot_server):
    mark = token()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.84", timeout=30) as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        talk.cmd("MAIL FROM:<a@example.net>")
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        talk.send(f"Subject: {mark}\r\n\r\npart one\r\n".encode())
        postfix_server.stop()
        try:
            talk.send(b"part two\r\n.\r\n")
            code, text = talk.reply()
            assert code == 451, text
        finally:
            postfix_server.start()
        assert no_message(dovecot_server, "user1@example.com", mark)


def test_message_over_size_limit_is_refused(gate, start_gate, dovecot_server):
    small = start_gate(SMTPGATE_MESSAGE_SIZE_LIMIT="2000")
    try:
        mark = token()
        with Talk("127.0.0.1", small.mx_port, source="127.0.0.85") as talk:
            talk.banner()
            assert "SIZE 2000" in talk.cmd("EHLO client.example.test")[1]
            assert talk.cmd("MAIL FROM:<a@example.net> SIZE=5000")[0] == 552
            talk.cmd("MAIL FROM:<a@example.net>")
            assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
            assert talk.cmd("DATA")[0] == 354
            talk.send(f"Subject: {mark}\r\n\r\n".encode() + b"y" * 70 + b"\r\n" * 100)
            talk.send(b"z" * 3000 + b"\r\n.\r\n")
            code, text = talk.reply()
            assert (code, text[4:9]) == (552, "5.3.4")
            # the session goes on: a small message after the big one is accepted
            talk.cmd("MAIL FROM:<a@example.net>")
            assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
            talk.cmd("DATA")
            talk.send(f"Subject: {mark}-small\r\n\r\nsmall\r\n.\r\n".encode())
            assert talk.reply()[0] == 250
            dovecot_server.wait_for_message("user1@example.com", has(f"{mark}-small"))
            assert no_message(dovecot_server, "user1@example.com", "zzzzzzzzzz")
    finally:
        small.stop()


def test_idle_client_times_out_with_421(start_gate):
    quick = start_gate(SMTPGATE_SMTPD_TIMEOUT="1")
    try:
        with Talk("127.0.0.1", quick.mx_port) as talk:
            talk.banner()
            code, text = talk.reply()  # nothing sent: the server speaks first
            assert code == 421 and "4.4.2" in text
            assert talk.closed()
    finally:
        quick.stop()


def test_too_many_errors_ends_the_session(gate):
    with Talk("127.0.0.1", gate.mx_port) as talk:
        talk.banner()
        codes = [talk.cmd("BOGUS")[0] for _ in range(19)]
        assert set(codes) == {502}
        talk.send(b"BOGUS\r\n")
        assert talk.reply()[0] == 502
        code, text = talk.reply()
        assert code == 421 and "too many errors" in text
        assert talk.closed()


def test_long_command_line_is_refused_not_fatal(gate):
    with Talk("127.0.0.1", gate.mx_port) as talk:
        talk.banner()
        assert talk.cmd("EHLO " + "a" * 5000)[0] == 500
        assert talk.cmd("EHLO client.example.test")[0] == 250


def test_very_long_body_lines_arrive_whole(gate, dovecot_server):
    mark = token()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.86", timeout=30) as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        talk.cmd("MAIL FROM:<a@example.net>")
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        talk.cmd("DATA")
        long_line = b"L" * 150_000  # longer than smtpgate's 64 KiB read buffer
        talk.send(f"Subject: {mark}\r\n\r\n".encode() + long_line + b"\r\n" + long_line
                  + b"\r\n.\r\n")
        assert talk.reply()[0] == 250
        raw = dovecot_server.wait_for_message("user1@example.com", has(mark))
        assert raw.count(b"L") >= 300_000


def test_client_quitting_before_data_never_reaches_postfix(gate, postfix_server):
    since = postfix_server.log_mark()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.98") as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        talk.cmd("MAIL FROM:<a@example.net>")
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert talk.cmd("QUIT")[0] == 221
    # a later client's message is the marker: once Postfix logged it, it would have logged
    # the first client too, had smtpgate opened a connection for it
    mark = token()
    result = swaks(gate, "--to", "user1@example.com", "--header", f"Subject: {mark}")
    assert result.returncode == 0, result.stdout + result.stderr
    postfix_server.wait_for_log(r"status=sent", since=since)
    assert "127.0.0.98" not in postfix_server.log_text()[since:]
