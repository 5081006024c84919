"""meter - the targets of a benchmark run, and what is measured around each run of one.

SYNOPSIS
    TARGETS, PY_FRONTS
    marker(args, *parts) -> str              a Message-ID marker of its own per case and point
    others_meanwhile(before, after, *mine) -> dict[str, int]
    Meter(stack, target)                     .snapshot() -> dict, .sampler(), .wait_delivered()
    front_of(stack, target), port_of(stack, target, mx=False), available_targets(stack)

DESCRIPTION
    A snapshot holds the CPU seconds so far of the front end (its processes
    and the children they reaped), of the whole Postfix instance (the
    master, its live children, and the cutime/cstime of those it reaped),
    of redis-server and of dnsmasq, Redis's calls per command, and Postfix's
    deliveries per message marker. Take one before and one after a run and
    subtract: the chain's CPU is the sum of the four.

    port_of(..., mx=True) gives postscreen's MX-case service (the same
    settings, a pre-queue limit above the MX cases' concurrency).
"""

from __future__ import annotations

import asyncio
import re
import time

from benchmarks import procstat
from benchmarks.stack import Stack, StackError, redis_info_commands

TARGETS = ("smtpgate", "aiosmtpd-front", "postscreen", "smtpd")
PY_FRONTS = ("smtpgate", "aiosmtpd-front")  # Python front ends: CPU, memory, Redis measured


def marker(args, *parts) -> str:
    """The Message-ID marker of one case's messages: its own per run, case, target and point."""
    return ".".join(["bench", args.run_id,
                     *(re.sub(r"[^A-Za-z0-9-]", "-", str(part)) for part in parts)])


def others_meanwhile(before: dict, after: dict, *mine: str) -> dict[str, int]:
    """Deliveries of other markers between two snapshots (what a plain count would add)."""
    was = before["delivered_by_marker"]
    return {m: n - was.get(m, 0) for m, n in after["delivered_by_marker"].items()
            if m not in mine and n != was.get(m, 0)}


class Meter:
    """CPU, memory and Redis counters of the front end and of Postfix around one run."""

    def __init__(self, stack: Stack, target: str) -> None:
        self.stack, self.target = stack, target

    def front(self) -> tuple[int | None, list[int]]:
        gate = front_of(self.stack, self.target)
        if gate:
            return gate.pid, gate.pids()
        return None, []

    def snapshot(self) -> dict:
        root, pids = self.front()
        pf = self.stack.postfix
        redis = redis_info_commands(self.stack.redis_port)
        return {
            "front_cpu": procstat.cpu_seconds(root, pids) if root else 0.0,
            "postfix_cpu": procstat.cpu_seconds(pf.master_pid(), pf.pids()),
            "redis_cpu": self._service_cpu("redis"),
            "dns_cpu": self._service_cpu("dnsmasq"),
            "delivered_by_marker": pf.delivered_by_marker(),
            "redis": sum(v for k, v in redis.items() if k not in ("info", "ping")),
            "redis_by_command": redis,
        }

    def _service_cpu(self, name: str) -> float:
        pid = self.stack.service_pid(name)
        return procstat.cpu_seconds(pid, [pid]) if pid else 0.0

    def sampler(self) -> procstat.PeakSampler:
        if self.target in PY_FRONTS:
            return procstat.PeakSampler(lambda: self.front()[1])
        return procstat.PeakSampler(self.stack.postfix.pids, interval=0.5)

    async def wait_delivered(self, mark: str, count: int, deadline: float) -> int:
        """Deliveries of the messages marked `mark`, once count are in or the deadline passed."""
        pf = self.stack.postfix
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            got = pf.delivered(mark)
            if got >= count:
                return got
            await asyncio.sleep(0.05)
        return pf.delivered(mark)


def front_of(stack: Stack, target: str):
    """The Python front end's process (benchmarks.stack.Smtpgate), None for Postfix's."""
    return {"smtpgate": stack.smtpgate, "aiosmtpd-front": stack.aiosmtpd}.get(target)


def port_of(stack: Stack, target: str, mx: bool = False) -> int:
    if target in PY_FRONTS:
        front = front_of(stack, target)
        if not front:
            raise StackError(f"{target} is not running")
        return front.port
    if target == "postscreen":
        return stack.postfix.ports["postscreen_mx" if mx else "postscreen"]
    return stack.postfix.ports["direct"]


def available_targets(stack: Stack) -> list[str]:
    return [t for t in TARGETS if t not in PY_FRONTS or front_of(stack, t)]
