"""session_log - Postfix's log lines for one session, most of them written from its events.

SYNOPSIS
    SessionLog(session)
    session_log.notify(event)        a subscriber of the session's events (smtpgate.smtp.events)
    session_log.connected() ; session_log.tls(ssl_object) ; session_log.tls_failed(why)
    session_log.lost(after) ; session_log.lost_in_data(size) ; session_log.timed_out(after)
    session_log.too_many_errors(after) ; session_log.failed() ; session_log.bad_proxy_header(why)
    session_log.spool_failed(exc) ; session_log.spool_spent(limit)
    tls_established(label, ssl_object) -> str

DESCRIPTION
    The lines fail2ban filters, pflogsumm and people's habits read, in
    Postfix's words, each carrying the session id: `connect from`,
    `NOQUEUE: reject: STAGE from` (for a Refused event whose `noqueue`
    names a stage), the queue id line of a message Postfix took or the
    NOQUEUE line of one it refused (a Relayed event with Postfix's
    answer), and `disconnect from` with the command counts (Ended). The
    lines that follow no reply (connect, TLS, lost connection, timeout,
    too many errors, the warnings) are written when the session, or the
    part it drives (smtpgate.smtp.intake's IntakeLog), calls the method of
    that name.

    What the lines show of the session (client label, HELO name, the
    transaction's sender and recipients, the command counts) is read from
    it when the event comes: `session` is the driver
    (smtpgate.smtp.session.Session).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from smtpgate.smtp.events import Ended, Event, Refused, Relayed

log = logging.getLogger("smtpgate.smtpd")

_QUEUE_ID = re.compile(r"queued as ([0-9A-Za-z]+)")


class SessionLog:
    __slots__ = ("session",)

    def __init__(self, session: Any) -> None:
        self.session = session

    def notify(self, event: Event) -> None:
        kind = type(event)
        if kind is Refused:
            if event.noqueue is not None:
                self._noqueue(event)
        elif kind is Relayed:
            if event.answer is not None:
                self._relayed(event)
        elif kind is Ended:
            session = self.session
            if session.state is not None:  # the policy saw it: the connect line was written
                log.info("disconnect from %s %s session=%s", session.client_label,
                         session.command_counts(), session.id)

    def _noqueue(self, event: Refused) -> None:
        """Postfix's NOQUEUE line; at MAIL the sender refused is named, as Postfix does,
        although the transaction never took it."""
        session = self.session
        if event.noqueue == "CONNECT":
            log.info("NOQUEUE: reject: CONNECT from %s: %s; proto=SMTP", session.client_label,
                     event.text)
            return
        to = f" to=<{event.recipient}>" if event.recipient is not None else ""
        sender = session.sender if event.sender is None else event.sender
        log.info("NOQUEUE: reject: %s from %s: %s; from=<%s>%s proto=%s helo=<%s>",
                 event.noqueue, session.client_label, event.text, sender or "", to,
                 session.proto, session.helo or "")

    def _relayed(self, event: Relayed) -> None:
        """One line per message, keyed by Postfix's queue id, so its log lines can be found."""
        session, answer = self.session, event.answer
        text = answer.text
        queued = _QUEUE_ID.search(text) if answer.code == 250 else None
        if queued:
            log.info("%s: client=%s, from=<%s>, nrcpt=%d, size=%d, session=%s",
                     queued.group(1), session.client_label, session.sender or "",
                     len(session.recipients), event.size, session.id)
        else:  # Postfix's words, as the client got them; the id after them
            log.info("NOQUEUE: reject: DATA from %s: %s; from=<%s> nrcpt=%d proto=%s helo=<%s> "
                     "session=%s", session.client_label, text.replace("\r\n", " "),
                     session.sender or "", len(session.recipients), session.proto,
                     session.helo or "", session.id)

    # --- the lines that follow no reply --------------------------------------------------------

    def connected(self) -> None:
        session = self.session
        client = session.client
        log.info("connect from %s to [%s]:%s session=%s", session.client_label,
                 client.local_ip, client.local_port, session.id)

    def tls(self, ssl_object) -> None:
        log.info("%s", tls_established(self.session.client_label, ssl_object))

    def tls_failed(self, why: str) -> None:
        log.info("SSL_accept error from %s: %s", self.session.client_label, why)

    def lost(self, after: str) -> None:
        """Postfix's words for a client that left without QUIT."""
        log.info("lost connection after %s from %s", after or "CONNECT",
                 self.session.client_label)

    def lost_in_data(self, size: int) -> None:
        log.info("lost connection after DATA (%d bytes) from %s", size,
                 self.session.client_label)

    def timed_out(self, after: str) -> None:
        log.info("timeout after %s from %s", after or "CONNECT", self.session.client_label)

    def too_many_errors(self, after: str) -> None:
        log.info("too many errors after %s from %s", after or "CONNECT",
                 self.session.client_label)

    def failed(self) -> None:
        """A bug: the traceback, and the client's name."""
        log.exception("error: session with %s failed", self.session.client_label)

    def bad_proxy_header(self, why: str) -> None:
        client = self.session.client
        log.warning("warning: PROXY from [%s]:%s: %s", client.ip, client.port, why)

    def spool_failed(self, exc: OSError) -> None:
        log.warning("warning: %s: spool: %s", self.session.client_label, exc)

    def spool_spent(self, limit: int) -> None:
        log.warning("warning: %s: spool budget of %d bytes spent; 452 4.3.1",
                    self.session.client_label, limit)


def tls_established(label: str, ssl_object) -> str:
    """Postfix's line: `Anonymous TLS connection established from name[ip]: TLSv1.3 with
    cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`."""
    if ssl_object is None:
        return f"TLS connection established from {label}"
    name, _, bits = ssl_object.cipher() or ("unknown", "", 0)
    return (f"Anonymous TLS connection established from {label}: {ssl_object.version()} "
            f"with cipher {name} ({bits}/{bits} bits)")
