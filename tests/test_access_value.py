"""access(5) values as smtpgate reads them: one labelled row per form."""

import pytest

from smtpgate.checks.access_value import TEMPFAIL, Action, Kind, parse
from smtpgate.verdict import Reply

CASES = [
    ("ok", "OK", Kind.OK, None),
    ("permit-lower", "permit", Kind.OK, None),
    ("permit-mixed-case", "Permit", Kind.OK, None),
    ("all-numerical-is-ok", "12345", Kind.OK, None),
    ("dunno", "DUNNO", Kind.DUNNO, None),
    ("dunno-lower-padded", "  dunno ", Kind.DUNNO, None),
    ("reject-default", "REJECT", Kind.REJECT, Reply(554, "5.7.1", "Access denied")),
    ("reject-lower", "reject", Kind.REJECT, Reply(554, "5.7.1", "Access denied")),
    ("reject-text", "REJECT send-only account", Kind.REJECT,
     Reply(554, "5.7.1", "send-only account")),
    ("reject-dsn-text", "REJECT 5.7.26 no thanks", Kind.REJECT,
     Reply(554, "5.7.26", "no thanks")),
    ("reject-tab", "REJECT\tgo away", Kind.REJECT, Reply(554, "5.7.1", "go away")),
    ("defer", "DEFER", Kind.DEFER, Reply(450, "4.7.1", "Access denied")),
    ("defer-text", "defer try later", Kind.DEFER, Reply(450, "4.7.1", "try later")),
    ("defer-if-permit", "DEFER_IF_PERMIT later", Kind.DEFER_IF_PERMIT,
     Reply(450, "4.7.1", "later")),
    ("defer-if-reject", "DEFER_IF_REJECT", Kind.DEFER_IF_REJECT,
     Reply(450, "4.7.1", "Access denied")),
    ("4nn-text", "451 come back later", Kind.DEFER, Reply(451, "4.7.1", "come back later")),
    ("5nn-text", "550 no such user here", Kind.REJECT, Reply(550, "5.7.1", "no such user here")),
    ("5nn-dsn", "550 5.1.1 mailbox unavailable", Kind.REJECT,
     Reply(550, "5.1.1", "mailbox unavailable")),
    ("5nn-dsn-wrong-class-fixed", "550 4.1.1 odd", Kind.REJECT, Reply(550, "5.1.1", "odd")),
    ("bare-code-is-all-numerical", "550", Kind.OK, None),
]

INVALID = [
    ("empty", ""),
    ("blank", "   "),
    ("none", None),
    ("unknown-word", "allow"),
    ("typo", "permti"),
    ("code-3nn", "354 go ahead"),
    ("code-6nn", "650 what"),
    ("hold-unsupported", "HOLD"),
    ("discard-unsupported", "DISCARD spam"),
    ("restriction-name", "permit_mynetworks"),
    ("reject-restriction", "reject_unknown_client_hostname"),
    ("ok-with-text", "OK fine"),
    ("dunno-with-text", "DUNNO please"),
]


@pytest.mark.parametrize(("value", "kind", "reply"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_parse(value, kind, reply):
    action = parse(value)
    assert action.kind is kind
    assert action.reply == reply
    assert action.reason == ""


@pytest.mark.parametrize("value", [c[1] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_is_a_tempfail_never_a_permit(value):
    action = parse(value)
    assert action.kind is Kind.INVALID
    assert action.reply == TEMPFAIL
    assert str(action.reply) == "451 4.3.0 Temporary lookup failure"
    assert action.reason


def test_reply_for_adds_postfix_context():
    action = parse("REJECT")
    reply = action.reply_for("<b@example.com>: Recipient address rejected")
    assert str(reply) == "554 5.7.1 <b@example.com>: Recipient address rejected: Access denied"


def test_reply_for_without_reply():
    assert Action(Kind.OK).reply_for("ctx") is None
