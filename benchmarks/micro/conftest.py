"""conftest - fixtures of the micro benchmarks: a real redis-server and an event loop of their own.

SYNOPSIS
    redis_url (session)      redis://127.0.0.1:P/0 of a private redis-server, loaded with keys
    loop (session)           an event loop for driving async lookups from sync benchmarks

DESCRIPTION
    The micro benchmarks time pure functions and the table lookups with
    pytest-benchmark. Lookups that miss the cache make one real Redis round
    trip, so a redis-server runs for the session (no persistence, loopback).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from benchmarks.stack import World, free_port, redis_command, spawn, wait_for


@pytest.fixture(scope="session")
def world() -> World:
    return World()


@pytest.fixture(scope="session")
def redis_url(world):
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-micro-"))
    port = free_port()
    proc = spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--dir", str(workdir)], workdir)
    try:
        wait_for("redis-server", lambda: redis_command(port, "PING") == b"+PONG\r\n", 10, proc.log)
        for key, value in {f"VDOM:{world.domain}": "1", f"VALI:{world.rcpt}": world.rcpt,
                           f"VBOX:{world.rcpt}": "bench.test/user/",
                           f"PSA:{world.denied_net}.0/24": "reject"}.items():
            redis_command(port, "SET", key, value)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
