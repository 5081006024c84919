"""reject_unknown_client_hostname with REV: overrides, as a table of labelled facts."""

from __future__ import annotations

import pytest

from smtpgate.checks.client_fcrdns import FcrdnsFacts, Forward, decide, rev_names
from smtpgate.verdict import Outcome

IP = "192.0.2.10"
CANNOT = f"Client host rejected: cannot find your hostname, [{IP}]"

CONFIRMED = FcrdnsFacts(IP, "ok", ("mail.example.com",),
                        (Forward("mail.example.com", "ok", ("192.0.2.9", IP)),), 300)
NO_PTR = FcrdnsFacts(IP, "nxdomain", ttl=60)
PTR_NODATA = FcrdnsFacts(IP, "nodata", ttl=60)
PTR_TEMPFAIL = FcrdnsFacts(IP, "tempfail")
MISMATCH = FcrdnsFacts(IP, "ok", ("forged.example.com",),
                       (Forward("forged.example.com", "ok", ("198.51.100.1",)),), 300)
NO_FORWARD = FcrdnsFacts(IP, "ok", ("gone.example.com",),
                         (Forward("gone.example.com", "nxdomain"),), 60)
FORWARD_TEMPFAIL = FcrdnsFacts(IP, "ok", ("slow.example.com",),
                               (Forward("slow.example.com", "tempfail"),), 0)
SECOND_NAME = FcrdnsFacts(IP, "ok", ("a.example.com", "b.example.com"),
                          (Forward("a.example.com", "ok", ("198.51.100.1",)),
                           Forward("b.example.com", "ok", (IP,))), 120)
INVALID_NAME = FcrdnsFacts(IP, "ok", ("bad_name!",), (Forward("bad_name!", "ok", (IP,)),), 60)
V6 = "2001:db8::25"
V6_CONFIRMED = FcrdnsFacts(V6, "ok", ("v6.example.com",),
                           (Forward("v6.example.com", "ok", ("2001:db8:0::25",)),), 300)

# (id, facts, kwargs, outcome, reply)
CASES = [
    ("confirmed", CONFIRMED, {}, Outcome.PASS, None),
    ("second name confirms", SECOND_NAME, {}, Outcome.PASS, None),
    ("ipv6 confirmed, other spelling", V6_CONFIRMED, {}, Outcome.PASS, None),
    ("no PTR", NO_PTR, {}, Outcome.FAIL, f"450 4.7.25 {CANNOT}"),
    ("PTR nodata", PTR_NODATA, {}, Outcome.FAIL, f"450 4.7.25 {CANNOT}"),
    ("no PTR, code 550", NO_PTR, {"unknown_code": 550}, Outcome.FAIL, f"550 5.7.25 {CANNOT}"),
    ("PTR does not confirm", MISMATCH, {}, Outcome.FAIL, f"450 4.7.25 {CANNOT}"),
    ("PTR does not confirm, 550", MISMATCH, {"unknown_code": 550}, Outcome.FAIL,
     f"550 5.7.25 {CANNOT}"),
    ("no forward record", NO_FORWARD, {"unknown_code": 550}, Outcome.FAIL,
     f"550 5.7.25 {CANNOT}"),
    ("invalid PTR name never confirms", INVALID_NAME, {}, Outcome.FAIL, f"450 4.7.25 {CANNOT}"),
    ("PTR tempfail is 4xx even with 550", PTR_TEMPFAIL, {"unknown_code": 550}, Outcome.FAIL,
     f"450 4.7.25 {CANNOT}"),
    ("forward tempfail is 4xx even with 550", FORWARD_TEMPFAIL, {"unknown_code": 550},
     Outcome.FAIL, f"450 4.7.25 {CANNOT}"),
    ("mynetworks", NO_PTR, {"trusted": True}, Outcome.PERMIT, None),
    ("REV ip permit", NO_PTR, {"rev_ip": "permit"}, Outcome.PERMIT, None),
    ("REV ip OK", PTR_TEMPFAIL, {"rev_ip": "OK"}, Outcome.PERMIT, None),
    ("REV ip dunno", NO_PTR, {"rev_ip": "dunno"}, Outcome.FAIL, f"450 4.7.25 {CANNOT}"),
    ("REV ip reject", CONFIRMED, {"rev_ip": "reject"}, Outcome.FAIL,
     f"554 5.7.1 <mail.example.com[{IP}]>: Client host rejected: Access denied"),
    ("REV ip reject unknown", NO_PTR, {"rev_ip": "REJECT go away"}, Outcome.FAIL,
     f"554 5.7.1 <unknown[{IP}]>: Client host rejected: go away"),
    ("REV unconfirmed name permit", MISMATCH,
     {"rev_by_name": {"forged.example.com": "permit"}}, Outcome.PERMIT, None),
    ("REV confirmed name reject", CONFIRMED, {"rev_by_name": {"mail.example.com": "reject"}},
     Outcome.FAIL, f"554 5.7.1 <mail.example.com[{IP}]>: Client host rejected: Access denied"),
    ("REV name wins over ip", MISMATCH,
     {"rev_by_name": {"forged.example.com": "permit"}, "rev_ip": "reject"}, Outcome.PERMIT, None),
    ("REV name for another name ignored", MISMATCH,
     {"rev_by_name": {"other.example.com": "permit"}}, Outcome.FAIL, f"450 4.7.25 {CANNOT}"),
    ("REV lookup failed", CONFIRMED, {"rev_ip": "tempfail"}, Outcome.FAIL,
     f"451 4.3.0 <mail.example.com[{IP}]>: Client host rejected: Temporary lookup failure"),
    ("REV 4xx text", NO_PTR, {"rev_ip": "450 4.7.1 come back later"}, Outcome.FAIL,
     f"450 4.7.1 <unknown[{IP}]>: Client host rejected: come back later"),
]


@pytest.mark.parametrize("facts,kwargs,outcome,reply", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_fcrdns(facts, kwargs, outcome, reply):
    verdict = decide(facts, **kwargs)
    assert verdict.check == "client_fcrdns"
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert verdict.reason


def test_hostname_and_ttl():
    assert CONFIRMED.hostname == "mail.example.com"
    assert SECOND_NAME.hostname == "b.example.com"
    assert MISMATCH.hostname is None
    assert decide(CONFIRMED).ttl == 300
    assert decide(MISMATCH).ttl == 0


def test_ipv4_mapped_client_matches_a_record():
    facts = FcrdnsFacts("::ffff:192.0.2.10", "ok", ("m.example.com",),
                        (Forward("m.example.com", "ok", (IP,)),), 60)
    assert facts.hostname == "m.example.com"


@pytest.mark.parametrize("facts,expected", [
    (CONFIRMED, ("mail.example.com",)),
    (SECOND_NAME, ("b.example.com",)),
    (MISMATCH, ("forged.example.com",)),
    (INVALID_NAME, ()),
    (NO_PTR, ()),
], ids=["confirmed", "confirmed second", "unconfirmed", "invalid name", "no ptr"])
def test_rev_names(facts, expected):
    assert rev_names(facts) == expected


def test_reason_names_the_evidence():
    assert "forged.example.com" in decide(MISMATCH).reason
    assert "198.51.100.1" in decide(MISMATCH).reason
    assert "nxdomain" in decide(NO_PTR).reason
