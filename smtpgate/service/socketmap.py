"""socketmap - Postfix socketmap service over smtpgate's Redis tables.

SYNOPSIS
    await start_socketmap(tables, host, port, *, max_request=MAX_REQUEST,
                          idle_timeout=IDLE_TIMEOUT) -> asyncio.Server
    MAPS = {"vdom": VDOM, "vali": VALI, "vbox": VBOX, "recip": RECIP,
            "logmap": LOGMAP, "hlo": HLO}
    answer(tables, name, key) -> str          one reply, without the netstring
    encode(text) -> bytes                      netstring

DESCRIPTION
    A stock Postfix (no redis patch) reads the image's tables through
    `socketmap:inet:HOST:PORT:NAME` (socketmap_table(5)). A request is the
    netstring "NAME KEY"; the reply is the netstring "OK value",
    "NOTFOUND ", "TEMP reason" or "PERM reason". Postfix keeps the
    connection and sends more requests; requests are answered in order.

    Postfix treats a socketmap like a pattern table: it asks the full
    address only, never the partial keys it tries in a hash table (seen with
    Postfix 3.7: a catch-all and a +extension were refused until this
    module did the fall-backs). So an address asked of vali, vbox, recip or
    logmap is answered with that table's own order (user+ext@domain,
    user@domain, @domain; the address then the domain for recip), the same
    order smtpgate's RCPT check uses. Domain and HELO names match
    case-insensitively. VALI and LOGMAP values listing several targets
    are answered comma-separated (Postfix's alias value syntax).

    A value smtpgate cannot use (unknown access action, empty alias) and any
    Redis failure answer TEMP, so Postfix defers (451 4.3.0) instead of
    accepting or bouncing. An unknown map name answers PERM. A request longer
    than max_request bytes, or not a netstring, closes the connection (the
    client sees a protocol error and Postfix retries later); so does
    idle_timeout seconds of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from smtpgate.lookups import keys
from smtpgate.lookups.tables import TableError, Tables

log = logging.getLogger("smtpgate.socketmap")

MAX_REQUEST = 10000
MAX_REPLY = 100000  # Postfix's socketmap_max_reply_size default
IDLE_TIMEOUT = 300.0

MAPS = {
    "vdom": keys.VDOM,
    "vali": keys.VALI,
    "vbox": keys.VBOX,
    "recip": keys.RECIP,
    "logmap": keys.LOGMAP,
    "hlo": keys.HLO,
}


class ProtocolError(Exception):
    pass


def encode(text: str) -> bytes:
    data = text.encode("utf-8", "replace")
    return b"%d:%s," % (len(data), data)


async def read_netstring(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One netstring's payload; None at a clean end of stream."""
    digits = b""
    while True:
        ch = await reader.read(1)
        if not ch:
            if digits:
                raise ProtocolError("connection closed inside a length")
            return None
        if ch == b":":
            break
        if not ch.isdigit() or len(digits) >= len(str(limit)):
            raise ProtocolError("bad netstring length")
        digits += ch
    if not digits:
        raise ProtocolError("empty netstring length")
    size = int(digits)
    if size > limit:
        raise ProtocolError(f"request of {size} bytes exceeds {limit}")
    payload = await reader.readexactly(size + 1)
    if payload[-1:] != b",":
        raise ProtocolError("netstring not terminated by ','")
    return payload[:-1]


ADDRESS_TABLES = frozenset({keys.VALI, keys.VBOX, keys.RECIP, keys.LOGMAP})


async def answer(tables: Tables, name: str, key: str) -> str:
    prefix = MAPS.get(name)
    if prefix is None:
        return f"PERM unknown map {name!r}"
    if not key or any(c.isspace() or ord(c) < 32 for c in key):
        return "NOTFOUND "
    try:
        if prefix in ADDRESS_TABLES and "@" in key:
            hit = await tables.lookup_address(prefix, key)
        else:
            hit = await tables.lookup(prefix, key)
    except TableError as exc:
        return f"TEMP {exc}"
    if hit is None:
        return "NOTFOUND "
    if hit.invalid:
        return f"TEMP bad value in {hit.key}: {hit.error}"
    value = ", ".join(hit.targets) if hit.targets else hit.value.strip()
    if len(value) > MAX_REPLY - 3:
        return f"PERM value of {hit.key} too long"
    return f"OK {value}"


async def _serve(tables: Tables, max_request: int, idle_timeout: float,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    try:
        while True:
            async with asyncio.timeout(idle_timeout):
                payload = await read_netstring(reader, max_request)
            if payload is None:
                break
            text = payload.decode("utf-8", "replace")
            name, _, key = text.partition(" ")
            writer.write(encode(await answer(tables, name, key)))
            await writer.drain()
    except ProtocolError as exc:
        log.warning("socketmap: %s: %s; closing", peer, exc)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def start_socketmap(tables: Tables, host: str, port: int, *,
                          max_request: int = MAX_REQUEST,
                          idle_timeout: float = IDLE_TIMEOUT) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Postfix keeps its socketmap connections open, so a stopping worker cancels them;
        # Python 3.11's start_server then logs the cancellation as a traceback (its callback
        # asks a cancelled task for its exception). Ending here is normal.
        with contextlib.suppress(asyncio.CancelledError):
            await _serve(tables, max_request, idle_timeout, reader, writer)

    # every worker process binds the same port (SO_REUSEPORT), as the SMTP listeners do
    return await asyncio.start_server(handle, host, port, reuse_port=True)
