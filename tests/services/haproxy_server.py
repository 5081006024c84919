"""haproxy_server - Debian's HAProxy in front of several smtpgate instances, for the tests.

SYNOPSIS
    HaproxyServer(workdir, backends=[(mx_port, health_port), ...])
        .port: int                  the frontend, 127.0.0.1
        .start() ; .stop()          stop() asserts a clean exit
        .log_text() ; .wait_for_log(regex, timeout=10)

DESCRIPTION
    A TCP frontend on a free loopback port, and one backend with a server
    per smtpgate: round-robin, `send-proxy-v2` (so smtpgate sees the real
    client), and an HTTP health check of each gate's /healthz on its own
    port every 200 ms (`fall 2 rise 2`), so a gate that dies is out within
    about half a second. A connection refused by a dead gate is retried on
    another one (`option redispatch 1`), as a production setup would.

    HAProxy runs in the foreground (-db) in its own session, its log
    (server state changes, one line per connection) on stderr into
    workdir/haproxy.log. stop() sends SIGUSR1 (the soft stop: no new
    connections, the open ones finish) and asserts exit status 0 within
    10 s; it is killed and reported otherwise.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from .ports import free_port
from .procs import run, spawn, stop_process
from .waiting import log_tail, wait_for_port

CONFIG = """\
global
    log stderr format raw local0 info
    maxconn 500

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1

frontend smtp
    bind 127.0.0.1:{port}
    default_backend gates

backend gates
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2 send-proxy-v2
{servers}
"""


class HaproxyServer:
    def __init__(self, workdir: Path, backends: list[tuple[int, int]]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backends = list(backends)
        self.config_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None
        self.pick_ports()

    def pick_ports(self) -> None:
        self.port = free_port()

    def _config(self) -> str:
        servers = "\n".join(f"    server gate{i} 127.0.0.1:{mx} check port {health}"
                            for i, (mx, health) in enumerate(self.backends))
        return CONFIG.format(port=self.port, servers=servers)

    def start(self, timeout: float = 10.0) -> None:
        self.config_path.write_text(self._config())
        run(["haproxy", "-c", "-q", "-f", str(self.config_path)], timeout=10,
            what="haproxy -c (the generated configuration)")
        self.proc = spawn(["haproxy", "-db", "-f", str(self.config_path)], self.log_path)
        try:
            wait_for_port("127.0.0.1", self.port, timeout, proc=self.proc, log=self.log_path)
        except TimeoutError:
            stop_process(self.proc)
            raise

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(proc)
                raise AssertionError(f"haproxy did not stop within {timeout:g} s of SIGUSR1; "
                                     f"log tail:\n{log_tail(self.log_path)}") from None
        stop_process(proc)  # reaped already: only forgets it
        if proc.returncode != 0:
            raise AssertionError(f"haproxy exited with status {proc.returncode}; log tail:\n"
                                 f"{log_tail(self.log_path)}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, regex: str, timeout: float = 10.0) -> re.Match:
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(f"no haproxy log line matching {regex!r}; tail:\n"
                                   f"{log_tail(self.log_path)}")
            time.sleep(0.05)
