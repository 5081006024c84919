"""HELO restrictions: every case as a labelled row."""

from __future__ import annotations

import pytest

from smtpgate.checks.helo import HeloDns, decide, needs_dns
from smtpgate.verdict import Outcome

OK = HeloDns("ok", 300, ("192.0.2.1",))
NOTFOUND = HeloDns("notfound", 60)
TEMPFAIL = HeloDns("tempfail")

# (id, helo, access, dns, kwargs, outcome, reply)
CASES = [
    ("no helo yet", None, None, None, {}, Outcome.SKIP, None),
    ("mynetworks", "localhost", None, None, {"trusted": True}, Outcome.PERMIT, None),
    ("resolving fqdn", "mail.example.com", None, OK, {}, Outcome.PASS, None),
    ("fqdn trailing dot", "mail.example.com.", None, OK, {}, Outcome.PASS, None),
    ("no dns facts", "mail.example.com", None, None, {}, Outcome.PASS, None),
    ("invalid characters", "bad_name!", None, None, {}, Outcome.FAIL,
     "501 5.5.2 <bad_name!>: Helo command rejected: Invalid name"),
    ("empty", "", None, None, {}, Outcome.FAIL,
     "501 5.5.2 <>: Helo command rejected: Invalid name"),
    ("space inside", "my host.example", None, None, {}, Outcome.FAIL,
     "501 5.5.2 <my host.example>: Helo command rejected: Invalid name"),
    ("hyphen at label end", "mail-.example.com", None, None, {}, Outcome.FAIL,
     "501 5.5.2 <mail-.example.com>: Helo command rejected: Invalid name"),
    ("double dot", "mail..example.com", None, None, {}, Outcome.FAIL,
     "501 5.5.2 <mail..example.com>: Helo command rejected: Invalid name"),
    ("label too long", f"{'a' * 64}.example.com", None, None, {}, Outcome.FAIL,
     f"501 5.5.2 <{'a' * 64}.example.com>: Helo command rejected: Invalid name"),
    ("non-ascii echoed safely", "hé.example", None, None, {}, Outcome.FAIL,
     "501 5.5.2 <h?.example>: Helo command rejected: Invalid name"),
    ("single label", "localhost", None, None, {}, Outcome.FAIL,
     "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"),
    ("bare ip address", "192.0.2.1", None, None, {}, Outcome.FAIL,
     "504 5.5.2 <192.0.2.1>: Helo command rejected: need fully-qualified hostname"),
    ("ipv4 literal", "[192.0.2.1]", None, None, {}, Outcome.PASS, None),
    ("ipv6 literal", "[IPv6:2001:db8::1]", None, None, {}, Outcome.PASS, None),
    ("literal never looked up", "[192.0.2.1]", None, NOTFOUND, {}, Outcome.PASS, None),
    ("bad ipv4 literal", "[192.0.2]", None, None, {}, Outcome.FAIL,
     "501 5.5.2 <[192.0.2]>: Helo command rejected: invalid ip address"),
    ("untagged ipv6 literal", "[2001:db8::1]", None, None, {}, Outcome.FAIL,
     "501 5.5.2 <[2001:db8::1]>: Helo command rejected: invalid ip address"),
    ("unknown host", "nowhere.example.com", None, NOTFOUND, {}, Outcome.FAIL,
     "450 4.7.1 <nowhere.example.com>: Helo command rejected: Host not found"),
    ("unknown host 550", "nowhere.example.com", None, NOTFOUND, {"unknown_code": 550},
     Outcome.FAIL, "550 5.7.1 <nowhere.example.com>: Helo command rejected: Host not found"),
    ("dns tempfail stays 450", "slow.example.com", None, TEMPFAIL, {"unknown_code": 550},
     Outcome.FAIL, "450 4.7.1 <slow.example.com>: Helo command rejected: Host not found"),
    ("HLO permit overrides invalid", "localhost", "permit", None, {}, Outcome.PERMIT, None),
    ("HLO OK overrides unknown", "nowhere.example.com", "OK", NOTFOUND, {}, Outcome.PERMIT,
     None),
    ("HLO reject", "mail.example.com", "reject", OK, {}, Outcome.FAIL,
     "554 5.7.1 <mail.example.com>: Helo command rejected: Access denied"),
    ("HLO REJECT text", "mail.example.com", "REJECT you are not welcome", OK, {},
     Outcome.FAIL, "554 5.7.1 <mail.example.com>: Helo command rejected: you are not welcome"),
    ("HLO 450 text", "mail.example.com", "450 4.7.0 slow down", OK, {}, Outcome.FAIL,
     "450 4.7.0 <mail.example.com>: Helo command rejected: slow down"),
    ("HLO dunno goes on", "localhost", "DUNNO", None, {}, Outcome.FAIL,
     "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"),
    ("HLO lookup failed", "mail.example.com", "tempfail", OK, {}, Outcome.FAIL,
     "451 4.3.0 <mail.example.com>: Helo command rejected: Temporary lookup failure"),
    ("HLO bad value never permits", "mail.example.com", "HOLD", OK, {}, Outcome.FAIL,
     "451 4.3.0 <mail.example.com>: Helo command rejected: Temporary lookup failure"),
]


@pytest.mark.parametrize("helo,access,dns,kwargs,outcome,reply", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_helo(helo, access, dns, kwargs, outcome, reply):
    verdict = decide(helo, access=access, dns=dns, **kwargs)
    assert verdict.check == "helo"
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    if outcome is Outcome.FAIL:
        assert verdict.reason


def test_pass_carries_dns_ttl():
    assert decide("mail.example.com", dns=OK).ttl == 300


@pytest.mark.parametrize("helo,expected", [
    ("mail.example.com", True), ("mail.example.com.", True), ("localhost", False),
    ("[192.0.2.1]", False), ("bad!name", False), (None, False), ("", False),
], ids=["fqdn", "fqdn dot", "single label", "literal", "invalid", "none", "empty"])
def test_needs_dns(helo, expected):
    assert needs_dns(helo) is expected
