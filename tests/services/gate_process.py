"""gate_process - smtpgate itself, run as a real `smtpgate serve` process for the tests.

SYNOPSIS
    GateProcess(workdir, env) ; .start(timeout) ; .stop() ; .log_text() ; .wait_for_log(regex)
    .mx_port, .submission_port, .submissions_port
    make_certificate(workdir, names) -> (ca_pem_path, cert_path, key_path)

DESCRIPTION
    The process is started with a clean environment plus `env`, listens on
    free loopback ports, and is ready when it writes "smtpgate: ready" on
    stderr (which goes to a log file the tests can read). It is stopped with
    SIGTERM and killed if it does not exit within the deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trustme

from .ports import free_port

READY = "smtpgate: ready"


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


class GateProcess:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.mx_port = free_port()
        self.submission_port = free_port()
        self.submissions_port = free_port()
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOSTNAME": "mx.example.test",
            "SMTPGATE_MX_LISTEN": f"127.0.0.1:{self.mx_port}",
            "SMTPGATE_SUBMISSION_LISTEN": "",
            "SMTPGATE_METRICS_LISTEN": "",
            "SMTPGATE_SOCKETMAP_LISTEN": "",
            "SMTPGATE_WORKERS": "1",
            "SMTPGATE_TLS_OPTIONAL": "yes",
            **env,
        }
        self.log_path = workdir / "smtpgate.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpgate", "serve"], env=self.env,
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY in self.log_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtpgate exited with {self.proc.returncode}:\n"
                                   + self.log_text()[-3000:])
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("smtpgate did not get ready:\n" + self.log_text()[-3000:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

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
