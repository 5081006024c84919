"""Relay control for one recipient: local domains, relaying, routing tricks."""

from __future__ import annotations

import pytest

from smtpgate.address import parse_path
from smtpgate.checks.destination import decide, is_postmaster
from smtpgate.verdict import Outcome


def denied(rcpt: str) -> str:
    return f"554 5.7.1 <{rcpt}>: Relay access denied"


def non_fqdn(rcpt: str) -> str:
    return f"504 5.5.2 <{rcpt}>: Recipient address rejected: need fully-qualified address"


# (id, path text, local, trusted, extra kwargs, outcome, reply)
CASES = [
    ("local domain", "<u@dom.example>", True, False, {}, Outcome.PASS, None),
    ("foreign domain", "<u@other.example>", False, False, {}, Outcome.FAIL,
     denied("u@other.example")),
    ("foreign domain trusted", "<u@other.example>", False, True, {}, Outcome.PERMIT, None),
    ("local domain trusted", "<u@dom.example>", True, True, {}, Outcome.PERMIT, None),
    ("address literal", "<u@[192.0.2.1]>", False, False, {}, Outcome.FAIL,
     denied("u@[192.0.2.1]")),
    ("non fqdn", "<u@localhost>", False, False, {}, Outcome.FAIL, non_fqdn("u@localhost")),
    ("non fqdn trusted too", "<u@localhost>", False, True, {}, Outcome.FAIL,
     non_fqdn("u@localhost")),
    ("no domain", "<user>", False, False, {}, Outcome.FAIL, non_fqdn("user")),
    ("postmaster without domain", "<Postmaster>", False, False, {}, Outcome.PASS, None),
    ("percent hack to local", "<user%victim.example@dom.example>", True, False, {},
     Outcome.FAIL, denied("user%victim.example@dom.example")),
    ("percent hack trusted", "<user%victim.example@dom.example>", True, True, {},
     Outcome.FAIL, denied("user%victim.example@dom.example")),
    ("bang path to local", "<victim.example!user@dom.example>", True, False, {},
     Outcome.FAIL, denied("victim.example!user@dom.example")),
    ("quoted at to local", '<"user@victim.example"@dom.example>', True, False, {},
     Outcome.FAIL, denied("user@victim.example@dom.example")),
    ("quoted at trusted", '<"user@victim.example"@dom.example>', True, True, {},
     Outcome.FAIL, denied("user@victim.example@dom.example")),
    ("source route to local", "<@dom.example:user@victim.example>", False, False, {},
     Outcome.FAIL, denied("user@victim.example")),
    ("source route ending local", "<@relay.example:user@dom.example>", True, False, {},
     Outcome.FAIL, denied("user@dom.example")),
    ("source route trusted", "<@relay.example:user@dom.example>", True, True, {},
     Outcome.FAIL, denied("user@dom.example")),
    ("routing allowed for trusted when asked", "<user%x.example@dom.example>", True, True,
     {"allow_trusted_routing": True}, Outcome.PERMIT, None),
    ("routing still denied untrusted when asked", "<user%x.example@dom.example>", True, False,
     {"allow_trusted_routing": True}, Outcome.FAIL, denied("user%x.example@dom.example")),
    ("quoted without routing is fine", '<"john smith"@dom.example>', True, False, {},
     Outcome.PASS, None),
    ("unknown domain", "<u@nowhere.example>", False, True, {"domain_dns": "notfound"},
     Outcome.FAIL,
     "450 4.1.2 <u@nowhere.example>: Recipient address rejected: Domain not found"),
    ("unknown domain 550", "<u@nowhere.example>", False, False,
     {"domain_dns": "notfound", "unknown_domain_code": 550}, Outcome.FAIL,
     "550 5.1.2 <u@nowhere.example>: Recipient address rejected: Domain not found"),
    ("domain dns tempfail", "<u@slow.example>", False, False,
     {"domain_dns": "tempfail", "unknown_domain_code": 550}, Outcome.FAIL,
     "450 4.1.2 <u@slow.example>: Recipient address rejected: Domain not found"),
    ("domain dns ok, untrusted", "<u@other.example>", False, False, {"domain_dns": "ok"},
     Outcome.FAIL, denied("u@other.example")),
    ("local domain ignores dns", "<u@dom.example>", True, False, {"domain_dns": "notfound"},
     Outcome.PASS, None),
]


@pytest.mark.parametrize("text,local,trusted,kwargs,outcome,reply", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_destination(text, local, trusted, kwargs, outcome, reply):
    verdict = decide(parse_path(text), local=local, trusted=trusted, **kwargs)
    assert verdict.check == "destination"
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert verdict.reason


@pytest.mark.parametrize("text,expected", [
    ("<postmaster>", True), ("<POSTMASTER>", True), ("<postmaster@dom.example>", False),
    ("<user>", False),
], ids=["lower", "upper", "with domain", "other user"])
def test_is_postmaster(text, expected):
    assert is_postmaster(parse_path(text)) is expected
