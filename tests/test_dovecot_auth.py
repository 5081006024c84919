"""Tests of dovecot_auth: against the real Dovecot auth service, then against scripted peers
for what a healthy Dovecot will not do (stall, drop the connection, answer `temp`)."""

import asyncio
import base64
import logging
import os
import socket
import subprocess
import time

import pytest
from services.ports import free_port
from services.waiting import no_hang

from smtpgate.lookups.dovecot_auth import (
    BAD_MECHANISM,
    BAD_RESPONSE,
    CANT_CONNECT,
    CONNECTION_LOST,
    TIMED_OUT,
    AuthResult,
    DovecotAuth,
)

PEER = {"client_ip": "192.0.2.10", "local_ip": "127.0.0.1", "secured": True}


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return f"{authzid}\0{user}\0{password}".encode()


@pytest.fixture
async def auth(dovecot_server):
    client = DovecotAuth("127.0.0.1", dovecot_server.auth_port, timeout=10)
    yield client
    await client.close()


# --- the real Dovecot ---------------------------------------------------------------------------


async def test_good_login(auth):
    result = await auth.authenticate("PLAIN", plain("user1@example.com", "secret1"), **PEER)
    assert result == AuthResult(True, "user1@example.com", False, "")


async def test_login_mechanism_is_spoken_as_plain(auth):
    result = await auth.authenticate("login", plain("user2@example.com", "secret2"), **PEER)
    assert result.ok and result.user == "user2@example.com"


REFUSED = [
    ("wrong-password", plain("user1@example.com", "secret2")),
    ("unknown-user", plain("nobody@example.com", "secret1")),
    ("authzid-of-another-user", plain("user1@example.com", "secret1", authzid="user2@example.com")),
    ("no-password", plain("user1@example.com", "")),
    ("not-plain-form", b"user1@example.com secret1"),
]


async def test_refused_logins_are_permanent_failures(auth):
    # concurrently: Dovecot holds each failure back (auth_failure_delay)
    results = await asyncio.gather(*(
        auth.authenticate("PLAIN", packed, **PEER) for _, packed in REFUSED))
    for (label, _), result in zip(REFUSED, results, strict=True):
        assert not result.ok, label
        assert not result.temporary, label


async def test_user_added_later_can_log_in(auth, dovecot_server):
    dovecot_server.add_user("late@example.com", "l8te")
    # Dovecot re-reads a passwd-file at most once a second: wait for it, with a deadline
    deadline = time.monotonic() + 5
    while not (result := await auth.authenticate(
            "PLAIN", plain("late@example.com", "l8te"), **PEER)).ok:
        assert not result.temporary, result
        assert time.monotonic() < deadline, "the new user never became valid"
        await asyncio.sleep(0.2)
    assert result.user == "late@example.com"


@pytest.mark.parametrize(("mechanism", "response", "reason"), [
    ("CRAM-MD5", plain("user1@example.com", "secret1"), BAD_MECHANISM),
    ("PLAIN", b"", BAD_RESPONSE),
    ("PLAIN", b"\0" * 20000, BAD_RESPONSE),
], ids=["unsupported-mechanism", "empty-response", "oversized-response"])
async def test_bad_requests_are_refused_without_asking(mechanism, response, reason):
    # a port nobody listens on: an answer proves Dovecot was never asked
    client = DovecotAuth("127.0.0.1", free_port(), timeout=5)
    result = await client.authenticate(mechanism, response, **PEER)
    assert result == AuthResult(False, None, False, reason)
    await client.close()


def established_connections(port: int) -> int:
    """This process's established connections to port; Postfix's smtpd keeps its own SASL
    connections to the same Dovecot (after a submission test), which are not ours to count."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
        capture_output=True, text=True, check=True).stdout
    return len([line for line in out.splitlines() if f"pid={os.getpid()}," in line])


async def test_many_concurrent_logins_share_one_connection(auth, dovecot_server):
    requests = []
    for i in range(60):
        if i % 3 == 0:
            requests.append((plain("user1@example.com", "secret1"), True, "user1@example.com"))
        elif i % 3 == 1:
            requests.append((plain("user2@example.com", "secret2"), True, "user2@example.com"))
        else:
            requests.append((plain("user1@example.com", f"wrong{i}"), False, None))
    results = await asyncio.gather(*(
        auth.authenticate("PLAIN", packed, **PEER) for packed, _, _ in requests))
    for (_, ok, user), result in zip(requests, results, strict=True):
        assert result.ok is ok
        if ok:
            assert result.user == user
        assert not result.temporary
    assert established_connections(dovecot_server.auth_port) == 1


async def test_dovecot_stopped_is_temporary_and_recovers(dovecot_server):
    if not (hasattr(dovecot_server, "stop") and hasattr(dovecot_server, "start")):
        pytest.skip("the dovecot_server fixture cannot be stopped")
    client = DovecotAuth("127.0.0.1", dovecot_server.auth_port, timeout=5)
    try:
        assert (await client.authenticate("PLAIN", plain("user1@example.com", "secret1"),
                                          **PEER)).ok
        dovecot_server.stop()
        wait_until_gone(dovecot_server.auth_port)
        try:
            result = await client.authenticate(
                "PLAIN", plain("user1@example.com", "secret1"), **PEER)
            assert not result.ok
            assert result.temporary
            assert result.reason in (CANT_CONNECT, CONNECTION_LOST)
        finally:
            dovecot_server.start()
        result = await client.authenticate("PLAIN", plain("user1@example.com", "secret1"), **PEER)
        assert result.ok, result
    finally:
        await client.close()


def wait_until_gone(port: int, timeout: float = 10.0) -> None:
    """Dovecot's auth process may outlive its master for a moment, still serving its clients."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
        except OSError:
            if established_connections(port) == 0:
                return
        assert time.monotonic() < deadline, f"Dovecot on port {port} is still there"
        time.sleep(0.05)


async def test_password_and_response_are_never_logged(auth, caplog):
    secret = "Hunter2-unique-secret"
    packed = plain("user1@example.com", secret)
    encoded = base64.b64encode(packed).decode()
    caplog.set_level(logging.DEBUG)
    dead = DovecotAuth("127.0.0.1", free_port(), timeout=2)
    await asyncio.gather(auth.authenticate("PLAIN", packed, **PEER),
                         dead.authenticate("PLAIN", packed, **PEER))
    await dead.close()
    assert caplog.records, "expected the unreachable server to be logged"
    assert secret not in caplog.text
    assert encoded not in caplog.text


# --- scripted peers: what a healthy Dovecot will not do ----------------------------------------

HANDSHAKE = (b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
             b"SPID\t1\nCUID\t1\nCOOKIE\t00\nDONE\n")


class Peer:
    """A TCP server running `script(reader, writer)` for each connection; counts connections."""

    def __init__(self, script):
        self.script = script
        self.connections = 0
        self.lines: list[str] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_auth(self, reader) -> list[str]:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError
            fields = line.decode().rstrip("\n").split("\t")
            if fields[0] == "AUTH":
                self.lines.append(line.decode())
                return fields


async def test_unreachable_server_is_temporary():
    client = DovecotAuth("127.0.0.1", free_port(), timeout=5)
    result = await client.authenticate("PLAIN", plain("u@example.com", "p"), **PEER)
    # refused at once, not waited out: CANT_CONNECT, not TIMED_OUT
    assert result == AuthResult(False, None, True, CANT_CONNECT)
    await client.close()


async def test_silent_server_times_out_as_temporary():
    async def silent(peer, reader, writer):
        await reader.read()  # never answers, not even the handshake

    async with Peer(silent) as peer:
        client = DovecotAuth("127.0.0.1", peer.port, timeout=0.5)
        async with no_hang():  # the client's own timeout ends it
            result = await client.authenticate("PLAIN", plain("u@example.com", "p"), **PEER)
        assert result == AuthResult(False, None, True, TIMED_OUT)
        await client.close()


async def test_server_stuck_after_handshake_times_out_and_is_reconnected():
    async def stuck(peer, reader, writer):
        writer.write(HANDSHAKE)
        fields = await peer.read_auth(reader)
        if peer.connections == 1:
            await reader.read()  # swallow the request, answer nothing
        else:
            writer.write(f"OK\t{fields[1]}\tuser=u@example.com\n".encode())
            await writer.drain()
            await reader.read()

    async with Peer(stuck) as peer:
        client = DovecotAuth("127.0.0.1", peer.port, timeout=0.5)
        first = await client.authenticate("PLAIN", plain("u@example.com", "p"), **PEER)
        assert first.temporary and first.reason == TIMED_OUT
        second = await client.authenticate("PLAIN", plain("u@example.com", "p"), **PEER)
        assert second == AuthResult(True, "u@example.com", False, "")
        assert peer.connections == 2
        await client.close()


async def test_connection_lost_mid_request_is_retried_once_then_temporary():
    async def hang_up(peer, reader, writer):
        writer.write(HANDSHAKE)
        await peer.read_auth(reader)

    async with Peer(hang_up) as peer:
        client = DovecotAuth("127.0.0.1", peer.port, timeout=5)
        result = await client.authenticate("PLAIN", plain("u@example.com", "p"), **PEER)
        assert result == AuthResult(False, None, True, CONNECTION_LOST)
        assert peer.connections == 2
        await client.close()


async def test_request_line_and_reply_parsing():
    async def script(peer, reader, writer):
        writer.write(HANDSHAKE)
        await writer.drain()
        while True:
            fields = await peer.read_auth(reader)
            rid = fields[1]
            user = base64.b64decode(fields[-1].removeprefix("resp=")).split(b"\0")[1].decode()
            if user == "temp":
                reply = f"FAIL\t{rid}\tuser=temp\ttemp\treason=passdb down\n"
            elif user == "code":
                reply = f"FAIL\t{rid}\tcode=temp_fail\n"
            elif user == "escaped":
                reply = f"OK\t{rid}\tuser=a\x01tb\x01\x01c\n"
            else:
                reply = f"FAIL\t{rid}\tuser={user}\treason=Password \x01nexpired\n"
            # unknown lines and answers to ids nobody asked for are ignored
            writer.write(f"NOTICE\tsomething\nOK\t99999\tuser=x\n{reply}".encode())
            await writer.drain()

    async with Peer(script) as peer:
        client = DovecotAuth("127.0.0.1", peer.port, timeout=5)
        temp = await client.authenticate("PLAIN", plain("temp", "p"), **PEER)
        assert temp == AuthResult(False, "temp", True, "passdb down")
        code = await client.authenticate("PLAIN", plain("code", "p"), client_ip="2001:db8::1",
                                         local_ip="::1", secured=False)
        assert code == AuthResult(False, None, True, "")
        escaped = await client.authenticate("PLAIN", plain("escaped", "p"), **PEER)
        assert escaped == AuthResult(True, "a?b\x01c".replace("\x01", "?"), False, "")
        expired = await client.authenticate("PLAIN", plain("bob", "p"), client_ip="unknown",
                                            local_ip="127.0.0.1", secured=True)
        assert expired == AuthResult(False, "bob", False, "Password ?expired")
        await client.close()

    assert peer.connections == 1
    first, second, _, fourth = peer.lines
    assert first.split("\t")[2:8] == [
        "PLAIN", "service=smtp", "nologin", "no-penalty", "lip=127.0.0.1", "rip=192.0.2.10"]
    assert "\tsecured\t" in first
    assert "lip=::1\trip=2001:db8::1\t" in second and "secured" not in second
    assert "rip=" not in fourth  # not an address: left out


async def test_handshake_without_plain_is_temporary():
    async def no_plain(peer, reader, writer):
        writer.write(b"VERSION\t1\t2\nMECH\tGSSAPI\nDONE\n")
        await writer.drain()
        await reader.read()

    async with Peer(no_plain) as peer:
        client = DovecotAuth("127.0.0.1", peer.port, timeout=5)
        result = await client.authenticate("PLAIN", plain("u@example.com", "p"), **PEER)
        assert not result.ok and result.temporary
        assert "PLAIN" in result.reason
        await client.close()


async def test_wrong_protocol_version_is_temporary():
    async def v2(peer, reader, writer):
        writer.write(b"VERSION\t2\t0\nMECH\tPLAIN\nDONE\n")
        await writer.drain()
        await reader.read()

    async with Peer(v2) as peer:
        client = DovecotAuth("127.0.0.1", peer.port, timeout=5)
        result = await client.authenticate("PLAIN", plain("u@example.com", "p"), **PEER)
        assert result == AuthResult(False, None, True, CANT_CONNECT)
        await client.close()
