"""ports - loopback ports for test services, never handed out twice

SYNOPSIS
    free_port(host="127.0.0.1", udp=False) -> int
    bind_failure(text) -> bool
    start_on_free_ports(service, attempts=3) -> service

DESCRIPTION
    Asking the kernel for a free port (bind to port 0) and closing it before
    the service binds it is a race twice over: the kernel hands the same
    ephemeral ports to every outgoing connection on the machine (a test
    client, Postfix connecting to Dovecot, swaks), and nothing stopped the
    harness from handing one number to two services. What this module does
    instead:

    - Ports come from a block of BLOCK consecutive ports below the kernel's
      ephemeral range (net.ipv4.ip_local_port_range), where the kernel never
      picks a port by itself, so no outgoing connection can take one.
    - Each process claims its own block with an exclusive flock() on
      $TMPDIR/smtpgate-test-ports/<first port>.lock, held until the process
      ends: two pytest runs, or a test run and the scripts/local_stack.py or
      benchmark run it starts, never draw from the same block. A used-up
      block is followed by another one, claimed the same way.
    - Inside the process a port is handed out once and never again, even
      after its service stopped: a stopped Redis restarts on its own port,
      and a port handed out as "nobody listens here" stays unused.
    - A candidate is handed out only if it can be bound right now (TCP, and
      UDP too with udp=True); one that some other program holds is skipped.

    What is left is a program outside the harness binding a port inside a
    claimed block between the check and the service's own bind. For that,
    start_on_free_ports() starts a service and, when the start fails because
    an address was in use (bind_failure() of the error text and of what the
    service logged during the attempt), calls service.pick_ports() and
    tries again, up to attempts times. GateProcess.start() does the same
    for smtpgate. The services (redis_server, dns_server, dovecot_server,
    rspamd_server, postfix_server) all have pick_ports().
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import socket
import tempfile
import threading
from pathlib import Path

BLOCK = 200
FLOOR = 20000  # below: the well-known and registered ports of real services
CEILING = 65536

_lock = threading.Lock()
_given: set[int] = set()
_claimed: dict[int, int] = {}  # first port of a claimed block -> the lock file's descriptor
_next = 0
_end = 0


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def _span() -> tuple[int, int]:
    """Where blocks are cut from: outside the ephemeral range if there is room."""
    low, high = _ephemeral_range()
    if low - FLOOR >= 4 * BLOCK:
        return FLOOR, low
    if CEILING - (high + 1) >= 4 * BLOCK:
        return high + 1, CEILING
    return FLOOR, CEILING  # no room: rely on the bind check and on start_on_free_ports()


def _lock_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "smtpgate-test-ports"
    path.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        path.chmod(0o1777)
    return path


def _claim_block() -> int:
    start, stop = _span()
    firsts = [first for first in range(start, stop - BLOCK + 1, BLOCK) if first not in _claimed]
    random.shuffle(firsts)
    directory = _lock_dir()
    for first in firsts:
        try:  # read-only is enough for flock(), and works on another user's lock file
            fd = os.open(directory / f"{first}.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC,
                         0o666)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _claimed[first] = fd  # kept open: the claim lasts as long as this process
        return first
    raise RuntimeError(f"every block of {BLOCK} ports in {start}..{stop - 1} is claimed "
                       f"by another process (lock files in {directory})")


def _bindable(host: str, port: int, udp: bool) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1", udp: bool = False) -> int:
    """A port no one in this process got before, free on host right now (see above)."""
    global _next, _end
    with _lock:
        while True:
            if _next >= _end:
                _next = _claim_block()
                _end = _next + BLOCK
            port, _next = _next, _next + 1
            if port in _given:
                continue
            _given.add(port)  # handed out or found busy: either way never again
            if _bindable(host, port, udp):
                return port


_IN_USE = re.compile(r"address already in use|EADDRINUSE|cannot listen on", re.IGNORECASE)


def bind_failure(text: str) -> bool:
    """Does this error text or log say that a port was taken?"""
    return bool(_IN_USE.search(text))


def _log_size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0


def _log_since(path: Path | None, offset: int) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def start_on_free_ports(service, attempts: int = 3):
    """service.start(); on a port taken meanwhile, service.pick_ports() and start again."""
    log_path = getattr(service, "log_path", None)
    for attempt in range(1, attempts + 1):
        mark = _log_size(log_path)
        try:
            service.start()
            return service
        except (RuntimeError, TimeoutError) as exc:
            if attempt == attempts or not bind_failure(f"{exc}\n{_log_since(log_path, mark)}"):
                raise
            service.stop()
            service.pick_ports()
    raise AssertionError("unreachable")
