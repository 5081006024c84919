"""Tests of checks/rate_limits: anvil's event limits and the per-login ones, as labelled cases.

The replies are Postfix 3.7's smtpd.c words (mail_cmd, rcpt_cmd, smtpd_sasl_auth_cmd_wrapper,
starttls_cmd, smtpd_start_tls); the per-login ones are smtpgate's own, in the same shape.
"""

import ipaddress

import pytest

from smtpgate.checks import rate_limits
from smtpgate.checks.rate_limits import (
    AUTH,
    LOGIN_MESSAGE,
    LOGIN_RECIPIENT,
    MESSAGE,
    NEW_TLS,
    RECIPIENT,
    decide,
    exempt,
    starttls_refused,
)
from smtpgate.verdict import Outcome

IP = "192.0.2.7"
NAME = "mail.example.net"

CASES = [
    # (id, event, rate, limit, outcome, reply)
    ("message-at-limit", MESSAGE, 3, 3, Outcome.PASS, None),
    ("message-over", MESSAGE, 4, 3, Outcome.FAIL, "450 4.7.1 Error: too much mail from 192.0.2.7"),
    ("recipient-over", RECIPIENT, 11, 10, Outcome.FAIL,
     "450 4.7.1 Error: too many recipients from 192.0.2.7"),
    ("auth-over", AUTH, 2, 1, Outcome.FAIL,
     "450 4.7.1 Error: too many AUTH commands from 192.0.2.7"),
    ("new-tls-over-ends-the-session", NEW_TLS, 3, 2, Outcome.FAIL,
     "421 4.7.0 mx.gate.test Error: too many new TLS sessions from mail.example.net[192.0.2.7]"),
    ("login-message-over", LOGIN_MESSAGE, 101, 100, Outcome.FAIL,
     "450 4.7.1 Error: too much mail from login user1@example.com"),
    ("login-recipient-over", LOGIN_RECIPIENT, 2, 1, Outcome.FAIL,
     "450 4.7.1 Error: too many recipients from login user1@example.com"),
    ("login-recipient-under", LOGIN_RECIPIENT, 1, 1, Outcome.PASS, None),
    ("limit-zero-is-off", RECIPIENT, 10**6, 0, Outcome.PASS, None),
]


@pytest.mark.parametrize(("event", "rate", "limit", "outcome", "reply"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(event, rate, limit, outcome, reply):
    verdict = decide(event, rate, limit, ip=IP, name=NAME, login="user1@example.com",
                     hostname="mx.gate.test", window=60)
    assert verdict.check == f"{event}_rate_limit"  # one rejection metric label per limit
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert verdict.reason


def test_the_reason_is_postfixs_warning_with_the_limit():
    verdict = decide(MESSAGE, 31, 30, ip=IP, name=NAME, window=60)
    assert verdict.reason == ("Message delivery request rate limit exceeded: 31 from "
                              "mail.example.net[192.0.2.7] (limit 30/60s)")
    login = decide(LOGIN_RECIPIENT, 501, 500, ip=IP, login="u@example.com", window=3600)
    assert login.reason == ("SASL login recipient rate limit exceeded: 501 from login "
                            "u@example.com (limit 500/3600s)")


@pytest.mark.parametrize(("rate", "limit", "reply"), [
    pytest.param(2, 2, None, id="at-the-limit-the-handshake-goes-ahead"),
    pytest.param(3, 2, "454 4.7.0 Error: too many new TLS sessions from unknown[192.0.2.7]",
                 id="over-it-454"),
    pytest.param(99, 0, None, id="off"),
])
def test_starttls_refused_before_the_handshake(rate, limit, reply):
    verdict = starttls_refused(rate, limit, ip=IP)
    assert verdict.check == "new_tls_session_rate_limit"
    assert (str(verdict.reply) if verdict.reply else None) == reply


NETWORKS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(("ip", "spared"), [
    pytest.param("192.0.2.200", True, id="in-a-network"),
    pytest.param("::ffff:192.0.2.1", True, id="ipv4-mapped"),
    pytest.param("2001:db8:1::5", True, id="ipv6"),
    pytest.param("198.51.100.1", False, id="outside"),
    pytest.param("not an address", False, id="garbage-is-not-spared"),
])
def test_exempt(ip, spared):
    assert exempt(ip, NETWORKS) is spared


def test_an_unknown_event_is_a_bug_not_a_pass():
    with pytest.raises(ValueError, match="rate-limited event"):
        rate_limits.decide("vrfy", 5, 1, ip=IP)


def test_each_events_limit_is_a_setting_off_by_default():
    from smtpgate.config import Config

    defaults = Config()
    assert len(rate_limits.SETTINGS) == 6
    assert all(getattr(defaults, name) == 0 for name in rate_limits.SETTINGS)
