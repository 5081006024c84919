"""What one session costs Redis: round trips and commands, counted by the real redis-server.

Each case runs a few sessions through a real `smtpgate serve` and reads Redis's own
figures before and after (INFO stats total_reads_processed: one read per round trip of
a client; INFO commandstats: every command, those run inside scripts too), less what the
test itself asked. A change that adds a round trip to a session shows here, not in a
benchmark read weeks later. The figures are printed (pytest -s) for the benchmark notes.

The round trips of a first contact: the connect script (counts, rate and the screening
cache together), then the end of the session (its release and what screening found, one
pipeline shared with the sessions that ended at the same time). A refused session adds
its evidence record (smtpgate.lookups.evidence, batched likewise).
"""

from __future__ import annotations

import time

import pytest
from services.smtp_talk import Talk, untag

from smtpgate.lookups import keys

pytestmark = pytest.mark.slow

SESSIONS = 3  # per case, each from its own address
OWN = ("cmdstat_info", "cmdstat_exists", "cmdstat_keys", "cmdstat_ping")


@pytest.fixture(scope="module")
def gate(start_gate):
    process = start_gate(SMTPGATE_GREET_WAIT="0.3", SMTPGATE_DNSBL_SITES="bl.test=127.0.0.2")
    yield process
    process.stop()


class Traffic:
    """Redis's figures around a block, less the test's own reads and commands."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self.polls = 0

    def poll(self, call):
        self.polls += 1
        return call()

    def __enter__(self) -> Traffic:
        self.before = self.redis.info("commandstats")
        self.reads = self.redis.info("stats")["total_reads_processed"]  # counts its own read
        self.polls = 0
        return self

    def settle(self, records: int) -> None:
        """Wait until every session has been released and `records` evidence records
        (or their aliases) are written: everything the sessions will ever send."""
        deadline = time.monotonic() + 10
        while (self.poll(lambda: self.redis.exists(keys.COUNT_ALL))
               or len(self.poll(lambda: self.redis.keys("smtpgate:session:*"))) < records):
            assert time.monotonic() < deadline, "the sessions' ends never reached Redis"
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        after = self.poll(lambda: self.redis.info("commandstats"))
        reads = self.poll(lambda: self.redis.info("stats"))["total_reads_processed"]
        delta = {name: stats["calls"] - self.before.get(name, {}).get("calls", 0)
                 for name, stats in after.items()}
        heartbeats = delta.get("cmdstat_ping", 0)  # the table cache's, on its own connection
        self.round_trips = reads - self.reads - self.polls - heartbeats
        self.commands = {name.removeprefix("cmdstat_"): calls for name, calls in delta.items()
                         if calls and name not in OWN}

    def per_session(self) -> tuple[float, float]:
        return self.round_trips / SESSIONS, sum(self.commands.values()) / SESSIONS


def accepted(gate, source: str, rcpt: str = "user1@example.com") -> tuple[int, str]:
    with Talk("127.0.0.1", gate.mx_port, source=source) as talk:
        assert talk.banner()[0] == 220  # the greet wait's teaser and the banner, one reply
        assert talk.cmd("EHLO client.example.test")[0] == 250
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        code, text = untag(talk.cmd(f"RCPT TO:<{rcpt}>"))
        if code == 250:
            assert talk.cmd("DATA")[0] == 354
            assert talk.cmd(b"Subject: counted\r\n\r\nhello\r\n.")[0] == 250
        talk.cmd("QUIT")
    return code, text


def refused_at_connect(gate, source: str) -> str:
    with Talk("127.0.0.1", gate.mx_port, source=source) as talk:
        return untag(talk.banner()[1].rsplit("\n", 1)[-1])  # the last line: the verdict


def report(case: str, traffic: Traffic) -> tuple[float, float]:
    trips, commands = traffic.per_session()
    print(f"\n{case}: {trips:.2f} round trips, {commands:.1f} commands per session: "
          f"{dict(sorted(traffic.commands.items()))}")
    return trips, commands


def test_round_trips_and_commands_per_session(gate, world, dns, redis):
    """First contact and returning client: two round trips each, however many tests ran."""
    clients = [f"127.0.0.{n}" for n in range(70, 70 + SESSIONS)]  # forward-confirmed names
    # warm-up: the pool's connections opened, the scripts loaded, a refusal's record written
    assert accepted(gate, "127.0.0.99")[0] == 250
    assert accepted(gate, "127.0.0.98", rcpt="nobody@example.com")[0] == 550
    Traffic(redis).settle(1)
    with Traffic(redis) as first:
        for ip in clients:
            assert accepted(gate, ip)[0] == 250
            first.settle(0)
    with Traffic(redis) as returning:
        for ip in clients:
            assert accepted(gate, ip)[0] == 250
            returning.settle(0)
    unknown_clients = [f"127.0.0.{n}" for n in range(80, 80 + SESSIONS)]
    with Traffic(redis) as unknown:
        for n, ip in enumerate(unknown_clients, 1):
            code, text = accepted(gate, ip, rcpt="nobody@example.com")
            assert (code, text.split(":")[-1]) == (
                550, " User unknown in virtual mailbox table"), text
            unknown.settle(1 + n)
    dns.set([(f"{n}.5.0.127.bl.test", "A", "127.0.0.2") for n in range(1, SESSIONS + 1)])
    with Traffic(redis) as listed:
        for n in range(1, SESSIONS + 1):
            text = refused_at_connect(gate, f"127.0.5.{n}")
            assert text.endswith("blocked using bl.test"), text
            listed.settle(1 + SESSIONS + n)
    redis.set("PSA:127.0.6.0/24", "reject")
    deadline = time.monotonic() + 10  # the table cache hears of the key asynchronously
    while not refused_at_connect(gate, "127.0.6.99").startswith("521 5.3.2"):
        assert time.monotonic() < deadline, "the access list entry never took effect"
    time.sleep(0.2)  # that probe's own evidence record, out of the way
    records = len(redis.keys("smtpgate:session:*"))
    with Traffic(redis) as dropped:
        for n in range(1, SESSIONS + 1):
            assert refused_at_connect(gate, f"127.0.6.{n}").startswith("521 5.3.2")
            dropped.settle(records + n)

    trips = {case: report(case, traffic)[0] for case, traffic in (
        ("first contact, accepted", first), ("returning client, accepted", returning),
        ("first contact, unknown recipient", unknown), ("DNSBL refusal at connect", listed),
        ("access-list drop", dropped))}
    # the refresher's renewal (every 40 s) may fall into one case: half a round trip spare
    assert trips["first contact, accepted"] <= 2.4
    assert trips["returning client, accepted"] <= 2.4
    assert trips["first contact, unknown recipient"] <= 3.4  # and the evidence record
    assert trips["DNSBL refusal at connect"] <= 3.4  # and the evidence record
    assert trips["access-list drop"] <= 1.4  # the evidence record only: never counted
