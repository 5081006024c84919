"""MAIL and RCPT parameters refused at once, with Postfix's words, as labelled cases."""

from __future__ import annotations

import pytest

from smtpgate.smtp.params import mail_params_reply, rcpt_params_reply

MAIL = [
    ("nothing", {}, None),
    ("size-ok", {"SIZE": "1000"}, None),
    ("size-too-big", {"SIZE": "5000"}, "552 5.3.4 Message size exceeds fixed limit"),
    ("size-not-a-number", {"SIZE": "x"}, "501 5.5.4 Bad message size syntax"),
    ("body-8bitmime", {"BODY": "8bitmime"}, None),
    ("body-binarymime", {"BODY": "BINARYMIME"}, "555 5.5.4 Unsupported option: BODY=BINARYMIME"),
    ("ret-full", {"RET": "FULL"}, None),
    ("ret-bogus", {"RET": "BOGUS"}, "501 5.5.4 Bad RET parameter syntax"),
    ("envid-xtext", {"ENVID": "abc+2Bdef"}, None),
    ("envid-bad-xtext", {"ENVID": "abc+zz"}, "501 5.5.4 Bad ENVID parameter syntax"),
    ("envid-too-long", {"ENVID": "a" * 101}, "501 5.5.4 Bad ENVID parameter syntax"),
    ("smtputf8", {"SMTPUTF8": None}, None),
    ("smtputf8-with-value", {"SMTPUTF8": "x"}, "555 5.5.4 Unsupported option: SMTPUTF8"),
    ("auth", {"AUTH": "<>"}, None),
    ("unknown", {"XFOO": "1"}, "555 5.5.4 Unsupported option: XFOO"),
]


@pytest.mark.parametrize(("params", "reply"), [c[1:] for c in MAIL], ids=[c[0] for c in MAIL])
def test_mail_params(params, reply):
    got = mail_params_reply(params, 2000)
    assert (str(got) if got else None) == reply


RCPT = [
    ("notify-never", {"NOTIFY": "NEVER"}, None),
    ("notify-list", {"NOTIFY": "SUCCESS,FAILURE,DELAY"}, None),
    ("notify-never-and-more", {"NOTIFY": "NEVER,SUCCESS"},
     "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("notify-twice", {"NOTIFY": "DELAY,DELAY"}, "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("orcpt", {"ORCPT": "rfc822;user+40example.com"}, None),
    ("orcpt-no-type", {"ORCPT": "user@example.com"}, "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("unknown", {"XFOO": None}, "555 5.5.4 Unsupported option: XFOO"),
]


@pytest.mark.parametrize(("params", "reply"), [c[1:] for c in RCPT], ids=[c[0] for c in RCPT])
def test_rcpt_params(params, reply):
    got = rcpt_params_reply(params)
    assert (str(got) if got else None) == reply
