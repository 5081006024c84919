"""waiting - wait for a condition with a deadline, never for luck

SYNOPSIS
    wait_until(predicate, timeout, what, interval=0.05) -> value
    async with no_hang(): ...            fails (TimeoutError) after HANG_LIMIT seconds
    wait_for_port(host, port, timeout=10, proc=None, log=None) -> None
    log_tail(path, lines=40) -> str

DESCRIPTION
    wait_until() calls predicate() until it returns a true value, which it
    returns. Past the deadline it raises TimeoutError naming what it waited
    for. An exception raised by predicate() counts as "not yet"; the last
    one is quoted in the error.

    wait_for_port() waits until a TCP connect to host:port succeeds. When
    proc (a subprocess.Popen) is given and exits first, it fails at once.
    Either failure raises with the tail of log (a path), the service's own
    words, so a broken configuration is diagnosed from the test output.

    log_tail() returns the last lines of a file, or a note if it is missing.

    no_hang() bounds a block that must end by itself (a timeout inside the
    code under test fired, a refused connection was noticed): a generous
    "it did not hang" limit, never a performance bound. Tests assert the
    outcome (a timeout status, which of two things finished first) rather
    than how long it took.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

HANG_LIMIT = 10.0  # seconds


def no_hang(seconds: float = HANG_LIMIT) -> asyncio.Timeout:
    return asyncio.timeout(seconds)


def log_tail(path: str | Path | None, lines: int = 40) -> str:
    if path is None:
        return "(no log)"
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or f"(log {path} is empty)"


def wait_until(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05
) -> T:
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # "not yet"; reported if the deadline passes
            last_error = exc
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10,
    proc: subprocess.Popen | None = None,
    log: str | Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not _port_open(host, port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with status {proc.returncode} before "
                f"{host}:{port} opened; log tail:\n{log_tail(log)}"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{host}:{port} not open after {timeout:g}s; log tail:\n{log_tail(log)}"
            )
        time.sleep(0.02)
    if proc is not None and proc.poll() is not None:  # the port is someone else's
        raise RuntimeError(
            f"{proc.args[0]} exited with status {proc.returncode}, yet {host}:{port} is "
            f"open (another program has it?); log tail:\n{log_tail(log)}"
        )
