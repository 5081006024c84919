"""Two smtpgate instances behind a real HAProxy (send-proxy-v2), sharing one Redis and one Postfix.

What must hold across instances: Postfix sees the real client, the per-client connection
count and the screening cache are one (they live in Redis), and mail keeps flowing when one
instance dies (HAProxy's health check of /healthz takes it out).
"""

from __future__ import annotations

import re
import uuid

import pytest
from services import procs
from services.haproxy_server import HaproxyServer
from services.ports import start_on_free_ports
from services.smtp_talk import Talk, send_marked, untag
from services.waiting import wait_until

from smtpgate.lookups import keys

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def balanced(start_gate, service_root):
    gates = [start_gate(listeners=("mx", "metrics"), SMTPGATE_PROXY_PROTOCOL="v2",
                        SMTPGATE_PROXY_TRUSTED="127.0.0.1/32", SMTPGATE_GREET_WAIT="1",
                        SMTPGATE_CLIENT_CONNECTION_COUNT_LIMIT="2")
             for _ in range(2)]
    haproxy = HaproxyServer(service_root / f"haproxy-{uuid.uuid4().hex[:8]}",
                            [(gate.mx_port, gate.metrics_port) for gate in gates])
    procs.on_exit(haproxy.stop)
    start_on_free_ports(haproxy)
    yield gates, haproxy
    try:
        haproxy.stop()
    finally:
        for gate in gates:
            gate.stop()


def released(redis_client, timeout: float = 5.0) -> None:
    """No session counted any more (closed sessions leave the count in batches)."""
    wait_until(lambda: not redis_client.exists(keys.COUNT_ALL), timeout,
               "the closed sessions to leave the count")


def marks(gates) -> list[int]:
    return [len(gate.log_text()) for gate in gates]


def logged(gate, since: int, regex: str) -> bool:
    return re.search(regex, gate.log_text()[since:], re.MULTILINE) is not None


def test_postfix_sees_the_client_behind_haproxy(balanced, world, postfix_server,
                                                dovecot_server):
    _, haproxy = balanced
    since = postfix_server.log_mark()
    mark = f"haproxy-{uuid.uuid4().hex}"
    assert send_marked(haproxy.port, mark)[0] == 250
    postfix_server.wait_for_log(r"client=host77\.clients\.example\.test\[127\.0\.0\.77\]",
                                since=since)
    stored = dovecot_server.wait_for_message("user1@example.com", lambda raw: mark.encode() in raw)
    assert re.search(rb"Received: from client\.example\.test \(host77\.clients\.example\.test "
                     rb"\[127\.0\.0\.77\]\)", stored), stored[:600]
    haproxy.wait_for_log(r"smtp gates/gate\d ")  # its own line for the connection


def test_a_client_screened_by_one_instance_is_pass_old_at_the_other(balanced, world):
    gates, haproxy = balanced
    since = marks(gates)
    seen: set[int] = set()
    for _ in range(6):  # round-robin: two connections in a row reach both instances
        with Talk("127.0.0.1", haproxy.port, source="127.0.0.81") as talk:
            banner = talk.banner()
            assert banner[0] == 220, banner
            talk.cmd("QUIT")
        released(world)  # the per-client count is 2 here: let the closed sessions go first
        seen |= {i for i, gate in enumerate(gates)
                 if logged(gate, since[i], r"connect from \S+\[127\.0\.0\.81\]")}
        if len(seen) == 2:
            break
    assert seen == {0, 1}, "HAProxy did not spread the connections over both instances"
    new = [i for i, gate in enumerate(gates)
           if logged(gate, since[i], r"PASS NEW \[127\.0\.0\.81\]")]
    assert len(new) == 1, [gate.log_text()[since[i]:] for i, gate in enumerate(gates)]
    other = gates[1 - new[0]]
    other.wait_for_log(r"PASS OLD \[127\.0\.0\.81\]:\d+")
    assert not logged(other, since[1 - new[0]], r"PASS NEW \[127\.0\.0\.81\]")


def test_the_per_client_connection_limit_counts_both_instances(balanced, world):
    gates, haproxy = balanced
    since = marks(gates)
    with (Talk("127.0.0.1", haproxy.port, source="127.0.0.82") as first,
          Talk("127.0.0.1", haproxy.port, source="127.0.0.82") as second):
        assert first.banner()[0] == 220 and second.banner()[0] == 220
        holders = [i for i, gate in enumerate(gates)
                   if logged(gate, since[i], r"connect from \S+\[127\.0\.0\.82\]")]
        assert holders == [0, 1], "round-robin should have put one on each instance"
        with Talk("127.0.0.1", haproxy.port, source="127.0.0.82") as third:
            assert untag(third.banner()) == (421, "421 4.7.0 Error: too many connections from "
                                           "127.0.0.82")
        first.cmd("QUIT")
        second.cmd("QUIT")


def test_mail_keeps_flowing_when_one_instance_is_killed(balanced, world, postfix_server):
    gates, haproxy = balanced
    gates[0].kill()
    # at once, before the health check noticed: HAProxy's retry takes the refused connection
    # to the other instance
    assert send_marked(haproxy.port, f"haproxy-kill-{uuid.uuid4().hex}")[0] == 250
    haproxy.wait_for_log(r"Server gates/gate0 is DOWN", timeout=10)
    since = marks(gates)[1]
    for _ in range(4):
        assert send_marked(haproxy.port, f"haproxy-after-{uuid.uuid4().hex}")[0] == 250
    wait_until(lambda: gates[1].log_text()[since:].count("client=host77") >= 4, 10,
               "four messages through the surviving instance")
