"""dns_cpu - CPU time per DNS lookup of smtpgate's resolver, against a real dnsmasq.

SYNOPSIS
    python -m benchmarks.micro.dns_cpu [--queries N] [--concurrency C] [--loop uvloop|asyncio]
                                       [--compare FILE] [--rounds R]

DESCRIPTION
    Starts dnsmasq on a free loopback port with `--synth-domain` for
    127.16.0.0/12 (each address has a PTR h-127-20-x-y.synth.test and that
    name an A record, like the benchmark's first contacts), then measures
    with getrusage() (this process only, user and system CPU; the DNS
    server's CPU is not counted, though on loopback the kernel's delivery
    of each query to it is part of this process's system time):

    - miss A / miss PTR: N lookups of names never asked before (a cache
      miss each, one query on the wire each), C at a time;
    - hit: N lookups of one name already in the resolver's cache;
    - shared: N lookups of C names, each name asked by C callers at once
      (one query per name on the wire).

    Prints one line per figure: microseconds of CPU per lookup, and the
    wall time. Every answer is checked, so a broken resolver cannot report a
    fast number. The machine is usually shared: compare figures of one run.
    --compare FILE also measures another version of resolver.py (e.g. `git
    show main:smtpgate/lookups/resolver.py > /tmp/old_resolver.py`) in the
    same run, the two taking turns for --rounds rounds, each on names of its
    own; the ratio line is this version's CPU over the other's.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import resource
import shutil
import socket
import struct
import sys
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
    """The i-th client address of 127.16.0.0/12 (each a name of its own)."""
    return f"127.{16 + i // 62500 % 16}.{i // 250 % 250 + 1}.{i % 250 + 1}"


def synth_name(ip: str) -> str:
    return f"h-{ip.replace('.', '-')}.{SYNTH}"


def cpu_times() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def timed(count: int, lookups, check) -> tuple[float, float, float]:
    """Per lookup: microseconds of user CPU, of system CPU, and of wall time."""
    (user, system), wall = cpu_times(), time.perf_counter()
    results = await lookups()
    (user2, system2), wall2 = cpu_times(), time.perf_counter()
    for result in results:
        check(result)
    return tuple((b - a) / count * 1e6 for a, b in
                 ((user, user2), (system, system2), (wall, wall2)))


async def in_batches(calls, concurrency: int) -> list:
    results = []
    for start in range(0, len(calls), concurrency):
        results += await asyncio.gather(*(call() for call in calls[start:start + concurrency]))
    return results


def ok(answer) -> None:
    assert answer.status == "ok", answer


async def measure(resolver, base: int, queries: int, concurrency: int) -> dict[str, tuple]:
    """Figures of one resolver, on addresses from `base` on (none asked before)."""
    figures = {}
    names = [synth_name(address(base + i)) for i in range(queries)]
    figures["miss A"] = await timed(queries, lambda: in_batches(
        [lambda n=n: resolver.lookup(n, "A") for n in names], concurrency), ok)
    ips = [address(base + queries + i) for i in range(queries)]
    figures["miss PTR"] = await timed(queries, lambda: in_batches(
        [lambda ip=ip: resolver.ptr(ip) for ip in ips], concurrency), ok)
    figures["hit"] = await timed(queries, lambda: in_batches(
        [lambda: resolver.lookup(names[0], "A")] * queries, concurrency), ok)
    shared = [synth_name(address(base + 2 * queries + i // concurrency)) for i in range(queries)]
    figures["shared"] = await timed(queries, lambda: in_batches(
        [lambda n=n: resolver.lookup(n, "A") for n in shared], concurrency), ok)
    return figures


def load_resolver(path: str):
    spec = importlib.util.spec_from_file_location("compared_resolver", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Resolver


async def run(port: int, args) -> None:
    servers = (HostPort("127.0.0.1", port),)
    versions = {"this": Resolver(servers, 5.0)}
    if args.compare:
        versions["compared"] = load_resolver(args.compare)(servers, 5.0)
    totals: dict[str, dict[str, list]] = {label: {} for label in versions}
    base = 0
    try:
        for resolver in versions.values():  # warm-up: imports, sockets, first answers
            for i in range(50):
                ok(await resolver.lookup(synth_name(address(900000 + i)), "A"))
        for _ in range(args.rounds):
            for label, resolver in versions.items():
                figures = await measure(resolver, base, args.queries, args.concurrency)
                base += 3 * args.queries
                for figure, values in figures.items():
                    totals[label].setdefault(figure, []).append(values)
    finally:
        for resolver in versions.values():
            close = getattr(resolver, "close", None)
            if close is not None:
                close()
    rounds = args.rounds
    for label, figures in totals.items():
        for figure, values in figures.items():
            user, system, wall = (sum(v[i] for v in values) / rounds for i in range(3))
            print(f"{label:<9} {figure:<9} {user + system:7.1f} us CPU/lookup (user {user:6.1f},"
                  f" sys {system:6.1f})  {wall:8.1f} us wall  ({args.queries} x {rounds})")
    if args.compare:
        for figure in totals["this"]:
            this = sum(v[0] + v[1] for v in totals["this"][figure])
            other = sum(v[0] + v[1] for v in totals["compared"][figure])
            print(f"ratio     {figure:<9} {this / other:7.2f} (CPU, this / compared)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--compare", metavar="FILE", help="another resolver.py to measure too")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-dns-cpu-"))
    port = free_udp_port()
    proc = spawn("dnsmasq", [
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--user=root",
        "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}",
        "--local-ttl=300", "--cache-size=10000", f"--local=/{SYNTH}/",
        f"--synth-domain={SYNTH},127.16.0.0/12,h-",
    ], workdir)
    try:
        wait_for("dnsmasq", lambda: answers(port), 10, proc.log)
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(run(port, args))
        else:
            asyncio.run(run(port, args))
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
