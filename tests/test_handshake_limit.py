"""Implicit-TLS (465) handshakes in progress, bounded per client address and per worker."""

from __future__ import annotations

import contextlib
import socket
import ssl

import pytest
from services.world import gate_in_world

from smtpgate.smtp.handshake_limit import HandshakeLimit


def test_bounds_per_client_and_per_worker_and_what_leaving_gives_back():
    limit = HandshakeLimit(per_client=2, per_worker=3)
    assert limit.enter("192.0.2.1") is None
    assert limit.enter("192.0.2.1") is None
    assert limit.enter("192.0.2.1") == "client"
    assert limit.enter("192.0.2.2") is None
    assert limit.enter("192.0.2.3") == "worker"
    limit.leave("192.0.2.1")
    assert limit.enter("192.0.2.3") is None
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        limit.leave(ip)
    assert limit.in_progress == 0 and limit.by_client == {}  # nothing kept per address
    assert limit.refused == {"client": 1, "worker": 1, "rate": 0}


def test_no_bound():
    limit = HandshakeLimit(0, 0)
    assert all(limit.enter("192.0.2.1") is None for _ in range(1000))


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    yield from gate_in_world(start_gate, redis_server, dns_server,
                             listeners=("mx", "submissions"),
                             SMTPGATE_SUBMISSIONS_CLIENT_HANDSHAKE_LIMIT="2",
                             SMTPGATE_SUBMISSIONS_HANDSHAKE_LIMIT="3")


def silent(port: int, source: str) -> socket.socket:
    """A connection that never sends its ClientHello: a handshake in progress."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def closed_at_once(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.slow
def test_handshakes_over_the_bounds_are_closed_before_tls(gate, certificate):
    port = gate.submissions_port
    with contextlib.ExitStack() as stack:
        first = [stack.enter_context(silent(port, "127.0.0.50")) for _ in range(2)]
        over_client = stack.enter_context(silent(port, "127.0.0.50"))
        assert closed_at_once(over_client)
        stack.enter_context(silent(port, "127.0.0.51"))
        over_worker = stack.enter_context(silent(port, "127.0.0.52"))
        assert closed_at_once(over_worker)
        for sock in first:
            sock.close()
        # the client's handshakes ended: its next one goes through
        context = ssl.create_default_context(cafile=str(certificate[0]))
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=("127.0.0.50", 0)) as plain, \
                context.wrap_socket(plain, server_hostname="mx.example.test") as tls:
            assert tls.recv(1024).startswith(b"220 ")
    log = gate.log_text()
    assert ("warning: Refusing TLS service request from unknown[127.0.0.50] for service "
            "submissions (too many handshakes from the client)") in log
    assert ("warning: Refusing TLS service request from unknown[127.0.0.52] for service "
            "submissions (too many handshakes in progress)") in log
