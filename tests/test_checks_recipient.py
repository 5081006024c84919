"""Recipient checks: RECIP: actions and unknown users, plus the VALI/VBOX key order."""

from __future__ import annotations

import pytest

from smtpgate.checks.recipient import decide
from smtpgate.lookups import keys as key_formats
from smtpgate.verdict import Outcome

R = "user@dom.example"
UNKNOWN = f"550 5.1.1 <{R}>: Recipient address rejected: User unknown in virtual mailbox table"

# (id, access, local, listed, outcome, reply)
CASES = [
    ("known user", None, True, True, Outcome.PASS, None),
    ("unknown user", None, True, False, Outcome.FAIL, UNKNOWN),
    ("lookup failed", None, True, None, Outcome.FAIL,
     f"451 4.3.0 <{R}>: Temporary lookup failure"),
    ("relayed recipient skips table", None, False, False, Outcome.SKIP, None),
    ("RECIP reject (send-only account)", "reject", True, True, Outcome.FAIL,
     f"554 5.7.1 <{R}>: Recipient address rejected: Access denied"),
    ("RECIP REJECT with text", "REJECT send-only account", True, True, Outcome.FAIL,
     f"554 5.7.1 <{R}>: Recipient address rejected: send-only account"),
    ("RECIP 550 with text", "550 5.7.1 This account only sends", True, True, Outcome.FAIL,
     f"550 5.7.1 <{R}>: Recipient address rejected: This account only sends"),
    ("RECIP 450 with text", "450 mailbox moving", True, True, Outcome.FAIL,
     f"450 4.7.1 <{R}>: Recipient address rejected: mailbox moving"),
    ("RECIP defer", "DEFER", True, True, Outcome.FAIL,
     f"450 4.7.1 <{R}>: Recipient address rejected: Access denied"),
    ("RECIP permit still needs a user", "permit", True, False, Outcome.FAIL, UNKNOWN),
    ("RECIP OK and known", "OK", True, True, Outcome.PERMIT, None),
    ("RECIP dunno", "DUNNO", True, True, Outcome.PASS, None),
    ("RECIP dunno unknown", "dunno", True, False, Outcome.FAIL, UNKNOWN),
    ("RECIP reject beats unknown", "reject", True, False, Outcome.FAIL,
     f"554 5.7.1 <{R}>: Recipient address rejected: Access denied"),
    ("RECIP lookup failed", "tempfail", True, True, Outcome.FAIL,
     f"451 4.3.0 <{R}>: Recipient address rejected: Temporary lookup failure"),
    ("RECIP bad value", "FILTER smtp:x", True, True, Outcome.FAIL,
     f"451 4.3.0 <{R}>: Recipient address rejected: Temporary lookup failure"),
]


@pytest.mark.parametrize("access,local,listed,outcome,reply", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_recipient(access, local, listed, outcome, reply):
    verdict = decide(R, local=local, listed=listed, access=access)
    assert verdict.check == "recipient"
    assert verdict.outcome is outcome
    assert (str(verdict.reply) if verdict.reply else None) == reply
    assert verdict.reason


def test_unknown_user_without_the_table_name():
    """Postfix's show_user_unknown_table_name = no, the docker-postfix-redis image's."""
    verdict = decide(R, local=True, listed=False, show_table=False)
    assert str(verdict.reply) == f"550 5.1.1 <{R}>: Recipient address rejected: User unknown"


@pytest.mark.parametrize("address,keys", [
    ("user@dom.example", ("user@dom.example", "@dom.example")),
    ("User+Tag@Dom.Example", ("user+tag@dom.example", "user@dom.example", "@dom.example")),
    ("a+b+c@dom.example", ("a+b+c@dom.example", "a@dom.example", "@dom.example")),
    ("+leading@dom.example", ("+leading@dom.example", "@dom.example")),
    ("postmaster", ("postmaster",)),
], ids=["plain", "tag and case", "first delimiter", "leading delimiter kept", "no domain"])
def test_listed_is_looked_up_in_virtual_order(address, keys):
    """What `listed` is decided from: the keys' one home, smtpgate.lookups.keys."""
    for prefix in (key_formats.VALI, key_formats.VBOX):
        assert key_formats.address_keys(prefix, address) == [f"{prefix}:{k}" for k in keys]
