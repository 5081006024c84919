"""A worker's spool budget through the real chain: 452 4.3.1 at MAIL, at DATA, after the dot."""

from __future__ import annotations

import time
import uuid

import pytest
from services.smtp_talk import Talk, untag
from services.world import gate_in_world

pytestmark = pytest.mark.slow

BUDGET = 300_000
STORAGE = (452, "452 4.3.1 Insufficient system storage")


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    yield from gate_in_world(start_gate, redis_server, dns_server,
                             SMTPGATE_SPOOL_BUDGET=str(BUDGET), SMTPGATE_WORKERS="1")


def hello(talk: Talk) -> None:
    talk.banner()
    assert talk.cmd("EHLO client.example.test")[0] == 250


def body(size: int, mark: str) -> bytes:
    line = b"x" * 998 + b"\r\n"
    return f"Subject: {mark}\r\n\r\n".encode() + line * (size // len(line))


def test_size_over_what_is_left_is_refused_at_mail(gate):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.97") as talk:
        hello(talk)
        assert untag(talk.cmd(f"MAIL FROM:<a@example.net> SIZE={BUDGET + 1}")) == STORAGE
        assert talk.cmd(f"MAIL FROM:<a@example.net> SIZE={BUDGET}")[0] == 250


def test_a_spent_budget_refuses_data_and_comes_back(gate, dovecot_server):
    mark = f"sb-{uuid.uuid4().hex}"
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.97") as big, \
            Talk("127.0.0.1", gate.mx_port, source="127.0.0.98") as small:
        hello(big)
        hello(small)
        assert big.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert big.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert big.cmd("DATA")[0] == 354
        big.send(body(BUDGET + 100_000, "too big for the budget"))  # no end yet
        # while the big message is on its way, the budget is spent: DATA gets 452
        deadline = time.monotonic() + 20
        while True:
            assert small.cmd("MAIL FROM:<a@example.net>")[0] == 250
            assert small.cmd("RCPT TO:<user1@example.com>")[0] == 250
            reply = small.cmd("DATA")
            if reply[0] == 452:
                assert untag(reply) == STORAGE
                break
            assert reply[0] == 354 and time.monotonic() < deadline, reply
            small.send(b"Subject: early\r\n\r\nx\r\n.\r\n")  # the big one not read yet
            assert small.reply()[0] == 250
        assert small.cmd("RSET")[0] == 250
        big.send(b".\r\n")  # read to its end, in step, refused for want of room
        assert untag(big.reply()) == STORAGE
        # given back: the next message goes through
        assert small.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert small.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert small.cmd("DATA")[0] == 354
        small.send(body(100_000, mark) + b".\r\n")
        assert small.reply()[0] == 250
        assert big.cmd("QUIT")[0] == 221
    dovecot_server.wait_for_message("user1@example.com", lambda raw: mark.encode() in raw)
    assert "spool budget of 300000 bytes spent; 452 4.3.1" in gate.log_text()
