"""redis_server - a private redis-server on a free loopback port

SYNOPSIS
    RedisServer(workdir: Path)
        .host: str            "127.0.0.1"
        .port: int
        .url: str             "redis://127.0.0.1:PORT/0"
        .log_path: Path
        .start() -> None      start (again) on the same port; waits for PING
        .pick_ports() -> None another port, for a first start that found it taken
        .stop() -> None       stop; a test may kill Redis mid-session
        .running: bool
        .client() -> redis.Redis   sync client, decode_responses=True

DESCRIPTION
    The server keeps no data on disk (no RDB, no AOF), so start() after
    stop() comes back empty, and runs with Redis's defaults otherwise (no
    keyspace notifications: the table cache uses CLIENT TRACKING, which needs
    no server setting). start() waits until PING answers, with a
    deadline, and raises with the server's log tail otherwise.
"""

from __future__ import annotations

import socket
from pathlib import Path

import redis

from .ports import free_port
from .procs import spawn, stop_process
from .waiting import log_tail, wait_for_port, wait_until


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.pick_ports()
        self.log_path = self.workdir / "redis.log"
        self._proc = None

    def pick_ports(self) -> None:
        """New ports (services.ports.start_on_free_ports, before the first start only)."""
        self.port = free_port(self.host)
        self.url = f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=self.port, db=0, decode_responses=True, socket_timeout=5
        )

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", "",
        ]
        self._proc = spawn(argv, self.log_path, cwd=self.workdir)
        wait_for_port(self.host, self.port, timeout, proc=self._proc, log=self.log_path)
        # The port may be open but not ours (taken meanwhile, and redis-server gone with
        # "Address already in use"): wait for our process to answer, or to have exited.
        proc = self._proc
        try:
            wait_until(lambda: proc.poll() is not None or self._pong(), timeout,
                       f"redis PING on port {self.port}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{log_tail(self.log_path)}") from None
        if self._proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {self._proc.returncode}; "
                               f"log tail:\n{log_tail(self.log_path)}")

    def _pong(self) -> bool:
        """One PING, answered within half a second (no client library and its retries)."""
        with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} running={self.running}>"
