"""procs - start and stop service processes so that none outlives the tests

SYNOPSIS
    spawn(argv, log, env=None, cwd=None) -> subprocess.Popen
    die_with_parent() -> None           a preexec_fn: SIGTERM when the parent dies
    stop_process(proc, timeout=5.0) -> None
    kill_pidfile(path, timeout=5.0) -> None
    run(argv, timeout=30.0, what=None, **kwargs) -> subprocess.CompletedProcess
    on_exit(callback) -> None
    make_root(prefix="smtpgate-test-") -> Path

DESCRIPTION
    spawn() starts a foreground service with stdout and stderr appended to
    the file log (never a pipe: a daemon that keeps a pipe open hangs its
    reader), in its own session, with the parent-death signal set to
    SIGTERM so that a pytest killed with SIGKILL still takes it down. The
    process is remembered and stopped at interpreter exit.

    stop_process() sends SIGTERM to the process group, waits up to timeout,
    then SIGKILLs it. kill_pidfile() does the same for a daemon known only
    by its pid file, waiting for the process to be gone (ports are free
    afterwards).

    run() runs a short command, and raises RuntimeError with its output
    when it fails or times out, instead of a bare CalledProcessError.

    on_exit() registers a callback run at interpreter exit, last registered
    first; errors in callbacks are printed and ignored.

    make_root() creates the per-session temporary directory, world-readable
    so that service users (mail, postfix, _rspamd) can reach their parts.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_callbacks: list[Callable[[], object]] = []
_children: list[subprocess.Popen] = []


def die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    argv: list[str],
    log: str | Path,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    _children.append(proc)
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    if proc in _children:
        _children.remove(proc)


def kill_pidfile(path: str | Path, timeout: float = 5.0) -> None:
    try:
        pid = int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.02)


def run(
    argv: list[str], timeout: float = 30.0, what: str | None = None, **kwargs
) -> subprocess.CompletedProcess:
    what = what or " ".join(argv)
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: no answer after {timeout:g}s") from exc
    except OSError as exc:
        raise RuntimeError(f"{what}: cannot run: {exc}") from exc
    if result.returncode != 0:
        raise RuntimeError(
            f"{what}: exit status {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def on_exit(callback: Callable[[], object]) -> None:
    _callbacks.append(callback)


def make_root(prefix: str = "smtpgate-test-") -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@atexit.register
def _cleanup() -> None:
    while _callbacks:
        callback = _callbacks.pop()
        try:
            callback()
        except Exception:
            traceback.print_exc()
    for proc in list(_children):
        with contextlib.suppress(Exception):
            stop_process(proc, timeout=2.0)
