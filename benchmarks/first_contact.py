"""first_contact - smtpgate's CPU per session for clients never seen before, two versions.

SYNOPSIS
    python -m benchmarks.first_contact [--compare DIR] [--sessions N] [--concurrency C]
                                       [--ttl S] [--greet-wait S] [--rounds R]
                                       [--py-spy FILE]

DESCRIPTION
    A quick measurement of the DNS-heavy first contact, until benchmarks.run
    has such a case. It starts the benchmark stack (benchmarks.stack: Redis,
    dnsmasq, Postfix) with dnsmasq also synthesizing a forward-confirmed
    name for every address of 127.20.0.0/16 (`--synth-domain`, TTL --ttl),
    then runs sessions (greet, EHLO, MAIL, RCPT, 2 KiB DATA, QUIT), C at a
    time, each from an address of its own that no earlier session used
    ("new"), and then the same addresses again ("returning": screening
    cache and DNS cache hits). smtpgate's CPU (utime+stime of the master
    and its worker, from /proc) is divided by the sessions.

    --compare DIR also runs another smtpgate source tree (a directory
    holding a `smtpgate` package, e.g. `git archive main smtpgate | tar -x
    -C DIR`), the two taking turns for --rounds rounds, on one stack. The
    machine is usually shared: compare the figures of one run.

    --py-spy FILE records the worker with py-spy during this tree's "new"
    sessions of the first round (collapsed stacks, for flame graphs or
    grep), which costs the worker some CPU: take the figures from a run
    without it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.load import SessionRun, make_body, timed_session
from benchmarks.procstat import cpu_seconds
from benchmarks.stack import ROOT, Settings, Stack, spawn, wait_for

SYNTH = "synth.bench.test"


class FirstContactStack(Stack):
    ttl: int = 300
    source_tree: Path = ROOT

    def _start_dns(self) -> None:
        super()._start_dns()
        conf = self.workdir / "dnsmasq.conf"
        text = conf.read_text().replace("local-ttl=3600", f"local-ttl={self.ttl}")
        conf.write_text(text + f"local=/{SYNTH}/\nsynth-domain={SYNTH},127.20.0.0/16,h-\n")
        self.procs.pop().stop()
        proc = spawn("dnsmasq", ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}",
                                 "--user=root"], self.workdir)
        self.procs.append(proc)
        wait_for("dnsmasq with synth-domain",
                 lambda: self._dns_answers(f"h-127-20-0-1.{SYNTH}") == "127.20.0.1", 10, proc.log)

    def smtpgate_env(self, port: int | None = None) -> dict[str, str]:
        env = super().smtpgate_env(port)
        env["PYTHONPATH"] = f"{self.source_tree}:{ROOT}"
        return env


def addresses(start: int, count: int) -> list[str]:
    return [f"127.20.{1 + i // 250}.{1 + i % 250}" for i in range(start, start + count)]


async def sessions(port: int, sources: list[str], concurrency: int, world) -> SessionRun:
    run = SessionRun()
    body = make_body(2048, world, "first-contact")
    queue = iter(sources)

    async def worker() -> None:
        for source in queue:
            await timed_session(run, port, body, world, None, source, 60.0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return run


def measure(stack: FirstContactStack, sources: list[str], concurrency: int,
            profile: Path | None = None) -> dict:
    gate = stack.smtpgate
    figures = {}
    for label in ("new", "returning"):
        spy = None
        if profile is not None and label == "new":
            worker = max(gate.pids())  # the worker forked after the master
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record",
                                    "--rate", "1000", "--format", "raw", "-o", str(profile),
                                    "-p", str(worker)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached before the first session
        before = cpu_seconds(gate.pid, gate.pids())
        run = asyncio.run(sessions(gate.port, sources, concurrency, stack.world))
        cpu = cpu_seconds(gate.pid, gate.pids()) - before
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            if spy.wait(30) != 0:
                raise SystemExit(f"py-spy exited with {spy.returncode}")
        if run.errors:
            raise SystemExit(f"{label}: {dict(run.errors)} of {len(sources)} sessions failed")
        figures[label] = cpu / len(sources) * 1000
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", type=Path, metavar="DIR")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--ttl", type=int, default=300)
    parser.add_argument("--greet-wait", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--py-spy", type=Path, metavar="FILE", dest="profile")
    args = parser.parse_args()
    trees = {"this": ROOT, **({"compared": args.compare.resolve()} if args.compare else {})}
    stack = FirstContactStack(Settings(greet_wait=args.greet_wait, with_smtpgate=False,
                                       with_aiosmtpd=False))
    stack.ttl = args.ttl
    results: dict[str, list[dict]] = {label: [] for label in trees}
    start = itertools.count(0, args.sessions)
    with stack:
        for _ in range(args.rounds):
            for label, tree in trees.items():
                stack.source_tree = tree
                stack.start_smtpgate()
                try:
                    profile = args.profile if label == "this" and not results[label] else None
                    results[label].append(measure(
                        stack, addresses(next(start), args.sessions), args.concurrency, profile))
                finally:
                    stack.smtpgate.proc.stop()
                    stack.smtpgate = None
    for label, rounds in results.items():
        for kind in ("new", "returning"):
            values = [r[kind] for r in rounds]
            print(f"{label:<9} {kind:<10} {sum(values) / len(values):6.2f} CPU-ms/session"
                  f"  (rounds: {', '.join(f'{v:.2f}' for v in values)})")
    if args.compare:
        for kind in ("new", "returning"):
            this = sum(r[kind] for r in results["this"])
            other = sum(r[kind] for r in results["compared"])
            print(f"ratio     {kind:<10} {this / other:6.2f} (CPU, this / compared)")


if __name__ == "__main__":
    main()
