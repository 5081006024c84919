"""Selective greylisting through real sessions: a gate with a 2-second delay, the real Redis
and DNS; a second gate on the same Redis stands for another node.

Good clients (services.world: FCrDNS passes) all live in 127.0.0.0/24, the key's network,
so each test starts from a flushed Redis (the `world` fixture). A client listed in bl.test,
whose weight 1 is under the threshold 2, is doubtful (dnsbl_low); an unlisted one is not.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from services.evidence import explained
from services.smtp_talk import Talk, untag
from services.world import gate_in_world

from smtpgate.lookups import keys

pytestmark = pytest.mark.slow

DOUBTFUL = "127.0.0.85"  # listed in bl.test, under the threshold
CLEAN = "127.0.0.86"
GATE_ENV = {"SMTPGATE_GREYLIST": "selective", "SMTPGATE_GREYLIST_DELAY": "2",
            "SMTPGATE_DNSBL_SITES": "bl.test*1", "SMTPGATE_DNSBL_THRESHOLD": "2"}
SESSION_TAG = re.compile(r"; session=([0-9A-Z]{12})$")


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    yield from gate_in_world(start_gate, redis_server, dns_server,
                             listeners=("mx", "metrics"), **GATE_ENV)


@pytest.fixture
def listed(world, dns):
    name = f"{'.'.join(reversed(DOUBTFUL.split('.')))}.bl.test"
    dns.set([(name, "A", "127.0.0.2")])
    yield world
    dns.remove(name)  # the DNS server is the session's: later modules must not see the listing


def rcpt(port: int, source: str, rcpts=("user1@example.com",)) -> list[str]:
    """The RCPT replies of one session from source (session ids kept)."""
    with Talk("127.0.0.1", port, source=source) as talk:
        assert talk.reply()[0] == 220
        assert talk.cmd("EHLO client.example.test")[0] == 250
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        answers = [talk.cmd(f"RCPT TO:<{to}>")[1] for to in rcpts]
        talk.cmd("QUIT")
    return answers


def greylist_counts(gate) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gate.metrics_port}/metrics",
                                timeout=10) as answer:
        text = answer.read().decode()
    return {r: float(v) for r, v in
            re.findall(r'(?m)^smtpgate_greylist_total\{result="(\w+)"\} (\S+)$', text)}


def test_a_doubtful_client_is_greylisted_then_passes_and_is_remembered_by_another_node(
        gate, listed, redis, cli, redis_server, start_gate, monkeypatch):
    before = greylist_counts(gate)
    first = rcpt(gate.mx_port, DOUBTFUL, ("user1@example.com", "nobody@example.com"))
    # greylisted, a recipient that does not exist refused for good first
    assert untag(first[0]) == ("450 4.7.1 <user1@example.com>: Recipient address rejected: "
                               "Greylisted, try again in 2 seconds"), gate.log_text()[-3000:]
    assert untag(first[1]).startswith("550 5.1.1 <nobody@example.com>")
    session = SESSION_TAG.search(first[0]).group(1)
    gate.wait_for_log(rf"NOQUEUE: reject: RCPT from host85\.clients\.example\.test"
                      rf"\[127\.0\.0\.85\]: 450 4\.7\.1 <user1@example\.com>: Recipient address "
                      rf"rejected: Greylisted, try again in 2 seconds; session={session}; "
                      rf"from=<a@example\.net> to=<user1@example\.com>")
    assert redis.get(keys.greylist_key("127.0.0.0/24", "example.net")) is not None

    # the evidence says why
    monkeypatch.setenv("SMTPGATE_MYNETWORKS", "")
    out = explained(cli, redis_server.url, session)
    assert re.search(r"(?m)^  greylist +fail +greylisted \[127\.0\.0\.85\] 127\.0\.0\.0/24 "
                     r"example\.net \(dnsbl_low: DNSBL score 1 under the threshold 2\); first "
                     r"seen now, a retry after 2 s", out), out

    # retried too soon: deferred again; then, once the delay is over, passed
    started = time.monotonic()
    while (answer := untag(rcpt(gate.mx_port, DOUBTFUL)[0])).startswith("450"):
        assert "Greylisted" in answer, answer
        assert time.monotonic() - started < 15, "the retry never passed"
        time.sleep(0.25)
    assert answer == "250 2.1.5 Ok"
    assert redis.exists(keys.greylist_pass_key("127.0.0.0/24"))

    # another node on the same Redis knows the network passed
    other = start_gate(listeners=("mx",), **GATE_ENV)
    try:
        assert untag(rcpt(other.mx_port, DOUBTFUL)[0]) == "250 2.1.5 Ok"
        other.wait_for_log(r"disconnect from host85\.clients\.example\.test\[127\.0\.0\.85\]")
    finally:
        other.stop()

    after = greylist_counts(gate)
    assert after["new"] - before.get("new", 0) == 1
    assert after["retried"] - before.get("retried", 0) == 1
    assert after["early"] - before.get("early", 0) >= 0  # as many as the machine's speed made


def test_a_client_that_is_not_doubtful_is_not_greylisted(gate, listed, redis, cli,
                                                         redis_server, dns_server, monkeypatch):
    assert rcpt(gate.mx_port, CLEAN) == ["250 2.1.5 Ok"]
    for name, value in {**GATE_ENV, "SMTPGATE_NAMESERVERS": dns_server.nameserver,
                        "SMTPGATE_MYNETWORKS": ""}.items():
        monkeypatch.setenv(name, value)  # explain decides with the gate's settings
    assert redis.keys("smtpgate:grey*") == []  # not even asked
    status, out, _ = cli(redis_server.url, "explain", "--ip", CLEAN, "--from",
                         "a@example.net", "--rcpt", "user1@example.com")
    assert "  greylist         pass    [127.0.0.86] not doubtful" in out, out
    # explain's dry run of the doubtful one says it would be greylisted, and writes nothing
    status, out, _ = cli(redis_server.url, "explain", "--ip", DOUBTFUL, "--helo",
                         "client.example.test", "--from", "a@example.net", "--rcpt",
                         "user1@example.com")
    assert status == 1 and re.search(r"greylist +fail +greylisted \[127\.0\.0\.85\]", out), out
    assert redis.keys("smtpgate:grey*") == []
