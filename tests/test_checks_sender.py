"""reject_non_fqdn_sender, with addresses from the real parser."""

from __future__ import annotations

import pytest

from smtpgate.address import parse_path
from smtpgate.checks.sender import decide
from smtpgate.verdict import Outcome

CASES = [
    ("fqdn", "<a@mail.example.com>", False, None),
    ("null sender", "<>", False, None),
    ("trailing dot", "<a@example.com.>", False, None),
    ("address literal", "<a@[192.0.2.1]>", False, None),
    ("single label", "<a@localhost>", False,
     "504 5.5.2 <a@localhost>: Sender address rejected: need fully-qualified address"),
    ("no domain", "<user>", False,
     "504 5.5.2 <user>: Sender address rejected: need fully-qualified address"),
    ("numeric domain", "<a@192.0.2.1>", False,
     "504 5.5.2 <a@192.0.2.1>: Sender address rejected: need fully-qualified address"),
    ("utf8 domain", "<a@bücher.example>", True, None),
]


@pytest.mark.parametrize("text,utf8,reply", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sender(text, utf8, reply):
    verdict = decide(parse_path(text, utf8, mail=True), smtputf8=utf8)
    assert verdict.check == "sender"
    if reply is None:
        assert verdict.outcome is Outcome.PASS
    else:
        assert verdict.outcome is Outcome.FAIL
        assert str(verdict.reply) == reply
