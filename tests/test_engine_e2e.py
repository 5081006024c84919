"""The engine's promises through the real chain: whole messages only, Postfix's last word."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest
from services.smtp_talk import SESSION_TAG, Talk
from services.world import gate_in_world

from smtpgate.relay.pool import RelayBusy, TransactionLimit

pytestmark = pytest.mark.slow


def token() -> str:
    return f"en-{uuid.uuid4().hex}"


def has(text: str):
    return lambda raw: text.encode() in raw


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    yield from gate_in_world(start_gate, redis_server, dns_server)


def envelope(talk: Talk, *recipients: str, mail: str = "MAIL FROM:<a@example.net>") -> None:
    talk.banner()
    assert talk.cmd("EHLO client.example.test")[0] == 250
    assert talk.cmd(mail)[0] == 250
    for rcpt in recipients:
        assert talk.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert talk.cmd("DATA")[0] == 354


def test_a_slow_client_holds_no_postfix_process(gate, postfix_server, dovecot_server):
    slow_mark, fast_mark = token(), token()
    since = postfix_server.log_mark()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.91", timeout=30) as slow:
        envelope(slow, "user1@example.com")
        slow.send(f"Subject: {slow_mark}\r\n\r\nfirst half\r\n".encode())
        # while the slow client is mid-message, another one delivers
        with Talk("127.0.0.1", gate.mx_port, source="127.0.0.92", timeout=30) as fast:
            envelope(fast, "user1@example.com")
            fast.send(f"Subject: {fast_mark}\r\n\r\nfast\r\n.\r\n".encode())
            assert fast.reply()[0] == 250
        postfix_server.wait_for_log(r"client=host92\.clients", since=since)
        assert "127.0.0.91" not in postfix_server.log_text()[since:]
        slow.send(b"second half\r\n.\r\n")
        code, text = slow.reply()
        assert code == 250, text
    message = dovecot_server.wait_for_message("user1@example.com", has(slow_mark))
    assert b"first half\nsecond half" in message
    # smtpgate's line and Postfix's share the queue id from Postfix's 250
    queue_id = re.search(r"queued as ([0-9A-F]+)", text).group(1)
    gate.wait_for_log(rf"{queue_id}: client=host91\S+\[127\.0\.0\.91\], "
                      rf"from=<a@example\.net>, nrcpt=1, size=\d+")
    assert f"{queue_id}: client=host91" in postfix_server.log_text()


def test_a_client_vanishing_mid_data_leaves_nothing_at_postfix(gate, postfix_server):
    since = postfix_server.log_mark()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.93") as talk:
        envelope(talk, "user1@example.com")
        talk.send(b"Subject: gone\r\n\r\nhalf a message\r\n")
    gate.wait_for_log(r"lost connection after DATA \(\d+ bytes\) from host93")
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.94") as marker:
        envelope(marker, "user1@example.com")
        marker.send(b"Subject: marker\r\n\r\nx\r\n.\r\n")
        assert marker.reply()[0] == 250
    postfix_server.wait_for_log(r"client=host94\.clients", since=since)
    assert "127.0.0.93" not in postfix_server.log_text()[since:]


def test_a_recipient_postfix_refuses_fails_the_whole_message(gate, redis_server, postfix_server,
                                                             dovecot_server):
    # smtpgate's tables know ghost@, Postfix's do not: the two disagree at relay time
    redis_server.client().set("VALI:ghost@example.com", "ghost@example.com")
    mark = token()
    try:
        with Talk("127.0.0.1", gate.mx_port, source="127.0.0.95") as talk:
            envelope(talk, "user1@example.com", "ghost@example.com")
            talk.send(f"Subject: {mark}\r\n\r\nto two\r\n.\r\n".encode())
            code, text = talk.reply()
    finally:
        redis_server.client().delete("VALI:ghost@example.com")
    assert code == 550 and "ghost@example.com" in text, text  # Postfix's own words
    assert SESSION_TAG.search(text), text  # ... ending with the session id, like smtpgate's
    assert not any(mark.encode() in raw for raw in dovecot_server.messages("user1@example.com"))


@pytest.mark.parametrize(("parameter", "reply"), [
    ("RET=BOGUS", "501 5.5.4 Bad RET parameter syntax"),
    ("BODY=BINARYMIME", "555 5.5.4 Unsupported option: BODY=BINARYMIME"),
    ("ENVID=bad+zz", "501 5.5.4 Bad ENVID parameter syntax"),
])
def test_a_mail_parameter_postfix_would_refuse_is_refused_at_mail(gate, postfix_server,
                                                                  dovecot_server, parameter,
                                                                  reply):
    mark = token()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.96") as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        code, text = talk.cmd(f"MAIL FROM:<a@example.net> {parameter}")
        assert f"{code} {text}".startswith(reply) or text.startswith(reply), text
        # still in step: the next transaction goes through
        assert talk.cmd("MAIL FROM:<a@example.net> RET=HDRS ENVID=ok+2B1")[0] == 250
        assert talk.cmd("RCPT TO:<user1@example.com> NOTIFY=FAILURE")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        talk.send(f"Subject: {mark}\r\n\r\nx\r\n.\r\n".encode())
        assert talk.reply()[0] == 250
    dovecot_server.wait_for_message("user1@example.com", has(mark))


async def test_transaction_limit_hands_slots_over_in_order_and_refuses_after_the_wait():
    limit = TransactionLimit(1, wait=0.2)
    order: list[str] = []
    release = asyncio.Event()

    async def holder():
        async with limit.slot():
            order.append("first in")
            await release.wait()
        order.append("first out")

    async def second():
        async with limit.slot():
            order.append("second in")

    first = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    with pytest.raises(RelayBusy):  # nobody releases within the wait
        async with limit.slot():
            pass
    waiting = asyncio.ensure_future(second())
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, waiting)
    assert order == ["first in", "first out", "second in"]
    assert limit.in_flight == 0


def test_starttls_is_logged_with_version_and_cipher_as_postfix_does(gate):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.87") as talk:
        talk.banner()
        assert "STARTTLS" in talk.cmd("EHLO client.example.test")[1]
        assert talk.cmd("STARTTLS")[0] == 220
        talk.starttls()
        version, cipher = talk.sock.version(), talk.sock.cipher()[0]
        assert talk.cmd("EHLO client.example.test")[0] == 250
        talk.cmd("QUIT")
    line = gate.wait_for_log(
        r"Anonymous TLS connection established from \S+\[127\.0\.0\.87\]: (\S+) with cipher "
        r"(\S+) \((\d+)/(\d+) bits\)")
    assert (line.group(1), line.group(2)) == (version, cipher)
    gate.wait_for_log(r"disconnect from \S+\[127\.0\.0\.87\] ehlo=2 starttls=1 quit=1 "
                      r"commands=4")


async def test_a_slot_handed_over_to_a_cancelled_waiter_is_passed_on():
    limit = TransactionLimit(1, wait=5.0)
    release, entered = asyncio.Event(), asyncio.Event()

    async def holder():
        async with limit.slot():
            entered.set()
            await release.wait()

    async def waiter():
        async with limit.slot():
            pass

    first = asyncio.ensure_future(holder())
    await entered.wait()
    second = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)  # the second now waits for the slot
    release.set()
    await asyncio.sleep(0)  # the holder hands its slot over ...
    second.cancel()  # ... and the waiter is cancelled before it could use it
    await asyncio.gather(first, second, return_exceptions=True)
    assert limit.in_flight == 0  # whether the waiter ran or not, no slot is lost
    async with limit.slot():  # and the slot can be taken again at once
        assert limit.in_flight == 1


async def test_a_free_slot_is_taken_and_given_back_also_when_the_block_fails():
    limit = TransactionLimit(2, wait=0.2)
    async with limit.slot():
        assert limit.in_flight == 1
        async with limit.slot():
            assert limit.in_flight == 2
        assert limit.in_flight == 1
    assert limit.in_flight == 0
    with pytest.raises(KeyError):  # the block's exception passes through, its slot returned
        async with limit.slot():
            raise KeyError("x")
    assert limit.in_flight == 0


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_the_message_carries_how_it_arrived(gate, dovecot_server, tls):
    mark = token()
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.85", timeout=30) as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        if tls:
            assert talk.cmd("STARTTLS")[0] == 220
            talk.starttls()
            talk.cmd("EHLO client.example.test")
            cipher = talk.sock.cipher()[0]
        talk.cmd("MAIL FROM:<a@example.net>")
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        talk.send(f"Subject: {mark}\r\n\r\nhow\r\n.\r\n".encode())
        assert talk.reply()[0] == 250
    message = dovecot_server.wait_for_message("user1@example.com", has(mark)).decode()
    ours = re.search(r"Received: from client\.example\.test \(\S+ \[127\.0\.0\.85\]\)\n"
                     r"(\t\(using (\S+) with cipher (\S+) \(\d+/\d+ bits\)\)\n)?"
                     r"\tby mx\.example\.test \(smtpgate\) with (\S+)\n"
                     r"\tfor <user1@example\.com>;", message)
    assert ours, message[:600]
    if tls:
        assert (ours.group(3), ours.group(4)) == (cipher, "ESMTPS")
    else:
        assert (ours.group(1), ours.group(4)) == (None, "ESMTP")
