"""sender - reject_non_fqdn_sender.

SYNOPSIS
    decide(sender: Path, *, smtputf8: bool = False) -> Verdict

DESCRIPTION
    sender is the parsed MAIL FROM path. The null sender and address
    literals pass; a sender whose domain is missing or not a fully
    qualified host name (one trailing dot allowed) gets, as from Postfix,
      504 5.5.2 <addr>: Sender address rejected: need fully-qualified address
    Malformed addresses never get here: smtpgate.address refuses them with
    501 5.1.7 Bad sender address syntax.
"""

from __future__ import annotations

from smtpgate.address import Path, is_address_literal, is_fqdn
from smtpgate.checks.access_verdict import printable
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "sender"
CLASS = "Sender address"


def decide(sender: Path, *, smtputf8: bool = False) -> Verdict:
    if sender.null:
        return Verdict(CHECK, Outcome.PASS, reason="null sender")
    if is_address_literal(sender.domain) or is_fqdn(sender.domain, smtputf8):
        return Verdict(CHECK, Outcome.PASS, reason="fully-qualified")
    text = f"<{printable(sender.address)}>: {CLASS} rejected: need fully-qualified address"
    return Verdict(CHECK, Outcome.FAIL, Reply(504, "5.5.2", text), "reject_non_fqdn_sender")
