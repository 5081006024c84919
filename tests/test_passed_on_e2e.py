"""A multi-line refusal from the real Postfix reaches the client as one reply, tagged once."""

from __future__ import annotations

import re

import pytest
from services.smtp_talk import SESSION_TAG, Talk
from services.world import gate_in_world

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server, postfix_server):
    # Postfix's reject footer makes its refusals three lines long. Set before the gate starts:
    # the connections smtpgate greets ahead of need must reach smtpd processes that have it
    # (a reload leaves a connected smtpd with the old settings until its session ends).
    with postfix_server.changed(smtpd_reject_footer=r"second line\nthird line"):
        yield from gate_in_world(start_gate, redis_server, dns_server)


def test_postfix_multi_line_refusal_is_one_reply_with_the_session_id_at_its_end(
        gate, redis_server):
    # smtpgate's tables know ghost@, Postfix's do not: Postfix refuses it at relay time
    redis_server.client().set("VALI:ghost@example.com", "ghost@example.com")
    try:
        with Talk("127.0.0.1", gate.mx_port, source="127.0.0.94") as talk:
            talk.banner()
            assert talk.cmd("EHLO client.example.test")[0] == 250
            assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
            assert talk.cmd("RCPT TO:<ghost@example.com>")[0] == 250
            assert talk.cmd("DATA")[0] == 354
            talk.send(b"Subject: footer\r\n\r\nx\r\n.\r\n")
            code, text = talk.reply()
            assert talk.cmd("NOOP")[0] == 250  # nothing else was left to read
    finally:
        redis_server.client().delete("VALI:ghost@example.com")
    lines = text.split("\n")
    assert code == 550 and len(lines) == 3, text
    assert [line[:4] for line in lines] == ["550-", "550-", "550 "], text
    assert lines[1].endswith("second line") and re.search(r"third line; session=\w+$", lines[2])
    assert text.count("session=") == 1 and SESSION_TAG.search(text)
