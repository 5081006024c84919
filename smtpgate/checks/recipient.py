"""recipient - RECIP: access and reject_unlisted_recipient for one recipient.

SYNOPSIS
    decide(rcpt: str, *, local: bool, listed: bool | None,
           access: str | None = None, show_table: bool = True) -> Verdict

DESCRIPTION
    rcpt is the recipient in internal form (Path.address). access is the
    RECIP: value for it (None: no key; "tempfail": the lookup failed), an
    access(5) action: REJECT [text] (554 5.7.1 ... Access denied), DEFER,
    "4xx text", "5xx text" fail the recipient with
    "<rcpt>: Recipient address rejected: <text>"; OK/permit and DUNNO go on,
    because in Postfix an access OK does not bypass the unlisted-recipient
    test that follows (smtpd_reject_unlisted_recipient).

    For a local domain, listed says whether the address is in VALI or VBOX
    under one of its keys (None: the lookup failed); which keys, in which
    order, is smtpgate.lookups.keys's to say (address_keys, recip_keys),
    the one home of every key format. Not listed:
      550 5.1.1 <rcpt>: Recipient address rejected: User unknown in virtual mailbox table
    or, with show_table False (Postfix's show_user_unknown_table_name = no,
    the docker-postfix-redis image's setting), "... rejected: User unknown".
    a failed lookup:
      451 4.3.0 <rcpt>: Temporary lookup failure
    A non-local recipient (relayed for a trusted client) skips the test.
"""

from __future__ import annotations

from smtpgate.checks import access_verdict
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "recipient"
CLASS = "Recipient address"


def decide(rcpt: str, *, local: bool, listed: bool | None,
           access: str | None = None, show_table: bool = True) -> Verdict:
    shown = access_verdict.printable(rcpt)
    table = access_verdict.evaluate(CHECK, access, shown, CLASS)
    if table is not None and table.failed:
        return Verdict(CHECK, table.outcome, table.reply, f"RECIP: {table.reason}")
    permitted = table is not None and table.outcome is Outcome.PERMIT
    if not local:
        return Verdict(CHECK, Outcome.PERMIT if permitted else Outcome.SKIP,
                       reason="not a local domain")
    if listed is None:
        return Verdict(CHECK, Outcome.FAIL,
                       Reply(451, "4.3.0", f"<{shown}>: Temporary lookup failure"),
                       "VALI/VBOX lookup failed")
    if not listed:
        unknown = "User unknown in virtual mailbox table" if show_table else "User unknown"
        return Verdict(CHECK, Outcome.FAIL,
                       Reply(550, "5.1.1", f"<{shown}>: {CLASS} rejected: {unknown}"),
                       "reject_unlisted_recipient: not in VALI or VBOX")
    return Verdict(CHECK, Outcome.PERMIT if permitted else Outcome.PASS,
                   reason="RECIP permit; listed" if permitted else "listed")

