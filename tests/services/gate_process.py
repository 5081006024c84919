"""gate_process - smtpgate itself, run as a real `smtpgate serve` process for the tests.

SYNOPSIS
    GateProcess(workdir, env, listeners=("mx",))
        .start(timeout=15) ; .stop(timeout=10) ; .log_text() ; .wait_for_log(regex)
        .kill()                         SIGKILL, a crash on purpose (stop() then checks nothing)
        .workers() -> list[int]         pids of the worker processes (children of the master)
        .mx_port, .submission_port, .submissions_port, .metrics_port, .socketmap_port
        .workers_expected: int          from SMTPGATE_WORKERS (default 1)
    make_certificate(workdir, names) -> (ca_pem_path, cert_path, key_path)

DESCRIPTION
    The process is started with a clean environment plus `env`, in its own
    session (so a kill reaches its workers too) and with the parent-death
    signal set, and is ready when every worker has written "smtpgate: ready"
    on stderr (which goes to a log file the tests can read).

    Each listener named in `listeners` ("mx", "submission", "submissions",
    "metrics", "socketmap") gets its own port from services.ports, set as
    SMTPGATE_<NAME>_LISTEN unless env sets it; the others are off. When
    smtpgate cannot bind a port that something outside the harness took
    meanwhile ("cannot listen on"), start() picks new ports and tries again.

    stop() is a check as much as a stop: it sends SIGTERM and waits up to
    timeout seconds; smtpgate must have exited with status 0 by then. If it
    had to be killed (still draining: a test left a connection open), or it
    exited with another status (also before stop() was called), stop()
    raises AssertionError with the tail of its log. A second stop() does
    nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trustme

from .ports import bind_failure, free_port
from .procs import die_with_parent
from .waiting import wait_until

READY = "smtpgate: ready"
LISTENERS = ("mx", "submission", "submissions", "metrics", "socketmap")


def make_certificate(workdir: Path, names: tuple[str, ...] = ("mx.example.test",)):
    ca = trustme.CA()
    cert = ca.issue_cert(*names)
    ca_path = workdir / "ca.pem"
    cert_path = workdir / "fullchain.pem"
    key_path = workdir / "privkey.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return ca_path, cert_path, key_path


def children_of(pid: int) -> list[int]:
    """Live child processes of pid, from /proc (zombies excluded)."""
    return _live_processes(parent=pid)


def _live_processes(*, parent: int | None = None, session: int | None = None) -> list[int]:
    """Processes (zombies excluded) with that parent, or in that session, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # after "pid (comm) ": state, ppid, pgrp, session, ...
        fields = raw[raw.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        if (parent is not None and int(fields[1]) == parent) or \
                (session is not None and int(fields[3]) == session):
            found.append(int(entry))
    return sorted(found)


class GateProcess:
    def __init__(self, workdir: Path, env: dict[str, str],
                 listeners: tuple[str, ...] = ("mx",)) -> None:
        unknown = set(listeners) - set(LISTENERS)
        if unknown or "mx" not in listeners:
            raise ValueError(f"listeners must include mx and be among {LISTENERS}: {listeners}")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.listeners = tuple(listeners)
        self.extra_env = dict(env)
        self.workers_expected = int(env.get("SMTPGATE_WORKERS", "1"))
        self.log_path = workdir / "smtpgate.log"
        self.proc: subprocess.Popen | None = None
        self._checked = False
        self.pick_ports()

    def pick_ports(self) -> None:
        for name in LISTENERS:
            setattr(self, f"{name}_port", free_port() if name in self.listeners else None)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOSTNAME": "mx.example.test",
            **{f"SMTPGATE_{name.upper()}_LISTEN": (
                f"127.0.0.1:{getattr(self, f'{name}_port')}" if name in self.listeners else "")
               for name in LISTENERS},
            "SMTPGATE_WORKERS": "1",
            "SMTPGATE_TLS_OPTIONAL": "yes",
            **self.extra_env,
        }

    def start(self, timeout: float = 15.0, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            mark = len(self.log_text())
            try:
                self._start_once(timeout, mark)
                return
            except RuntimeError as exc:
                if attempt == attempts or not bind_failure(self.log_text()[mark:]):
                    raise
                print(f"gate_process: {exc}; new ports, attempt {attempt + 1}", file=sys.stderr)
                self.pick_ports()

    def _start_once(self, timeout: float, mark: int) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smtpgate", "serve"], env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                start_new_session=True, preexec_fn=die_with_parent)
        self._checked = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text()[mark:].count(READY) >= self.workers_expected:
                return
            if self.proc.poll() is not None:
                self._checked = True
                raise RuntimeError(f"smtpgate exited with {self.proc.returncode} at start:\n"
                                   + self.log_text()[mark:][-3000:])
            time.sleep(0.05)
        self._kill()
        self._checked = True
        raise TimeoutError(f"smtpgate did not get ready within {timeout:g} s:\n"
                           + self.log_text()[mark:][-3000:])

    def workers(self) -> list[int]:
        """The worker pids: the master's children (one worker: the process itself)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        if self.workers_expected == 1:
            return [self.proc.pid]
        return children_of(self.proc.pid)

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: master and workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL to the master and its workers, as a crash would; nothing left to check."""
        if self.proc is not None and not self._checked:
            self._checked = True
            self._kill()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then assert that smtpgate exited with status 0 within timeout seconds."""
        if self.proc is None or self._checked:
            return
        self._checked = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise AssertionError(
                    f"smtpgate (pid {self.proc.pid}) did not exit within {timeout:g} s of "
                    "SIGTERM and was killed (a client left open keeps it draining?); "
                    f"log tail:\n{self.log_text()[-3000:]}") from None
        try:  # the workers are gone too: none may outlive the master
            wait_until(lambda: not self._session_members(), 5,
                       f"the workers of smtpgate {self.proc.pid} to exit")
        except TimeoutError as exc:
            self._kill()
            raise AssertionError(f"{exc}; killed {self._session_members()}; log tail:\n"
                                 f"{self.log_text()[-3000:]}") from None
        if self.proc.returncode != 0:
            raise AssertionError(f"smtpgate (pid {self.proc.pid}) exited with status "
                                 f"{self.proc.returncode}, not 0; log tail:\n"
                                 f"{self.log_text()[-3000:]}")

    def _session_members(self) -> list[int]:
        """Processes still in smtpgate's session (its workers, if any outlived it)."""
        return _live_processes(session=self.proc.pid)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.log_text())
            if match:
                return match
            time.sleep(0.05)
        raise TimeoutError(f"no log line matching {pattern!r}:\n" + self.log_text()[-3000:])
