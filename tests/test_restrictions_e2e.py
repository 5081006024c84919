"""Client, HELO, sender and recipient restrictions through the real server and real DNS.

Good clients (services.world) are 127.0.0.70-99 with forward-confirmed PTRs; the other
127.0.x.y addresses have whatever DNS story each test gives them. Rejections are reported
at RCPT (smtpd_delay_reject = yes), so each test walks to RCPT and reads that answer.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

import pytest
from services.ports import free_port
from services.smtp_talk import Talk, untag

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def socketmap_gate(start_gate, postfix_server, **env: str):
    """smtpgate, and Postfix reading the same Redis keys through smtpgate's socketmap."""
    process = start_gate(listeners=("mx", "socketmap"), **env)
    port = process.socketmap_port
    shipped = (Path(__file__).parent.parent / "conf/postfix/socketmap.cf").read_text()
    settings = dict(line.split(" = ", 1) for line in shipped.splitlines()
                    if " = " in line and not line.startswith("#"))
    try:
        with postfix_server.changed(**{k: v.replace(":10027:", f":{port}:")
                                       for k, v in settings.items()}):
            yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def gate(start_gate, postfix_server):
    with socketmap_gate(start_gate, postfix_server) as process:
        yield process


def rcpt(gate, source: str, helo: str = "client.example.test",
         sender: str = "a@example.net", to: str = "user1@example.com") -> tuple[int, str]:
    """The first refusal (without its session id, checked) or RCPT's 250."""
    with Talk("127.0.0.1", gate.mx_port, source=source) as talk:
        assert talk.banner()[0] == 220
        code, text = talk.cmd(f"EHLO {helo}")
        if code != 250:
            return untag((code, text))
        code, text = talk.cmd(f"MAIL FROM:<{sender}>")
        if code != 250:
            return untag((code, text))
        return untag(talk.cmd(f"RCPT TO:<{to}>"))


def rcpt_settled(gate, source: str, code: int, timeout: float = 5.0, **kw) -> tuple[int, str]:
    """rcpt(), retried until smtpgate's table cache has caught up with a key just written.

    Redis tells the cache about a change asynchronously, so a session that starts in the
    same millisecond may still see the old value; poll with a deadline instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = rcpt(gate, source, **kw)
        if result[0] == code or time.monotonic() > deadline:
            return result


# --- client: reject_unknown_client_hostname and REV -------------------------------------------

def test_client_without_ptr_is_deferred(gate, world):
    assert rcpt(gate, "127.0.7.1") == (
        450, "450 4.7.25 Client host rejected: cannot find your hostname, [127.0.7.1]")


def test_client_whose_ptr_does_not_confirm_is_deferred(gate, world, dns):
    dns.add_ptr("127.0.7.2", "liar.example.test")
    dns.set([("liar.example.test", "A", "127.0.9.9")])
    code, text = rcpt(gate, "127.0.7.2")
    assert code == 450 and "4.7.25" in text


def test_client_with_confirmed_ptr_passes(gate, world, dns):
    dns.add_ptr("127.0.7.3", "honest.example.test")
    dns.set([("honest.example.test", "A", "127.0.7.3")])
    assert rcpt(gate, "127.0.7.3")[0] == 250


def test_rev_permit_by_ip_or_network_excuses_missing_dns(gate, world):
    world.set("REV:127.0.7.0/28", "permit")
    assert rcpt_settled(gate, "127.0.7.4", 250)[0] == 250


def test_rev_permit_by_hostname(gate, world, dns):
    dns.add_ptr("127.0.7.20", "broken-forward.example.test")  # no A record
    world.set("REV:broken-forward.example.test", "permit")
    assert rcpt_settled(gate, "127.0.7.20", 250)[0] == 250


def test_rev_reject(gate, world):
    world.set("REV:127.0.0.71", "reject")
    code, text = rcpt_settled(gate, "127.0.0.71", 554)
    assert code == 554 and "Access denied" in text


# --- HELO -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("helo", "code", "text"), [
    ("nodots", 504, "504 5.5.2 <nodots>: Helo command rejected: need fully-qualified hostname"),
    ("bad_name!.example.test", 501,
     "501 5.5.2 <bad_name!.example.test>: Helo command rejected: Invalid name"),
    ("nx.example.test", 450, "450 4.7.1 <nx.example.test>: Helo command rejected: Host not found"),
    ("[127.0.0.300]", 501, "501 5.5.2 <[127.0.0.300]>: Helo command rejected: invalid ip address"),
], ids=["not-fqdn", "invalid", "unknown-host", "bad-literal"])
def test_bad_helo_is_rejected_at_rcpt(gate, world, helo, code, text):
    assert rcpt(gate, "127.0.0.72", helo=helo) == (code, text)


@pytest.mark.parametrize("helo", ["client.example.test", "[127.0.0.72]", "CLIENT.example.test"],
                         ids=["resolving-name", "address-literal", "any-case"])
def test_good_helo_passes(gate, world, helo):
    assert rcpt(gate, "127.0.0.72", helo=helo)[0] == 250


def test_hlo_permit_overrides(gate, world):
    world.set("HLO:nx.example.test", "permit")
    assert rcpt_settled(gate, "127.0.0.73", 250, helo="nx.example.test")[0] == 250


def test_hlo_reject(gate, world):
    world.set("HLO:client.example.test", "reject")
    code, text = rcpt_settled(gate, "127.0.0.73", 554)
    assert code == 554 and "Helo command rejected" in text


def test_helo_is_required(gate, world):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.74") as talk:
        talk.banner()
        assert untag(talk.cmd("MAIL FROM:<a@example.net>")) == (
            503, "503 5.5.1 Error: send HELO/EHLO first")


# --- destination and recipients -----------------------------------------------------------

@pytest.mark.parametrize("to", [
    "someone@elsewhere.example",
    "user1%elsewhere.example@example.com",
    "elsewhere.example!user1@example.com",
    "@relay.example:user1@example.com",
    '"user1@elsewhere.example"@example.com',
], ids=["foreign-domain", "percent-hack", "bang-path", "source-route", "quoted-at"])
def test_relay_attempts_never_relay(gate, world, to):
    code, text = rcpt(gate, "127.0.0.75", to=to)
    assert code == 554 and text.endswith("Relay access denied"), text


def test_recipient_must_be_fully_qualified(gate, world):
    code, text = rcpt(gate, "127.0.0.75", to="user1@localhost")
    assert code in (504, 554), text


def test_unknown_user_is_rejected_by_smtpgate(gate, world):
    assert rcpt(gate, "127.0.0.76", to="nobody@example.com") == (
        550, "550 5.1.1 <nobody@example.com>: Recipient address rejected: "
             "User unknown in virtual mailbox table")


def test_the_images_unknown_user_wording(start_gate, world):
    """show_user_unknown_table_name = no, as the docker-postfix-redis image's Postfix had."""
    quiet = start_gate(SMTPGATE_SHOW_USER_UNKNOWN_TABLE_NAME="no")
    try:
        assert rcpt(quiet, "127.0.0.76", to="nobody@example.com") == (
            550, "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown")
    finally:
        quiet.stop()


def test_alias_extension_and_catch_all_are_delivered(gate, world, dovecot_server, postfix_server):
    """smtpgate's RCPT rules and Postfix's (through the socketmap) agree, and mail arrives."""
    mark = f"rules-{uuid.uuid4().hex}"
    world.set("VALI:@example.com", "user2@example.com")
    for to in ("sales@example.com", "anything-at-all@example.com", "user1+tag@example.com"):
        with Talk("127.0.0.1", gate.mx_port, source="127.0.0.76") as talk:
            talk.banner()
            talk.cmd("EHLO client.example.test")
            talk.cmd("MAIL FROM:<a@example.net>")
            reply = talk.cmd(f"RCPT TO:<{to}>")
            assert reply[0] == 250, (to, reply, postfix_server.log_text()[-700:])
            assert talk.cmd("DATA")[0] == 354
            talk.send(f"Subject: {mark} {to}\r\n\r\nhello\r\n.\r\n".encode())
            assert talk.reply()[0] == 250
    for user, to in (("user1@example.com", "sales@example.com"),
                     ("user2@example.com", "sales@example.com"),
                     ("user1@example.com", "user1+tag@example.com"),
                     ("user2@example.com", "anything-at-all@example.com")):
        dovecot_server.wait_for_message(user, lambda raw, to=to: f"{mark} {to}".encode() in raw)


def test_recip_send_only_account(gate, world):
    world.set("RECIP:user2@example.com", "REJECT send-only account")
    assert rcpt_settled(gate, "127.0.0.77", 554, to="user2@example.com") == (
        554, "554 5.7.1 <user2@example.com>: Recipient address rejected: send-only account")
    assert rcpt(gate, "127.0.0.77", to="user1@example.com")[0] == 250


def test_recip_defer_text(gate, world):
    world.set("RECIP:user2@example.com", "450 4.2.1 mailbox being moved")
    assert rcpt_settled(gate, "127.0.0.77", 450, to="user2@example.com") == (
        450, "450 4.2.1 <user2@example.com>: Recipient address rejected: mailbox being moved")


# --- sender ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("sender", "code"), [
    ("a@nodots", 504), ("no-at-sign", 504), ("a@@example.net", 501)],
    ids=["non-fqdn-domain", "no-domain", "malformed"])
def test_sender_syntax_and_fqdn(gate, world, sender, code):
    result = rcpt(gate, "127.0.0.78", sender=sender)
    assert result[0] == code, result


def test_missing_angle_brackets_are_refused(gate, world):
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.78") as talk:
        talk.banner()
        talk.cmd("EHLO client.example.test")
        code, text = talk.cmd("MAIL FROM:a@example.net")
        assert code == 501 and text.startswith("501 5.1.7"), text


# --- DNS trouble is never a 5xx and never an accept -------------------------------------------

def test_dns_server_unreachable_gives_4xx(start_gate, world):
    blind = start_gate(SMTPGATE_NAMESERVERS=f"127.0.0.1:{free_port(udp=True)}",
                       SMTPGATE_DNS_TIMEOUT="0.5")
    try:
        code, text = rcpt(blind, "127.0.0.79")
        assert 400 <= code < 500, text
    finally:
        blind.stop()
