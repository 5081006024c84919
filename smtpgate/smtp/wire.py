"""wire - one client connection as an asyncio.Protocol: a byte buffer, one deadline, batched writes.

SYNOPSIS
    Wire(on_connect, loop=None)               the protocol factory's product
    await wire.line(timeout, limit) -> bytes | None | TOO_LONG
    wire.take_line(limit) -> bytes | None ; wire.may_wait(limit) -> bool   the loop's own wait
    await wire.more(timeout) -> bool          wait for more bytes; False at end of stream
    wire.buf                                  what the client sent and nobody consumed yet
    wire.reply(line: bytes) ; await wire.flush()
    wire.send() -> bool ; await wire.drain()     flush() in two: the write, then the wait if any
    await wire.greet_wait(teaser, seconds, decided, hold=None) -> (bytes, float)
    await wire.start_tls(context, timeout)
    wire.close() ; wire.abort()

DESCRIPTION
    The session reads through this object and nothing else; there is no
    StreamReader. Bytes land in `buf` from data_received(); a session
    waiting for them awaits one future, woken by data, end of stream or
    its deadline.

    One deadline per connection: each wait sets `deadline` (re-arming is
    an attribute write), filed with the worker's deadline wheel
    (smtpgate.smtp.deadlines: one loop timer for every connection, a
    deadline fires at most its TICK late), and filed again only when it
    comes round early. A connection costs no timer of its own.

    Replies are queued with reply() and written by flush() in one write;
    the session flushes when the client has nothing more pipelined, so a
    pipelined batch of commands gets one write of replies, and also once
    WRITE_HIGH bytes are queued, so a long batch cannot make the gate hold
    its replies. When the client does not read (the transport's buffer is
    past its high mark), flush() waits for it to drain (smtpgate.flow_control),
    bounded by the same deadline; meanwhile no command is read, and
    reading pauses as below.

    The greet wait may hold its "220-" teaser back until `hold` is done
    (the DNSBL's outcome known), at most TEASER_HOLD seconds: a client the
    DNSBL drops meanwhile hears only its refusal, one write instead of two.
    The wait is counted from the connect all the same, and a client that
    talks before the teaser fails the pregreet test as one that talks
    after it does.

    Reading pauses when `buf` holds more than BUFFER_HIGH bytes and
    resumes when the session waits again, so a client cannot make the
    gate hold more than a few hundred KB of unread input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from smtpgate.flow_control import WriteFlow
from smtpgate.smtp.deadlines import deadlines_of

BUFFER_HIGH = 262144
WRITE_HIGH = 65536  # replies queued past this are written before the next command is read
TOO_LONG = b"<too long>"  # a marker, compared by identity
CLOSE_GRACE = 10.0
HEADER_TIMEOUT = 5.0  # postscreen_upstream_proxy_timeout, for the PROXY header's reads
TEASER_HOLD = 0.25  # at most this long the greet wait's teaser waits for the DNSBL's answer


class WireTimeout(Exception):
    """The client said nothing before the deadline."""


class Wire(asyncio.Protocol):
    __slots__ = (
        "_deadlines",
        "_filed",
        "_flow",
        "_loop",
        "_on_connect",
        "_out",
        "_paused",
        "_queued",
        "_sink",
        "_sink_error",
        "_sink_timeout",
        "_waiter",
        "buf",
        "closed",
        "deadline",
        "eof",
        "transport",
    )

    def __init__(self, on_connect: Callable[[Wire], object],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._on_connect = on_connect
        self._loop = loop or asyncio.get_running_loop()  # the factory's: one getpid() less
        self.buf = bytearray()
        self.eof = False
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.deadline = 0.0
        self._deadlines = deadlines_of(self._loop)
        self._filed: int | None = None  # the deadline wheel's tick it is filed at
        self._waiter: asyncio.Future | None = None
        self._flow = WriteFlow()
        self._paused = False
        self._out: list[bytes] = []
        self._queued = 0  # bytes in _out
        self._sink: Callable[[bytearray], bool] | None = None
        self._sink_error: BaseException | None = None
        self._sink_timeout = 0.0

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        sink = self._sink
        if sink is not None:  # DATA: consumed here, without waking the session per chunk
            try:
                done = sink(self.buf)
            except Exception as exc:  # the spool's disk, say: the session reports it
                self._sink_error, done = exc, True
            if done:
                self._sink = None
                self._wake()
            else:
                self.deadline = self._loop.time() + self._sink_timeout
            return
        if len(self.buf) > BUFFER_HIGH and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.closed = True
        self._deadlines.forget(self)
        self._wake()
        self._flow.resume()

    def pause_writing(self) -> None:
        self._flow.pause()

    def resume_writing(self) -> None:
        self._flow.resume()

    # --- waiting ---------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(True)

    def _waiting(self) -> bool:
        return self._waiter is not None and not self._waiter.done()

    def _expired(self) -> None:
        """The deadline wheel's word: the deadline has come (a wait ends with WireTimeout)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(WireTimeout())

    def _disarm(self) -> None:
        self._deadlines.forget(self)

    def more(self, timeout: float) -> asyncio.Future[bool]:
        """Wait until the client sends more: True, or False when the stream has ended;
        WireTimeout at the deadline. A future, not a coroutine: a session waiting for its
        client holds no frame for it."""
        waiter = self._loop.create_future()
        if self.eof:
            waiter.set_result(False)
            return waiter
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self.deadline = self._loop.time() + timeout
        self._deadlines.watch(self)  # filed again if earlier than before (the PROXY header's)
        self._waiter = waiter
        return waiter

    async def feed_until(self, sink: Callable[[bytearray], bool], timeout: float) -> bool:
        """Hand every byte to `sink` as it arrives until it returns True (it consumes what it
        takes from buf); False when the stream ends first. The deadline is re-armed by each
        chunk, so a client that keeps sending never times out.
        """
        if self.send():
            await self.drain()
        if sink(self.buf):
            return True
        self._sink, self._sink_timeout, self._sink_error = sink, timeout, None
        try:
            while self._sink is not None:
                if not await self.more(timeout):
                    return False
        finally:
            self._sink = None
        if self._sink_error is not None:
            raise self._sink_error
        return True

    def take_line(self, limit: int) -> bytes | None:
        """line() without a wait: the next whole line (TOO_LONG past `limit`) when buf holds
        one; None when it does not, or when replies must be flushed first (line() does)."""
        if self._queued >= WRITE_HIGH:
            return None
        buf = self.buf
        end = buf.find(b"\n")
        if end < 0:
            return None
        del_end = end + 1
        line = TOO_LONG if end >= limit else bytes(buf[:del_end])
        del buf[:del_end]
        return line

    def may_wait(self, limit: int) -> bool:
        """Whether a caller may wait for a line itself (flush(), more(), take_line(): no
        coroutine of the wire's held while the client is idle): not with an over-long line
        to skip or a batch of replies to write (line() does those)."""
        return len(self.buf) <= limit and self._queued < WRITE_HIGH

    async def line(self, timeout: float, limit: int) -> bytes | None:
        """The next line with its LF; None at end of stream; TOO_LONG past `limit` bytes.

        The rest of an over-long line is read and thrown away, so the next line is whole.
        """
        if self._queued >= WRITE_HIGH:  # a long pipelined batch: its replies go out now
            await self.flush()
        buf = self.buf
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                if end >= limit:
                    del buf[:end + 1]
                    return TOO_LONG
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                return line
            if len(buf) > limit:
                await self._skip_line(timeout)
                return TOO_LONG
            await self.flush()
            if not await self.more(timeout):
                return None

    async def _skip_line(self, timeout: float) -> None:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                del self.buf[:end + 1]
                return
            self.buf.clear()
            await self.flush()
            if not await self.more(timeout):
                return

    async def greet_wait(self, teaser: bytes, seconds: float, decided: asyncio.Future | None,
                         hold: asyncio.Future | None = None) -> tuple[bytes, float]:
        """postscreen's wait after the teaser: what the client sent too early, and when.

        `decided` done ends the wait; `hold` holds the teaser back (see DESCRIPTION). A
        wait that `decided` ended before the teaser went out returns (b"", 0.0) unsent."""
        loop = self._loop
        end = loop.time() + seconds
        # held even when `hold` is done already (a result from the DNSBL cache): the verdict
        # it brings is taken in this turn of the loop, the teaser waits for it
        held = hold is not None and not self.buf and not self.eof
        if not held:
            self.transport.write(teaser)
        started = loop.time()
        if self.buf or self.eof:
            return bytes(self.buf), 0.0
        self._disarm()  # the PROXY header's 5 s deadline must not cut this wait short
        if decided is not None:
            decided.add_done_callback(self._woken)
        if held:
            hold.add_done_callback(self._woken)
        timer = loop.call_later(min(TEASER_HOLD, seconds) if held else seconds, self._wake)
        try:
            while True:
                waiter = self._waiter = loop.create_future()
                await waiter
                if not held or (decided is not None and decided.done()):
                    break
                held = False  # the DNSBL answered without a verdict, or the hold is over
                self.transport.write(teaser)
                started = loop.time()
                if self.buf or self.eof:
                    return bytes(self.buf), 0.0  # it talked before the teaser
                timer.cancel()
                timer = loop.call_at(end, self._wake)
        finally:
            self._waiter = None
            timer.cancel()
            for future in (decided, hold):  # no wake-up of a later wait
                if future is not None:
                    future.remove_done_callback(self._woken)
        if held:
            return b"", 0.0  # decided before the teaser: the verdict is the first word
        if self.buf:
            return bytes(self.buf), loop.time() - started
        return b"", 0.0

    def _woken(self, _future: asyncio.Future) -> None:
        self._wake()

    # --- writing ---------------------------------------------------------------------------

    def reply(self, line: bytes) -> None:
        self._out.append(line)
        self._queued += len(line)

    async def flush(self) -> None:
        if self.send():
            await self.drain()

    def send(self) -> bool:
        """flush() without its wait: the queued replies written; True when the client must
        read them before the caller goes on (await drain() then). The session's loop calls
        this per command, which costs no coroutine when there is nothing to wait for."""
        out = self._out
        if not out:
            return False
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        self._queued = 0
        if self.closed:
            return False
        self.transport.write(data)
        return self._flow.paused

    async def drain(self) -> None:
        """The client reads nothing: wait for it (reading no more of its commands meanwhile),
        at most until the deadline of the last wait for it."""
        try:
            await self._flow.drained(max(self.deadline - self._loop.time(), 1.0))
        except TimeoutError:
            self.abort()
            raise WireTimeout from None

    def write_now(self, data: bytes) -> None:
        """Queued replies and data at once, without waiting: the last word before closing."""
        self._out.append(data)
        if not self.closed:
            self.transport.write(b"".join(self._out))
        self._out.clear()
        self._queued = 0

    # --- TLS and closing -------------------------------------------------------------------

    async def start_tls(self, context, timeout: float) -> None:
        """Hand the socket to TLS; what the client sent in clear after STARTTLS is dropped.

        RFC 3207 (and CVE-2011-0411): nothing sent before the handshake may count as a
        command, so the buffer is emptied and reading paused before our 220 goes out.
        """
        self.buf.clear()
        transport = self.transport
        transport.pause_reading()
        await self.flush()
        self.transport = await self._loop.start_tls(
            transport, self, context, server_side=True, ssl_handshake_timeout=timeout)

    def close(self) -> None:
        """Close after what is queued is sent; a client that does not read it is cut off
        after CLOSE_GRACE seconds, so its socket cannot linger uncounted."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                self._loop.call_later(CLOSE_GRACE, transport.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def extra(self, name: str, default=None):
        return self.transport.get_extra_info(name, default) if self.transport else default

    # --- the PROXY parser's reader (aiosmtpd.proxy_protocol.AsyncReader) -----------------

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self.more(HEADER_TIMEOUT):
                raise asyncio.IncompleteReadError(bytes(self.buf), n)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        while (end := self.buf.find(separator)) < 0:
            if len(self.buf) > 4096 or not await self.more(HEADER_TIMEOUT):
                raise asyncio.IncompleteReadError(bytes(self.buf), None)
        data = bytes(self.buf[:end + len(separator)])
        del self.buf[:end + len(separator)]
        return data

    async def read(self, n: int = -1) -> bytes:
        if not self.buf and not await self.more(HEADER_TIMEOUT):
            return b""
        n = len(self.buf) if n < 0 else min(n, len(self.buf))
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data
