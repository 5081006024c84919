"""tls_idle_memory - what an idle STARTTLS session costs smtpgate, as the OOM killer counts it.

SYNOPSIS
    python -m benchmarks.tls_idle_memory [--sessions 1000] [--warm 200] [--json FILE]
                                         [--smtpgate-env NAME=VALUE ...]
                                         [--baseline DIR] [--rounds 1]

DESCRIPTION
    Starts the benchmark stack (benchmarks.stack: Redis, dnsmasq, Postfix,
    smtpgate with one worker, no greet wait), then, for each way of
    holding sessions, on a fresh smtpgate: opens `--warm` STARTTLS
    sessions that then say nothing and holds them (one-off costs: OpenSSL's
    code pages, the allocator's first arenas), reads the worker's memory,
    opens `--sessions` more, reads it again. A session costs what those
    add, divided by their number. (Sessions closed and opened again would
    reuse memory the process kept: a warm worker's growth understates
    what N sessions held at once take.)

    The ways: from one address or from a distinct address each (127.1.x.y,
    per-client state: the screening cache, limits, DNS answers), and with
    or without EHLO said again after the handshake (as every real client
    does: it reads and writes application data through TLS).

    Memory per session is (held - before) / sessions of the smtpgate
    worker's RSS (VmRSS, /proc/PID/status) and Pss (smaps_rollup). RSS is
    the figure the kernel's OOM killer weighs (oom_badness: resident anon,
    file and shmem pages, plus swap and page tables) and what `ps`/`top`
    show; a container's limit counts the cgroup's charged pages, of which
    a session's are anonymous memory, the same pages. Pss divides shared
    pages among the processes sharing them, so the master's copy-on-write
    pages and library code make Pss lower than RSS for a forked worker;
    growth of private memory shows in both alike.

    Output: one line per way, and with --json the figures as a list.

    --baseline DIR runs another checkout's smtpgate (its PYTHONPATH) the
    same way in the same run, the two taking turns per way in an order
    drawn at random, `--rounds` times: a change measured against its
    baseline minutes apart on the same busy machine.

    What it found (2 shared cores, other work running; 1,000 sessions after
    200; benchmarks/README.md's "Idle STARTTLS sessions" has the table):
    29.5-31.5 KB per session, RSS and Pss alike, whichever the way (one
    address 29.5, with EHLO after TLS 30.0, distinct addresses 31.4, both
    31.5; 31.3-34.4 before the idle session was made smaller, measured in
    the same runs). A bare uvloop TLS server measured the same way holds 23.9
    KB per connection (1.3 KB without TLS): uvloop's SSL transport and
    OpenSSL's connection (the SSL object, its memory BIOs, which keep the
    size of the handshake's largest flight; CPython already sets
    SSL_MODE_RELEASE_BUFFERS) are three quarters of it. Without uvloop,
    asyncio's SSL transport holds a 256 KB bytearray per connection: 285
    KB a session. With postscreen's screening of new addresses (greet
    wait 6 s, DNSBL and PTR lookups) 39.4 KB: the resolver's and DNSBL's
    caches filling, bounded by their sizes, not by sessions.
    The run.py figure (14-16 KB, Pss) is lower because it is taken on a
    worker that earlier cases had grown: new sessions reuse memory freed
    by old ones, which the process keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import ssl
import sys
from pathlib import Path

from benchmarks import procstat
from benchmarks.load import HOST, _expect
from benchmarks.stack import Settings, Stack

WAYS = (("one address", False, False), ("one address, EHLO after TLS", False, True),
        ("distinct addresses", True, False), ("distinct addresses, EHLO after TLS", True, True))


def addresses(count: int, distinct: bool) -> list[str]:
    if not distinct:
        return ["127.1.0.1"] * count
    return [f"127.1.{1 + i // 250}.{1 + i % 250}" for i in range(count)]


async def open_sessions(port: int, sources: list[str], world, tls: ssl.SSLContext,
                        ehlo_again: bool, parallel: int = 40) -> tuple[list, int]:
    writers, errors = [], 0
    queue = iter(sources)

    async def opener() -> None:
        nonlocal errors
        for source in queue:
            try:
                async with asyncio.timeout(60):
                    reader, writer = await asyncio.open_connection(HOST, port,
                                                                   local_addr=(source, 0))
                    await _expect(reader, writer, None, "220", "banner")
                    ehlo = b"EHLO %s\r\n" % world.client_name.encode()
                    await _expect(reader, writer, ehlo, "250", "ehlo")
                    await _expect(reader, writer, b"STARTTLS\r\n", "220", "starttls")
                    await writer.start_tls(tls, server_hostname=world.mx_name)
                    if ehlo_again:
                        await _expect(reader, writer, ehlo, "250", "ehlo after tls")
                writers.append(writer)
            except (OSError, TimeoutError, ssl.SSLError, RuntimeError, Exception):
                errors += 1

    await asyncio.gather(*(opener() for _ in range(parallel)))
    return writers, errors


def worker_pid(stack: Stack) -> int:
    pids = stack.smtpgate.pids()
    return pids[-1]  # one worker: the master's only child


async def measure(stack: Stack, sessions: int, warm: int, ways=WAYS,
                  parallel: int = 40, targets: dict | None = None, rounds: int = 1) -> list[dict]:
    """Per way, on a fresh worker: `warm` sessions opened and held first (one-off costs:
    OpenSSL's code pages, the allocator's first arenas, caches), then `sessions` more; the
    cost of a session is what those add, divided by their number. `targets`: name ->
    the PYTHONPATH of the smtpgate to run (None: this checkout's), taking turns per way."""
    tls = ssl.create_default_context(cafile=str(stack.ca_pem))
    targets = targets or {"smtpgate": None}
    original = stack.smtpgate_env
    runs = []
    for round_number in range(rounds):
        for way in ways:
            order = list(targets.items())
            random.shuffle(order)  # neither target always runs on a cooler machine
            runs += [(round_number, way, target, path) for target, path in order]
    rows = []
    for round_number, (name, distinct, ehlo_again), target, path in runs:
        stack.smtpgate.proc.stop()
        stack.smtpgate_env = (original if path is None else
                              lambda *a, p=str(path): {**original(*a), "PYTHONPATH": p})
        stack.start_smtpgate()
        stack.smtpgate_env = original
        pid = worker_pid(stack)
        fresh = procstat.memory_kb([pid])
        sources = addresses(warm + sessions, distinct)
        held = []
        try:
            writers, errors = await open_sessions(stack.smtpgate.port, sources[:warm],
                                                  stack.world, tls, ehlo_again, parallel)
            held += writers
            await asyncio.sleep(1.0)
            before = procstat.memory_kb([pid])
            writers, more_errors = await open_sessions(stack.smtpgate.port, sources[warm:],
                                                       stack.world, tls, ehlo_again, parallel)
            held += writers
            await asyncio.sleep(1.0)
            after = procstat.memory_kb([pid])
        finally:
            for writer in held:
                writer.transport.abort()
        count = len(writers)
        row = {"target": target, "round": round_number, "way": name, "sessions": count,
               "errors": errors + more_errors,
               "rss_bytes_per_session": (after.rss - before.rss) * 1024 / max(1, count),
               "pss_bytes_per_session": (after.pss - before.pss) * 1024 / max(1, count),
               "rss_kb_fresh": fresh.rss, "rss_kb_warm": before.rss, "rss_kb_held": after.rss}
        rows.append(row)
        print(f"{target:9} {name:36} {count} sessions ({row['errors']} errors) "
              f"RSS {row['rss_bytes_per_session'] / 1024:5.1f} KB/session "
              f"Pss {row['pss_bytes_per_session'] / 1024:5.1f} KB/session "
              f"(worker RSS {fresh.rss} KB fresh, {before.rss} warm, {after.rss} held)",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=200,
                        help="sessions opened and held before measuring (one-off costs)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--only", default="", help="only the ways whose name has this text")
    parser.add_argument("--parallel", type=int, default=40, help="sessions opened at once")
    parser.add_argument("--smtpgate-env", action="append", default=[],
                        help="NAME=VALUE for smtpgate's environment (to compare a setting)")
    parser.add_argument("--baseline", type=Path,
                        help="another checkout's smtpgate, measured in turn with this one")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    settings = Settings(workers=1, greet_wait=1.0, with_aiosmtpd=False)  # postscreen's (min 1)
    stack = Stack(settings)
    # a thousand sessions from one address: past the per-client limits (50, and a rate)
    extra = {"SMTPGATE_GREET_WAIT": "0", "SMTPGATE_CLIENT_CONNECTION_COUNT_LIMIT": "0",
             "SMTPGATE_CLIENT_CONNECTION_RATE_LIMIT": "0",
             **dict(item.split("=", 1) for item in args.smtpgate_env)}
    original = stack.smtpgate_env
    stack.smtpgate_env = lambda *a: {**original(*a), **extra}
    with stack:
        ways = [way for way in WAYS if args.only in way[0]]
        targets = {"smtpgate": None}
        if args.baseline:
            targets["baseline"] = args.baseline.resolve()
        rows = asyncio.run(measure(stack, args.sessions, args.warm, ways, args.parallel,
                                   targets, args.rounds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
