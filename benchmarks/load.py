"""load - the load generators: Postfix's smtp-source, and bounded asyncio SMTP clients.

SYNOPSIS
    await smtp_source(port, *, concurrency, messages, size, world, timeout,
                      marker=None) -> SourceRun
    make_body(size, world, marker="bench") -> bytes
    await run_sessions(port, *, sessions, concurrency, body, world, tls=None,
                       timeout=30, budget=60) -> SessionRun
    await run_screening(port, *, sources, concurrency, duration, timeout,
                        hello=None) -> ScreenRun
    await hold_idle(port, *, sources, count, budget) -> IdleHold   (.close())
    await trickle_senders(port, *, sources, count, world, interval, until) -> SlowRun
    await run_paced(port, *, interval, until, body, world, timeout) -> SessionRun
    await run_clients(port, *, plan, concurrency, until, body, timeout, stagger=0)
        -> ClientRun
    percentile(values, q) -> float

DESCRIPTION
    smtp_source runs `smtp-source -s CONCURRENCY -m MESSAGES -l SIZE` against
    127.0.0.1:port, one message per connection, timed from outside (it prints
    no rate), and killed at the timeout. It sends HELO, one RCPT, and cannot
    pick its source address, speak STARTTLS or time a session. With a
    marker, it sends a message made by make_body() from a file (-F) instead
    of its own (-l), so that every message carries the marker.

    make_body builds a message of about size bytes whose Message-ID is
    <MARKER@client.bench.test> (and Subject the marker): Postfix logs the
    Message-ID of every message it queues, so deliveries are counted per
    marker (benchmarks.stack.DeliveryLog), never by counting every delivery
    in the log. Give each case, target and run its own marker.

    run_sessions is the Python client for what smtp-source cannot do: it
    times each session from connect to the 221 reply to QUIT (EHLO, optional
    STARTTLS and EHLO again, MAIL, RCPT, DATA, the body, QUIT), keeps
    CONCURRENCY sessions in flight, and stops starting new ones once the
    budget (seconds) is spent. A session that gets an unexpected reply or
    times out is an error, counted by the reply code or exception name, and
    has no latency. SessionRun.queued counts the messages the server took
    (250 to the final dot), whether the session then ended well or not.

    run_screening opens connections from the given source addresses (any
    127.x.y.z is local) for a fixed duration and reads until the first final
    reply line or the close: it counts connections per outcome ("521", "220",
    "eof", "timeout"). A 220 is answered with QUIT; with hello (an EHLO
    line), a 220 is first answered with hello and the outcome is the reply
    to it (a front end that decides only at the first command, as the
    aiosmtpd front end does, rejects there).

    hold_idle opens COUNT connections spread over the source addresses,
    never sends a byte (the client sits in the greet wait, then before HELO),
    and keeps them open until close().

    trickle_senders opens COUNT sessions spread over the source addresses,
    each going through EHLO, MAIL, RCPT and DATA like a normal client, then
    sending its message one byte every `interval` seconds, until the
    perf_counter time `until`, when every connection is aborted (no final
    dot is ever sent). SlowRun.outcomes counts where each got to ("354":
    trickling; else the code or exception that stopped it), .bytes the
    bytes trickled in all, and .reached[i] when each entered DATA.

    run_paced is a normal client next to them: it starts one session
    (one_session) every `interval` seconds until `until`, each in its own
    task bounded by timeout, and waits for all; latencies are end to end,
    connect to 221, whatever the client had to wait for on the way.

    run_clients is the MX traffic client: every session a Client of its own
    (kind, source address, HELO name, sender, recipient; from a plan, see
    benchmarks.mx_plan), `concurrency` sessions in flight until `until`,
    each bound to its source address, through banner, EHLO, MAIL, RCPT,
    DATA and QUIT (client_session). ClientRun.sessions has the start, end,
    kind and outcome of each ("250", or "CODE@STEP" where it was refused,
    "timeout@STEP", "ExceptionName@STEP").

    Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import ssl
import tempfile
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
                      timeout: float, marker: str | None = None,
                      rcpt: str | None = None) -> SourceRun:
    """smtp-source's run; with `rcpt` (a refused recipient) -A keeps it going past refusals."""
    with contextlib.ExitStack() as cleanup:
        if marker is None:
            payload = ["-l", str(size)]
        else:  # the message from a file: smtp-source adds no header of its own then
            message = cleanup.enter_context(tempfile.NamedTemporaryFile(
                prefix="smtp-source-", suffix=".eml"))
            message.write(make_body(size, world, marker).replace(b"\r\n", b"\n"))
            message.flush()
            payload = ["-F", message.name]
        argv = [
            "smtp-source", "-s", str(concurrency), "-m", str(messages), *payload,
            "-M", world.client_name, "-f", world.sender, "-t", rcpt or world.rcpt,
            *(["-A"] if rcpt else []), f"{HOST}:{port}",
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


def make_body(size: int, world, marker: str = "bench") -> bytes:
    """A message of about size bytes, its Message-ID <marker@client.bench.test>."""
    if not marker or any(c in marker for c in "<>@ \t\r\n"):
        raise ValueError(f"bad message marker {marker!r}")
    head = (f"From: <{world.sender}>\r\nTo: <{world.rcpt}>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@{world.client_name}>\r\n\r\n").encode()
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
                      source: str | None = None, run: SessionRun | None = None) -> None:
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
        if run is not None:
            run.queued += 1
        await _expect(reader, writer, b"QUIT\r\n", "221", "quit")
    finally:
        writer.transport.abort()


@dataclass
class SessionRun:
    latencies: list[float] = field(default_factory=list)  # seconds, successful sessions only
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0
    queued: int = 0  # messages the server took (250 to the dot), the session ended well or not

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict:
        ms = [v * 1000 for v in self.latencies]
        return {
            "sessions": self.ok,
            "queued": self.queued,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "sessions_per_s": self.ok / self.elapsed if self.elapsed else 0.0,
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
            "mean_ms": sum(ms) / len(ms) if ms else math.nan,
            "max_ms": max(ms) if ms else math.nan,
        }


async def timed_session(run: SessionRun, port: int, body: bytes, world,
                        tls: ssl.SSLContext | None, source: str | None, timeout: float) -> None:
    """One session into `run`: its latency when it went well, else the kind of failure."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await one_session(port, body, world, tls, source, run)
    except SmtpError as exc:
        run.errors[exc.code] += 1
    except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
        run.errors[type(exc).__name__] += 1
    else:
        run.latencies.append(time.perf_counter() - t0)


async def run_sessions(port: int, *, sessions: int, concurrency: int, body: bytes, world,
                       tls: ssl.SSLContext | None = None, timeout: float = 30.0,
                       budget: float = 60.0, source: str | None = None) -> SessionRun:
    run = SessionRun()
    counter = itertools.count()
    start = time.perf_counter()
    stop_at = start + budget

    async def worker() -> None:
        while next(counter) < sessions and time.perf_counter() < stop_at:
            await timed_session(run, port, body, world, tls, source, timeout)

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


async def _screen_once(port: int, source: str, hello: bytes | None = None) -> str:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        code = await read_reply(reader)
        if code == "220" and hello:
            writer.write(hello)
            code = await read_reply(reader)
            if code == "250":
                code = "220"  # passed: the banner and the EHLO both say go on
        if code == "220":
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(OSError):
                await read_reply(reader)
        return code
    finally:
        writer.transport.abort()


async def run_screening(port: int, *, sources: list[str], concurrency: int, duration: float,
                        timeout: float, hello: bytes | None = None) -> ScreenRun:
    run = ScreenRun()
    addresses = itertools.cycle(sources)
    start = time.perf_counter()
    stop_at = start + duration

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    outcome = await _screen_once(port, next(addresses), hello)
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


async def hold_idle_tls(port: int, *, sources: list[str], count: int, world,
                        tls: ssl.SSLContext, budget: float, parallel: int = 50) -> IdleHold:
    """`count` sessions that did EHLO and STARTTLS and then say nothing more."""
    hold = IdleHold()
    addresses = itertools.cycle(sources)
    counter = itertools.count()
    stop_at = time.perf_counter() + budget

    async def opener() -> None:
        while next(counter) < count and time.perf_counter() < stop_at:
            try:
                async with asyncio.timeout(max(0.1, stop_at - time.perf_counter())):
                    reader, writer = await asyncio.open_connection(
                        HOST, port, local_addr=(next(addresses), 0))
                    await _expect(reader, writer, None, "220", "banner")
                    await _expect(reader, writer, b"EHLO %s\r\n" % world.client_name.encode(),
                                  "250", "ehlo")
                    await _expect(reader, writer, b"STARTTLS\r\n", "220", "starttls")
                    await writer.start_tls(tls, server_hostname=world.mx_name)
                hold.writers.append(writer)
            except (OSError, TimeoutError, ssl.SSLError, RuntimeError) as exc:
                hold.errors[type(exc).__name__] += 1

    start = time.perf_counter()
    await asyncio.gather(*(opener() for _ in range(min(parallel, max(1, count)))))
    hold.elapsed = time.perf_counter() - start
    return hold


# --- slow senders: DATA one byte at a time -------------------------------------------------------


@dataclass
class SlowRun:
    outcomes: Counter = field(default_factory=Counter)
    reached: list[float] = field(default_factory=list)  # perf_counter time each entered DATA
    bytes: int = 0
    elapsed: float = 0.0

    def summary(self) -> dict:
        return {"sessions": sum(self.outcomes.values()), "outcomes": dict(self.outcomes),
                "in_data": len(self.reached), "bytes_trickled": self.bytes,
                "elapsed_s": self.elapsed}


async def _trickle_once(port: int, source: str, world, interval: float, run: SlowRun,
                        where: list[str]) -> None:
    where[0] = "connect"
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        for step, command, code in (
                ("banner", None, "220"),
                ("ehlo", b"EHLO %s\r\n" % world.client_name.encode(), "250"),
                ("mail", b"MAIL FROM:<%s>\r\n" % world.sender.encode(), "250"),
                ("rcpt", b"RCPT TO:<%s>\r\n" % world.rcpt.encode(), "250"),
                ("data", b"DATA\r\n", "354")):
            where[0] = step
            await _expect(reader, writer, command, code, step)
        where[0] = "354"
        run.reached.append(time.perf_counter())
        for byte in itertools.cycle(b"Subject: slow\r\n\r\n" + b"x" * 1000):
            writer.write(bytes((byte,)))
            run.bytes += 1
            try:  # wait out the interval, but notice a server that speaks or hangs up
                said = await asyncio.wait_for(reader.read(512), interval)
            except TimeoutError:
                continue
            code = said[:3].decode(errors="replace") if said else "eof"
            raise SmtpError("trickle", f"{code}@trickle")
    finally:
        writer.transport.abort()


async def trickle_senders(port: int, *, sources: list[str], count: int, world, interval: float,
                          until: float) -> SlowRun:
    """Outcomes: "354" (trickling when stopped), "timeout@STEP" (still waiting for the reply
    to STEP at the deadline), else the reply code or exception that ended the session."""
    run = SlowRun()
    addresses = itertools.cycle(sources)
    start = time.perf_counter()

    async def one(source: str) -> None:
        where = ["connect"]
        try:
            async with asyncio.timeout(max(0.0, until - time.perf_counter())):
                await _trickle_once(port, source, world, interval, run, where)
        except TimeoutError:
            run.outcomes["354" if where[0] == "354" else f"timeout@{where[0]}"] += 1
        except SmtpError as exc:
            run.outcomes[exc.code] += 1
        except OSError as exc:
            run.outcomes[type(exc).__name__] += 1

    await asyncio.gather(*(one(next(addresses)) for _ in range(count)))
    run.elapsed = time.perf_counter() - start
    return run


async def run_paced(port: int, *, interval: float, until: float, body: bytes, world,
                    timeout: float, source: str | None = None) -> SessionRun:
    run = SessionRun()
    start = time.perf_counter()

    tasks = []
    while time.perf_counter() < until:
        tasks.append(asyncio.create_task(
            timed_session(run, port, body, world, None, source, timeout)))
        await asyncio.sleep(interval)
    await asyncio.gather(*tasks)
    run.elapsed = time.perf_counter() - start
    return run


# --- MX traffic: every session a client of its own -----------------------------------------------


@dataclass(frozen=True)
class Client:
    """One session's client: its kind (what the case expects of it), address and names."""

    kind: str
    source: str
    helo: str
    sender: str
    rcpt: str


@dataclass
class ClientRun:
    # (start, end, kind, outcome) per session, perf_counter seconds
    sessions: list[tuple[float, float, str, str]] = field(default_factory=list)
    queued: int = 0  # messages the server took (250 to the final dot)
    exhausted: bool = False  # the plan ran out of addresses before the time was up

    def ended_between(self, t0: float, t1: float) -> list[tuple[float, float, str, str]]:
        return [s for s in self.sessions if t0 <= s[1] < t1]


async def client_session(port: int, client: Client, body: bytes, run: ClientRun,
                         where: list[str]) -> str:
    """Banner, EHLO, MAIL, RCPT, DATA, QUIT from the client's own address.

    Returns "250" for a message taken and a 221 to QUIT, else "CODE@STEP" where the
    server said no (after a refusal past the banner the client still says QUIT)."""
    where[0] = "connect"
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(client.source, 0))
    try:
        for step, command, want in (
                ("banner", None, "220"),
                ("ehlo", b"EHLO %s\r\n" % client.helo.encode(), "250"),
                ("mail", b"MAIL FROM:<%s>\r\n" % client.sender.encode(), "250"),
                ("rcpt", b"RCPT TO:<%s>\r\n" % client.rcpt.encode(), "250"),
                ("data", b"DATA\r\n", "354"),
                ("dot", body + b".\r\n", "250")):
            where[0] = step
            if command is not None:
                writer.write(command)
            got = await read_reply(reader)
            if got != want:
                if step != "banner" and got[:1] in ("4", "5"):
                    where[0] = "quit"
                    writer.write(b"QUIT\r\n")
                    await read_reply(reader)
                return f"{got}@{step}"
        run.queued += 1
        where[0] = "quit"
        writer.write(b"QUIT\r\n")
        got = await read_reply(reader)
        return "250" if got == "221" else f"{got}@quit"
    finally:
        writer.transport.abort()


async def run_clients(port: int, *, plan, concurrency: int, until: float, body: bytes,
                      timeout: float, stagger: float = 0.0) -> ClientRun:
    """Keep `concurrency` sessions in flight until the perf_counter time `until`.

    plan.next() gives each session's Client (None: no address left, stop starting),
    plan.done(client, outcome) hears how it ended. The clients start spread evenly over
    `stagger` seconds: clients that all began together would stay in step (all in the
    greet wait, then all at DATA at once), which no MX sees."""
    run = ClientRun()

    async def worker(delay: float) -> None:
        await asyncio.sleep(delay)
        while time.perf_counter() < until:
            client = plan.next()
            if client is None:
                run.exhausted = True
                return
            where = ["connect"]
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    outcome = await client_session(port, client, body, run, where)
            except TimeoutError:
                outcome = f"timeout@{where[0]}"
            except (OSError, asyncio.IncompleteReadError) as exc:
                outcome = f"{type(exc).__name__}@{where[0]}"
            run.sessions.append((t0, time.perf_counter(), client.kind, outcome))
            plan.done(client, outcome)

    count = max(1, concurrency)
    await asyncio.gather(*(worker(stagger * i / count) for i in range(count)))
    return run
