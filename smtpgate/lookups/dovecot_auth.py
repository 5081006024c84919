"""dovecot_auth - a client of Dovecot's authentication service (the auth client protocol).

SYNOPSIS
    DovecotAuth(host: str, port: int, timeout: float = 10.0)
    await DovecotAuth.authenticate(mechanism: str, initial_response: bytes, *,
                                   client_ip: str, local_ip: str, secured: bool,
                                   service: str = "smtp") -> AuthResult
    await DovecotAuth.close() -> None
    AuthResult(ok: bool, user: str | None, temporary: bool, reason: str)

DESCRIPTION
    Speaks Dovecot's auth protocol v1 (doc.dovecot.org, "Dovecot
    Authentication Protocol") to the inet listener of its auth service, as
    Postfix's xsasl_dovecot_server.c does with smtpd_sasl_type = dovecot
    and smtpd_sasl_path = inet:$DOVECOT:11330.

    One connection per DovecotAuth, opened on first use and again after it
    is lost. The handshake runs once per connection: we send VERSION 1 and
    CPID (our pid), then read Dovecot's VERSION (the major version must be
    1), MECH lines, SPID, CUID, COOKIE up to DONE; PLAIN must be among the
    mechanisms. Requests are multiplexed on the connection, each with its
    own id, so many sessions authenticate at once; a reader task hands each
    OK / FAIL / CONT reply to the request with that id.

    authenticate() takes the SASL PLAIN response (authzid NUL authcid NUL
    password, decoded) for PLAIN and for LOGIN (the session converts a
    LOGIN exchange to that form), and always sends PLAIN:
        AUTH <id> PLAIN service=smtp nologin no-penalty lip=.. rip=..
             [secured] resp=<base64>
    `nologin` as Postfix sends it (no login process hand-off); `no-penalty`
    because smtpgate applies its own growing delay and failure limits
    (auth_limits), shared by all workers; Dovecot's per-IP penalty on top
    would only slow the answers down further. `secured` when the client's
    connection is encrypted (Dovecot refuses plaintext mechanisms otherwise
    under disable_plaintext_auth = yes). lip/rip are left out when they are
    not IP addresses.

    The result:
    - OK: ok True, user = Dovecot's `user=` (the canonical login, which the
      session hands to Postfix as XCLIENT LOGIN), or the authcid if absent.
    - FAIL: ok False; reason = Dovecot's `reason=` text or ""; temporary
      True when the reply carries `temp` or `code=temp_fail`; user = the
      `user=` Dovecot reported, if any (for the log).
    - Dovecot unreachable, the handshake failing, the connection lost, or
      no answer within `timeout` (one deadline for connect, handshake and
      reply): ok False, temporary True, reason in Postfix's words
      ("Can't connect to authentication server", "Connection lost to
      authentication server", ...). The session replies 454 4.7.0.
      A request lost with its connection before any answer is sent once
      more on a new connection (the server may have restarted).
    - a mechanism other than PLAIN or LOGIN: "Invalid authentication
      mechanism"; an empty or oversized response: "Invalid authentication
      response"; both permanent, without asking Dovecot.
    A CONT (challenge) to a PLAIN request with its initial response is a
    protocol error and fails the request.

    Passwords and the base64 response are never logged, never put into
    exception messages or reasons; only our own words and Dovecot's
    `reason=` appear. Values received are tab-unescaped (\\001 escapes)
    and control characters in them replaced by '?', as Postfix's
    printable().

    close() drops the connection; pending requests fail as temporary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import ipaddress
import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger("smtpgate.dovecot_auth")

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2
MAX_LINE = 16384  # Dovecot's AUTH_CLIENT_MAX_LINE_LENGTH
# base64 grows 4/3; keep the whole AUTH line under MAX_LINE
MAX_RESPONSE = (MAX_LINE - 512) * 3 // 4

CANT_CONNECT = "Can't connect to authentication server"
CONNECTION_LOST = "Connection lost to authentication server"
TIMED_OUT = "Authentication server timed out"
BAD_MECHANISM = "Invalid authentication mechanism"
BAD_RESPONSE = "Invalid authentication response"


@dataclass(frozen=True, slots=True)
class AuthResult:
    ok: bool
    user: str | None
    temporary: bool
    reason: str


class _Lost(Exception):
    """The connection went away before the request was answered."""


class _Connection:
    """One handshaken connection and its reader task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[list[str]]] = {}
        self.closed = False
        self.last_read = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        # shared by every session that authenticates: its log lines belong to none of them
        self.task = asyncio.get_running_loop().create_task(
            self._read_replies(), context=contextvars.Context())

    async def _read_replies(self) -> None:
        why = CONNECTION_LOST
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                self.last_read = time.monotonic()
                fields = line.rstrip(b"\r\n").decode("utf-8", "replace").split("\t")
                if fields[0] in ("OK", "FAIL", "CONT") and len(fields) > 1:
                    future = self.pending.pop(_to_int(fields[1]), None)
                    if future is not None and not future.done():
                        future.set_result(fields)
                # anything else (unknown commands, replies to abandoned ids) is ignored
        except asyncio.CancelledError:
            why = "connection closed"
            raise
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            why = f"{CONNECTION_LOST}: {type(exc).__name__}"
        finally:
            self.close(why)

    def close(self, why: str = "connection closed") -> None:
        if self.closed:
            return
        self.closed = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(_Lost(why))
        self.pending.clear()
        self.writer.close()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class DovecotAuth:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._lock: asyncio.Lock | None = None
        self._next_id = 0

    async def authenticate(
        self,
        mechanism: str,
        initial_response: bytes,
        *,
        client_ip: str,
        local_ip: str,
        secured: bool,
        service: str = "smtp",
    ) -> AuthResult:
        if mechanism.upper() not in ("PLAIN", "LOGIN"):
            return AuthResult(False, None, False, BAD_MECHANISM)
        if not initial_response or len(initial_response) > MAX_RESPONSE:
            return AuthResult(False, None, False, BAD_RESPONSE)
        params = [f"service={_clean_token(service) or 'smtp'}", "nologin", "no-penalty"]
        for name, value in (("lip", local_ip), ("rip", client_ip)):
            if (address := _ip_text(value)) is not None:
                params.append(f"{name}={address}")
        if secured:
            params.append("secured")
        params.append("resp=" + base64.b64encode(initial_response).decode("ascii"))
        try:
            async with asyncio.timeout(self.timeout):
                for attempt in (1, 2):
                    try:
                        fields = await self._request("PLAIN", params)
                        break
                    except _Lost as exc:
                        if attempt == 2:
                            log.warning("SASL: %s", exc)
                            return AuthResult(False, None, True, CONNECTION_LOST)
        except TimeoutError:
            log.warning("SASL: no answer from %s:%s within %gs", self.host, self.port,
                        self.timeout)
            return AuthResult(False, None, True, TIMED_OUT)
        except _Unavailable as exc:
            log.warning("SASL: %s", exc)
            return AuthResult(False, None, True, exc.reason)
        return _result(fields)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            if conn.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await conn.task
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    # --- internals -------------------------------------------------------------------------

    async def _request(self, mechanism: str, params: list[str]) -> list[str]:
        conn = await self._connection()
        request_id = self._new_id(conn)
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        conn.pending[request_id] = future
        sent_at = time.monotonic()
        line = "\t".join(["AUTH", str(request_id), mechanism, *params]) + "\n"
        try:
            conn.writer.write(line.encode("ascii"))
            await conn.writer.drain()
            return await future
        except OSError as exc:
            conn.close(f"{CONNECTION_LOST}: {type(exc).__name__}")
            raise _Lost(CONNECTION_LOST) from None
        except asyncio.CancelledError:
            conn.pending.pop(request_id, None)
            if conn.last_read < sent_at:
                # nothing at all came back since we asked: the server is stuck, not slow
                conn.close("no answer")
            raise

    def _new_id(self, conn: _Connection) -> int:
        while True:
            self._next_id = self._next_id % 0xFFFFFFFF + 1
            if self._next_id not in conn.pending:
                return self._next_id

    async def _connection(self) -> _Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            return self._conn

    async def _connect(self) -> _Connection:
        where = f"{self.host}:{self.port}"
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_LINE * 2)
        except OSError as exc:
            raise _Unavailable(CANT_CONNECT, f"connect to {where} failed: {exc}") from None
        try:
            writer.write(
                f"VERSION\t{PROTOCOL_MAJOR}\t{PROTOCOL_MINOR}\nCPID\t{os.getpid()}\n".encode())
            await writer.drain()
            mechanisms = await _read_handshake(reader, where)
        except _Unavailable:
            writer.close()
            raise
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            writer.close()
            raise _Unavailable(
                CONNECTION_LOST, f"handshake with {where} failed: {type(exc).__name__}") from None
        except BaseException:
            writer.close()
            raise
        if "PLAIN" not in mechanisms:
            writer.close()
            raise _Unavailable(
                "PLAIN not offered by authentication server",
                f"{where} offers {' '.join(sorted(mechanisms)) or 'no mechanisms'}, not PLAIN")
        conn = _Connection(reader, writer)
        conn.start()
        return conn


class _Unavailable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


async def _read_handshake(reader: asyncio.StreamReader, where: str) -> set[str]:
    mechanisms: set[str] = set()
    version_seen = False
    while True:
        line = await reader.readline()
        if not line:
            raise _Unavailable(CONNECTION_LOST, f"{where} closed the connection in the handshake")
        fields = line.rstrip(b"\r\n").decode("utf-8", "replace").split("\t")
        if fields[0] == "VERSION":
            if len(fields) < 3 or _to_int(fields[1]) != PROTOCOL_MAJOR:
                raise _Unavailable(
                    CANT_CONNECT, f"{where}: protocol version mismatch ({' '.join(fields[1:])} "
                    f"vs. {PROTOCOL_MAJOR})")
            version_seen = True
        elif fields[0] == "MECH" and len(fields) > 1:
            mechanisms.add(fields[1].upper())
        elif fields[0] == "DONE":
            if not version_seen:
                raise _Unavailable(CANT_CONNECT, f"{where}: no VERSION in the handshake")
            return mechanisms


def _result(fields: list[str]) -> AuthResult:
    verb, args = fields[0], fields[2:]
    user = None
    reason = ""
    temporary = False
    for arg in args:
        name, sep, value = arg.partition("=")
        if name == "user" and sep:
            user = _printable(_unescape(value)) or None
        elif name == "reason" and sep:
            reason = _printable(_unescape(value))
        elif arg == "temp" or (name == "code" and value == "temp_fail"):
            temporary = True
    if verb == "OK":
        return AuthResult(True, user, False, "")
    if verb == "CONT":
        log.warning("SASL: unexpected challenge to a PLAIN request with initial response")
        return AuthResult(False, None, False, "Unexpected authentication challenge")
    return AuthResult(False, user, temporary, reason)


_ESCAPES = {"0": "\0", "1": "\001", "t": "\t", "r": "\r", "n": "\n"}


def _unescape(value: str) -> str:
    if "\001" not in value:
        return value
    out = []
    chars = iter(value)
    for char in chars:
        if char == "\001":
            nxt = next(chars, "")
            out.append(_ESCAPES.get(nxt, nxt))
        else:
            out.append(char)
    return "".join(out)


def _printable(value: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in value)


def _clean_token(value: str) -> str:
    return "".join(c for c in value if c.isalnum() or c in "-_.")


def _ip_text(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip().removeprefix("IPV6:")))
    except (ValueError, AttributeError):
        return None


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1
