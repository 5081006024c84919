"""load - the load generators: Postfix's smtp-source, and bounded asyncio SMTP clients.

SYNOPSIS
    await smtp_source(port, *, concurrency, messages, size, world, timeout) -> SourceRun
    make_body(size, world) -> bytes
    await run_sessions(port, *, sessions, concurrency, body, world, tls=None,
                       timeout=30, budget=60) -> SessionRun
    await run_screening(port, *, sources, concurrency, duration, timeout) -> ScreenRun
    await hold_idle(port, *, sources, count, budget) -> IdleHold   (.close())
    percentile(values, q) -> float

DESCRIPTION
    smtp_source runs `smtp-source -s CONCURRENCY -m MESSAGES -l SIZE` against
    127.0.0.1:port, one message per connection, timed from outside (it prints
    no rate), and killed at the timeout. It sends HELO, one RCPT, and cannot
    pick its source address, speak STARTTLS or time a session.

    run_sessions is the Python client for what smtp-source cannot do: it
    times each session from connect to the 221 reply to QUIT (EHLO, optional
    STARTTLS and EHLO again, MAIL, RCPT, DATA, the body, QUIT), keeps
    CONCURRENCY sessions in flight, and stops starting new ones once the
    budget (seconds) is spent. A session that gets an unexpected reply or
    times out is an error, counted by the reply code or exception name, and
    has no latency.

    run_screening opens connections from the given source addresses (any
    127.x.y.z is local) for a fixed duration and reads until the first final
    reply line or the close: it counts connections per outcome ("521", "220",
    "eof", "timeout"). A 220 is answered with QUIT.

    hold_idle opens COUNT connections spread over the source addresses,
    never sends a byte (the client sits in the greet wait, then before HELO),
    and keeps them open until close().

    Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field

HOST = "127.0.0.1"


class SmtpError(Exception):
    def __init__(self, step: str, code: str) -> None:
        super().__init__(f"{step}: {code}")
        self.code = code


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# --- smtp-source ---------------------------------------------------------------------------------


@dataclass
class SourceRun:
    elapsed: float
    messages: int
    returncode: int | None
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


async def smtp_source(port: int, *, concurrency: int, messages: int, size: int, world,
                      timeout: float) -> SourceRun:
    argv = [
        "smtp-source", "-s", str(concurrency), "-m", str(messages), "-l", str(size),
        "-M", world.client_name, "-f", world.sender, "-t", world.rcpt, f"{HOST}:{port}",
    ]
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
        return SourceRun(time.perf_counter() - start, messages, None,
                         f"killed after {timeout:.0f}s " + err.decode(errors="replace")[-500:])
    return SourceRun(time.perf_counter() - start, messages, proc.returncode,
                     err.decode(errors="replace")[-500:])


# --- the asyncio SMTP client ---------------------------------------------------------------------


def make_body(size: int, world) -> bytes:
    head = (f"From: <{world.sender}>\r\nTo: <{world.rcpt}>\r\nSubject: bench\r\n"
            "Message-ID: <bench@client.bench.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    fill = max(0, size - len(head))
    body = head + line * (fill // len(line)) + b"y" * (fill % len(line))
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


async def read_reply(reader: asyncio.StreamReader) -> str:
    """The code of the next complete reply (multi-line replies read to their last line)."""
    while True:
        line = await reader.readline()
        if not line:
            return "eof"
        if len(line) < 4 or line[3:4] != b"-":
            return line[:3].decode(errors="replace")


async def _expect(reader, writer, command: bytes | None, code: str, step: str) -> None:
    if command is not None:
        writer.write(command)
    got = await read_reply(reader)
    if got != code:
        raise SmtpError(step, got)


async def one_session(port: int, body: bytes, world, tls: ssl.SSLContext | None = None,
                      source: str | None = None) -> None:
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=local)
    try:
        await _expect(reader, writer, None, "220", "banner")
        await _expect(reader, writer, b"EHLO %s\r\n" % world.client_name.encode(), "250", "ehlo")
        if tls is not None:
            await _expect(reader, writer, b"STARTTLS\r\n", "220", "starttls")
            await writer.start_tls(tls, server_hostname=world.mx_name)
            await _expect(reader, writer, b"EHLO %s\r\n" % world.client_name.encode(), "250",
                          "ehlo")
        await _expect(reader, writer, b"MAIL FROM:<%s>\r\n" % world.sender.encode(), "250", "mail")
        await _expect(reader, writer, b"RCPT TO:<%s>\r\n" % world.rcpt.encode(), "250", "rcpt")
        await _expect(reader, writer, b"DATA\r\n", "354", "data")
        await _expect(reader, writer, body + b".\r\n", "250", "dot")
        await _expect(reader, writer, b"QUIT\r\n", "221", "quit")
    finally:
        writer.transport.abort()


@dataclass
class SessionRun:
    latencies: list[float] = field(default_factory=list)  # seconds, successful sessions only
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict:
        ms = [v * 1000 for v in self.latencies]
        return {
            "sessions": self.ok,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "sessions_per_s": self.ok / self.elapsed if self.elapsed else 0.0,
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
            "mean_ms": sum(ms) / len(ms) if ms else math.nan,
            "max_ms": max(ms) if ms else math.nan,
        }


async def run_sessions(port: int, *, sessions: int, concurrency: int, body: bytes, world,
                       tls: ssl.SSLContext | None = None, timeout: float = 30.0,
                       budget: float = 60.0, source: str | None = None) -> SessionRun:
    run = SessionRun()
    counter = itertools.count()
    start = time.perf_counter()
    stop_at = start + budget

    async def worker() -> None:
        while next(counter) < sessions and time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    await one_session(port, body, world, tls, source)
            except SmtpError as exc:
                run.errors[exc.code] += 1
            except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
                run.errors[type(exc).__name__] += 1
            else:
                run.latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, sessions)))))
    run.elapsed = time.perf_counter() - start
    return run


# --- screening: connections until the first final reply ------------------------------------------


@dataclass
class ScreenRun:
    outcomes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    def summary(self, rejected_prefix: str = "5") -> dict:
        done = sum(self.outcomes.values())
        rejected = sum(n for k, n in self.outcomes.items() if k.startswith(rejected_prefix))
        ms = [v * 1000 for v in self.latencies]
        return {
            "connections": done,
            "rejected": rejected,
            "outcomes": dict(self.outcomes),
            "rejected_per_s": rejected / self.elapsed if self.elapsed else 0.0,
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
        }


async def _screen_once(port: int, source: str) -> str:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        code = await read_reply(reader)
        if code == "220":
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(OSError):
                await read_reply(reader)
        return code
    finally:
        writer.transport.abort()


async def run_screening(port: int, *, sources: list[str], concurrency: int, duration: float,
                        timeout: float) -> ScreenRun:
    run = ScreenRun()
    addresses = itertools.cycle(sources)
    start = time.perf_counter()
    stop_at = start + duration

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    outcome = await _screen_once(port, next(addresses))
            except TimeoutError:
                outcome = "timeout"
            except OSError as exc:
                outcome = type(exc).__name__
            if time.perf_counter() <= stop_at:
                run.outcomes[outcome] += 1
                run.latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    run.elapsed = min(time.perf_counter(), stop_at) - start
    return run


# --- idle connections ----------------------------------------------------------------------------


@dataclass
class IdleHold:
    writers: list = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0

    def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()


async def hold_idle(port: int, *, sources: list[str], count: int, budget: float,
                    parallel: int = 200) -> IdleHold:
    hold = IdleHold()
    addresses = itertools.cycle(sources)
    counter = itertools.count()
    start = time.perf_counter()
    stop_at = start + budget

    async def opener() -> None:
        while next(counter) < count and time.perf_counter() < stop_at:
            try:
                async with asyncio.timeout(max(0.1, stop_at - time.perf_counter())):
                    _, writer = await asyncio.open_connection(
                        HOST, port, local_addr=(next(addresses), 0), limit=1024)
                hold.writers.append(writer)
            except (OSError, TimeoutError) as exc:
                hold.errors[type(exc).__name__] += 1

    await asyncio.gather(*(opener() for _ in range(min(parallel, max(1, count)))))
    hold.elapsed = time.perf_counter() - start
    return hold
