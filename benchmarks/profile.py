"""profile - where smtpgate spends its time under smtp-source load (py-spy).

SYNOPSIS
    python -m benchmarks.profile [--seconds 10] [--concurrency 20] [--workers 1] [--out DIR]
    summarize(collapsed_lines, top=25) -> str

DESCRIPTION
    Starts the benchmark stack (benchmarks.stack), warms the screening cache,
    attaches `py-spy record --format raw` to smtpgate (its workers included)
    for --seconds while smtp-source sends messages through it, then writes
    DIR/profile.collapsed (flame graph input, one stack per line) and
    DIR/profile.txt: the functions with the most samples, by self time and
    by inclusive time, as shares of all samples. Idle samples are dropped
    (py-spy records only active threads by default).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import load
from benchmarks.stack import Settings, Stack, StackError

HERE = Path(__file__).resolve().parent


def summarize(lines: list[str], top: int = 25) -> str:
    self_count: collections.Counter = collections.Counter()
    incl_count: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        self_count[frames[-1]] += n
        for frame in set(frames):
            incl_count[frame] += n
    if not total:
        return "no samples\n"
    out = [f"{total} samples", "", "self %  function"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in self_count.most_common(top)]
    out += ["", "incl %  function"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in incl_count.most_common(top)]
    return "\n".join(out) + "\n"


async def drive(stack: Stack, seconds: float, concurrency: int) -> int:
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        run = await load.smtp_source(stack.smtpgate.port, concurrency=concurrency, messages=500,
                                     size=2048, world=stack.world, timeout=60)
        if not run.ok:
            raise StackError(f"smtp-source failed: {run.stderr}")
        sent += run.messages
    return sent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if not 1 <= args.seconds <= 120 or not 1 <= args.concurrency <= 500:
        p.error("--seconds must be 1..120 and --concurrency 1..500")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("benchmarks: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "profile.collapsed"
    with Stack(Settings(workers=args.workers, greet_wait=1.0)) as stack:
        body = load.make_body(2048, stack.world)
        asyncio.run(load.run_sessions(stack.smtpgate.port, sessions=1, concurrency=1, body=body,
                                      world=stack.world, timeout=20, budget=20))
        recorder = subprocess.Popen(
            [spy, "record", "--pid", str(stack.smtpgate.pid), "--subprocesses", "--rate", "250",
             "--duration", str(int(args.seconds)), "--format", "raw", "--output", str(raw),
             "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        sent = asyncio.run(drive(stack, args.seconds, args.concurrency))
        try:
            _, err = recorder.communicate(timeout=args.seconds + 30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            _, err = recorder.communicate()
        if recorder.returncode != 0 or not raw.exists():
            print(f"benchmarks: py-spy failed: {err[-1000:]}", file=sys.stderr)
            return 1
    summary = summarize(raw.read_text(errors="replace").splitlines())
    text = (f"smtpgate under smtp-source -s {args.concurrency}, {sent} messages, "
            f"{args.workers} worker(s), {args.seconds:g} s\n\n{summary}")
    (args.out / "profile.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
