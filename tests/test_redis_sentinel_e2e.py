"""REDIS naming a Sentinel set: mail flows, the master goes away, smtpgate follows the new one.

services.redis_ha.RedisSentinelSet: a master, a replica and three sentinels (quorum 2,
down-after 1 s). smtpgate runs with REDIS=redis+sentinel://.../mymaster/0. The master is
then either crashed (SIGKILL: the sentinels notice it is down after 1 s, agree and
promote the replica) or handed over with SENTINEL FAILOVER. Meanwhile one client after
another tries to deliver a message. Every answer must be 2xx/3xx or 4xx (421 at connect
or 451 at RCPT: the client retries), never 5xx, never a hang, never a traceback in the
log; within seconds sessions go through again on the new master; every message that got
its 250 is delivered; the keys written (and replicated) before the failover still
decide: PSA drops its network, VALI accepts its users and refuses the others; the table
cache reloads from the new master and follows its changes.

How long smtpgate answered 4xx is measured and printed (run with -s to see it), not
asserted.
"""

from __future__ import annotations

import io
import time
import uuid

import pytest
from services import procs
from services.ports import start_on_free_ports
from services.redis_ha import RedisSentinelSet
from services.smtp_talk import Talk
from services.waiting import wait_until

from smtpgate.cli.table import run as table_run
from smtpgate.config import load

pytestmark = pytest.mark.slow

CLIENT = "127.0.0.75"  # a good client (services.world)
DENIED = "127.0.6.1"
SESSION_TIMEOUT = 10.0  # a session that takes longer than this hangs


@pytest.fixture
def sentinel_set(service_root):
    servers = RedisSentinelSet(service_root / f"sentinel-{uuid.uuid4().hex[:8]}")
    procs.on_exit(servers.stop)
    start_on_free_ports(servers)
    yield servers
    servers.stop()  # checks every exit status (the crashed master excepted)


@pytest.fixture
def redis(sentinel_set):
    """The current master: `world` writes the image's keys there."""
    client = sentinel_set.client()
    yield client
    client.close()


def deliver(gate, mark: str, to: str = "user1@example.com",
            source: str = CLIENT) -> list[tuple[int, str]]:
    """One session that tries to deliver a message; every reply it got, in order."""
    replies = []
    with Talk("127.0.0.1", gate.mx_port, source=source, timeout=SESSION_TIMEOUT) as talk:
        replies.append(talk.banner())
        if replies[-1][0] != 220:
            return replies
        for line in ("EHLO client.example.test", "MAIL FROM:<a@example.net>", f"RCPT TO:<{to}>",
                     "DATA"):
            replies.append(talk.cmd(line))
            if replies[-1][0] >= 400:
                talk.cmd("QUIT")
                return replies
        talk.send(f"Subject: {mark}\r\n\r\nhello\r\n.\r\n".encode())
        replies.append(talk.reply())
        talk.cmd("QUIT")
    return replies


@pytest.mark.parametrize("how", ["crash", "sentinel-failover"])
def test_failover_is_4xx_then_business_as_usual(how, sentinel_set, world, start_gate,
                                                 dovecot_server):
    # written with `smtpgate table` through the sentinels, as an operator would
    out, err = io.StringIO(), io.StringIO()
    network = f"{DENIED.rsplit('.', 1)[0]}.0/24"
    assert table_run(["set", "PSA", network, "reject"], load({"REDIS": sentinel_set.url}),
                     stdout=out, stderr=err) == 0, err.getvalue()
    assert world.get(f"PSA:{network}") == "reject"
    sentinel_set.wait_replicated()
    gate = start_gate(REDIS=sentinel_set.url)
    try:
        before = f"before-{uuid.uuid4().hex}"
        assert deliver(gate, before)[-1][0] == 250
        old_master = sentinel_set.master_address()

        started = time.monotonic()
        if how == "crash":
            sentinel_set.kill_master()
        else:
            with sentinel_set.sentinels[0].client() as sentinel:
                assert sentinel.sentinel_failover(sentinel_set.service)
        accepted, refused, promoted_after = [], [], None
        first_4xx = last_4xx = None
        while True:  # until a message went through on the new master
            assert time.monotonic() - started < 30, f"no recovery; 4xx seen: {refused[-3:]}"
            if promoted_after is None and sentinel_set.master_address() != old_master:
                promoted_after = time.monotonic() - started
            mark = f"during-{uuid.uuid4().hex}"
            t0 = time.monotonic()
            replies = deliver(gate, mark)
            assert time.monotonic() - t0 < SESSION_TIMEOUT
            assert all(code < 500 for code, _ in replies), replies
            if replies[-1][0] == 250 and len(replies) == 6:
                accepted.append(mark)
                if promoted_after is not None:
                    break
            else:
                refused.append(replies[-1])
                last_4xx = time.monotonic() - started
                first_4xx = last_4xx if first_4xx is None else first_4xx
                time.sleep(0.01)  # pacing, so the clients do not crowd out the sentinels
        recovered_after = time.monotonic() - started
        print(f"\n{how}: new master named after {promoted_after:.2f} s, a message through it "
              f"after {recovered_after:.2f} s; {len(refused)} sessions answered 4xx"
              + (f" from {first_4xx:.2f} s to {last_4xx:.2f} s "
                 f"({sorted({r[1][:26] for r in refused})})" if refused else "")
              + f", {len(accepted)} accepted")

        for mark in (before, *accepted):
            dovecot_server.wait_for_message("user1@example.com",
                                            lambda raw, m=mark: m.encode() in raw)
        # what was written before the failover still decides
        with Talk("127.0.0.1", gate.mx_port, source=DENIED) as talk:
            assert talk.banner()[0] == 521
        assert deliver(gate, "x", to="nobody@example.com")[3][0] == 550
        assert deliver(gate, f"sales-{uuid.uuid4().hex}", to="sales@example.com")[-1][0] == 250
        # the table cache reloaded from the new master and follows its changes: a key
        # written now drops the cached "no such user"
        wait_until(lambda: gate.log_text().count("table cache: loaded") >= 2, 15,
                   "the table cache reloaded from the new master")
        assert deliver(gate, "x", to="new@example.com")[3][0] == 550
        with sentinel_set.client() as master:
            master.set("VALI:new@example.com", "user1@example.com")
        wait_until(lambda: deliver(gate, "x", to="new@example.com")[3][0] == 250, 5,
                   "the new key to be honoured")
        assert "Traceback" not in gate.log_text()
    finally:
        gate.stop()
