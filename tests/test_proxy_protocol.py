"""PROXY protocol v1/v2 from a trusted load balancer: Postfix and the checks see the real client."""

from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import struct
import uuid

import pytest
from services.smtp_talk import Talk

from smtpgate.smtp.proxy_header import SocketReader, read_header

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


@pytest.fixture(scope="module")
def mynetworks_gate(start_gate):
    process = start_gate(SMTPGATE_PROXY_PROTOCOL="auto", SMTPGATE_PROXY_TRUSTED="127.0.0.1/32",
                         SMTPGATE_MYNETWORKS="127.0.0.0/8")
    yield process
    process.stop()


def test_a_header_claiming_loopback_gets_no_mynetworks_trust(mynetworks_gate, world):
    """Relaying is for mynetworks; a PROXY header naming 127.0.0.1 must not open it."""
    with Talk("127.0.0.1", mynetworks_gate.mx_port, source="127.0.0.1") as talk:
        talk.send(b"PROXY TCP4 127.0.0.1 127.0.0.1 5555 25\r\n")
        assert talk.banner()[0] == 220
        talk.cmd("EHLO client.example.test")
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        code, text = talk.cmd("RCPT TO:<victim@elsewhere.example>")
        assert code == 554 and "Relay access denied" in text, (code, text)
    # the same address connecting directly is this host: mynetworks, relaying allowed
    with Talk("127.0.0.1", mynetworks_gate.mx_port, source="127.0.0.2") as talk:
        assert talk.banner()[0] == 220
        talk.cmd("EHLO client.example.test")
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert talk.cmd("RCPT TO:<victim@elsewhere.example>")[0] == 250


# --- port 465: the PROXY header comes before the TLS handshake ---------------------------------


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def smtps_gate(start_gate, request):
    # both loops: each has its own way of reading a new connection before the protocol can stop it
    process = start_gate(listeners=("mx", "submissions"), SMTPGATE_PROXY_PROTOCOL="v2",
                         SMTPGATE_PROXY_TRUSTED="127.0.0.1/32",
                         SMTPGATE_UVLOOP="yes" if request.param == "uvloop" else "no")
    yield process
    process.stop()


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.mark.parametrize("together", [False, True], ids=["header-alone", "header-and-hello"])
def test_implicit_tls_behind_a_balancer_sees_the_client(smtps_gate, world, certificate,
                                                       postfix_server, together):
    world.set("LOGMAP:user1@example.com", "user1@example.com")
    mark = f"smtps-proxy-{uuid.uuid4().hex}"
    since = postfix_server.log_mark()
    port = 40000 + uuid.uuid4().int % 20000  # the client's port, as the balancer tells it
    with Talk("127.0.0.1", smtps_gate.submissions_port, source="127.0.0.1") as talk:
        header = v2_header("127.0.0.77", port, "127.0.0.1", 465)
        # MSG_MORE: the kernel holds the header for the ClientHello, so both arrive as one
        # segment, as from a balancer that had the client's first bytes already
        talk.sock.send(header, socket.MSG_MORE if together else 0)
        talk.starttls(str(certificate[0]))
        assert talk.banner()[0] == 220
        assert "AUTH PLAIN" in talk.cmd("EHLO laptop")[1]
        assert talk.cmd("AUTH PLAIN " + plain("user1@example.com", "secret1"))[0] == 235
        assert talk.cmd("MAIL FROM:<user1@example.com>")[0] == 250
        assert talk.cmd("RCPT TO:<user2@example.com>")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        talk.send(f"Subject: {mark}\r\n\r\nthrough a balancer on 465\r\n.\r\n".encode())
        assert talk.reply()[0] == 250
        talk.cmd("QUIT")
    smtps_gate.wait_for_log(r"connect from unknown\[127\.0\.0\.77\] to \[127\.0\.0\.1\]:465")
    smtps_gate.wait_for_log(r"TLS connection established from \S+\[127\.0\.0\.77\]: TLSv1\.3")
    # XCLIENT carried the balancer's word for the client to Postfix
    postfix_server.wait_for_log(r"client=\S+\[127\.0\.0\.77\], sasl_method=XCLIENT, "
                                r"sasl_username=user1@example\.com", since=since)


def test_trusted_peer_without_header_on_465_is_dropped_with_a_clear_line(smtps_gate, world,
                                                                        certificate):
    context = ssl.create_default_context(cafile=str(certificate[0]))
    # a TLS client straight to the port: its ClientHello is no PROXY header
    with (Talk("127.0.0.1", smtps_gate.submissions_port, source="127.0.0.1") as talk,
          pytest.raises((ssl.SSLError, ConnectionError, OSError))):
        context.wrap_socket(talk.sock, server_hostname="mx.example.test")
    smtps_gate.wait_for_log(r"warning: PROXY from \[127\.0\.0\.1\]:\d+: PROXY unrecognized "
                            r"signature")


def test_untrusted_client_on_465_gets_tls_at_once(smtps_gate, world, certificate):
    with Talk("127.0.0.1", smtps_gate.submissions_port, source="127.0.0.78") as talk:
        talk.starttls(str(certificate[0]))  # no header expected from it
        assert talk.banner()[0] == 220
        talk.cmd("QUIT")
    smtps_gate.wait_for_log(r"TLS connection established from \S+\[127\.0\.0\.78\]")


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 127.0.0.77 127.0.0.1 5555 465\r\n",
    v2_header("127.0.0.77", 5555, "127.0.0.1", 465),
], ids=["v1", "v2"])
async def test_the_socket_reader_leaves_the_handshake_in_the_socket(header):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(header + b"\x16\x03\x01 the ClientHello")
        found = await read_header(SocketReader(ours), "auto")
        assert (found.client_ip, found.client_port, found.local_port) == ("127.0.0.77", 5555, 465)
        assert ours.recv(100) == b"\x16\x03\x01 the ClientHello"
