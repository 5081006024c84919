"""ports - free loopback ports for test services

SYNOPSIS
    free_port(host="127.0.0.1", udp=False) -> int

DESCRIPTION
    free_port() asks the kernel for an unused TCP port on host (and, with
    udp=True, checks that the same number is also free for UDP, as a DNS
    server needs both). The port is released before returning, so a race
    with another process is possible but unlikely: the kernel hands out
    ephemeral ports in rotation, and each pytest run binds its own.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1", udp: bool = False) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            if not udp:
                return port
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as dgram:
                    dgram.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found on {host}")
