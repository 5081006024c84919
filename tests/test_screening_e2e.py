"""Screening through the real server: access list, pregreet, DNSBL, protocol tests, limits.

Each client connects from its own loopback address; the DNS answers come from the real
DNS server. A greeting that starts with the "220-" teaser means the greet wait ran; a
single "220 " line means the client was let through without it.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
from services.smtp_talk import Talk, untag

from smtpgate.lookups import keys

pytestmark = pytest.mark.slow

SITES = "bl.test=127.0.0.[2..11]*3 wl.test=127.0.[0..255].[1..3]*-2 broken.test slow.test"


GATE_ENV = {"SMTPGATE_GREET_WAIT": "2", "SMTPGATE_DNSBL_SITES": SITES,
            "SMTPGATE_DNSBL_THRESHOLD": "3", "SMTPGATE_DNSBL_ALLOWLIST_THRESHOLD": "-1",
            "SMTPGATE_DNSBL_TIMEOUT": "1.5", "SMTPGATE_CLIENT_CONNECTION_COUNT_LIMIT": "2"}


@pytest.fixture(scope="module")
def gate(start_gate):
    process = start_gate(**GATE_ENV)
    yield process
    process.stop()


@pytest.fixture
def screened(world, dns):
    dns.set_servfail_zone("broken.test")
    dns.set_timeout_zone("slow.test")
    return world


def greeting(talk: Talk) -> list[str]:
    """The greeting lines up to the final 220 (or the refusal)."""
    lines = []
    while True:
        line = talk.file.readline().decode().rstrip("\r\n")
        if not line:
            return lines
        lines.append(untag(line))  # a refusal ends with its session id: checked, removed
        if line[3:4] != "-":
            return lines


def greeting_from(gate, source: str, expected: str, timeout: float = 5.0) -> list[str]:
    """The greeting, once smtpgate's table cache has caught up with a key just written.

    Redis tells the cache about changes asynchronously; a client that connects in the same
    millisecond may still be judged by the old value, so poll with a deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        # a short read timeout: judged by the old value, the client may be held in a long
        # greet wait, and the next try is the way out of it
        with Talk("127.0.0.1", gate.mx_port, source=source, timeout=1.0) as talk:
            try:
                lines = greeting(talk)
            except TimeoutError:
                lines = []
        if (lines and lines[-1] == expected) or time.monotonic() > deadline:
            return lines


def released(redis_client, timeout: float = 5.0) -> None:
    """Wait until no session is counted: closed sessions leave the count in batches."""
    deadline = time.monotonic() + timeout
    while redis_client.exists(keys.COUNT_ALL):  # each process deletes its field at zero
        assert time.monotonic() < deadline, "sessions still counted"
        time.sleep(0.02)


def reaches_rcpt(talk: Talk) -> tuple[int, str]:
    talk.cmd("EHLO client.example.test")
    talk.cmd("MAIL FROM:<a@example.net>")
    return talk.cmd("RCPT TO:<user1@example.com>")


def test_psa_permit_network_skips_every_test(gate, screened, dns):
    screened.set("PSA:127.0.2.0/24", "permit")
    dns.set([("5.2.0.127.bl.test", "A", "127.0.0.2")])  # listed, yet permitted
    banner = "220 mx.example.test ESMTP smtpgate"
    assert greeting_from(gate, "127.0.2.5", banner) == [banner]


def test_psa_reject_network_is_dropped_with_521(gate, screened):
    screened.set("PSA:127.0.3.0/24", "reject")
    refusal = "521 5.3.2 Service currently unavailable"
    assert greeting_from(gate, "127.0.3.9", refusal) == [refusal]
    with Talk("127.0.0.1", gate.mx_port, source="127.0.3.9") as talk:
        assert greeting(talk) == [refusal]
        assert talk.closed()


def test_most_specific_psa_key_wins(gate, screened):
    screened.set("PSA:127.0.3.0/24", "reject")
    screened.set("PSA:127.0.3.7", "permit")
    banner = "220 mx.example.test ESMTP smtpgate"
    assert greeting_from(gate, "127.0.3.7", banner) == [banner]
    assert greeting_from(gate, "127.0.3.8", "521 5.3.2 Service currently unavailable")[-1] \
        .startswith("521")


def test_pregreet_talker_is_rejected_at_rcpt_and_logged(gate, screened):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.90") as talk:
        teaser = talk.file.readline()
        assert teaser.startswith(b"220-")
        talk.send(b"EHLO impatient.example.test\r\n")  # before the final 220
        assert greeting(talk) == ["220 mx.example.test ESMTP smtpgate"]
        code, text = talk.reply()  # the EHLO sent early is still answered
        assert code == 250
        talk.cmd("MAIL FROM:<a@example.net>")
        code, text = untag(talk.cmd("RCPT TO:<user1@example.com>"))
        assert (code, text) == (550, "550 5.5.1 Protocol error")
        gate.wait_for_log(r"PREGREET 29 after \S+ from \[127\.0\.0\.90\]:\d+: EHLO impatient")


def test_patient_client_passes_and_is_remembered(gate, screened):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.91") as talk:
        assert greeting(talk) == ["220-mx.example.test ESMTP smtpgate",
                                  "220 mx.example.test ESMTP smtpgate"]
        code, _ = reaches_rcpt(talk)
        assert code == 250
        talk.cmd("QUIT")
    # the passes are written with the session's end, in the next release batch
    released(screened)
    assert screened.hget("smtpgate:psc:127.0.0.91", "pregreet")
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.91") as again:
        assert greeting(again) == ["220 mx.example.test ESMTP smtpgate"]  # cache hit: no wait


def test_with_every_test_off_a_client_seen_before_is_pass_old(start_gate, screened):
    """postscreen with no test before the banner: PASS NEW once, then PASS OLD while the
    client's cache entry lasts (make run's setting: no greet wait, no DNSBL)."""
    bare = start_gate()  # SMTPGATE_GREET_WAIT=0 and no DNSBL sites
    try:
        for _ in range(2):
            with Talk("127.0.0.1", bare.mx_port, source="127.0.0.92") as talk:
                assert greeting(talk) == ["220 mx.example.test ESMTP smtpgate"]
                talk.cmd("QUIT")
            released(screened)  # the pass is written with the session's end
        bare.wait_for_log(r"PASS OLD \[127\.0\.0\.92\]")
        log = bare.log_text()
        assert log.count("PASS NEW [127.0.0.92]") == 1, log
        assert screened.hget("smtpgate:psc:127.0.0.92", "no_tests")
    finally:
        bare.stop()


def test_dnsbl_listed_client_is_dropped_early(gate, screened, dns):
    """...and without a PTR lookup: FCrDNS waits until screening has let a client through."""
    dns.set([("5.4.0.127.bl.test", "A", "127.0.0.2")])
    ptr_queries = dns.queries("PTR")
    with Talk("127.0.0.1", gate.mx_port, source="127.0.4.5") as talk:
        lines = greeting(talk)
        assert lines[-1] == ("521 5.7.1 Service unavailable; client [127.0.4.5] "
                             "blocked using bl.test")
        assert talk.closed()
    assert dns.queries("PTR") == ptr_queries
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.89") as passed:  # let through: looked up
        assert greeting(passed)[-1] == "220 mx.example.test ESMTP smtpgate"
        passed.cmd("QUIT")
    assert dns.queries("PTR") > ptr_queries


def test_dnsbl_drop_logs_the_rank_and_the_refusal(gate, screened, dns):
    """connect, the rank and the sites that listed the client (postscreen's "DNSBL rank N"
    line), the refusal (the reply fail2ban reads, naming the zone) and disconnect: four
    lines, nothing more."""
    dns.set([("6.5.0.127.bl.test", "A", "127.0.0.2")])
    with Talk("127.0.0.1", gate.mx_port, source="127.0.5.6") as talk:
        refusal = talk.file.readline().decode().rstrip("\r\n")
        assert talk.closed()
    session = refusal.rpartition("session=")[2]
    assert refusal == ("521 5.7.1 Service unavailable; client [127.0.5.6] blocked using "
                       f"bl.test; session={session}")
    gate.wait_for_log(r"disconnect from unknown\[127\.0\.5\.6\]")
    lines = [line.partition(": ")[2] for line in gate.log_text().splitlines()
             if "127.0.5.6" in line]
    assert len(lines) == 4, lines
    assert lines[0] == (f"connect from unknown[127.0.5.6] to [127.0.0.1]:{gate.mx_port} "
                        f"session={session}")
    assert lines[1].startswith("dnsbl fail: ") and "rank" in lines[1] and "bl.test" in lines[1]
    assert lines[2] == (
        "NOQUEUE: reject: CONNECT from unknown[127.0.5.6]: 521 5.7.1 Service unavailable; "
        f"client [127.0.5.6] blocked using bl.test; session={session}; proto=SMTP")
    assert lines[3] == f"disconnect from unknown[127.0.5.6] commands=0 session={session}"


def test_dnsbl_allowlisted_client_skips_the_wait(gate, screened, dns):
    dns.set([("6.4.0.127.wl.test", "A", "127.0.0.2")])
    with Talk("127.0.0.1", gate.mx_port, source="127.0.4.6") as talk:
        lines = greeting(talk)
        assert lines[-1] == "220 mx.example.test ESMTP smtpgate"
    released(screened)  # the pass is written with the session's end
    with Talk("127.0.0.1", gate.mx_port, source="127.0.4.6") as again:
        assert greeting(again) == ["220 mx.example.test ESMTP smtpgate"]


@pytest.mark.parametrize("answer", ["127.255.255.254", "127.255.255.252", "10.0.0.2"],
                         ids=["spamhaus-254", "spamhaus-252", "outside-127"])
def test_dnsbl_error_answers_are_never_a_listing(gate, screened, dns, answer):
    dns.set([("7.4.0.127.bl.test", "A", answer)])
    with Talk("127.0.0.1", gate.mx_port, source="127.0.4.7") as talk:
        assert greeting(talk)[-1] == "220 mx.example.test ESMTP smtpgate"


def test_erroring_and_timing_out_zones_do_not_block(gate, screened, dns):
    """broken.test answers SERVFAIL and slow.test never answers: neither lists anyone."""
    with Talk("127.0.0.1", gate.mx_port, source="127.0.4.8") as talk:
        assert greeting(talk)[-1] == "220 mx.example.test ESMTP smtpgate"


def test_non_smtp_command_is_dropped(gate, screened):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.92") as talk:
        greeting(talk)
        talk.send(b"GET / HTTP/1.0\r\n")
        assert untag(talk.reply()) == (521, "521 5.7.0 Error: I can break rules, too. Goodbye.")
        assert talk.closed()


def test_pipelining_before_ehlo_is_enforced_at_rcpt(gate, screened):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.93") as talk:
        greeting(talk)
        talk.send(b"HELO client.example.test\r\nMAIL FROM:<a@example.net>\r\n")
        assert talk.reply()[0] == 250
        assert talk.reply()[0] == 250
        assert untag(talk.cmd("RCPT TO:<user1@example.com>")) == (550, "550 5.5.1 Protocol error")


def test_per_client_connection_limit(gate, screened):
    screened.set("PSA:127.0.5.0/24", "permit")  # no greet wait: the limit is what we test
    greeting_from(gate, "127.0.5.9", "220 mx.example.test ESMTP smtpgate")
    with contextlib.ExitStack() as stack:
        talks = [stack.enter_context(Talk("127.0.0.1", gate.mx_port, source="127.0.5.1"))
                 for _ in range(3)]
        # the three are counted in the order their Redis calls land, not the order of connect
        finals = sorted(greeting(talk)[-1] for talk in talks)
        assert finals[0].startswith("220 ") and finals[1].startswith("220 ")
        assert finals[2] == "421 4.7.0 Error: too many connections from 127.0.5.1"
        other = stack.enter_context(Talk("127.0.0.1", gate.mx_port, source="127.0.5.2"))
        assert greeting(other)[-1].startswith("220 ")


def test_global_connection_cap(start_gate, screened):
    small = start_gate(SMTPGATE_CONNECTION_LIMIT="1")
    try:
        screened.set("PSA:127.0.6.0/24", "permit")
        greeting_from(small, "127.0.6.9", "220 mx.example.test ESMTP smtpgate")
        released(screened)  # the probe's count goes in the next release batch
        with Talk("127.0.0.1", small.mx_port, source="127.0.6.1") as first:
            assert greeting(first)[-1].startswith("220 ")
            with Talk("127.0.0.1", small.mx_port, source="127.0.6.2") as second:
                assert greeting(second) == ["421 4.3.2 All server ports are busy"]
    finally:
        small.stop()


def test_redis_down_at_connect_is_421_not_a_pass(start_gate, screened, redis_server):
    gate = start_gate()
    redis_server.stop()
    try:
        with Talk("127.0.0.1", gate.mx_port, source="127.0.0.94") as talk:
            lines = greeting(talk)
            assert lines and lines[-1].startswith("421 4.3.0"), lines
    finally:
        redis_server.start()
        gate.stop()


def test_raw_socket_sees_no_traceback_on_garbage(gate, screened):
    data = b""
    with socket.create_connection(("127.0.0.1", gate.mx_port), timeout=10,
                                  source_address=("127.0.0.95", 0)) as sock:
        sock.sendall(b"\x00\xff\xfe garbage \r\n" * 3 + b"QUIT\r\n")
        while chunk := sock.recv(4096):
            data += chunk
    assert b"Traceback" not in data
    assert data.startswith(b"220-")


def test_greet_wait_is_shorter_under_stress(start_gate, screened):
    """postscreen's ${stress?{2}:{6}}s: near the connection cap the wait shrinks."""
    busy = start_gate(SMTPGATE_GREET_WAIT="30", SMTPGATE_GREET_WAIT_UNDER_STRESS="0.2",
                      SMTPGATE_CONNECTION_LIMIT="5")
    try:
        screened.set("PSA:127.0.10.0/24", "permit")
        greeting_from(busy, "127.0.10.9", "220 mx.example.test ESMTP smtpgate")
        with contextlib.ExitStack() as stack:
            for n in (1, 2, 3):
                greeting(stack.enter_context(
                    Talk("127.0.0.1", busy.mx_port, source=f"127.0.10.{n}")))
            # 4 of 5 in flight: this client waits 0.2 s, well inside the 10 s read timeout
            talk = stack.enter_context(
                Talk("127.0.0.1", busy.mx_port, source="127.0.0.96", timeout=10))
            assert greeting(talk) == ["220-mx.example.test ESMTP smtpgate",
                                      "220 mx.example.test ESMTP smtpgate"]
    finally:
        busy.stop()
