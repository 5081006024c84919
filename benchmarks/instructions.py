"""instructions - user-space instructions per session under callgrind: a figure the load leaves be.

SYNOPSIS
    .venv/bin/python -m benchmarks.instructions [--sessions 400] [--concurrency 40]
        [--baseline DIR] [--keep DIR]

DESCRIPTION
    CPU time per session (benchmarks.first_contact) moves by 10-20% from
    round to round on a shared 2-core machine, more than most changes to
    the session's code save. The instructions smtpgate's worker runs for
    a session hardly move with the load: this runs first_contact's
    "first" and "returning" phases against a worker under valgrind's
    callgrind, counting only while a phase runs, and prints instructions
    per session (Ir, user space: the kernel's side of the system calls is
    not in it). Two runs of the same code differed by about 1%;
    --baseline DIR (a checkout, e.g. /work/main) runs DIR's smtpgate the
    same way after this one's, on the same addresses' names.

    The worker is started through a small wrapper that turns callgrind's
    counting on and off at SIGRTMIN+3 and SIGRTMIN+4 (a C helper built
    from valgrind/callgrind.h with cc), and sets up everything as
    first_contact does (benchmarks.stack, its dnsmasq, one worker,
    uvloop, a 1 s greet wait). Counting also takes in what the worker does
    by itself meanwhile (the metrics' refresh, timers), which under
    valgrind is a larger share than in a real run: the printed "net"
    figure takes off the rate measured over 10 idle seconds before.
    Needs valgrind, its headers and a C compiler.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.first_contact import addresses, gate_env, measure, start_dnsmasq, start_gate
from benchmarks.stack import Settings, Stack

ON, OFF = signal.SIGRTMIN + 3, signal.SIGRTMIN + 4
HELPER_C = """#include <valgrind/callgrind.h>
void cg_on(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_off(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("phase"); }
"""
WRAPPER = """import ctypes, runpy, signal, sys
lib = ctypes.CDLL({helper!r})
signal.signal({on}, lambda *_: lib.cg_on())
signal.signal({off}, lambda *_: lib.cg_off())
sys.argv = ["smtpgate", "serve"]
runpy.run_module("smtpgate", run_name="__main__", alter_sys=True)
"""


def build_wrapper(folder: Path) -> Path:
    (folder / "cg.c").write_text(HELPER_C)
    helper = folder / "libcg.so"
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(helper), str(folder / "cg.c")],
                   check=True)
    wrapper = folder / "serve.py"
    wrapper.write_text(WRAPPER.format(helper=str(helper), on=int(ON), off=int(OFF)))
    return wrapper


def totals(path: Path) -> int:
    found = re.search(r"^totals: (\d+)", path.read_text(), re.M)
    return int(found.group(1)) if found else 0


def run_target(stack: Stack, source: Path, dns_port: int, wrapper: Path, out: Path,
               ips: list[str], warm: list[str], concurrency: int) -> dict[str, float]:
    gate = start_gate(stack, f"gate-cg-{out.name}", gate_env(stack, source, dns_port, 1.0), [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p", sys.executable, str(wrapper)], ready_within=300)
    measure(stack, gate, warm, concurrency, listed=False)
    spans = {}
    os.kill(gate.pid, ON)
    started = time.monotonic()
    time.sleep(10)
    os.kill(gate.pid, OFF)
    spans["idle"] = time.monotonic() - started
    time.sleep(2)
    errors = {}
    for phase in ("first", "returning"):
        os.kill(gate.pid, ON)
        started = time.monotonic()
        errors[phase] = measure(stack, gate, ips, concurrency, listed=False)["errors"]
        os.kill(gate.pid, OFF)
        spans[phase] = time.monotonic() - started
        time.sleep(2)
    gate.proc.stop(grace=10)
    dumps = sorted(out.parent.glob(f"{out.name}.*.*"), key=lambda p: int(p.suffix[1:]))
    counts = dict(zip(("idle", "first", "returning"), map(totals, dumps), strict=False))
    idle_rate = counts.get("idle", 0) / spans["idle"]
    figures: dict[str, float] = {"idle_per_s": idle_rate}
    for phase in ("first", "returning"):
        figures[phase] = counts.get(phase, 0) / len(ips)
        figures[f"{phase}_net"] = (counts.get(phase, 0) - idle_rate * spans[phase]) / len(ips)
        figures[f"{phase}_errors"] = sum(errors[phase].values())
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.instructions")
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--keep", type=Path,
                        help="copy callgrind's dumps here, for callgrind_annotate")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "cc"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    root = Path(__file__).resolve().parent.parent
    targets = {"smtpgate": root} | ({"baseline": args.baseline.resolve()} if args.baseline
                                    else {})
    with contextlib.ExitStack() as cleanup:
        folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="smtpgate-cg-")))
        wrapper = build_wrapper(folder)
        stack = cleanup.enter_context(Stack(Settings(with_smtpgate=False, with_aiosmtpd=False)))
        dns_port = start_dnsmasq(stack, 300)
        rows = {}
        for number, (name, source) in enumerate(targets.items()):
            ips = addresses("127.20", number * args.sessions, args.sessions)
            warm = addresses("127.20", 254 * 250 + number * 20, 20)
            rows[name] = run_target(stack, source, dns_port, wrapper, folder / name, ips, warm,
                                    args.concurrency)
            print(name, rows[name], flush=True)
        if args.keep:  # the dumps go with the temporary folder
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in folder.glob("*.*.*"):
                shutil.copy(dump, args.keep / dump.name)
    print()
    print("| target | phase | Ir/session | net of idle | errors |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        for phase in ("first", "returning"):
            net = row[f"{phase}_net"]
            print(f"| {name} | {phase} | {row[phase] / 1e6:.3f} M | {net / 1e6:.3f} M"
                  f" | {row[f'{phase}_errors']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
