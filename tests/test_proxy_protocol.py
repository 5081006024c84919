"""PROXY protocol v1/v2 from a trusted load balancer: Postfix and the checks see the real client."""

from __future__ import annotations

import ipaddress
import struct
import uuid

import pytest
from services.smtp_talk import Talk

pytestmark = pytest.mark.slow

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src: str, sport: int, dst: str, dport: int) -> bytes:
    body = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.fixture(scope="module")
def gate(start_gate):
    process = start_gate(SMTPGATE_PROXY_PROTOCOL="auto", SMTPGATE_PROXY_TRUSTED="127.0.0.1/32")
    yield process
    process.stop()


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 127.0.0.77 127.0.0.1 5555 25\r\n",
    v2_header("127.0.0.77", 5555, "127.0.0.1", 25),
], ids=["v1", "v2"])
def test_trusted_balancer_speaks_for_the_client(gate, world, postfix_server, dovecot_server,
                                                header):
    mark = f"proxy-{uuid.uuid4().hex}"
    since = postfix_server.log_mark()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.1") as talk:
        talk.send(header)
        assert talk.banner()[0] == 220
        talk.cmd("EHLO client.example.test")
        talk.cmd("MAIL FROM:<a@example.net>")
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250  # FCrDNS of 127.0.0.77 passed
        talk.cmd("DATA")
        talk.send(f"Subject: {mark}\r\n\r\nvia a balancer\r\n.\r\n".encode())
        assert talk.reply()[0] == 250
    postfix_server.wait_for_log(r"client=host77\.clients\.example\.test\[127\.0\.0\.77\]",
                                since=since)
    gate.wait_for_log(r"connect from unknown\[127\.0\.0\.77\]")


def test_trusted_peer_without_header_is_dropped(gate, world):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.1") as talk:
        talk.send(b"EHLO client.example.test\r\n")
        assert talk.closed()
        gate.wait_for_log(r"warning: PROXY from \[127\.0\.0\.1\]")


def test_untrusted_peer_cannot_claim_another_address(gate, world):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.79") as talk:
        assert talk.banner()[0] == 220  # no header expected from it: the banner comes at once
        assert talk.cmd("PROXY TCP4 203.0.113.9 127.0.0.1 5555 25")[0] == 502
