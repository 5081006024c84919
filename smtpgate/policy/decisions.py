"""decisions - a check decided again from the facts it decided on, under any configuration.

SYNOPSIS
    FACTS_VERSION
    decide(check, facts, config) -> Verdict | None
    Redecider(config, view=None)                     one per session re-decided
        redecider.decide(check, facts) -> Verdict | None
    disagreement(live, other, reply_text=None) -> str | None
                                                     "refuse", "accept", "reply" or None
    CHECKS                                           the checks that can be decided again

DESCRIPTION
    The policy (smtpgate.policy.stages) fetches facts (table answers, DNS
    and DNSBL answers, connection counts, what the client sent) and hands
    them to each check's pure decide(). For shadow rules and replay the
    facts of each check are also written as plain values (a dict of str,
    numbers, lists and None: JSON as it is), and this module decides the
    check again from them under another configuration: the candidate's
    settings, and, through `view`, the candidate's table keys
    (smtpgate.lookups.shadow_tables). Nothing is looked up again.

    decide() gives None when the facts cannot decide under that
    configuration: a fact the live session never fetched because it did
    not need it (a HELO name's DNS, skipped because an HLO key decided). A
    DNSBL zone the live configuration does not query has no answer: it
    counts as not listed.

    Redecider carries what one check's verdict means for the later ones of
    the same session, as the policy does: a permit of the access list or
    the DNSBL allowlist skips the screening tests (pregreet, dnsbl and the
    deep protocol tests), which then PASS. A screening test the live
    session skipped (its client was permitted) has no facts, so removing a
    permit is seen at the access list only.

    disagreement() compares two verdicts of one check: "refuse" when only
    the other refuses, "accept" when only the live one does, "reply" when
    both refuse with different replies; None when they agree.

    FACTS_VERSION names the shape of the facts; a record written with
    another version is not read (smtpgate.cli.replay counts it).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from smtpgate.address import Path, split
from smtpgate.checks import (
    access_list,
    client_fcrdns,
    destination,
    helo,
    limits,
    pregreet,
    protocol,
    recipient,
    sender,
    sender_login,
)
from smtpgate.checks import dnsbl as dnsbl_check
from smtpgate.checks.client_fcrdns import FcrdnsFacts, Forward
from smtpgate.checks.dnsbl import DnsblResult, ZoneResult
from smtpgate.checks.helo import HeloDns
from smtpgate.dnsbl_sites import parse_sites
from smtpgate.verdict import Outcome, Verdict

FACTS_VERSION = 1
Facts = dict[str, Any]
SCREENING = frozenset({"pregreet", "dnsbl", *protocol.TESTS})


def _bytes(text: str) -> bytes:
    return text.encode("latin-1", "replace")


@lru_cache(maxsize=8)
def _sites(dnsbl_sites: tuple[str, ...]) -> tuple:
    return tuple(parse_sites(" ".join(dnsbl_sites)))


def _access_list(f: Facts, config: Any) -> Verdict:
    psa = f.get("psa")
    return access_list.decide(
        f["ip"], psa[1] if psa else None, mynetworks=config.mynetworks if f["mynet"] else (),
        action=config.access_reject_action, psa_key=psa[0] if psa else "")


def _limits(f: Facts, config: Any) -> Verdict:
    return limits.decide(
        f["ip"], client_count=f["count"], client_rate=f["rate"], total=f["total"],
        count_limit=config.client_connection_count_limit,
        rate_limit=config.client_connection_rate_limit,
        connection_limit=config.connection_limit, hostname=config.hostname,
        exempt=f["exempt"], window=config.anvil_rate_time_unit)


def _pregreet(f: Facts, config: Any) -> Verdict:
    return pregreet.decide(_bytes(f["received"]), f["delay"], f["ip"], f["port"],
                           action=config.greet_action, ttl=config.greet_ttl)


def dnsbl_result(f: Facts) -> DnsblResult:
    return DnsblResult(f["ip"], tuple(ZoneResult(z, s, tuple(a), t) for z, s, a, t in f["zones"]),
                       f["ttl"])


def _dnsbl(f: Facts, config: Any) -> Verdict:
    return dnsbl_check.decide(
        dnsbl_result(f), _sites(config.dnsbl_sites), threshold=config.dnsbl_threshold,
        allowlist_threshold=config.dnsbl_allowlist_threshold, action=config.dnsbl_action,
        reply_map=config.dnsbl_reply_map)


def _pipelining(f: Facts, config: Any) -> Verdict:
    return protocol.pipelining(f["line"], _bytes(f["pending"]), f["ip"], f["port"],
                               pipelining_offered=f["esmtp"], action=config.pipelining_action)


def _non_smtp_command(f: Facts, config: Any) -> Verdict:
    return protocol.non_smtp_command(f["line"], f["ip"], f["port"], after=f["after"],
                                     action=config.non_smtp_command_action)


def _bare_newline(f: Facts, config: Any) -> Verdict:
    return protocol.bare_newline(_bytes(f["line"]), f["ip"], f["port"], after=f["after"],
                                 action=config.bare_newline_action)


def _helo(f: Facts, config: Any) -> Verdict | None:
    dns = f.get("dns")
    verdict = helo.decide(
        f["name"], access=f.get("access"),
        dns=HeloDns(dns[0], dns[1], tuple(dns[2]), tuple(dns[3])) if dns else None,
        unknown_code=config.unknown_helo_reject_code)
    if dns is None and verdict.reason == helo.NO_DNS:
        return None  # an HLO key decided live: the name's DNS was never asked
    return verdict


def _path(address: str, route: list[str] | tuple[str, ...] = ()) -> Path:
    local, domain = split(address)
    return Path(address, local, domain, route=tuple(route))


def _sender(f: Facts, config: Any) -> Verdict:
    return sender.decide(_path(f["sender"]), smtputf8=f["utf8"])


def _sender_login(f: Facts, config: Any) -> Verdict:
    owners = f.get("owners")
    if isinstance(owners, list):
        owners = frozenset(owners)
    return sender_login.decide(f["sender"], f.get("login"), owners,
                               enabled=config.sender_login_check)


def fcrdns_facts(f: Facts) -> FcrdnsFacts:
    return FcrdnsFacts(f["ip"], f["status"], tuple(f["ptr"]),
                       tuple(Forward(n, s, tuple(a)) for n, s, a in f["forward"]), f["ttl"])


def _client_fcrdns(f: Facts, config: Any) -> Verdict:
    rev_ip = f.get("rev_ip")
    return client_fcrdns.decide(
        fcrdns_facts(f), rev_ip=rev_ip[1] if rev_ip else None,
        rev_by_name=f.get("rev_by_name") or {}, unknown_code=config.unknown_client_reject_code)


def _destination(f: Facts, config: Any) -> Verdict:
    path = _path(f["rcpt"], f.get("route") or ())
    postmaster = destination.is_postmaster(path)
    return destination.decide(
        path, local=f.get("vdom") is not None or postmaster, trusted=f["trusted"],
        smtputf8=f["utf8"], allow_trusted_routing=config.allow_trusted_routing)


def _recipient(f: Facts, config: Any) -> Verdict:
    recip = f.get("recip")
    return recipient.decide(
        f["rcpt"], local=f.get("vdom") is not None,
        listed=f.get("vali") is not None or f.get("vbox") is not None,
        access=recip[1] if recip else None, show_table=config.show_user_unknown_table_name)


_DECIDE: dict[str, Callable[[Facts, Any], Verdict | None]] = {
    "access_list": _access_list, "limits": _limits, "pregreet": _pregreet, "dnsbl": _dnsbl,
    "pipelining": _pipelining, "non_smtp_command": _non_smtp_command,
    "bare_newline": _bare_newline, "helo": _helo, "sender": _sender,
    "sender_login": _sender_login, "client_fcrdns": _client_fcrdns,
    "destination": _destination, "recipient": _recipient,
}
CHECKS = tuple(_DECIDE)


def decide(check: str, facts: Facts, config: Any) -> Verdict | None:
    """The check's verdict from its facts under config; KeyError for an unknown check."""
    return _DECIDE[check](facts, config)


class Redecider:
    """One session's checks decided again, in the order the session took them."""

    __slots__ = ("config", "permitted", "view")

    def __init__(self, config: Any, view: Any = None) -> None:
        self.config = config
        self.view = view  # .facts(check, facts) -> facts with the candidate table keys
        self.permitted = False

    def decide(self, check: str, facts: Facts) -> Verdict | None:
        if self.permitted and check in SCREENING:
            return Verdict(check, Outcome.PASS, reason="permitted before screening")
        if self.view is not None:
            facts = self.view.facts(check, facts)
        verdict = _DECIDE[check](facts, self.config)
        if verdict is not None and verdict.outcome is Outcome.PERMIT and \
                check in ("access_list", "dnsbl"):
            self.permitted = True
        return verdict


def disagreement(live: Verdict, other: Verdict, reply_text: str | None = None) -> str | None:
    """reply_text: the live reply as written (a record's), in place of live.reply."""
    if live.failed != other.failed:
        return "refuse" if other.failed else "accept"
    if live.failed:
        before = reply_text if reply_text is not None else str(live.reply)
        if before != str(other.reply):
            return "reply"
    return None
