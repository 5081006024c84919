"""The pure parts of shadow rules and replay: checks decided again from recorded facts,
candidate keys laid over live answers, disagreements, and the report's summary."""

from __future__ import annotations

import dataclasses

import pytest

from smtpgate.cli.shadow import since_seconds, summarise
from smtpgate.config import load
from smtpgate.lookups.shadow_tables import ShadowTables
from smtpgate.policy.decisions import Redecider, decide, disagreement
from smtpgate.verdict import Outcome, Reply, Verdict

LIVE = load({"HOSTNAME": "mx.example.test", "SMTPGATE_DNSBL_SITES": "bl.test"})
LISTED = {"ip": "192.0.2.9", "ttl": 60.0, "zones": [["bl.test", "ok", ["127.0.0.2"], 300]]}
PSA = {"ip": "10.1.2.3", "mynet": True, "psa": ["10.0.0.0/8", "permit"]}


@pytest.mark.parametrize("label, pairs, psa", [
    ("no candidate PSA key: the live answer itself", [("HLO:x", "REJECT")],
     ["10.0.0.0/8", "permit"]),
    ("a more specific candidate network wins", [("PSA:10.1.0.0/16", "reject")],
     ["10.1.0.0/16", "reject"]),
    ("a less specific one loses", [("PSA:0.0.0.0/0", "reject")], ["10.0.0.0/8", "permit"]),
    ("the same key: the candidate's value", [("PSA:10.0.0.0/8", "dunno")],
     ["10.0.0.0/8", "dunno"]),
    ("the client's own address", [("PSA:10.1.2.3", "reject")], ["10.1.2.3", "reject"]),
    ("another client's key", [("PSA:10.1.2.4", "reject")], ["10.0.0.0/8", "permit"]),
])
def test_candidate_psa_keys_over_the_live_answer(label, pairs, psa):
    assert ShadowTables(pairs).facts("access_list", PSA)["psa"] == psa, label


def test_unchanged_facts_are_the_same_object():
    assert ShadowTables().facts("access_list", PSA) is PSA
    assert ShadowTables([("VALI:a@x.test", "a@x.test")]).facts("access_list", PSA) is PSA


def test_candidate_recipient_and_login_keys_in_the_tables_lookup_order():
    rcpt = {"rcpt": "user+tag@example.com", "looked": "user+tag@example.com", "vdom": None,
            "vali": None, "vbox": None, "recip": None}
    view = ShadowTables([("VDOM:example.com", "example.com"),
                         ("VALI:user@example.com", "user@example.com"),
                         ("RECIP:example.com", "REJECT no")])
    seen = view.facts("recipient", rcpt)
    assert (seen["vdom"], seen["vali"], seen["recip"]) == (
        "VDOM:example.com", "VALI:user@example.com", ["RECIP:example.com", "REJECT no"])
    # a live key earlier in the order than the candidate's keeps deciding
    live = {**rcpt, "recip": ["RECIP:user+tag@example.com", "OK"]}
    assert view.facts("recipient", live)["recip"] == ["RECIP:user+tag@example.com", "OK"]
    login = {"sender": "boss@example.com", "login": "boss", "hit": None, "owners": None}
    owned = ShadowTables([("LOGMAP:@example.com", "admin, boss")]).facts("sender_login", login)
    assert owned["owners"] == ["admin", "boss"]
    assert decide("sender_login", owned, LIVE).outcome is Outcome.PASS
    assert decide("sender_login", login, LIVE).failed  # live: no owner, logged in


def test_the_live_configuration_decides_as_recorded():
    assert decide("dnsbl", LISTED, LIVE).reply.code == 521
    ignored = dataclasses.replace(LIVE, dnsbl_action="ignore")
    verdict = decide("dnsbl", LISTED, ignored)
    assert verdict.outcome is Outcome.PASS and verdict.ignored
    assert disagreement(decide("dnsbl", LISTED, LIVE), verdict) == "accept"


def test_a_candidate_permit_skips_the_screening_tests_after_it():
    run = Redecider(LIVE, ShadowTables([("PSA:192.0.2.9", "permit")]))
    assert run.decide("access_list", {"ip": "192.0.2.9", "mynet": True, "psa": None}).outcome \
        is Outcome.PERMIT
    assert run.decide("dnsbl", LISTED).outcome is Outcome.PASS
    plain = Redecider(LIVE)
    plain.decide("access_list", {"ip": "192.0.2.9", "mynet": True, "psa": None})
    assert plain.decide("dnsbl", LISTED).failed


def test_a_fact_never_fetched_leaves_the_check_undecided():
    asked = {"name": "client.example.test", "access": None,
             "dns": ["notfound", 0, [], []]}
    assert decide("helo", asked, LIVE).reply.code == 450
    hlo_decided = {"name": "client.example.test", "access": "OK"}  # the DNS was not asked
    assert decide("helo", hlo_decided, LIVE).outcome is Outcome.PERMIT
    view = ShadowTables([("HLO:client.example.test", "DUNNO")])
    assert Redecider(LIVE, view).decide("helo", hlo_decided) is None


@pytest.mark.parametrize("live, other, direction", [
    (Verdict("x", Outcome.PASS), Verdict("x", Outcome.FAIL, Reply(550, "5.7.1", "no")),
     "refuse"),
    (Verdict("x", Outcome.FAIL, Reply(550, "5.7.1", "no")), Verdict("x", Outcome.PERMIT),
     "accept"),
    (Verdict("x", Outcome.FAIL, Reply(450, "4.7.1", "no")),
     Verdict("x", Outcome.FAIL, Reply(550, "5.7.1", "no")), "reply"),
    (Verdict("x", Outcome.PASS), Verdict("x", Outcome.PERMIT), None),
])
def test_disagreements(live, other, direction):
    assert disagreement(live, other) == direction


def test_the_report_summary():
    assert "no disagreements" in summarise([])[0]
    entries = [{"session": f"S{i}", "client": "192.0.2.9" if i < 3 else "192.0.2.10",
                "check": "dnsbl", "direction": "accept", "live": "fail 521 ...",
                "shadow": "pass"} for i in range(4)]
    lines = summarise(entries, examples=2)
    assert lines[0] == "  4 disagreements in 4 sessions"
    assert "  dnsbl            would accept           4" in lines
    assert lines.index("top clients:") + 1 == lines.index("  192.0.2.9" + " " * 31 + "3")
    assert lines[-2:] == ["  session=S3 192.0.2.10 dnsbl would accept: live fail 521 ...; "
                          "shadow pass", "  session=S2 192.0.2.9 dnsbl would accept: live "
                          "fail 521 ...; shadow pass"]
    assert since_seconds("2h") == 7200
    for bad in ("2", "", "-1h", "h"):
        with pytest.raises(ValueError):
            since_seconds(bad)
