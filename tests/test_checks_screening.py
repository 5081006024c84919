"""The screening decisions: access list, pregreet, DNSBL score, protocol tests, limits."""

import ipaddress

import pytest

from smtpgate.checks import access_list, dnsbl, limits, pregreet, protocol
from smtpgate.checks.dnsbl import DnsblResult, ZoneResult
from smtpgate.checks.screening_action import escape, format_delay, hangs_up
from smtpgate.dnsbl_sites import parse_sites
from smtpgate.verdict import Outcome

NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
DENIED = (ipaddress.ip_network("198.51.100.0/24"),)


# --- access list ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "psa", "action", "outcome", "reply", "reason"),
    [
        ("127.0.0.5", None, "drop", Outcome.PERMIT, None, "mynetworks 127.0.0.0/8"),
        ("::1", "reject", "drop", Outcome.PERMIT, None, "mynetworks ::1/128"),
        ("::ffff:127.0.0.9", None, "drop", Outcome.PERMIT, None, "mynetworks"),
        ("203.0.113.9", "permit", "drop", Outcome.PERMIT, None, "PSA:203.0.113.0/24 permit"),
        ("203.0.113.9", "PERMIT", "drop", Outcome.PERMIT, None, "permit"),
        ("203.0.113.9", "reject", "drop", Outcome.FAIL,
         "521 5.3.2 Service currently unavailable", "DENYLISTED [203.0.113.9]"),
        ("203.0.113.9", "reject", "enforce", Outcome.FAIL,
         "550 5.3.2 Service currently unavailable", "DENYLISTED"),
        ("203.0.113.9", "reject", "ignore", Outcome.PASS, None, "action ignore"),
        ("203.0.113.9", "dunno", "drop", Outcome.PASS, None, "dunno"),
        ("203.0.113.9", None, "drop", Outcome.PASS, None, "no match"),
        ("198.51.100.7", None, "drop", Outcome.FAIL,
         "521 5.3.2 Service currently unavailable", "static 198.51.100.0/24"),
        ("198.51.100.7", "permit", "drop", Outcome.FAIL, "521 5.3.2 Service currently unavailable",
         "static"),
        ("not-an-ip", "reject", "drop", Outcome.FAIL, "521 5.3.2 Service currently unavailable",
         "DENYLISTED"),
    ],
    ids=["mynetworks", "mynetworks-v6-beats-psa", "v4-mapped", "psa-permit", "psa-permit-case",
         "psa-reject-drop", "psa-reject-enforce", "psa-reject-ignore", "psa-dunno", "no-key",
         "static-deny", "static-deny-beats-psa", "bad-ip-psa-decides"],
)
def test_access_list(ip, psa, action, outcome, reply, reason):
    verdict = access_list.decide(
        ip, psa, mynetworks=NETS, denied=DENIED, action=action, psa_key="203.0.113.0/24"
    )
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert reason in verdict.logged
    assert verdict.ttl == 0


def test_access_drop_hangs_up_enforce_waits():
    drop = access_list.decide("203.0.113.9", "reject", action="drop")
    enforce = access_list.decide("203.0.113.9", "reject", action="enforce")
    assert hangs_up(drop) and not hangs_up(enforce)


# --- pregreet ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("received", "delay", "action", "outcome", "reply", "reason"),
    [
        (b"", 6.0, "enforce", Outcome.PASS, None, "PASS pregreet [192.0.2.1]:4321"),
        (b"EHLO foo\r\n", 0.1, "drop", Outcome.FAIL, "521 5.5.1 Protocol error",
         "PREGREET 10 after 0.1 from [192.0.2.1]:4321: EHLO foo\\r\\n"),
        (b"EHLO foo\r\n", 1.234, "enforce", Outcome.FAIL, "550 5.5.1 Protocol error",
         "PREGREET 10 after 1.2 from"),
        (b"\x00\xff\\x", 0.01234, "ignore", Outcome.PASS, None,
         "PREGREET 4 after 0.012 from [192.0.2.1]:4321: \\000\\377\\\\x (action ignore)"),
        (b"A" * 300, 0.5, "drop", Outcome.FAIL, "521 5.5.1 Protocol error",
         "PREGREET 300 after 0.5 from [192.0.2.1]:4321: " + "A" * 100),
    ],
    ids=["waited", "talker-drop", "talker-enforce", "binary-ignore", "long-truncated"],
)
def test_pregreet(received, delay, action, outcome, reply, reason):
    verdict = pregreet.decide(received, delay, "192.0.2.1", 4321, action=action, ttl=86400)
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert reason in verdict.logged
    assert verdict.ttl == (86400 if not received else 0)
    if len(received) > 100:
        assert verdict.reason.endswith("A" * 100)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0"), (0.1, "0.1"), (0.123, "0.12"), (0.0045, "0.0045"), (1.25, "1.2"), (6, "6"),
     (12.7, "13"), (123.4, "123")],
    ids=["zero", "tenth", "two-digits", "small", "one-point", "whole", "tens", "hundreds"],
)
def test_format_delay(seconds, text):
    assert format_delay(seconds) == text


def test_escape_str_and_tabs():
    assert escape("a\tb\r\n") == "a\\tb\\r\\n"


# --- DNSBL ---------------------------------------------------------------------------------

SITES = parse_sites(
    "zen.example=127.0.0.[2..11]*3 bl.example*2 bl.example=127.0.0.4*1 "
    "wl.example=127.0.[0..255].[1..3]*-2 key123.dq.example=127.0.0.2*4"
)


def result(**zones):
    found = tuple(
        ZoneResult(zone.replace("_", "."), status, tuple(answers), 300)
        for zone, (status, answers) in zones.items()
    )
    return DnsblResult("192.0.2.7", found, dnsbl.cache_ttl(found))


CLEAN = {"zen_example": ("nxdomain", ()), "bl_example": ("nxdomain", ()),
         "wl_example": ("nxdomain", ())}


@pytest.mark.parametrize(
    ("zones", "total", "zone", "outcome", "reply"),
    [
        (CLEAN, 0, None, Outcome.PASS, None),
        ({**CLEAN, "zen_example": ("ok", ["127.0.0.2"])}, 3, "zen.example", Outcome.FAIL,
         "521 5.7.1 Service unavailable; client [192.0.2.7] blocked using zen.example"),
        ({**CLEAN, "zen_example": ("ok", ["127.0.0.12"])}, 0, None, Outcome.PASS, None),
        ({**CLEAN, "bl_example": ("ok", ["127.0.0.4", "127.0.0.9"])}, 3, "bl.example",
         Outcome.FAIL,
         "521 5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.example"),
        ({**CLEAN, "bl_example": ("ok", ["127.0.0.9"])}, 2, "bl.example", Outcome.PASS, None),
        ({**CLEAN, "wl_example": ("ok", ["127.0.10.2"])}, -2, "wl.example", Outcome.PERMIT, None),
        ({**CLEAN, "zen_example": ("ok", ["127.0.0.2"]), "wl_example": ("ok", ["127.0.0.3"])}, 1,
         "zen.example", Outcome.PASS, None),
        ({**CLEAN, "zen_example": ("ok", ["127.255.255.254"])}, 0, None, Outcome.PASS, None),
        ({**CLEAN, "bl_example": ("ok", ["127.255.255.252"])}, 0, None, Outcome.PASS, None),
        ({**CLEAN, "bl_example": ("ok", ["10.1.2.3"])}, 0, None, Outcome.PASS, None),
        ({**CLEAN, "zen_example": ("timeout", ())}, 0, None, Outcome.PASS, None),
        ({"key123_dq_example": ("ok", ["127.0.0.2"])}, 4, "key123.dq.example", Outcome.FAIL,
         "521 5.7.1 Service unavailable; client [192.0.2.7] blocked using zen.spamhaus.org"),
        ({**CLEAN, "zen_example": ("ok", ["127.0.0.2"]), "bl_example": ("ok", ["127.0.0.4"])},
         6, "zen.example", Outcome.FAIL,
         "521 5.7.1 Service unavailable; client [192.0.2.7] blocked using zen.example"),
    ],
    ids=["clean", "listed", "filter-miss", "two-sites-one-zone", "below-threshold",
         "allowlisted", "allow-offsets-block", "spamhaus-254-not-listed",
         "spamhaus-252-not-listed", "outside-127-not-listed", "timeout-not-listed",
         "reply-map-hides-key", "heaviest-zone-named"],
)
def test_dnsbl(zones, total, zone, outcome, reply):
    res = result(**zones)
    found = dnsbl.score(SITES, res)
    assert (found.total, found.zone) == (total, zone)
    verdict = dnsbl.decide(
        res, SITES, threshold=3, allowlist_threshold=-1, action="drop",
        reply_map=(("key123.dq.example", "zen.spamhaus.org"),),
    )
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert verdict.reason.startswith(f"DNSBL rank {total} for [192.0.2.7]")
    assert verdict.ttl == (0 if outcome is Outcome.FAIL else res.ttl)


@pytest.mark.parametrize(
    ("zones", "unhealthy", "failed"),
    [
        ({"zen_example": ("ok", ["127.255.255.254"])}, ("zen.example",), ()),
        ({"zen_example": ("ok", ["8.8.8.8"]), "bl_example": ("tempfail", ())},
         ("zen.example",), ("bl.example",)),
        ({"zen_example": ("ok", ["127.0.0.2"])}, (), ()),
    ],
    ids=["blocked-resolver", "outside-127-and-servfail", "healthy"],
)
def test_dnsbl_health(zones, unhealthy, failed):
    found = dnsbl.score(SITES, result(**zones))
    assert (found.unhealthy, found.failed) == (unhealthy, failed)
    verdict = dnsbl.decide(result(**zones), SITES, threshold=3)
    for zone in unhealthy:
        assert f"error answers from {zone}" in verdict.reason
    for zone in failed:
        assert f"no answer from {zone}" in verdict.reason


@pytest.mark.parametrize(
    ("action", "outcome", "code"),
    [("drop", Outcome.FAIL, 521), ("enforce", Outcome.FAIL, 550), ("ignore", Outcome.PASS, None)],
    ids=["drop", "enforce", "ignore"],
)
def test_dnsbl_actions(action, outcome, code):
    res = result(zen_example=("ok", ["127.0.0.2"]))
    verdict = dnsbl.decide(res, SITES, threshold=1, action=action)
    assert verdict.outcome is outcome
    assert (verdict.reply.code if verdict.reply else None) == code


def test_dnsbl_allowlist_off_at_zero_and_no_sites_skips():
    res = result(wl_example=("ok", ["127.0.0.2"]))
    assert dnsbl.decide(res, SITES, allowlist_threshold=0).outcome is Outcome.PASS
    assert dnsbl.decide(res, (), threshold=1).outcome is Outcome.SKIP


@pytest.mark.parametrize(
    ("zones", "ttl"),
    [
        ((ZoneResult("a", "ok", ("127.0.0.2",), 5), ZoneResult("b", "nxdomain", (), 900)), 60.0),
        ((ZoneResult("a", "ok", ("127.0.0.2",), 86400),), 3600.0),
        ((ZoneResult("a", "nxdomain", (), 900), ZoneResult("b", "nodata", (), 1200)), 900.0),
        ((ZoneResult("a", "nxdomain", (), 900), ZoneResult("b", "timeout")), 60.0),
        ((), 60.0),
    ],
    ids=["clamped-low", "clamped-high", "smallest", "failure-retries-soon", "nothing"],
)
def test_cache_ttl(zones, ttl):
    assert dnsbl.cache_ttl(zones) == ttl


# --- protocol tests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "pending", "offered", "action", "outcome", "reply"),
    [
        ("EHLO x", b"", False, "enforce", Outcome.PASS, None),
        ("HELO x", b"MAIL FROM:<a@b>\r\n", False, "enforce", Outcome.FAIL,
         "550 5.5.1 Protocol error"),
        ("MAIL FROM:<a@b>", b"RCPT TO:<c@d>\r\n", True, "enforce", Outcome.PASS, None),
        ("RCPT TO:<c@d>", b"DATA\r\n", True, "drop", Outcome.PASS, None),
        ("EHLO x", b"MAIL FROM:<a@b>\r\n", True, "drop", Outcome.FAIL, "521 5.5.1 Protocol error"),
        ("DATA", b"Subject: x\r\n", True, "enforce", Outcome.FAIL, "550 5.5.1 Protocol error"),
        ("MAIL FROM:<a@b>", b"RCPT TO:<c@d>\r\n", False, "ignore", Outcome.PASS, None),
    ],
    ids=["nothing-pending", "before-offered", "mail-rcpt-ok", "rcpt-data-ok", "after-ehlo",
         "after-data", "ignored"],
)
def test_pipelining(command, pending, offered, action, outcome, reply):
    verdict = protocol.pipelining(
        command, pending, "192.0.2.1", 25, pipelining_offered=offered, action=action
    )
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    if pending and not (offered and outcome is Outcome.PASS):
        assert verdict.reason.startswith("COMMAND PIPELINING from [192.0.2.1]:25 after ")
    assert verdict.ttl == 0


@pytest.mark.parametrize(
    ("line", "action", "outcome", "reply"),
    [
        ("EHLO mail.example", "drop", Outcome.PASS, None),
        ("CONNECT 10.0.0.1:25 HTTP/1.0", "drop", Outcome.FAIL,
         "521 5.7.0 Error: I can break rules, too. Goodbye."),
        ("get / HTTP/1.1", "drop", Outcome.FAIL,
         "521 5.7.0 Error: I can break rules, too. Goodbye."),
        ("POST /x HTTP/1.1", "enforce", Outcome.FAIL, "550 5.5.1 Protocol error"),
        ("Host: example.com", "drop", Outcome.FAIL,
         "521 5.7.0 Error: I can break rules, too. Goodbye."),
        ("User-Agent: curl", "ignore", Outcome.PASS, None),
        ("MAIL FROM:<a@b>", "drop", Outcome.PASS, None),
        ("FOO bar", "drop", Outcome.PASS, None),
        ("", "drop", Outcome.PASS, None),
    ],
    ids=["smtp", "connect", "get-lowercase", "post-enforce", "header", "header-ignored",
         "mail-from-colon", "unknown-command", "empty"],
)
def test_non_smtp_command(line, action, outcome, reply):
    verdict = protocol.non_smtp_command(line, "192.0.2.1", 25, after="EHLO", action=action)
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    if outcome is Outcome.FAIL:
        assert verdict.reason == f"NON-SMTP COMMAND from [192.0.2.1]:25 after EHLO: {line}"


@pytest.mark.parametrize(
    ("line", "action", "outcome", "reply"),
    [
        (b"MAIL FROM:<a@b>\r\n", "drop", Outcome.PASS, None),
        (b"MAIL FROM:<a@b>\n", "drop", Outcome.FAIL, "521 5.5.1 Protocol error"),
        (b"a\nb\r\n", "enforce", Outcome.FAIL, "550 5.5.1 Protocol error"),
        (b"MAIL FROM:<a@b>\n", "ignore", Outcome.PASS, None),
        (b"line\r", "drop", Outcome.PASS, None),
    ],
    ids=["crlf", "bare-lf-drop", "embedded-lf", "ignored", "cr-only"],
)
def test_bare_newline(line, action, outcome, reply):
    verdict = protocol.bare_newline(line, "192.0.2.1", 25, after="MAIL", action=action)
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    if action != "ignore" and outcome is Outcome.FAIL:
        assert verdict.reason == "BARE NEWLINE from [192.0.2.1]:25 after MAIL"


def test_protocol_pass_at_rcpt_is_cacheable():
    verdict = protocol.passed("pipelining", "192.0.2.1", 25, 3600)
    assert (verdict.outcome, verdict.ttl) == (Outcome.PASS, 3600)
    with pytest.raises(ValueError, match="'pregreet' is not one of"):
        protocol.passed("pregreet", "192.0.2.1", 25, 1)


# --- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("192.0.2.1", 64, "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::9", 48, "2001:db8:1::/48"),
        ("2001:db8::9", 128, "2001:db8::9"),
        ("::ffff:192.0.2.1", 64, "192.0.2.1"),
        ("IPV6:2001:db8::1", 64, "2001:db8::/64"),
        (" junk ", 64, "junk"),
    ],
    ids=["ipv4", "ipv6-64", "ipv6-48", "ipv6-128", "mapped", "postfix-prefix", "junk"],
)
def test_client_key(ip, prefix, key):
    assert limits.client_key(ip, prefix) == key


@pytest.mark.parametrize(
    ("counts", "settings", "outcome", "reply"),
    [
        ((1, 1, 1), {}, Outcome.PASS, None),
        ((50, 1, 50), {"count_limit": 50}, Outcome.PASS, None),
        ((51, 1, 51), {"count_limit": 50}, Outcome.FAIL,
         "421 4.7.0 Error: too many connections from 192.0.2.1"),
        ((51, 1, 51), {"count_limit": 0}, Outcome.PASS, None),
        ((51, 1, 51), {"count_limit": 50, "exempt": True}, Outcome.PASS, None),
        ((1, 1, 11), {"connection_limit": 10}, Outcome.FAIL, "421 4.3.2 All server ports are busy"),
        ((1, 1, 11), {"connection_limit": 10, "exempt": True}, Outcome.FAIL,
         "421 4.3.2 All server ports are busy"),
        ((1, 31, 1), {"rate_limit": 30, "hostname": "mx.example"}, Outcome.FAIL,
         "421 4.7.0 mx.example Error: too many connections from 192.0.2.1"),
        ((1, 30, 1), {"rate_limit": 30}, Outcome.PASS, None),
        ((99, 99, 99), {"count_limit": 50, "rate_limit": 30, "connection_limit": 10},
         Outcome.FAIL, "421 4.7.0 Error: too many connections from 192.0.2.1"),
    ],
    ids=["fresh", "at-count-limit", "over-count", "count-off", "exempt-count", "global-cap",
         "global-cap-no-exemption", "over-rate", "at-rate", "count-checked-first"],
)
def test_limits(counts, settings, outcome, reply):
    count, rate, total = counts
    verdict = limits.decide(
        "192.0.2.1", client_count=count, client_rate=rate, total=total, **settings
    )
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    if verdict.failed:
        assert hangs_up(verdict)


SETTLE_SITES = parse_sites("zen.example*3 bl.example*2 wl.example*-2")


@pytest.mark.parametrize(
    ("zones", "allowlist", "expected"),
    [
        ({"zen_example": ("ok", ["127.0.0.2"]), "bl_example": ("pending", ()),
          "wl_example": ("pending", ())}, -1, False),  # 3 - 2 could drop below 3
        ({"zen_example": ("ok", ["127.0.0.2"]), "bl_example": ("ok", ["127.0.0.2"]),
          "wl_example": ("pending", ())}, -1, True),  # 5 - 2 stays >= 3: listed
        ({"zen_example": ("nxdomain", ()), "bl_example": ("nxdomain", ()),
          "wl_example": ("pending", ())}, -1, False),  # 0 or -2: pass or allowlisted
        ({"zen_example": ("nxdomain", ()), "bl_example": ("nxdomain", ()),
          "wl_example": ("pending", ())}, 0, True),  # allowlist off: pass either way
        ({"zen_example": ("nxdomain", ()), "bl_example": ("pending", ()),
          "wl_example": ("ok", ["127.0.0.2"])}, -1, False),  # -2 or 0
        ({"zen_example": ("nxdomain", ()), "bl_example": ("nxdomain", ()),
          "wl_example": ("ok", ["127.0.0.2"])}, -1, True),  # complete
        ({"zen_example": ("pending", ()), "bl_example": ("pending", ()),
          "wl_example": ("ok", ["127.0.0.2"])}, -1, False),
        ({"zen_example": ("pending", ()), "bl_example": ("nxdomain", ()),
          "wl_example": ("ok", ["127.0.0.2"])}, -5, True),  # -2 or 1: never <= -5, never >= 3
    ],
    ids=["listed-but-allowlist-pending", "listed-for-sure", "clean-allowlist-pending",
         "clean-allowlist-off", "allowlisted-block-pending", "complete",
         "two-pending", "neither-for-sure"],
)
def test_dnsbl_settled(zones, allowlist, expected):
    assert dnsbl.settled(
        SETTLE_SITES, result(**zones), threshold=3, allowlist_threshold=allowlist
    ) is expected
