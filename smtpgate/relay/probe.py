"""probe - ask the next hop, before any mail, whether it will take smtpgate's hand-offs.

SYNOPSIS
    await probe_next_hop(hop, ehlo_name, timeout, relay=False) -> HopProbe
    HopProbe(hop, error, source, xclient, xclient_reply, extensions, ipv6_reply, relay_reply)
    probe.reached ; probe.authorized
    hop_findings(probe, ipv6_clients="") -> list[Finding]     ipv6_clients: "listener", "proxy", ""
    carried_extensions(probe) -> frozenset[str] | None
    CARRIED, PROBE_ADDR, PROBE_ADDR6, PROBE_LOGIN, PROBE_RCPT

DESCRIPTION
    probe_next_hop() talks to the next hop with aiosmtplib, the way the
    relay will (smtpgate.relay.next_hop), and records what it heard:

    1. banner, EHLO: is XCLIENT offered, with which attributes? (Postfix
       lists XCLIENT only to hosts in smtpd_authorized_xclient_hosts.)
    2. XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE], sent even when not
       offered, for the evidence: 220 authorized; Postfix answers "550
       5.7.0 Error: insufficient authorization" to other hosts, and a
       server without XCLIENT 502.
    3. EHLO again after a 220 (Postfix answers EHLO anew for the client
       it now speaks for): the extensions that client gets, which are the
       ones a relayed message can use.
    4. A second connection: XCLIENT ADDR=IPV6:2001:db8::1. Postfix 3.7
       with inet_protocols = ipv4 answers "501 5.5.4 Bad ADDR syntax:
       IPV6:2001:db8::1"; with inet_protocols = all (or ipv6), 220.

    5. With relay (a submission next hop), a third connection: XCLIENT
       ADDR=192.0.2.1 LOGIN=smtpgate-probe, EHLO, MAIL FROM:<>, RCPT
       TO:<postmaster@[192.0.2.2]> (an address literal: no DNS, no
       domain of ours), then RSET: does the hop relay to another domain
       for an authenticated login? Postfix's submission service
       (conf/postfix/submission.cf) answers 250; the MX service
       (next-hop.cf) "554 5.7.1 <postmaster@[192.0.2.2]>: Relay access
       denied", which a user would hear only after sending the whole
       message. No mail is sent.

    The documentation addresses (RFC 5737, RFC 3849) stand for the
    client, so Postfix logs the probe as a connect from smtpgate and a
    "disconnect from unknown[192.0.2.1] ehlo=2 xclient=0/1 quit=1" (and
    one from unknown[2001:db8::1], or from smtpgate when IPv6 is
    refused), without a transaction.
    Failing to connect or to be greeted is recorded in `error`, never
    raised.

    hop_findings() turns a probe into findings, each naming the Postfix
    setting that would change it:
    - error: XCLIENT refused or not offered (every message would get
      451); a submission next hop that refuses (5xx) to relay for an
      authenticated login; IPv6 addresses refused when smtpgate has IPv6 clients for
      certain (ipv6_clients "listener": it listens on an IPv6 address);
      the next hop not reached.
    - ok, as a note: a submission next hop's temporary (4xx) answer to
      the relay test (its tables may be smtpgate's socketmap, not up yet).
    - warning: IPv6 addresses refused when smtpgate may have IPv6
      clients (ipv6_clients "proxy": a PROXY balancer may pass them on,
      or may speak IPv4 only); SMTPUTF8, 8BITMIME or DSN not offered
      (smtpgate stops offering it too: see carried_extensions()).
    - ok: what works, one line; notes on CHUNKING and PIPELINING, which
      the relay does without.
    carried_extensions() is the part of CARRIED that the next hop offers
    (after XCLIENT), or None when the probe learned nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aiosmtplib

from smtpgate.config import HostPort
from smtpgate.verdict import Finding

PROBE_ADDR = "192.0.2.1"  # RFC 5737 TEST-NET-1
PROBE_ADDR6 = "2001:db8::1"  # RFC 3849
PROBE_LOGIN = "smtpgate-probe"
PROBE_RCPT = "postmaster@[192.0.2.2]"  # another domain, and no DNS lookup for it
SUBMISSION_FIX = ("point SMTPGATE_SUBMISSION_NEXT_HOP at Postfix's submission service "
                  "(conf/postfix/submission.cf, port 10587), which relays for XCLIENT LOGIN")
# what smtpgate offers its clients only when the next hop offers it too
CARRIED = ("8BITMIME", "DSN", "SMTPUTF8")
NOTED = ("CHUNKING", "PIPELINING")  # the relay does without these

_FIX = {
    "SMTPUTF8": "smtputf8_enable = yes",
    "8BITMIME": "8bitmime out of smtpd_discard_ehlo_keywords",
    "DSN": "dsn out of smtpd_discard_ehlo_keywords",
}


@dataclass(frozen=True, slots=True)
class HopProbe:
    hop: HostPort
    error: str | None = None  # the next hop could not be reached or did not greet
    source: str = ""  # smtpgate's address as the next hop sees it
    xclient: frozenset[str] | None = None  # attributes in the first EHLO; None: not offered
    xclient_reply: str = ""  # the answer to XCLIENT ADDR=192.0.2.1 ...
    extensions: frozenset[str] = frozenset()  # EHLO keywords after XCLIENT (else before it)
    ipv6_reply: str = ""  # the answer to XCLIENT ADDR=IPV6:2001:db8::1; "" not asked
    relay_reply: str = ""  # RCPT TO:<PROBE_RCPT> after XCLIENT LOGIN=; "" not asked

    @property
    def reached(self) -> bool:
        return self.error is None

    @property
    def authorized(self) -> bool:
        return self.xclient_reply.startswith("220")

    @property
    def ipv6_accepted(self) -> bool:
        return self.ipv6_reply.startswith("220")


# --- the I/O ----------------------------------------------------------------------------------


async def probe_next_hop(hop: HostPort, ehlo_name: str, timeout: float,
                         relay: bool = False) -> HopProbe:
    try:
        source, xclient, reply, extensions = await _first_connection(hop, ehlo_name, timeout)
        ipv6 = relayed = ""
        if reply.startswith("220"):
            ipv6 = await _ipv6_connection(hop, ehlo_name, timeout, xclient or frozenset())
            if relay:
                relayed = await _relay_connection(hop, ehlo_name, timeout)
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
        return HopProbe(hop, error=_reason(exc))
    return HopProbe(hop, source=source, xclient=xclient, xclient_reply=reply,
                    extensions=extensions, ipv6_reply=ipv6, relay_reply=relayed)


async def _first_connection(hop: HostPort, ehlo_name: str, timeout: float):
    smtp = _client(hop, ehlo_name, timeout)
    await smtp.connect()
    try:
        sockname = smtp.get_transport_info("sockname") or ("", 0)
        await smtp.ehlo()
        xclient = _attributes(smtp.esmtp_extensions)
        extensions = _keywords(smtp.esmtp_extensions)
        reply = await _xclient(smtp, PROBE_ADDR, xclient or frozenset())
        if reply.startswith("220"):
            await smtp.ehlo()
            extensions = _keywords(smtp.esmtp_extensions)
        await _quit(smtp)
    finally:
        smtp.close()
    return sockname[0], xclient, reply, extensions


async def _ipv6_connection(hop: HostPort, ehlo_name: str, timeout: float,
                           offered: frozenset[str]) -> str:
    smtp = _client(hop, ehlo_name, timeout)
    await smtp.connect()
    try:
        # XCLIENT right after the banner, as the relay's pooled connections send it
        reply = await _xclient(smtp, f"IPV6:{PROBE_ADDR6}", offered)
        await _quit(smtp)
    finally:
        smtp.close()
    return reply


async def _relay_connection(hop: HostPort, ehlo_name: str, timeout: float) -> str:
    """The answer to a recipient in another domain, for an authenticated login."""
    smtp = _client(hop, ehlo_name, timeout)
    await smtp.connect()
    try:
        response = await smtp.execute_command(
            b"XCLIENT", f"ADDR={PROBE_ADDR}".encode(), b"NAME=[UNAVAILABLE]",
            f"LOGIN={PROBE_LOGIN}".encode())
        if response.code != 220:
            return f"XCLIENT LOGIN: {_one_line(response.code, response.message)}"
        await smtp.ehlo()
        response = await smtp.execute_command(b"MAIL", b"FROM:<>")
        if response.code == 250:
            response = await smtp.execute_command(b"RCPT", f"TO:<{PROBE_RCPT}>".encode())
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.execute_command(b"RSET")
        await _quit(smtp)
    finally:
        smtp.close()
    return _one_line(response.code, response.message)


def _client(hop: HostPort, ehlo_name: str, timeout: float) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname=hop.host, port=hop.port, local_hostname=ehlo_name,
                           timeout=timeout, start_tls=False, use_tls=False)


async def _xclient(smtp: aiosmtplib.SMTP, addr: str, offered: frozenset[str]) -> str:
    # ADDR and NAME whether offered or not: a refusal is the evidence we are after
    args = [b"ADDR=" + addr.encode("ascii")]
    if not offered or "NAME" in offered:
        args.append(b"NAME=[UNAVAILABLE]")
    response = await smtp.execute_command(b"XCLIENT", *args)
    return _one_line(response.code, response.message)


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        await smtp.execute_command(b"QUIT")  # a failure here changes nothing the probe found


def _attributes(extensions: dict[str, str]) -> frozenset[str] | None:
    if "xclient" not in extensions:
        return None
    return frozenset(extensions["xclient"].upper().split())


def _keywords(extensions: dict[str, str]) -> frozenset[str]:
    return frozenset(keyword.upper() for keyword in extensions)


def _one_line(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _one_line(exc.code, exc.message)
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# --- the findings -----------------------------------------------------------------------------


def carried_extensions(probe: HopProbe) -> frozenset[str] | None:
    if not probe.reached or not probe.authorized:
        return None
    return frozenset(name for name in CARRIED if name in probe.extensions)


def hop_findings(probe: HopProbe, ipv6_clients: str = "") -> list[Finding]:
    hop = probe.hop
    if not probe.reached:
        return [Finding("error", f"next hop {hop} cannot be reached: {probe.error}")]
    if not probe.authorized:
        return [_xclient_refused(probe)]
    found = []
    if probe.ipv6_accepted:
        ipv6 = "IPv6 client addresses accepted"
    elif ipv6_clients:
        listener = ipv6_clients == "listener"
        has = ("smtpgate listens on IPv6" if listener
               else "the PROXY balancer may pass on IPv6 clients")
        found.append(Finding("error" if listener else "warning",
                             f"next hop {hop} refuses IPv6 client addresses (XCLIENT "
                             f"ADDR=IPV6:{PROBE_ADDR6}: {probe.ipv6_reply}), and {has}: every "
                             "message from one would get 451; set inet_protocols = all in "
                             "Postfix's main.cf"))
        ipv6 = "IPv6 client addresses refused"
    else:
        ipv6 = "IPv6 client addresses refused (smtpgate has no IPv6 listener)"
    found += _relay_findings(probe)
    for name in CARRIED:
        if name not in probe.extensions:
            found.append(Finding("warning", f"next hop {hop} does not offer {name}, so "
                                            f"smtpgate does not offer it to clients; in "
                                            f"Postfix: {_FIX[name]}"))
    missing = [name for name in NOTED if name not in probe.extensions]
    offered = " ".join(sorted(n for n in (*CARRIED, *NOTED) if n in probe.extensions))
    line = (f"next hop {hop}: XCLIENT authorized for {probe.source or 'smtpgate'} "
            f"({' '.join(sorted(probe.xclient or ()))}); {ipv6}; offers {offered or 'none'}")
    if probe.relay_reply.startswith("2"):
        line += "; relays for an authenticated login"
    if missing:
        line += f"; without {' '.join(missing)} (the relay does without)"
    found.append(Finding("ok", line))
    return found


def _relay_findings(probe: HopProbe) -> list[Finding]:
    reply = probe.relay_reply
    if not reply or reply.startswith("2"):
        return []
    said = (f"XCLIENT LOGIN={PROBE_LOGIN}, MAIL FROM:<>, RCPT TO:<{PROBE_RCPT}>: {reply}"
            if not reply.startswith("XCLIENT") else reply)
    if reply.startswith("5") or reply.startswith("XCLIENT"):
        return [Finding("error", f"submission next hop {probe.hop} does not relay for an "
                                 f"authenticated login ({said}): every message a user sends to "
                                 f"another domain would be refused; {SUBMISSION_FIX}")]
    # a temporary answer: Postfix's tables may not be up yet (its socketmap is smtpgate's,
    # started after this probe); the first message shows how it is
    return [Finding("ok", f"submission next hop {probe.hop} did not say yet whether it relays "
                          f"for an authenticated login ({said})")]


def _xclient_refused(probe: HopProbe) -> Finding:
    hop, source = probe.hop, probe.source or "smtpgate's address"
    said = f"XCLIENT ADDR={PROBE_ADDR}: {probe.xclient_reply}"
    if probe.xclient is None and not probe.xclient_reply.startswith("550"):
        return Finding("error", f"next hop {hop} does not support XCLIENT ({said}); smtpgate "
                                "needs a Postfix smtpd there (conf/postfix/next-hop.cf)")
    return Finding("error", f"next hop {hop} does not let {source} use XCLIENT ({said}): "
                            f"every message would get 451; add {source} to "
                            "smtpd_authorized_xclient_hosts in Postfix's main.cf or the "
                            "service's -o options in master.cf")
