"""rate_limits - anvil's per-client event rates and the per-login rates, decided.

SYNOPSIS
    MESSAGE, RECIPIENT, NEW_TLS, AUTH, LOGIN_MESSAGE, LOGIN_RECIPIENT    the events counted
    CLIENT_SETTINGS, LOGIN_SETTINGS, SETTINGS      each event's limit among the settings
    Limit(event, limit, key)            one counter to bump: what, its limit, whose
    exempt(ip, networks) -> bool        smtpd_client_event_limit_exceptions
    decide(event, rate, limit, *, ip, name="unknown", login="", hostname="",
           window=60) -> Verdict
    starttls_refused(rate, limit, *, ip, name="unknown", window=60) -> Verdict

DESCRIPTION
    The rest of Postfix's anvil limits (smtpd_client_message_rate_limit,
    smtpd_client_recipient_rate_limit, smtpd_client_new_tls_session_rate_limit,
    smtpd_client_auth_rate_limit), and two of smtpgate's own for
    submission: messages and recipients per SASL login. The counts come
    from smtpgate.lookups.event_rates (fixed windows in Redis, shared by
    every worker and host); `rate` is the count with this event included,
    and a limit is exceeded when rate > limit, as in Postfix's smtpd.c. A
    limit of 0 is off: the caller asks for no count then.

    decide() gives, with Postfix 3.7's smtpd words (ip is the client
    address, name[ip] Postfix's namaddr):
    - MESSAGE (at MAIL):      450 4.7.1 Error: too much mail from <ip>
    - RECIPIENT (at RCPT):    450 4.7.1 Error: too many recipients from <ip>
    - AUTH (at AUTH):         450 4.7.1 Error: too many AUTH commands from <ip>
    - NEW_TLS (after a TLS handshake that made a new session):
      421 4.7.0 <hostname> Error: too many new TLS sessions from <name[ip]>,
      and the session ends;
    - LOGIN_MESSAGE, LOGIN_RECIPIENT (smtpgate's, on submission):
      450 4.7.1 Error: too much mail from login <login>, and
      450 4.7.1 Error: too many recipients from login <login>.
    The session goes on after a 450. starttls_refused() is the check before
    a STARTTLS handshake, which reads the count without adding to it:
    `454 4.7.0 Error: too many new TLS sessions from <name[ip]>`, the session
    going on without TLS. The reason is Postfix's warning (`Message delivery
    request rate limit exceeded: 31 from name[ip]`), with the limit and
    window added. Each event has its own check name, so the rejection
    metric (smtpgate_rejections_total{check}) counts each limit apart.

    exempt() is smtpd_client_event_limit_exceptions by network (the
    caller passes config.event_limit_exceptions, $mynetworks written out):
    an exempt client's events are neither counted nor limited. The
    per-login limits have no exceptions: they guard against a stolen
    password, wherever it is used from.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from smtpgate.checks import access_list
from smtpgate.verdict import Outcome, Reply, Verdict

MESSAGE = "message"
RECIPIENT = "recipient"
NEW_TLS = "new_tls_session"
AUTH = "auth"
LOGIN_MESSAGE = "login_message"
LOGIN_RECIPIENT = "login_recipient"
EVENTS = (MESSAGE, RECIPIENT, NEW_TLS, AUTH, LOGIN_MESSAGE, LOGIN_RECIPIENT)

# each event's limit among the settings (smtpgate.config), the client's and the login's
CLIENT_SETTINGS = {
    MESSAGE: "client_message_rate_limit",
    RECIPIENT: "client_recipient_rate_limit",
    NEW_TLS: "client_new_tls_session_rate_limit",
    AUTH: "client_auth_rate_limit",
}
LOGIN_SETTINGS = {
    MESSAGE: (LOGIN_MESSAGE, "login_message_rate_limit"),
    RECIPIENT: (LOGIN_RECIPIENT, "login_recipient_rate_limit"),
}
SETTINGS = (*CLIENT_SETTINGS.values(), *(name for _, name in LOGIN_SETTINGS.values()))

# Postfix's warning for each event (smtpd.c), the log's reason
_WARNING = {
    MESSAGE: "Message delivery request rate limit exceeded",
    RECIPIENT: "Recipient address rate limit exceeded",
    NEW_TLS: "New TLS session rate limit exceeded",
    AUTH: "AUTH command rate limit exceeded",
    LOGIN_MESSAGE: "SASL login message rate limit exceeded",
    LOGIN_RECIPIENT: "SASL login recipient rate limit exceeded",
}


@dataclass(frozen=True, slots=True)
class Limit:
    event: str
    limit: int
    key: str  # whose: the client key (smtpgate.checks.limits.client_key) or the login


def check_name(event: str) -> str:
    return f"{event}_rate_limit"


def exempt(ip: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return access_list.network_of(ip, networks) is not None


def _reply(event: str, ip: str, namaddr: str, login: str, hostname: str) -> Reply:
    if event == MESSAGE:
        return Reply(450, "4.7.1", f"Error: too much mail from {ip}")
    if event == RECIPIENT:
        return Reply(450, "4.7.1", f"Error: too many recipients from {ip}")
    if event == AUTH:
        return Reply(450, "4.7.1", f"Error: too many AUTH commands from {ip}")
    if event == NEW_TLS:
        return Reply(421, "4.7.0", f"{hostname} Error: too many new TLS sessions from {namaddr}")
    if event == LOGIN_MESSAGE:
        return Reply(450, "4.7.1", f"Error: too much mail from login {login}")
    if event == LOGIN_RECIPIENT:
        return Reply(450, "4.7.1", f"Error: too many recipients from login {login}")
    raise ValueError(f"{event!r} is not a rate-limited event ({', '.join(EVENTS)})")


def decide(event: str, rate: int, limit: int, *, ip: str, name: str = "unknown",
           login: str = "", hostname: str = "", window: float = 60) -> Verdict:
    namaddr = f"{name}[{ip}]"
    whose = f"login {login}" if event in (LOGIN_MESSAGE, LOGIN_RECIPIENT) else namaddr
    if limit > 0 and rate > limit:
        return Verdict(check_name(event), Outcome.FAIL,
                       _reply(event, ip, namaddr, login, hostname),
                       f"{_WARNING[event]}: {rate} from {whose} (limit {limit}/{window:g}s)")
    return Verdict(check_name(event), Outcome.PASS,
                   reason=f"{whose}: {rate} of {limit}/{window:g}s")


def starttls_refused(rate: int, limit: int, *, ip: str, name: str = "unknown",
                     window: float = 60) -> Verdict:
    namaddr = f"{name}[{ip}]"
    if limit > 0 and rate > limit:
        return Verdict(check_name(NEW_TLS), Outcome.FAIL,
                       Reply(454, "4.7.0", f"Error: too many new TLS sessions from {namaddr}"),
                       f"Refusing STARTTLS request from {namaddr}: {rate} new TLS sessions "
                       f"(limit {limit}/{window:g}s)")
    return Verdict(check_name(NEW_TLS), Outcome.PASS,
                   reason=f"{namaddr}: {rate} new TLS sessions of {limit}/{window:g}s")
