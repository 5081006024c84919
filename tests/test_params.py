"""MAIL and RCPT parameters refused at once, with Postfix 3.7's words, as labelled cases.

Each row is what Postfix's smtpd.c (mail_cmd, rcpt_cmd) answers to the same words;
tests/test_params_e2e.py sends such lines to the real Postfix and to smtpgate side by side.
"""

from __future__ import annotations

import pytest

from smtpgate.smtp.params import mail_params_reply, rcpt_params_reply, split_words

MAIL = [
    ("nothing", "", None),
    ("size-ok", "SIZE=1000", None),
    ("size-twice-last-counts", "SIZE=5000 SIZE=1000", None),
    ("size-too-big", "SIZE=5000", "552 5.3.4 Message size exceeds fixed limit"),
    ("size-not-a-number", "SIZE=x", "501 5.5.4 Bad message size syntax"),
    ("size-empty", "SIZE=", "501 5.5.4 Bad message size syntax"),
    ("size-without-value", "SIZE", "555 5.5.4 Unsupported option: SIZE"),
    ("size-glued-by-x1f", "SIZE=1\x1fBODY=7BIT", "501 5.5.4 Bad message size syntax"),
    ("size-glued-by-nbsp", "SIZE=1\xa0BODY=7BIT", "501 5.5.4 Bad message size syntax"),
    ("size-unicode-digits", "SIZE=\u0661", "501 5.5.4 Bad message size syntax"),
    ("size-overflow", "SIZE=" + "9" * 30,
     "552 5.3.4 Message size exceeds file system imposed limit"),
    ("split-at-tab-and-vt", "SIZE=1\tBODY=7BIT\x0bSMTPUTF8", None),
    ("body-8bitmime", "BODY=8bitmime", None),
    ("body-binarymime", "BODY=BINARYMIME", "555 5.5.4 Unsupported option: BODY=BINARYMIME"),
    ("body-without-value", "BODY", "555 5.5.4 Unsupported option: BODY"),
    ("ret-full", "RET=FULL", None),
    ("ret-twice", "RET=FULL RET=HDRS", "501 5.5.4 Bad RET parameter syntax"),
    ("ret-bogus", "RET=BOGUS", "501 5.5.4 Bad RET parameter syntax"),
    ("envid-xtext", "ENVID=abc+2Bdef", None),
    ("envid-long", "ENVID=" + "a" * 300, None),
    ("envid-bad-xtext", "ENVID=abc+zz", "501 5.5.4 Bad ENVID parameter syntax"),
    ("envid-empty", "ENVID=", "501 5.5.4 Bad ENVID parameter syntax"),
    ("envid-control", "ENVID=a+01", "501 5.5.4 Bad ENVID parameter syntax"),
    ("envid-twice", "ENVID=a ENVID=b", "501 5.5.4 Bad ENVID parameter syntax"),
    ("smtputf8", "SMTPUTF8", None),
    ("smtputf8-with-value", "SMTPUTF8=x", "555 5.5.4 Unsupported option: SMTPUTF8=x"),
    ("auth", "AUTH=<>", None),
    ("auth-anything", "AUTH=", None),
    ("auth-null-twice", "AUTH=<> AUTH=<>", None),
    ("auth-twice", "AUTH=a AUTH=b", "503 5.5.4 Error: multiple AUTH= options"),
    ("unknown", "XFOO=1", "555 5.5.4 Unsupported option: XFOO=1"),
    ("unknown-shown-printable", "X\x01=\x7f", "555 5.5.4 Unsupported option: X?=?"),
    ("first-refusal-wins", "XFOO SIZE=x", "555 5.5.4 Unsupported option: XFOO"),
]


@pytest.mark.parametrize(("line", "reply"), [c[1:] for c in MAIL], ids=[c[0] for c in MAIL])
def test_mail_params(line, reply):
    got = mail_params_reply(split_words(line), 2000)
    assert (str(got) if got else None) == reply


def test_mail_params_not_offered():
    without = frozenset({"8BITMIME"})
    assert str(mail_params_reply(["SMTPUTF8"], 0, without)) == \
        "555 5.5.4 Unsupported option: SMTPUTF8"
    assert str(mail_params_reply(["RET=FULL"], 0, without)) == "501 5.7.1 DSN support is disabled"
    assert mail_params_reply(["BODY=8BITMIME"], 0, frozenset()) is None


def test_size_over_the_spool_room_is_refused_for_now():
    assert mail_params_reply(["SIZE=100"], 2000, room=100) is None
    assert str(mail_params_reply(["SIZE=101"], 2000, room=100)) == \
        "452 4.3.1 Insufficient system storage"
    # the fixed limit first, as Postfix checks it before the queue's free space
    assert str(mail_params_reply(["SIZE=3000"], 2000, room=100)).startswith("552 5.3.4")
    assert mail_params_reply([], 2000, room=0) is None


RCPT = [
    ("notify-never", "NOTIFY=NEVER", None),
    ("notify-list", "NOTIFY=SUCCESS,FAILURE,DELAY", None),
    ("notify-lower-case", "NOTIFY=failure", None),
    ("notify-word-twice", "NOTIFY=DELAY,DELAY", None),
    ("notify-never-and-more", "NOTIFY=NEVER,SUCCESS",
     "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("notify-empty", "NOTIFY=", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("notify-unknown", "NOTIFY=ALWAYS", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("notify-twice", "NOTIFY=DELAY NOTIFY=FAILURE",
     "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("orcpt", "ORCPT=rfc822;user+40example.com", None),
    ("orcpt-utf8", "ORCPT=utf-8;j\\x{F6}rg@example.com", None),
    ("orcpt-utf8-bad", "ORCPT=utf-8;j\\x{G}@example.com",
     "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("orcpt-no-type", "ORCPT=user@example.com", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("orcpt-empty-type", "ORCPT=;a@b", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("orcpt-bad-xtext", "ORCPT=rfc822;a+4", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("orcpt-twice", "ORCPT=rfc822;a ORCPT=rfc822;b", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("unknown", "XFOO", "555 5.5.4 Unsupported option: XFOO"),
    ("glued-by-x1c", "NOTIFY=NEVER\x1cXFOO", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
]


@pytest.mark.parametrize(("line", "reply"), [c[1:] for c in RCPT], ids=[c[0] for c in RCPT])
def test_rcpt_params(line, reply):
    got = rcpt_params_reply(split_words(line))
    assert (str(got) if got else None) == reply
