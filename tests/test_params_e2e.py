"""MAIL and RCPT lines answered as the real Postfix answers them: the same lines, side by side.

Each line goes to the harness's Postfix (directly, as a trusted 127.0.0.1 client) and to
smtpgate in front of it, each on a connection of its own; the replies must be the same,
code, enhanced code and text (smtpgate's refusals end with the session id, which is taken
off first). Lines that differ on purpose are listed with both answers and why.
"""

from __future__ import annotations

import pytest
from services.smtp_talk import Talk, untag
from services.world import gate_in_world

pytestmark = pytest.mark.slow

SENDER = "a@example.net"

MAIL_LINES = [
    f"MAIL FROM:<{SENDER}> SIZE=1\x1fBODY=7BIT",
    f"MAIL FROM:<{SENDER}> SIZE=1\xa0BODY=7BIT",
    f"MAIL FROM:<{SENDER}> BODY=7BIT\xa0SMTPUTF8",
    f"MAIL FROM:<{SENDER}> SIZE=1\tBODY=7BIT",
    f"MAIL FROM:<{SENDER}> SIZE=1\x0bBODY=7BIT",
    f"MAIL FROM:<{SENDER}> SIZE=1 SIZE=2",
    f"MAIL FROM:<{SENDER}> SIZE",
    f"MAIL FROM:<{SENDER}> SIZE=",
    f"MAIL FROM:<{SENDER}> SIZE=99999999999",
    f"MAIL FROM:<{SENDER}> size=100 body=8bitmime",
    f"MAIL FROM:<{SENDER}> BODY=BINARYMIME",
    f"MAIL FROM:<{SENDER}> RET=FULL RET=HDRS",
    f"MAIL FROM:<{SENDER}> ENVID=" + "a" * 200,
    f"MAIL FROM:<{SENDER}> ENVID=",
    f"MAIL FROM:<{SENDER}> ENVID=a ENVID=b",
    f"MAIL FROM:<{SENDER}> ENVID=a+zz",
    f"MAIL FROM:<{SENDER}> SMTPUTF8",
    f"MAIL FROM:<{SENDER}> SMTPUTF8=yes",
    f"MAIL FROM:<{SENDER}> XSMTPUTF8",
    f"MAIL FROM:<{SENDER}> FOO=bar",
    f"MAIL FROM:<{SENDER}> AUTH=<>",
    f"MAIL FROM:<{SENDER}> AUTH=",
    f"MAIL FROM:<{SENDER}> AUTH=x+2By",
    f"MAIL FROM:<{SENDER}> AUTH=a AUTH=b",
    f"MAIL FROM:<{SENDER}>SIZE=1",
    f"MAIL FROM:<{SENDER}> SIZE=1\x1f",  # a trailing \x1c-\x1f or NBSP is part of the word
    f"MAIL FROM:<{SENDER}> BODY=7BIT\xa0",
    f"MAIL\tFROM:<{SENDER}>",  # the verb ends at any blank, a tab too
    "MAIL FROM:<a@exämple.net> ENVID=SMTPUTF8",
    "MAIL FROM:<a@exämple.net> SMTPUTF8",
    "MAIL FROM:<jörg@example.net> SMTPUTF8",
]

RCPT_LINES = [
    "RCPT TO:<user1@example.com> NOTIFY=DELAY,DELAY",
    "RCPT TO:<user1@example.com> NOTIFY=DELAY NOTIFY=FAILURE",
    "RCPT TO:<user1@example.com> NOTIFY=",
    "RCPT TO:<user1@example.com> NOTIFY=NEVER,DELAY",
    "RCPT TO:<user1@example.com> ORCPT=rfc822;",
    "RCPT TO:<user1@example.com> ORCPT=;a",
    "RCPT TO:<user1@example.com> ORCPT=x;a ORCPT=x;b",
    "RCPT TO:<user1@example.com> ORCPT=utf-8;j\\x{F6}rg@example.com",
    "RCPT TO:<user1@example.com> NOTIFY=NEVER\x1fXFOO",
]

# Refused by both, in other words on purpose: Postfix's default (strict_smtputf8 = no) takes a
# non-ASCII local part without SMTPUTF8; smtpgate answers as Postfix does with
# strict_smtputf8 = yes, since the address reaches checks and logs that expect the declaration.
# And a parameter word with a control character in it is shown with "?" for it (Postfix's
# printable(), which Postfix applies to its logs but not to this reply): a reply stays text.
DIFFERENT = {
    f"MAIL FROM:<{SENDER}> BODY=7BIT\x1cSMTPUTF8": (
        "555 5.5.4 Unsupported option: BODY=7BIT\x1cSMTPUTF8",
        "555 5.5.4 Unsupported option: BODY=7BIT?SMTPUTF8"),
    "MAIL FROM:<jörg@example.net>": ("250 2.1.0 Ok",
                                     "553 5.6.7 Must declare SMTPUTF8 to send unicode address"),
}


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    yield from gate_in_world(start_gate, redis_server, dns_server)


def answer(port: int, source: str, line: str, before: tuple[str, ...] = (),
           tagged: bool = True) -> str:
    with Talk("127.0.0.1", port, source=source) as talk:
        talk.banner()
        assert talk.cmd("EHLO client.example.test")[0] == 250
        for earlier in before:
            assert talk.cmd(earlier)[0] == 250, earlier
        reply = talk.cmd(line.encode())
        talk.cmd("QUIT")
        return untag(reply)[1] if tagged else reply[1]


@pytest.mark.parametrize("line", MAIL_LINES, ids=repr)
def test_mail_line_answered_as_postfix_does(gate, postfix_server, line):
    postfix = answer(postfix_server.port, "127.0.0.1", line, tagged=False)
    smtpgate = answer(gate.mx_port, "127.0.0.96", line)
    assert smtpgate == postfix, f"{line!r}: Postfix {postfix!r}, smtpgate {smtpgate!r}"


@pytest.mark.parametrize("line", RCPT_LINES, ids=repr)
def test_rcpt_line_answered_as_postfix_does(gate, postfix_server, line):
    mail = (f"MAIL FROM:<{SENDER}>",)
    postfix = answer(postfix_server.port, "127.0.0.1", line, mail, tagged=False)
    smtpgate = answer(gate.mx_port, "127.0.0.96", line, mail)
    assert smtpgate == postfix, f"{line!r}: Postfix {postfix!r}, smtpgate {smtpgate!r}"


@pytest.mark.parametrize("line", list(DIFFERENT), ids=repr)
def test_lines_answered_otherwise_on_purpose(gate, postfix_server, line):
    postfix, smtpgate = DIFFERENT[line]
    assert answer(postfix_server.port, "127.0.0.1", line, tagged=False) == postfix
    assert answer(gate.mx_port, "127.0.0.96", line) == smtpgate
