"""dns_cpu - CPU time per DNS lookup of smtpgate's resolver, against a real dnsmasq.

SYNOPSIS
    python -m benchmarks.micro.dns_cpu [--queries N] [--concurrency C] [--loop uvloop|asyncio]

DESCRIPTION
    Starts dnsmasq on a free loopback port with `--synth-domain` for
    127.20.0.0/16 (each address has a PTR h-127-20-x-y.synth.test and that
    name an A record, like the benchmark's first contacts), then measures
    with time.process_time() (this process only: the DNS server's CPU is
    not counted):

    - miss A / miss PTR: N lookups of names never asked before (a cache
      miss each, one query on the wire each), C at a time;
    - hit: N lookups of one name already in the resolver's cache;
    - shared: N lookups of C names, each name asked by C callers at once
      (one query per name on the wire).

    Prints one line per figure: microseconds of CPU per lookup, and the
    wall time. Every answer is checked, so a broken resolver cannot report a
    fast number. The machine is usually shared: compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

from benchmarks.stack import spawn, wait_for
from smtpgate.config import HostPort
from smtpgate.lookups.resolver import Resolver

SYNTH = "synth.test"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(port: int) -> bool:
    """One A query for a synthesized name, by hand: does dnsmasq answer yet?"""
    query = struct.pack(">HHHHHH", 0x5A5A, 0x0100, 1, 0, 0, 0)
    for label in f"h-127-20-0-1.{SYNTH}".split("."):
        query += bytes([len(label)]) + label.encode()
    query += b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(query, ("127.0.0.1", port))
        try:
            reply = sock.recv(512)
        except TimeoutError:
            return False
    return reply[:2] == b"\x5a\x5a" and reply[7] >= 1  # our id, at least one answer


def address(i: int) -> str:
    return f"127.20.{i // 250 % 250 + 1}.{i % 250 + 1}"


def synth_name(ip: str) -> str:
    return f"h-{ip.replace('.', '-')}.{SYNTH}"


async def timed(label: str, count: int, lookups, check) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    results = await lookups()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    for result in results:
        check(result)
    print(f"{label:<10} {cpu / count * 1e6:8.1f} us CPU/lookup   {wall / count * 1e6:8.1f} us wall"
          f"   ({count} lookups)")


async def in_batches(calls, concurrency: int) -> list:
    results = []
    for start in range(0, len(calls), concurrency):
        results += await asyncio.gather(*(call() for call in calls[start:start + concurrency]))
    return results


async def measure(port: int, queries: int, concurrency: int) -> None:
    resolver = Resolver((HostPort("127.0.0.1", port),), 5.0)
    try:
        # warm-up: imports, the channel, the server's first answers
        for i in range(50):
            await resolver.lookup(synth_name(address(60000 + i)), "A")

        def ok(answer) -> None:
            assert answer.status == "ok", answer

        names = [synth_name(address(i)) for i in range(queries)]
        await timed("miss A", queries, lambda: in_batches(
            [lambda n=n: resolver.lookup(n, "A") for n in names], concurrency), ok)
        ips = [address(queries + i) for i in range(queries)]
        await timed("miss PTR", queries, lambda: in_batches(
            [lambda ip=ip: resolver.ptr(ip) for ip in ips], concurrency), ok)
        await resolver.lookup(names[0], "A")
        await timed("hit", queries, lambda: in_batches(
            [lambda: resolver.lookup(names[0], "A")] * queries, concurrency), ok)
        shared = [synth_name(address(2 * queries + i // concurrency)) for i in range(queries)]
        await timed("shared", queries, lambda: in_batches(
            [lambda n=n: resolver.lookup(n, "A") for n in shared], concurrency), ok)
    finally:
        close = getattr(resolver, "close", None)
        if close is not None:
            close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-dns-cpu-"))
    port = free_udp_port()
    proc = spawn("dnsmasq", [
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--user=root",
        "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}",
        "--local-ttl=300", "--cache-size=10000", f"--local=/{SYNTH}/",
        f"--synth-domain={SYNTH},127.20.0.0/16,h-",
    ], workdir)
    try:
        wait_for("dnsmasq", lambda: answers(port), 10, proc.log)
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(measure(port, args.queries, args.concurrency))
        else:
            asyncio.run(measure(port, args.queries, args.concurrency))
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
