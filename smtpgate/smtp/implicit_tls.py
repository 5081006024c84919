"""implicit_tls - port 465: a load balancer's PROXY header first, then the TLS handshake.

SYNOPSIS
    implicit_tls_factory(gate) -> Callable[[], asyncio.Protocol]    for loop.create_server()

DESCRIPTION
    On 465 TLS starts with the client's first byte, but behind a load
    balancer (HAProxy's send-proxy-v2) the PROXY header comes before it.
    A transport reads eagerly (uvloop starts reading the moment
    connection_made returns), and handshake bytes read along with the
    header could not be handed to TLS afterwards. So a connection's first
    transport only gives up its socket: the socket is duplicated and the
    transport aborted before it read anything (the connection lives on
    in the duplicate). From the bare socket, then: the PROXY header when
    the peer is in proxy_trusted, exactly its bytes
    (smtp.proxy_header.SocketReader, aiosmtpd's parser); and the TLS
    handshake, on a new transport (loop.connect_accepted_socket, with the
    certificate of the moment, as STARTTLS has), whose session starts
    with the client's addresses from the header.

    A trusted peer that sends no valid header within 5 s is dropped with
    `warning: PROXY from [ip]:port: reason`, as on 25 and 587
    (postscreen's upstream proxy behaviour); other peers are ordinary
    clients and get TLS at once. A failed handshake is logged as
    `SSL_accept error from [ip]:port: reason`.

    Handshakes in progress are bounded per client address and per worker
    (smtpgate.smtp.handshake_limit: submissions_client_handshake_limit,
    submissions_handshake_limit), and a client over
    client_new_tls_session_rate_limit gets none (the policy reads its
    count: smtpgate.policy.stages.Policy.tls_service_refused); such a
    connection is closed before TLS, with Postfix's `warning: Refusing TLS
    service request from unknown[ip] for service submissions (too many
    handshakes from the client|too many handshakes in progress|too many
    new TLS sessions)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable

from smtpgate.address import plain_ip
from smtpgate.policy.state import Client
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.proxy_header import SocketReader, expects_header, read_header
from smtpgate.smtp.session import SUBMISSIONS, protocol_factory
from smtpgate.smtp.tls import handshake_error

log = logging.getLogger("smtpgate.smtpd")

HANDSHAKE_TIMEOUT = 30.0
_OVER = {"client": "too many handshakes from the client",
         "worker": "too many handshakes in progress", "rate": "too many new TLS sessions"}


def implicit_tls_factory(gate: Gate) -> Callable[[], asyncio.Protocol]:
    loop = asyncio.get_running_loop()
    entering: set[asyncio.Task] = set()

    def hand_over(sock: socket.socket) -> None:
        task = loop.create_task(_enter(gate, sock))
        entering.add(task)
        task.add_done_callback(entering.discard)

    return lambda: _Door(hand_over)


class _Door(asyncio.Protocol):
    """The first transport of a 465 connection: it hands the socket over and goes."""

    def __init__(self, hand_over: Callable[[socket.socket], None]) -> None:
        self._hand_over = hand_over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        except OSError:
            transport.abort()
            return
        transport.abort()  # closes its descriptor only: the duplicate keeps the connection
        self._hand_over(sock)


async def _enter(gate: Gate, sock: socket.socket) -> None:
    try:
        sock.setblocking(False)
        peer = sock.getpeername()
    except OSError:
        sock.close()  # the client left already
        return
    config, tls = gate.config, gate.tls
    proxied = None
    if expects_header(plain_ip(peer[0]), config.proxy_protocol, config.proxy_trusted):
        found = await read_header(SocketReader(sock), config.proxy_protocol)
        if isinstance(found, str):
            log.warning("warning: PROXY from [%s]:%s: %s", plain_ip(peer[0]), peer[1], found)
            sock.close()
            return
        proxied = found
    if tls is None or gate.draining:
        sock.close()  # a reload lost the certificate, or the gate is stopping
        return
    client = (proxied.client_ip, proxied.client_port) if proxied else peer[:2]
    ip = plain_ip(client[0])
    over = gate.handshakes.enter(ip)
    if over is None and await gate.policy.tls_service_refused(
            Client(ip, client[1], listener=SUBMISSIONS, proxied=proxied is not None)):
        gate.handshakes.leave(ip)
        gate.handshakes.refused["rate"] += 1
        over = "rate"
    if over is not None:
        log.warning("warning: Refusing TLS service request from unknown[%s] for service %s "
                    "(%s)", ip, SUBMISSIONS, _OVER[over])
        sock.close()
        return
    try:
        await asyncio.get_running_loop().connect_accepted_socket(
            protocol_factory(gate, SUBMISSIONS, proxied), sock, ssl=tls.context(SUBMISSIONS),
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        log.info("SSL_accept error from [%s]:%s: %s", ip, client[1], handshake_error(exc))
        with contextlib.suppress(OSError):
            sock.close()
    finally:
        gate.handshakes.leave(ip)
