"""services.ports: ports are never handed out twice, come from a block this process holds,
and a service whose port was taken meanwhile starts again on new ones."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from services import ports
from services.redis_server import RedisServer

TESTS = Path(__file__).resolve().parent


def test_ports_are_never_handed_out_twice_and_are_free():
    given = [ports.free_port() for _ in range(300)]  # more than one block
    assert len(set(given)) == len(given)
    for port in given[-5:]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # still free: nobody else in this process has it


def test_ports_lie_outside_the_kernels_ephemeral_range():
    low, high = ports._ephemeral_range()
    start, stop = ports._span()
    if (start, stop) == (ports.FLOOR, ports.CEILING):
        return  # this kernel leaves no room outside; the bind check and retries remain
    for _ in range(20):
        assert not low <= ports.free_port() <= high


def test_another_process_draws_from_another_block():
    mine = ports.free_port()
    child = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); from services import ports; "
         "print(ports.free_port())", str(TESTS)],
        capture_output=True, text=True, timeout=30, check=True)
    theirs = int(child.stdout)
    held = [range(first, first + ports.BLOCK) for first in ports._claimed]
    assert any(mine in block for block in held)
    assert not any(theirs in block for block in held)  # our blocks are locked to us


def test_a_service_whose_port_was_taken_starts_on_new_ones(tmp_path):
    server = RedisServer(tmp_path / "redis")
    taken = server.port
    with socket.socket() as squatter:  # some other program got there first
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            ports.start_on_free_ports(server)
            assert server.running and server.port != taken
            assert server.client().ping()
            assert "Address already in use" in server.log_path.read_text()
        finally:
            server.stop()
