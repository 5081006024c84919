"""image_python - smtpgate from the shipped image beside smtpgate on the host's Python, one run

SYNOPSIS
    python -m benchmarks.image_python [--image TAG] [--messages N] [--concurrency C]
                                      [--size BYTES] [--rounds R] [--workers W]

DESCRIPTION
    The Dockerfile runs smtpgate on Python 3.13 (its comment says why: from
    3.12 on asyncio's get_running_loop() stopped calling getpid()); the host
    here has 3.11. This measures the two in the same run, on the same stack
    (benchmarks.stack: Redis, the DNS server, Postfix with its discard
    transport, smtpgate on the host's interpreter), with a second smtpgate
    started from the image by podman: same environment, own port,
    --network=host (the container shares the host's loopback, so neither
    slirp4netns nor NAT is in what is measured), the stack's certificate
    mounted read-only. Each round runs smtp-source against one front, then
    the other (R rounds each, alternating, so that the machine's other load
    falls on both), and the report is per front: the Python it runs
    (asked of the interpreter in its process), messages per second and CPU
    milliseconds per message of the front's processes (from /proc: the
    container's processes are the host's), medians over the rounds, and the
    messages delivered (every one must be).

    Without --image, the repository's Dockerfile is built first (podman
    build --pull=never on the stand-in base scripts/setup.sh makes) and
    removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
import uuid

from benchmarks import load, procstat
from benchmarks.container import build_image, host_python, start_image_gate
from benchmarks.stack import Settings, Stack, StackError, free_port


class Front:
    """One smtpgate under load: its port, its processes, the Python it runs."""

    def __init__(self, name: str, port: int, pids, python: str) -> None:
        self.name, self.port, self.pids, self.python = name, port, pids, python
        self.rates: list[float] = []
        self.cpu_ms: list[float] = []
        self.delivered = 0
        self.sent = 0


def host_front(stack: Stack) -> Front:
    gate = stack.smtpgate
    return Front("host", gate.port, lambda: (gate.pid, gate.pids()), host_python(gate.pid))


def start_image_front(stack: Stack, image: str, cleanup: contextlib.ExitStack) -> Front:
    port = free_port()
    # the host's smtpgate has the socketmap's default port; nothing here asks that service
    env = {**stack.smtpgate_env(port), "SMTPGATE_SOCKETMAP_LISTEN": ""}
    gate = start_image_gate(stack, image, env, "smtpgate-image", cleanup)
    return Front("image", port, lambda: (gate.pid, gate.pids()), gate.python)


async def one_round(stack: Stack, front: Front, args) -> None:
    mark = f"img-{front.name}-{uuid.uuid4().hex[:10]}"
    root, pids = front.pids()
    before = procstat.cpu_seconds(root, pids)
    run = await load.smtp_source(front.port, concurrency=args.concurrency,
                                 messages=args.messages, size=args.size, world=stack.world,
                                 timeout=max(60, args.messages / 10), marker=mark)
    root, pids = front.pids()
    after = procstat.cpu_seconds(root, pids)
    if run.ok:
        front.rates.append(args.messages / run.elapsed)
    front.cpu_ms.append((after - before) * 1000 / args.messages)
    deadline = time.monotonic() + 60
    while stack.postfix.delivered(mark) < args.messages and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    front.delivered += stack.postfix.delivered(mark)
    front.sent += args.messages


def report(fronts: list[Front], args) -> str:
    lines = [f"smtpgate on the host's Python and from the image, same stack, same run: "
             f"{args.rounds} rounds of smtp-source -s {args.concurrency} -m {args.messages} "
             f"-l {args.size} each, alternating; workers={args.workers}; medians",
             "", "| front | Python | messages/s | front CPU ms/msg | delivered |",
             "|---|---|---|---|---|"]
    for front in fronts:
        rate = statistics.median(front.rates) if front.rates else float("nan")
        cpu = statistics.median(front.cpu_ms) if front.cpu_ms else float("nan")
        lines.append(f"| {front.name} | {front.python} | {rate:.0f} | {cpu:.2f} | "
                     f"{front.delivered}/{front.sent} |")
    host, image = fronts
    if host.cpu_ms and image.cpu_ms and host.rates and image.rates:
        rate = statistics.median(image.rates) / statistics.median(host.rates)
        cpu = statistics.median(image.cpu_ms) / statistics.median(host.cpu_ms)
        lines += ["", f"image/host: messages/s x{rate:.2f}, CPU per message x{cpu:.2f}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.image_python",
                                description=__doc__.split("\n")[0])
    p.add_argument("--image", default="", help="an image to run (default: build the Dockerfile)")
    p.add_argument("--messages", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("messages", "concurrency", "size", "rounds", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        image = args.image or build_image(cleanup)
        # greet wait 1 s, postscreen's least; the warm-up passes it, and the screening cache
        # (in Redis, shared by the two fronts) lets the measured sessions skip it
        stack = cleanup.enter_context(Stack(Settings(workers=args.workers, greet_wait=1,
                                                     with_aiosmtpd=False)))
        fronts = [host_front(stack), start_image_front(stack, image, cleanup)]
        for front in fronts:
            asyncio.run(load.smtp_source(front.port, concurrency=1, messages=1,
                                         size=args.size, world=stack.world, timeout=60))
        for _ in range(args.rounds):
            for front in fronts:
                asyncio.run(one_round(stack, front, args))
        print(report(fronts, args))
        missing = [f.name for f in fronts if f.delivered != f.sent]
        if missing:
            print(f"not every message was delivered: {', '.join(missing)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StackError as exc:
        print(f"benchmarks.image_python: {exc}", file=sys.stderr)
        sys.exit(1)
