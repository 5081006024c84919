"""destination - the image's smtpd_relay_restrictions for one recipient.

SYNOPSIS
    decide(rcpt: Path, *, local: bool, trusted: bool, domain_dns: str | None = None,
           smtputf8: bool = False, unknown_domain_code: int = 450,
           allow_trusted_routing: bool = False) -> Verdict
    is_postmaster(rcpt: Path) -> bool

DESCRIPTION
    In Postfix's order: reject_non_fqdn_recipient,
    reject_unknown_recipient_domain, permit_mynetworks,
    reject_unauth_destination.

    rcpt is the parsed RCPT TO path (smtpgate.address.parse_path). local
    is the VDOM fact: mail for the domain is accepted here. trusted means
    mynetworks or an authenticated client, which may relay. domain_dns is
    the A/AAAA/MX status of a non-local domain ("ok", "notfound",
    "tempfail"; None: not looked up, test skipped). Replies:

      504 5.5.2 <rcpt>: Recipient address rejected: need fully-qualified address
      450 4.1.2 <rcpt>: Recipient address rejected: Domain not found
      554 5.7.1 <rcpt>: Relay access denied

    The bare "<postmaster>" that RFC 5321 obliges every server to accept
    passes (is_postmaster() tells the caller to treat it as
    postmaster@$DOMAIN). Address literals skip the FQDN test.

    Routing tricks never relay. Postfix's trivial-rewrite turns
    user%host@local and host!user@local into user@host, and with
    allow_untrusted_routing = no refuses them for untrusted clients; a
    source route, or a local part carrying "@", "%" or "!" (quoted or not),
    is here refused with "Relay access denied" for every client, trusted
    ones included, since smtpgate hands the address to a Postfix that
    would rewrite and relay it (allow_trusted_routing=True lets trusted
    clients through, as Postfix's permit_mynetworks would).
"""

from __future__ import annotations

from smtpgate.address import Path, is_address_literal, is_fqdn
from smtpgate.checks.access_verdict import printable
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "destination"
CLASS = "Recipient address"


def is_postmaster(rcpt: Path) -> bool:
    return not rcpt.domain and not rcpt.route and rcpt.local.lower() == "postmaster"


def decide(rcpt: Path, *, local: bool, trusted: bool, domain_dns: str | None = None,
           smtputf8: bool = False, unknown_domain_code: int = 450,
           allow_trusted_routing: bool = False) -> Verdict:
    shown = printable(rcpt.address)
    if is_postmaster(rcpt):
        return Verdict(CHECK, Outcome.PASS, reason="RFC 5321 postmaster")
    domain = rcpt.domain
    if not is_address_literal(domain) and not is_fqdn(domain, smtputf8):
        return Verdict(CHECK, Outcome.FAIL,
                       Reply(504, "5.5.2",
                             f"<{shown}>: {CLASS} rejected: need fully-qualified address"),
                       "reject_non_fqdn_recipient")
    if rcpt.routed and not (trusted and allow_trusted_routing):
        return _relay_denied(shown, f"routed address ({_routing(rcpt)}) never relays")
    if not local and domain_dns is not None and domain_dns != "ok" \
            and not is_address_literal(domain):
        code = 450 if domain_dns == "tempfail" else unknown_domain_code
        return Verdict(CHECK, Outcome.FAIL,
                       Reply(code, f"{str(code)[0]}.1.2",
                             f"<{shown}>: {CLASS} rejected: Domain not found"),
                       f"reject_unknown_recipient_domain: {domain} {domain_dns}")
    if trusted:
        return Verdict(CHECK, Outcome.PERMIT, reason="permit_mynetworks")
    if local:
        return Verdict(CHECK, Outcome.PASS, reason=f"{domain} is a local domain")
    return _relay_denied(shown, f"{domain} is not a local domain")


def _relay_denied(shown: str, reason: str) -> Verdict:
    return Verdict(CHECK, Outcome.FAIL, Reply(554, "5.7.1", f"<{shown}>: Relay access denied"),
                   f"reject_unauth_destination: {reason}")


def _routing(rcpt: Path) -> str:
    if rcpt.route:
        return "source route @" + ",@".join(rcpt.route)
    chars = "".join(ch for ch in "@%!" if ch in rcpt.local)
    return f"local part contains {chars}"
