"""sender_login - reject_sender_login_mismatch: MAIL FROM must belong to the SASL login.

SYNOPSIS
    decide(sender: str, login: str | None,
           owners: frozenset[str] | None | Literal["tempfail"],
           enabled: bool = True) -> Verdict
    TEMPFAIL

DESCRIPTION
    decide() applies Postfix's reject_sender_login_mismatch (smtpd_check.c:
    reject_auth_sender_login_mismatch, then reject_unauth_sender_login_mismatch)
    with the image's smtpd_sender_login_maps, the LOGMAP keys. `owners` is
    what the tables layer found for the sender (Tables.logmap(): LOGMAP:
    <address>, then LOGMAP:@<domain>), as `frozenset(hit.targets)` (the
    value split on spaces and commas, keys.split_targets); None when there
    is no key; TEMPFAIL when the lookup failed (TableError, or an invalid
    Hit: an empty value).

    - `enabled` false (config sender_login_check): SKIP.
    - the null sender `<>`: SKIP, as Postfix checks only a non-empty sender.
    - lookup failed: FAIL `451 4.3.0 <sender>: Temporary lookup failure`
      (Postfix's reject_dict_retry).
    - logged in, and the login is one of the owners (compared without
      regard to case, as Postfix's strcasecmp_utf8): PASS.
    - logged in, and no owner or other owners (the address is not in
      LOGMAP at all counts as a mismatch, as with reject_sender_login_mismatch,
      unlike reject_known_sender_login_mismatch): FAIL
      `553 5.7.1 <sender>: Sender address rejected: not owned by user <login>`.
    - not logged in, and the address has an owner: FAIL
      `553 5.7.1 <sender>: Sender address rejected: not logged in`.
    - not logged in, and no owner: PASS (nothing to protect).
"""

from __future__ import annotations

from typing import Literal

from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "sender_login"
TEMPFAIL: Literal["tempfail"] = "tempfail"

Owners = frozenset[str] | None | Literal["tempfail"]


def decide(sender: str, login: str | None, owners: Owners, enabled: bool = True) -> Verdict:
    if not enabled:
        return Verdict(CHECK, Outcome.SKIP, reason="sender_login_check off")
    if not sender:
        return Verdict(CHECK, Outcome.SKIP, reason="null sender")
    if owners == TEMPFAIL:
        return Verdict(
            CHECK, Outcome.FAIL, Reply(451, "4.3.0", f"<{sender}>: Temporary lookup failure"),
            reason=f"LOGMAP lookup for <{sender}> failed")
    shown = " ".join(sorted(owners)) if owners else "none"
    if login:
        wanted = login.casefold()
        if owners and any(owner.casefold() == wanted for owner in owners):
            return Verdict(CHECK, Outcome.PASS, reason=f"<{sender}> owned by {login}")
        return Verdict(
            CHECK, Outcome.FAIL,
            Reply(553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {login}"),
            reason=f"<{sender}> owners: {shown}; login {login}")
    if owners:
        return Verdict(
            CHECK, Outcome.FAIL,
            Reply(553, "5.7.1", f"<{sender}>: Sender address rejected: not logged in"),
            reason=f"<{sender}> owners: {shown}; not logged in")
    return Verdict(CHECK, Outcome.PASS, reason=f"<{sender}> has no owner; not logged in")
