"""SMTPGATE_WORKERS=2: the master and its workers (smtpgate.service.server, _supervise).

Both workers take connections (the kernel spreads them over the SO_REUSEPORT sockets; each
worker logs with its own pid), SIGTERM ends master and workers with status 0, and a worker
killed with SIGKILL is replaced by a new one that serves too.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from services.smtp_talk import Talk
from services.waiting import wait_until

pytestmark = pytest.mark.slow

CONNECT = re.compile(r"smtpgate/\w+\[(\d+)\]: connect from \S+\[127\.0\.0\.1\]")
# _supervise treats a worker that dies sooner than this after its start as a failure at
# start (and stops the rest); a worker killed later is replaced.
START_WINDOW = 5.0
TICKS = os.sysconf("SC_CLK_TCK")


def age(pid: int) -> float:
    """Seconds since the process started (/proc: start time in clock ticks since boot)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    started = int(stat[stat.rindex(")") + 2:].split()[19]) / TICKS
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def serving_pids(gate) -> set[int]:
    return {int(pid) for pid in CONNECT.findall(gate.log_text())}


def connect_until_served_by(gate, pids: set[int], limit: int = 200) -> set[int]:
    """Connections (banner, QUIT) until each of pids has logged one; the pids seen."""
    for _ in range(limit):
        with Talk("127.0.0.1", gate.mx_port) as talk:
            assert talk.banner()[0] == 220
            assert talk.cmd("QUIT")[0] == 221
        # the worker logs the connect before it sends the banner: no wait needed
        if pids <= serving_pids(gate):
            break
    return serving_pids(gate)


def test_two_workers_both_serve_and_sigterm_ends_them_all(start_gate):
    gate = start_gate(SMTPGATE_WORKERS="2")
    workers = gate.workers()
    assert len(workers) == 2, workers  # two children of the master
    assert gate.log_text().count("smtpgate: ready") == 2
    # with 2 workers and random source ports, 200 connections all to one is a 2^-199 chance
    assert connect_until_served_by(gate, set(workers)) == set(workers)
    # SIGTERM: stop() asserts status 0 within its deadline, and that no process of smtpgate's
    # session (the workers are in it) is left
    gate.stop()
    assert gate.proc.returncode == 0


def test_a_killed_worker_is_replaced_by_one_that_serves(start_gate):
    gate = start_gate(SMTPGATE_WORKERS="2")
    workers = gate.workers()
    assert len(workers) == 2, workers
    victim, survivor = workers
    wait_until(lambda: age(victim) > START_WINDOW + 0.5, START_WINDOW + 10,
               "the worker to be past the master's start window")
    os.kill(victim, signal.SIGKILL)

    def replacement() -> list[int] | None:
        now = gate.workers()
        return now if len(now) == 2 and victim not in now else None

    replaced = wait_until(replacement, 15, "the master to start a new worker")
    assert survivor in replaced
    (newcomer,) = set(replaced) - {survivor}
    gate.wait_for_log(rf"warning: worker {victim} exited with status \d+; restarting")
    assert gate.proc.poll() is None  # the master stays
    wait_until(lambda: gate.log_text().count("smtpgate: ready") == 3, 15,
               "the new worker to be ready")
    assert newcomer in connect_until_served_by(gate, {newcomer})
    gate.stop()  # and still a clean exit: status 0, no worker left
