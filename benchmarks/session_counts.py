"""session_counts - system calls and Python calls per session, by kind: where a session's work is.

SYNOPSIS
    .venv/bin/python -m benchmarks.session_counts [--sessions 400] [--concurrency 40]
        [--top 20] [--tool strace|cprofile|both]

DESCRIPTION
    Counts that the machine's load leaves be, for the three phases of
    benchmarks.first_contact (a new client accepted, the same client
    returning, a DNSBL-listed new client refused at connect), against one
    worker set up as first_contact sets it up (its dnsmasq, a 1 s greet
    wait, DNS TTL 300 s):

      strace    `strace -c -f` attached to the worker while a phase runs:
                system calls per session, by name (the kernel's side of a
                session: each write to a client, to Postfix, to Redis; the
                event loop's waits);
      cprofile  the worker started under a wrapper that turns cProfile on
                and off at SIGRTMIN+3 and SIGRTMIN+4: Python calls per
                session, by function, with their callers' file and line for
                the most called (the interpreter's side: what runs how often).

    Timings are left out on purpose: strace and cProfile both slow the
    worker, so only their counts are figures. For instructions per session
    see benchmarks.instructions; for CPU time, benchmarks.first_contact.
    Needs strace for the first tool (a Debian package; not installed by
    setup.sh, as this is not part of the suite).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.first_contact import addresses, gate_env, measure, start_dnsmasq, start_gate
from benchmarks.stack import Settings, Smtpgate, Stack, wait_for

ON, OFF = signal.SIGRTMIN + 3, signal.SIGRTMIN + 4
PHASES = (("first", "127.20", False), ("returning", "127.20", False),
          ("listed", "127.21", True))
PROFILING_WRAPPER = """import cProfile, os, runpy, signal, sys
profile = cProfile.Profile()
dumps = [0]
def on(*_):
    profile.enable()
def off(*_):
    profile.disable()
    dumps[0] += 1
    path = f"{out}.{{dumps[0]}}"
    profile.dump_stats(path + ".part")  # whole before it has its name: the harness waits on it
    os.replace(path + ".part", path)
    profile.clear()
signal.signal({on}, on)
signal.signal({off}, off)
sys.argv = ["smtpgate", "serve"]
runpy.run_module("smtpgate", run_name="__main__", alter_sys=True)
"""


def start_worker(stack: Stack, dns_port: int, command: list[str] | None = None) -> Smtpgate:
    env = gate_env(stack, Path(__file__).resolve().parent.parent, dns_port, 1.0)
    return start_gate(stack, "gate-counts", env, command, ready_within=120)


def run_phases(stack: Stack, gate: Smtpgate, sessions: int, concurrency: int, tool: int,
               around) -> dict[str, int]:
    """Each phase with `around(phase)` (a context manager) around its load; errors each.

    Each tool (numbered from 0) has addresses of its own: the screening cache in the one
    Redis remembers those of the tool before, which would make its "first" clients returning
    ones and its listed clients refused from the cache."""
    first = tool * sessions
    warm = addresses("127.20", 254 * 250 + tool * 20, 20)  # past the phases' addresses
    measure(stack, gate, warm, concurrency, listed=False)
    errors = {}
    for phase, net, listed in PHASES:
        with around(phase):
            result = measure(stack, gate, addresses(net, first, sessions), concurrency, listed)
        errors[phase] = sum(result["errors"].values())
    return errors


def strace_counts(path: Path) -> dict[str, int]:
    """`strace -c` output: calls by system call name."""
    counts = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if not fields or not fields[-1].isidentifier() or fields[-1] in ("total", "syscall"):
            continue
        numbers = [f for f in fields[:-1] if f.replace(".", "").isdigit()]
        # % time, seconds, usecs/call, calls[, errors]: calls is the 4th number
        if len(numbers) >= 4:
            counts[fields[-1]] = int(numbers[3])
    return counts


def by_strace(stack: Stack, dns_port: int, folder: Path, sessions: int,
              concurrency: int) -> tuple[dict, dict]:
    gate = start_worker(stack, dns_port)

    @contextlib.contextmanager
    def traced(phase: str):
        out = folder / f"strace.{phase}"
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(gate.pid)],
                                  stderr=subprocess.PIPE)
        time.sleep(1)  # attached before the first connection (strace says so only on a tty)
        if tracer.poll() is not None:
            raise RuntimeError(f"strace could not attach: {tracer.stderr.read().decode()}")
        try:
            yield
        finally:
            tracer.send_signal(signal.SIGINT)
            try:
                tracer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                tracer.kill()  # never left attached to the worker
                tracer.wait()
            tracer.stderr.close()
        if tracer.returncode not in (0, -signal.SIGINT):
            raise RuntimeError(f"strace exited with {tracer.returncode}")

    errors = run_phases(stack, gate, sessions, concurrency, 0, traced)
    gate.proc.stop(grace=10)
    return {phase: strace_counts(folder / f"strace.{phase}") for phase, _, _ in PHASES}, errors


def by_cprofile(stack: Stack, dns_port: int, folder: Path, sessions: int,
                concurrency: int) -> tuple[dict, dict]:
    wrapper = folder / "profiled_serve.py"
    out = folder / "cprofile"
    wrapper.write_text(PROFILING_WRAPPER.format(out=str(out), on=int(ON), off=int(OFF)))
    gate = start_worker(stack, dns_port, [sys.executable, str(wrapper)])
    dumps = []

    @contextlib.contextmanager
    def profiled(phase: str):
        os.kill(gate.pid, ON)
        try:
            yield
        finally:
            os.kill(gate.pid, OFF)
            dumps.append(Path(f"{out}.{len(dumps) + 1}"))
            wait_for("profile dump", dumps[-1].exists, 30, gate.proc.log)

    errors = run_phases(stack, gate, sessions, concurrency, 1, profiled)
    gate.proc.stop(grace=10)
    return {phase: pstats.Stats(str(dump)).stats
            for (phase, _, _), dump in zip(PHASES, dumps, strict=True)}, errors


def _where(key: tuple) -> str:
    path, line, name = key
    for prefix in (str(Path(__file__).resolve().parent.parent) + "/", sys.prefix + "/",
                   sys.base_prefix + "/lib/python3." + str(sys.version_info[1]) + "/"):
        path = path.replace(prefix, "")
    return f"{path}:{line}({name})" if path != "~" else name


def strace_table(counts: dict[str, dict[str, int]], sessions: int, top: int) -> str:
    names = collections.Counter()
    for phase_counts in counts.values():
        names.update(phase_counts)
    lines = ["| system call | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    lines.append("| all | " + " | ".join(f"{sum(c.values()) / sessions:.1f}"
                                           for c in counts.values()) + " |")
    for name, _ in names.most_common(top):
        lines.append(f"| {name} | " + " | ".join(f"{c.get(name, 0) / sessions:.2f}"
                                                 for c in counts.values()) + " |")
    return "\n".join(lines)


def cprofile_table(stats: dict[str, dict], sessions: int, top: int) -> str:
    out = []
    for phase, phase_stats in stats.items():
        calls = sum(row[1] for row in phase_stats.values())
        out += [f"{phase}: {calls / sessions:.0f} Python calls a session (C functions called "
                "from Python included)", "", "| calls/session | function | most from |",
                "|---|---|---|"]
        for key, row in sorted(phase_stats.items(), key=lambda kv: -kv[1][1])[:top]:
            callers = sorted(row[4].items(), key=lambda kv: -kv[1][1])[:2]
            shown = ", ".join(f"{_where(c)} {v[1] / sessions:.1f}" for c, v in callers)
            out.append(f"| {row[1] / sessions:.2f} | {_where(key)} | {shown} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.session_counts")
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--tool", choices=("strace", "cprofile", "both"), default="both")
    args = parser.parse_args(argv)
    if args.tool != "cprofile" and not shutil.which("strace"):
        raise SystemExit("strace is not installed (apt-get install strace)")
    with contextlib.ExitStack() as cleanup:
        folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="smtpgate-n-")))
        stack = cleanup.enter_context(Stack(Settings(with_smtpgate=False, with_aiosmtpd=False)))
        dns_port = start_dnsmasq(stack, 300)
        print(f"{args.sessions} sessions a phase, {args.concurrency} concurrent, one worker\n")
        if args.tool in ("strace", "both"):
            counts, errors = by_strace(stack, dns_port, folder, args.sessions, args.concurrency)
            print(f"System calls per session (strace -c -f; errors {errors})\n")
            print(strace_table(counts, args.sessions, args.top), "\n", flush=True)
        if args.tool in ("cprofile", "both"):
            stats, errors = by_cprofile(stack, dns_port, folder, args.sessions, args.concurrency)
            print(f"Python calls per session (cProfile; errors {errors})\n")
            print(cprofile_table(stats, args.sessions, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
