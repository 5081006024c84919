"""Tests of checks/sender_login: reject_sender_login_mismatch as a table of labelled cases."""

import pytest

from smtpgate.checks.sender_login import TEMPFAIL, decide
from smtpgate.verdict import Outcome

U1 = "user1@example.com"
U2 = "user2@example.com"

CASES = [
    # (id, sender, login, owners, enabled, outcome, reply)
    ("own-address", U1, U1, frozenset({U1}), True, Outcome.PASS, None),
    ("one-of-several-owners", "sales@example.com", U2, frozenset({U1, U2}), True,
     Outcome.PASS, None),
    ("owner-case-differs", "User1@Example.com", "USER1@example.COM", frozenset({U1}), True,
     Outcome.PASS, None),
    ("someone-elses-address", U2, U1, frozenset({U2}), True, Outcome.FAIL,
     "553 5.7.1 <user2@example.com>: Sender address rejected: not owned by user "
     "user1@example.com"),
    ("address-without-owner", "stranger@example.org", U1, None, True, Outcome.FAIL,
     "553 5.7.1 <stranger@example.org>: Sender address rejected: not owned by user "
     "user1@example.com"),
    ("empty-owner-list", U1, U1, frozenset(), True, Outcome.FAIL,
     "553 5.7.1 <user1@example.com>: Sender address rejected: not owned by user "
     "user1@example.com"),
    ("owner-is-prefix-of-login", U1, "user1@example.com.evil", frozenset({U1}), True,
     Outcome.FAIL,
     "553 5.7.1 <user1@example.com>: Sender address rejected: not owned by user "
     "user1@example.com.evil"),
    ("not-logged-in-owned-address", U1, None, frozenset({U1}), True, Outcome.FAIL,
     "553 5.7.1 <user1@example.com>: Sender address rejected: not logged in"),
    ("not-logged-in-unowned-address", "a@example.org", None, None, True, Outcome.PASS, None),
    ("empty-login-is-not-logged-in", U1, "", frozenset({U1}), True, Outcome.FAIL,
     "553 5.7.1 <user1@example.com>: Sender address rejected: not logged in"),
    ("null-sender", "", U1, None, True, Outcome.SKIP, None),
    ("check-off", U2, U1, frozenset({U2}), False, Outcome.SKIP, None),
    ("lookup-failed", U1, U1, TEMPFAIL, True, Outcome.FAIL,
     "451 4.3.0 <user1@example.com>: Temporary lookup failure"),
    ("check-off-beats-tempfail", U1, U1, TEMPFAIL, False, Outcome.SKIP, None),
]


@pytest.mark.parametrize(
    ("sender", "login", "owners", "enabled", "outcome", "reply"),
    [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(sender, login, owners, enabled, outcome, reply):
    verdict = decide(sender, login, owners, enabled)
    assert verdict.check == "sender_login"
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert verdict.reason
