"""End to end through the harness: a real client, Postfix, the rspamd milter, Dovecot LMTP."""

from __future__ import annotations

import email
import smtplib
import socket
import subprocess
import uuid

import pytest
from dns.resolver import NXDOMAIN, LifetimeTimeout, NoNameservers

pytestmark = pytest.mark.slow

# rspamd's GTUBE pattern (https://rspamd.com/doc/other/gtube_patterns.html), split so
# that this file is not itself spam.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*" + "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def marker() -> str:
    return f"harness-{uuid.uuid4().hex}"


def has(token: str):
    return lambda raw: token.encode() in raw


def swaks(postfix_server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "swaks",
            "--server", postfix_server.host,
            "--port", str(postfix_server.port),
            "--local-interface", "127.0.0.1",
            "--helo", "client.example.test",
            "--from", "sender@example.net",
            "--timeout", "20",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_swaks_message_lands_in_user1_maildir(postfix_server, dovecot_server):
    token = marker()
    result = swaks(
        postfix_server, "--to", "user1@example.com",
        "--header", f"Subject: {token}", "--body", f"body {token}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    raw = dovecot_server.wait_for_message("user1@example.com", has(token))
    message = email.message_from_bytes(raw)
    assert message["Subject"] == token
    assert f"body {token}" in message.get_payload()
    assert message["Delivered-To"] == "user1@example.com"


def test_gtube_is_rejected_by_the_milter_and_not_delivered(postfix_server, dovecot_server):
    token = marker()
    mark = postfix_server.log_mark()
    result = swaks(
        postfix_server, "--to", "user1@example.com",
        "--header", f"Subject: {token}", "--body", f"{GTUBE}\n{token}",
    )
    # swaks exits 26 when the server rejects the message after DATA
    assert result.returncode == 26, result.stdout + result.stderr
    assert "<** 554 5.7.1 " in result.stdout, result.stdout
    postfix_server.wait_for_log(r"milter-reject: END-OF-MESSAGE .*: 5\.7\.1 ", since=mark)
    assert not any(token.encode() in raw for raw in dovecot_server.messages("user1@example.com"))
    assert postfix_server.queue_ids() == []


def test_alias_sales_reaches_both_mailboxes(postfix_server, dovecot_server):
    token = marker()
    result = swaks(postfix_server, "--to", "sales@example.com", "--header", f"Subject: {token}")
    assert result.returncode == 0, result.stdout + result.stderr
    for user in ("user1@example.com", "user2@example.com"):
        raw = dovecot_server.wait_for_message(user, has(token))
        # One LMTP transaction for both: Dovecot adds no Delivered-To then.
        assert email.message_from_bytes(raw)["To"] == "sales@example.com"


def test_unknown_recipient_and_foreign_relay_are_refused(postfix_server):
    with smtplib.SMTP(postfix_server.host, postfix_server.port, timeout=20) as smtp:
        code, text = smtp.docmd(
            "XCLIENT", "ADDR=127.0.0.78 NAME=[UNAVAILABLE] HELO=stranger.test PROTO=ESMTP"
        )
        assert code == 220, text
        smtp.ehlo("stranger.test")
        assert smtp.mail("someone@example.net")[0] == 250
        code, text = smtp.rcpt("nobody@example.com")
        assert code == 550 and b"User unknown in virtual mailbox table" in text
        code, text = smtp.rcpt("victim@elsewhere.test")
        assert code == 554 and b"Relay access denied" in text


def test_xclient_makes_postfix_record_the_impersonated_client(postfix_server, dovecot_server):
    token = marker()
    with smtplib.SMTP(postfix_server.host, postfix_server.port, timeout=20) as smtp:
        smtp.ehlo("smtpgate.example.test")
        assert "xclient" in smtp.esmtp_features
        code, text = smtp.docmd(
            "XCLIENT", "ADDR=127.0.0.77 NAME=mail.example.test HELO=mail.example.test PROTO=ESMTP"
        )
        assert code == 220, text
        smtp.ehlo("mail.example.test")
        smtp.sendmail(
            "sender@example.net",
            ["user1@example.com"],
            f"Subject: {token}\r\n\r\nvia xclient\r\n".encode(),
        )
    raw = dovecot_server.wait_for_message("user1@example.com", has(token))
    received = email.message_from_bytes(raw).get_all("Received")
    assert any(
        "from mail.example.test (mail.example.test [127.0.0.77])" in " ".join(r.split())
        for r in received
    ), received


# The harness's own promises, which other tests rely on.


def test_dns_answers_records_as_set_and_forgets_them_on_clear(dns):
    dns.set([
        ("mail.example.test", "A", "127.0.0.77", 60),
        ("example.test", "MX", "10 mail.example.test"),
        ("2.0.0.127.bl.test", "A", "127.0.0.2"),
        ("x.test", "TXT", "hello"),
    ])
    dns.add_ptr("127.0.0.77", "mail.example.test")
    dns.add_ptr("2001:db8::7", "v6.example.test")
    resolver = dns.resolver()
    answer = resolver.resolve("mail.example.test", "A")
    assert [a.to_text() for a in answer] == ["127.0.0.77"] and answer.rrset.ttl == 60
    assert resolver.resolve("example.test", "MX")[0].to_text() == "10 mail.example.test."
    assert resolver.resolve("2.0.0.127.bl.test", "A")[0].to_text() == "127.0.0.2"
    assert resolver.resolve("x.test", "TXT")[0].to_text() == '"hello"'
    assert resolver.resolve_address("127.0.0.77")[0].to_text() == "mail.example.test."
    assert resolver.resolve_address("2001:db8::7")[0].to_text() == "v6.example.test."
    with pytest.raises(NXDOMAIN):
        resolver.resolve("absent.example.test", "A")
    dns.clear()
    with pytest.raises(NXDOMAIN):
        resolver.resolve("mail.example.test", "A")


def test_dns_servfail_and_timeout_zones(dns):
    dns.set_servfail_zone("broken.test")
    dns.set_timeout_zone("slow.test")
    resolver = dns.resolver(timeout=1.0)
    with pytest.raises(NoNameservers, match="SERVFAIL"):
        resolver.resolve("a.broken.test", "A")
    with pytest.raises(LifetimeTimeout):  # no answer at all, so the lifetime ran out
        resolver.resolve("a.slow.test", "A")


def test_dns_rejects_bad_records_clearly(dns):
    with pytest.raises(ValueError, match="bad DNS record"):
        dns.set([("x.test", "A", "not-an-address")])
    with pytest.raises(ValueError, match="not an IP address"):
        dns.add_ptr("300.1.1.1", "x.test")


def test_redis_can_be_stopped_and_started_on_the_same_port(redis_server, redis):
    redis.set("k", "v")
    port = redis_server.port
    redis_server.stop()
    try:
        # A bare connect: redis-py's own retries would take seconds here.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((redis_server.host, port), timeout=5)
    finally:
        redis_server.start()
    assert redis_server.port == port
    assert redis_server.client().get("k") is None


def test_postfix_stop_start_and_map_change(postfix_server, dovecot_server):
    postfix_server.stop()
    with pytest.raises(OSError):
        smtplib.SMTP(postfix_server.host, postfix_server.port, timeout=5)
    postfix_server.start()
    aliases = {"sales@example.com": ["user1@example.com", "user2@example.com"]}
    changed = {**aliases, "info@example.com": "user2@example.com"}
    postfix_server.set_map("virtual_alias_maps", changed)
    try:
        token = marker()
        result = swaks(postfix_server, "--to", "info@example.com", "--header", f"Subject: {token}")
        assert result.returncode == 0, result.stdout + result.stderr
        dovecot_server.wait_for_message("user2@example.com", has(token))
    finally:
        postfix_server.set_map("virtual_alias_maps", aliases)
