"""Timed overrides through the real server: set with the CLI, obeyed by the gate's sessions.

One gate (with a DNSBL and /metrics) for the module, the real Redis and DNS. Good clients
(services.world: FCrDNS passes) 127.0.0.92-95 are kept out by a PSA reject or a DNSBL
listing until an allow lets them in; a deny refuses a client that would be let in.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from services.evidence import explained
from services.smtp_talk import Talk, untag
from services.waiting import wait_until
from services.world import gate_in_world

pytestmark = pytest.mark.slow

LISTED = "127.0.0.94"  # in bl.test
SESSION_TAG = re.compile(r"; session=([0-9A-Z]{12})$")


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    yield from gate_in_world(start_gate, redis_server, dns_server,
                             listeners=("mx", "metrics"), SMTPGATE_DNSBL_SITES="bl.test")


@pytest.fixture
def scene(world, dns):
    """127.0.0.92/30 kept out: .93 by a PSA reject, .94 by the DNSBL, and .92 only a stranger
    whom the protocol tests judge."""
    world.set("PSA:127.0.0.93", "reject")
    dns.set([(f"{'.'.join(reversed(LISTED.split('.')))}.bl.test", "A", "127.0.0.2")])
    return world


def greeting(gate, source: str) -> str:
    """The first reply line (a refusal's session id checked and kept)."""
    with Talk("127.0.0.1", gate.mx_port, source=source, timeout=5.0) as talk:
        return talk.reply()[1].splitlines()[-1]


def greeting_until(gate, source: str, start: str, timeout: float = 10.0) -> str:
    """The greeting, once it starts with `start`: the gate's table cache hears of a change
    asynchronously, and an override ends when Redis removes it. A deadline, no sleep."""
    deadline = time.monotonic() + timeout
    while True:
        line = greeting(gate, source)
        if line.startswith(start) or time.monotonic() > deadline:
            return line
        time.sleep(0.02)


def to_rcpt(gate, source: str) -> tuple[int, str]:
    """A whole session up to RCPT, with the commands pipelined without PIPELINING being
    offered first (postscreen's pipelining test would hang up on a stranger)."""
    with Talk("127.0.0.1", gate.mx_port, source=source) as talk:
        assert talk.reply()[0] == 220
        talk.send(b"HELO client.example.test\r\nMAIL FROM:<a@example.net>\r\n"
                  b"RCPT TO:<user1@example.com>\r\n")
        replies = [talk.reply() for _ in range(3)]
        assert [code for code, _ in replies[:2]] == [250, 250], replies
        return replies[2]


def test_an_allow_lets_in_what_psa_and_the_dnsbl_keep_out_until_removed(gate, scene, cli,
                                                                         redis_server):
    assert greeting_until(gate, "127.0.0.93", "521").startswith(
        "521 5.3.2 Service currently unavailable")
    assert greeting(gate, LISTED).startswith("521 5.7.1 Service unavailable; client "
                                             f"[{LISTED}] blocked using bl.test")
    assert to_rcpt(gate, "127.0.0.92")[0] == 550  # pipelining when it was not offered
    status, _, err = cli(redis_server.url, "allow", "127.0.0.92/30", "--for", "1h",
                           "--reason", "owner called")
    assert status == 0, err
    assert greeting_until(gate, "127.0.0.93", "220").startswith("220 ")
    for source in ("127.0.0.92", "127.0.0.93", LISTED):
        assert to_rcpt(gate, source) == (250, "250 2.1.5 Ok")
    gate.wait_for_log(r"override permit: ALLOWLISTED \[127\.0\.0\.94\] \(override allow "
                      r"127\.0\.0\.92/30 by alice at [-0-9: ]+UTC, (1h|59m\d+s) left: "
                      r"owner called\)")
    allowed_at = gate.log_text().index("override permit: ALLOWLISTED [127.0.0.92]")
    assert "COMMAND PIPELINING from [127.0.0.9" not in gate.log_text()[allowed_at:]

    assert cli(redis_server.url, "overrides", "remove", "127.0.0.92/30")[0] == 0
    assert greeting_until(gate, "127.0.0.93", "521").startswith("521 5.3.2")


def test_an_override_ends_by_itself(gate, scene, cli, redis_server):
    assert cli(redis_server.url, "allow", "127.0.0.93", "--for", "3s", "--reason", "brief")[0] \
        == 0
    assert greeting_until(gate, "127.0.0.93", "220", timeout=3).startswith("220 ")
    status, out, _ = cli(redis_server.url, "overrides")
    assert out.startswith("allow 127.0.0.93 by alice") or not out, out  # gone if very late
    # nobody removes it: after its 3 seconds, the PSA reject decides again
    assert greeting_until(gate, "127.0.0.93", "521", timeout=15).startswith("521 5.3.2")
    status, out, err = cli(redis_server.url, "overrides")
    assert status == 0 and out == "" and "0 overrides in force" in err


def test_a_deny_answers_at_connect_and_explain_names_it(gate, world, cli, redis_server):
    assert greeting(gate, "127.0.0.95").startswith("220 ")
    status, _, err = cli(redis_server.url, "deny", "127.0.0.95", "--for", "1h", "--reason",
                         "spam run", "--reply", "550 5.7.1 Call us at +1 555 0100")
    assert status == 0, err
    line = greeting_until(gate, "127.0.0.95", "550")
    assert untag(line) == "550 5.7.1 Call us at +1 555 0100", line
    session = SESSION_TAG.search(line).group(1)
    gate.wait_for_log(r"override fail: DENYLISTED \[127\.0\.0\.95\] \(override deny "
                      r"127\.0\.0\.95 by alice at .* left: spam run\)")
    gate.wait_for_log(rf"NOQUEUE: reject: CONNECT from unknown\[127\.0\.0\.95\]: 550 5\.7\.1 "
                      rf"Call us at \+1 555 0100; session={session}")
    assert greeting(gate, "127.0.0.96").startswith("220 ")  # its neighbour is not denied

    out = explained(cli, redis_server.url, session)
    assert re.search(r"(?m)^connect\n  override +fail +DENYLISTED \[127\.0\.0\.95\] "
                     r"\(override deny 127\.0\.0\.95 by alice", out), out
    assert "reply: 550 5.7.1 Call us at +1 555 0100; session=" in out

    # the dry run reads Redis directly (no table cache): the same verdict, and it stops there
    status, out, err = cli(redis_server.url, "explain", "--ip", "127.0.0.95", "--rcpt",
                           "user1@example.com")
    assert status == 1 and "  override         fail    DENYLISTED [127.0.0.95]" in out, out
    assert "RCPT" not in out and out.rstrip().endswith(
        "reply: 550 5.7.1 Call us at +1 555 0100"), out

    def in_force() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{gate.metrics_port}/metrics",
                                    timeout=10) as answer:
            text = answer.read().decode()
        return re.findall(r'(?m)^smtpgate_overrides_in_force\{action="(\w+)"\} (\S+)$', text)

    wait_until(lambda: sorted(in_force()) == [("allow", "0.0"), ("deny", "1.0")], 10,
               "the overrides in force in /metrics")
