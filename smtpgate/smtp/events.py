"""events - what a session tells its subscribers: refused, relayed, protocol test failed, ended.

SYNOPSIS
    Refused(listener, command, reply, text, state, counted=True, noqueue=None, sender=None,
            recipient=None)
    Relayed(result, seconds=None, answer=None, size=0)
    ProtocolTestFailed(test, listener)
    Ended(listener, how, last_command, eof, draining, rejected=False)
    Event                                    any of them
    Subscriber                               Callable[[Event], None]

DESCRIPTION
    The session writes replies; what else happens because of one is done
    by subscribers to these events, each with one job: the dialogue counts
    errors, the session's evidence keeps refusals for `smtpgate explain
    --session` (smtpgate.smtp.evidence.SessionEvidence), the session's log
    writes Postfix's lines (smtpgate.smtp.session_log), and the worker's
    metrics count them (smtpgate.service.metrics.Metrics.notify). An event
    carries the facts its subscribers need, so none of them reaches into
    the wire or the gate; the log and the evidence read the session's
    dialogue (HELO name, transaction) as it stands when the event comes.

    Refused: a 4xx/5xx the client got, smtpgate's own or Postfix's passed
    on (reply None then; `text` is what was written, session id included).
    `state` is the policy's ClientState (its record says which check gave
    the reply); `counted` is false for a reply that is no error (a 452
    within smtpd_recipient_overshoot_limit); `noqueue` names the stage of
    the NOQUEUE line Postfix would log for it (CONNECT, HELO, MAIL, RCPT,
    DATA; None: no line), with the sender refused at MAIL or the recipient
    refused at RCPT. Relayed: a message's end at the next hop, Postfix's
    reply code or "tempfail" / "busy", with the seconds the hand-off took,
    and Postfix's answer and the message's size when it answered.
    ProtocolTestFailed: a deep protocol test found something, once per
    test and session (the metrics count it; the policy's record and log
    have the verdict). Ended: the session is over; `how` is "closed" (no
    error), "timeout", "error" or "refused" (at connect), told apart
    further by the metrics with the last command, whether the client
    closed first (eof), whether the gate was draining, and whether the
    client was refused something and had no message queued (rejected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smtpgate.verdict import Reply


@dataclass(slots=True)
class Refused:
    listener: str
    command: str  # the last command ("" before the first: at connect)
    reply: Reply | None  # None: Postfix's reply, passed on
    text: str
    state: Any  # smtpgate.policy.state.ClientState, or None before the policy opened one
    counted: bool = True
    noqueue: str | None = None  # the stage its NOQUEUE line names
    sender: str | None = None  # MAIL's, refused: the transaction never took it
    recipient: str | None = None


@dataclass(slots=True)
class Relayed:
    result: int | str
    seconds: float | None = None
    answer: Any = None  # smtpgate.relay.next_hop.HopReply: Postfix's, as the client got it
    size: int = 0


@dataclass(slots=True)
class ProtocolTestFailed:
    test: str
    listener: str


@dataclass(slots=True)
class Ended:
    listener: str
    how: str
    last_command: str
    eof: bool
    draining: bool
    rejected: bool = False


Event = Refused | Relayed | ProtocolTestFailed | Ended
Subscriber = Callable[[Event], None]
