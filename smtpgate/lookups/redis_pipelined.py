"""redis_pipelined - one pipelined connection per process for the hot path's Redis calls.

SYNOPSIS
    PipelinedRedis(target, timeout, *, decode=True, retries=1, fallback=factory)
        await .get(k) / .mget(keys) / .hget(k, f) / .hgetall(k) / .delete(*k) / .ping()
        await .evalsha(sha, n, *keys_and_args) / .eval(...) / .script_load(src)
        .register_script(src) -> Script          await script(keys=[...], args=[...])
        .pipeline(transaction=False) -> Pipeline  get set hset expire incr xadd
                                                  eval evalsha hgetall, await .execute()
        await .execute_command(*args)
        .submit(data, count) -> Future of replies   packed commands, from a callback
        pack(args, out), raise_first(replies, commands)
        anything else: the redis-py client fallback() makes (SCAN, XRANGE, ...)
        await .aclose()

DESCRIPTION
    redis-py spends most of a call's CPU on its machinery (a connection
    checked out of a pool, the retry wrapper, a Pipeline object and a
    command object per command, option handling), not on the socket. Here
    every caller's commands go, packed as RESP, down one connection, those
    of one turn of the loop in one write (a send on loopback is the dearest
    part of a call); replies are parsed by hiredis in the order sent and
    handed to the callers' futures (one future per pipeline or command),
    so concurrent sessions share the connection without waiting for each
    other's round trips. Redis answers commands in the order it reads them,
    so nothing is lost by sharing: a caller that stops waiting (its own
    timeout) leaves its slot to be filled and dropped.

    The promises of redis_client hold here too:
    - timeout bounds the connect (sentinel discovery, AUTH, SELECT
      included) and every reply: the oldest unanswered call is watched by
      one timer, and when its reply is overdue (by a little more than
      timeout: the callers' own timeouts speak first) the connection is
      closed and every call on it fails with redis.exceptions.TimeoutError;
    - a lost connection fails the calls on it with ConnectionError, each
      sent again once on a fresh connection (retries, as redis-py's Retry);
      the next call connects again, so a Redis restart costs the calls in
      flight at most;
    - a Sentinel set's master is asked of the sentinels at each connect; a
      READONLY reply (the master was demoted) closes the connection and
      reads as ConnectionError (sent again once, to the new master), as
      with redis-py's sentinel client;
    - error replies raise redis-py's own exceptions (NoScriptError,
      ResponseError, ...), parsed by redis-py's parser; a pipeline raises
      the first, annotated as redis-py annotates it, after reading all;
    - scripts run by SHA1 and are loaded again on NOSCRIPT.
    Cluster URLs and TLS (rediss://) stay on redis-py (redis_client.connect).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    DataError,
    InvalidResponse,
    NoScriptError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from smtpgate import redis_url

CLOSED = "Connection closed by server."
_pack_command = hiredis.pack_command


def pack(args: Iterable[Any], out: list[bytes]) -> None:
    """One command as RESP, appended to `out`: str as UTF-8, int as its digits, float as
    its repr, bytes as they are (what redis-py writes for these; an int or str subclass,
    an enum member say, as its value, where redis-py would write its repr).

    hiredis packs it in C, a tenth of a first contact's Python when done here; what it
    refuses (bool, None, bytearray, other types) is refused below, with redis-py's
    DataError and wording."""
    if type(args) is not tuple:
        args = tuple(args)
    try:
        out.append(_pack_command(args))
    except TypeError:
        _pack(args, out)


def _pack(args: Iterable[Any], out: list[bytes]) -> None:
    parts = []
    for value in args:
        if isinstance(value, bytes):
            data = value
        elif isinstance(value, str):
            data = value.encode()
        elif isinstance(value, bool):
            raise DataError("Invalid input of type: 'bool'. Convert to a bytes, string, "
                            "int or float first.")
        elif isinstance(value, int):
            data = b"%d" % value
        elif isinstance(value, float):
            data = repr(value).encode()
        else:
            raise DataError(f"Invalid input of type: {type(value).__name__!r}. Convert to a "
                            f"bytes, string, int or float first.")
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    out.append(b"*%d\r\n" % len(parts))
    out.extend(parts)


class _Connection(asyncio.Protocol):
    """One socket: requests written in order, replies handed out in that order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, where: str,
                 encoding: str | None) -> None:
        self.loop = loop
        # a little after the callers' own timeouts (the same redis_timeout, started a moment
        # earlier), so that theirs are what they report; this one closes the connection
        self.grace = timeout * 1.05 + 0.01
        self.where = where
        self.reader = hiredis.Reader(protocolError=InvalidResponse,
                                     replyError=BaseParser.parse_error, encoding=encoding)
        # [future, replies expected, replies so far, deadline]
        self.pending: collections.deque[list] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []  # this turn's requests, written together at its end
        self._context = contextvars.Context()  # _write belongs to no caller

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, count: int) -> asyncio.Future:
        if self.closed or self.transport.is_closing():
            raise RedisConnectionError(CLOSED)
        future = self.loop.create_future()
        deadline = self.loop.time() + self.grace
        self.pending.append([future, count, [], deadline])
        out = self._out
        out.append(data)
        if len(out) == 1:
            self.loop.call_soon(self._write, context=self._context)
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._overdue)
        return future

    def _write(self) -> None:
        """Every request of a turn of the loop in one write: one system call (a send on
        loopback costs more than everything else of a call) for the sessions that asked
        in that turn, and often one read of their replies."""
        out, self._out = self._out, []
        if not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def data_received(self, data: bytes) -> None:
        reader, pending = self.reader, self.pending
        reader.feed(data)
        try:
            while (reply := _next_reply(reader, self.where)) is not False:
                entry = pending[0]
                replies = entry[2]
                replies.append(reply)
                if len(replies) == entry[1]:
                    pending.popleft()
                    if not entry[0].done():  # its caller may have stopped waiting
                        entry[0].set_result(replies)
        except (InvalidResponse, hiredis.ProtocolError, IndexError) as exc:
            # garbage, or a reply nobody asked for: the order is lost, and the connection
            self.abort(RedisConnectionError(f"Protocol error from {self.where}: {exc}"))

    def _overdue(self) -> None:
        """The timer watches the oldest call only: when it fires early (that call was
        answered), it waits for the next oldest's deadline."""
        self._timer = None
        if not self.pending:
            return
        deadline = self.pending[0][3]
        if self.loop.time() >= deadline:
            self.abort(RedisTimeoutError(f"Timeout reading from {self.where}"))
        else:
            self._timer = self.loop.call_at(deadline, self._overdue)

    def abort(self, exc: Exception) -> None:
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(CLOSED))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, collections.deque()
        for entry in pending:
            if not entry[0].done():
                entry[0].set_exception(exc)


def _next_reply(reader: hiredis.Reader, where: str) -> Any:
    """The next whole reply, False when none is complete. A bulk string that is not UTF-8
    (a table value written in Latin-1, say) is that reply's error alone: hiredis has
    consumed the whole reply when it raises, so the order holds and the connection stays."""
    try:
        return reader.gets()
    except UnicodeDecodeError as exc:
        return InvalidResponse(f"A reply from {where} is not valid UTF-8: {exc}")


def _chain(result: asyncio.Future, task: asyncio.Task) -> None:
    if result.done():
        return
    if task.cancelled():
        result.cancel()
    elif task.exception() is not None:
        result.set_exception(task.exception())
    else:
        result.set_result(task.result())


def raise_first(replies: list, commands: list[tuple] | None = None) -> None:
    for number, reply in enumerate(replies, 1):
        if isinstance(reply, Exception):  # an error reply, parsed by redis-py's parser
            if commands is not None:  # as redis-py's pipeline words it
                cmd = " ".join(_text(a) for a in commands[number - 1])
                if len(cmd) > 100:
                    cmd = cmd[:97] + "..."
                reply.args = (f"Command # {number} ({cmd}) of pipeline caused error: "
                              f"{reply.args}", *reply.args[1:])
            raise reply


def _connect_error(where: str, exc: OSError) -> str:
    """redis-py's words for a failed connect (redis.utils.format_error_message, not in every
    redis-py this project allows)."""
    if not exc.args:
        return f"Error connecting to {where}."
    if len(exc.args) == 1:
        return f"Error {exc.args[0]} connecting to {where}."
    return f"Error {exc.args[0]} connecting to {where}. {exc.args[1]}."


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _pairs(reply: list) -> dict:
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _ok(reply: Any) -> bool:
    return reply in (b"OK", "OK")


class PipelinedRedis:
    def __init__(self, target: redis_url.RedisTarget, timeout: float, *, decode: bool = True,
                 retries: int = 1, fallback: Callable[[], Any]) -> None:
        if target.kind not in ("single", "sentinel") or target.url.startswith("rediss:"):
            raise ValueError("a pipelined connection serves redis://, unix:// and Sentinel")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self._encoding = "utf-8" if decode else None
        self._fallback_factory = fallback
        self._fallback: Any = None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future | None = None
        self._sentinel: Sentinel | None = None

    # --- the connection ---------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._connecting is None or self._connecting.get_loop() is not loop:
            self._connecting = loop.create_task(self._open(loop))
            self._connecting.add_done_callback(self._opened)
        return await asyncio.shield(self._connecting)

    def _opened(self, task: asyncio.Task) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._conn = task.result()

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        target = self.target
        try:
            async with asyncio.timeout(self.timeout):
                if target.kind == "sentinel":
                    host, port = await self._sentinels().discover_master(target.service)
                    path, db = "", target.db
                    username, password = target.username, target.password
                else:  # the URL as redis-py reads it (credentials, ?db=, a socket's path)
                    options = parse_url(target.url)
                    host, port = options.get("host", "localhost"), options.get("port", 6379)
                    path, db = options.get("path", ""), int(options.get("db") or 0)
                    username, password = options.get("username"), options.get("password")
                where = path or f"{host}:{port}"

                def protocol() -> _Connection:
                    return _Connection(loop, self.timeout, where, self._encoding)

                try:
                    if path:
                        _, conn = await loop.create_unix_connection(protocol, path)
                    else:
                        _, conn = await loop.create_connection(protocol, host, int(port))
                except OSError as exc:
                    raise RedisConnectionError(_connect_error(where, exc)) from exc
                hello: list[bytes] = []
                commands = 0
                if password is not None:
                    pack(("AUTH", password) if username is None
                         else ("AUTH", username, password), hello)
                    commands += 1
                if db:
                    pack(("SELECT", db), hello)
                    commands += 1
                if commands:
                    replies = await conn.send(b"".join(hello), commands)
                    try:
                        raise_first(replies)
                    except RedisError:  # a wrong password, an unknown database
                        conn.abort(RedisConnectionError(CLOSED))
                        raise
                return conn
        except TimeoutError as exc:
            raise RedisTimeoutError("Timeout connecting to server") from exc

    def _sentinels(self) -> Sentinel:
        if self._sentinel is None:
            kwargs: dict[str, Any] = {"socket_timeout": self.timeout,
                                      "socket_connect_timeout": self.timeout}
            if self.target.sentinel_password is not None:
                kwargs["password"] = self.target.sentinel_password
            self._sentinel = Sentinel(list(self.target.nodes), sentinel_kwargs=kwargs)
        return self._sentinel

    async def run(self, data: bytes, count: int, attempt: int = 0) -> list:
        """`count` packed commands sent at once; their replies (error replies as exceptions,
        not raised). A connection lost under them (or a demoted master's): sent again,
        `retries` times, as redis-py's Retry does."""
        while True:
            conn = self._conn
            if conn is None or conn.closed or conn.loop is not asyncio.get_running_loop():
                conn = await self._connection()
            try:
                replies = await conn.send(data, count)
                if self.target.kind == "sentinel":
                    self._demoted(conn, replies)
                return replies
            except RedisConnectionError:
                if attempt >= self.retries:
                    raise
                attempt += 1

    def submit(self, data: bytes, count: int) -> asyncio.Future:
        """run() as a future: on an open connection no task and no coroutine, for a caller
        that batches commands from a callback (a task only to connect, or to send again)."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or conn.closed or conn.loop is not loop:
            return loop.create_task(self.run(data, count))
        try:
            sent = conn.send(data, count)
        except RedisConnectionError:
            return loop.create_task(self.run(data, count))
        result = loop.create_future()
        sent.add_done_callback(functools.partial(self._settle, result, conn, data, count))
        return result

    def _settle(self, result: asyncio.Future, conn: _Connection, data: bytes, count: int,
                sent: asyncio.Future) -> None:
        if result.done():  # cancelled by its caller
            if not sent.cancelled():
                sent.exception()  # retrieved: an outage is the caller's timeout, not a warning
            return
        exc = sent.exception()
        if exc is None:
            replies = sent.result()
            try:
                if self.target.kind == "sentinel":
                    self._demoted(conn, replies)
            except RedisConnectionError as demoted:
                exc = demoted
            else:
                result.set_result(replies)
                return
        if isinstance(exc, RedisConnectionError) and self.retries:
            again = conn.loop.create_task(self.run(data, count, attempt=1))
            again.add_done_callback(functools.partial(_chain, result))
            # a caller that stops waiting (its timeout: the sessions were told 421) takes
            # the resend with it, as redis-py's retry under asyncio.timeout is cancelled
            result.add_done_callback(lambda r: r.cancelled() and again.cancel())
        else:
            result.set_exception(exc)

    def _demoted(self, conn: _Connection, replies: list) -> None:
        for reply in replies:
            if isinstance(reply, ReadOnlyError):
                conn.abort(RedisConnectionError("The previous master is now a slave"))
                raise RedisConnectionError("The previous master is now a slave")

    async def execute_command(self, *args: Any) -> Any:
        out: list[bytes] = []
        pack(args, out)
        reply = (await self.run(b"".join(out), 1))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.abort(RedisConnectionError("Connection closed"))
            self._conn = None
        if self._fallback is not None:
            await self._fallback.aclose()
            self._fallback = None
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
            self._sentinel = None

    def __getattr__(self, name: str) -> Any:
        """Commands not served here (SCAN, XRANGE, ...): redis-py's, on a client of its own."""
        if name.startswith("_"):
            raise AttributeError(name)
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        return getattr(self._fallback, name)

    # --- commands ---------------------------------------------------------------------------

    async def get(self, name: Any) -> Any:
        return await self.execute_command("GET", name)

    async def mget(self, keys: Any, *more: Any) -> list:
        names = [keys] if isinstance(keys, str | bytes) else list(keys)
        return await self.execute_command("MGET", *names, *more)

    async def hget(self, name: Any, key: Any) -> Any:
        return await self.execute_command("HGET", name, key)

    async def hgetall(self, name: Any) -> dict:
        return _pairs(await self.execute_command("HGETALL", name))

    async def delete(self, *names: Any) -> int:
        return await self.execute_command("DEL", *names)

    async def ping(self) -> bool:
        await self.execute_command("PING")
        return True

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVAL", script, numkeys, *keys_and_args)

    async def script_load(self, script: str) -> Any:
        return await self.execute_command("SCRIPT", "LOAD", script)

    def register_script(self, script: str) -> Script:
        return Script(self, script)

    def pipeline(self, transaction: bool = False) -> Pipeline:
        if transaction:
            raise ValueError("a pipelined connection sends no MULTI/EXEC")
        return Pipeline(self)


class Script:
    """A Lua script run by SHA1, loaded again when the server has lost it."""

    def __init__(self, client: PipelinedRedis, source: str) -> None:
        self.client = client
        self.script = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Iterable[Any] = (), args: Iterable[Any] = (),
                       client: Any = None) -> Any:
        keys, args = list(keys), list(args)
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.client.script_load(self.script)
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)


class Pipeline:
    """Commands gathered and sent in one write; execute() returns their replies in order and
    raises the first error reply (after reading them all), as redis-py's pipeline does."""

    __slots__ = ("_client", "_commands", "_out", "_post")

    def __init__(self, client: PipelinedRedis) -> None:
        self._client = client
        self._out: list[bytes] = []
        self._commands: list[tuple] = []
        self._post: list[Callable[[Any], Any] | None] = []

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.reset()

    def reset(self) -> None:
        self._out, self._commands, self._post = [], [], []

    def __len__(self) -> int:
        return len(self._commands)

    def execute_command(self, *args: Any, post: Callable[[Any], Any] | None = None) -> Pipeline:
        pack(args, self._out)
        self._commands.append(args)
        self._post.append(post)
        return self

    async def execute(self, raise_on_error: bool = True) -> list:
        out, commands, post = self._out, self._commands, self._post
        self.reset()
        if not commands:
            return []
        replies = await self._client.run(b"".join(out), len(commands))
        if raise_on_error:
            raise_first(replies, commands)
        return [reply if convert is None or isinstance(reply, Exception) else convert(reply)
                for reply, convert in zip(replies, post, strict=True)]

    def get(self, name: Any) -> Pipeline:
        return self.execute_command("GET", name)

    def set(self, name: Any, value: Any, ex: int | None = None) -> Pipeline:
        if ex is None:
            return self.execute_command("SET", name, value, post=_ok)
        return self.execute_command("SET", name, value, "EX", int(ex), post=_ok)

    def hset(self, name: Any, key: Any = None, value: Any = None,
             mapping: Mapping | None = None) -> Pipeline:
        items = [] if key is None else [key, value]
        for k, v in (mapping or {}).items():
            items += (k, v)
        return self.execute_command("HSET", name, *items)

    def expire(self, name: Any, time: int) -> Pipeline:
        return self.execute_command("EXPIRE", name, int(time), post=bool)

    def incr(self, name: Any, amount: int = 1) -> Pipeline:
        return self.execute_command("INCRBY", name, amount)

    def hgetall(self, name: Any) -> Pipeline:
        return self.execute_command("HGETALL", name, post=_pairs)

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Pipeline:
        return self.execute_command("EVAL", script, numkeys, *keys_and_args)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Pipeline:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def xadd(self, name: Any, fields: Mapping, id: str = "*", maxlen: int | None = None,
             approximate: bool = True, minid: Any = None) -> Pipeline:
        args: list[Any] = ["XADD", name]
        if maxlen is not None and minid is not None:
            raise DataError("Only one of ``maxlen`` or ``minid`` may be specified")
        if maxlen is not None:
            args += ("MAXLEN", "~" if approximate else "=", maxlen)
        elif minid is not None:
            args += ("MINID", "~" if approximate else "=", minid)
        args.append(id)
        for k, v in fields.items():
            args += (k, v)
        return self.execute_command(*args)

