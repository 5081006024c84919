"""hop_timeouts - how long each step of a hand-off to the next hop may take.

SYNOPSIS
    HopTimeouts(connect, reply, data_done, total)
    HopTimeouts.of(timeout)              a float: the same limit for every step
    HopTimeouts.from_config(config)

DESCRIPTION
    One limit for every step is wrong at both ends: a next hop that does
    not answer a connect should be given up in seconds, while its reply to
    the message may rightly take minutes (its milters scan the message),
    and the whole hand-off must end before the client stops waiting for
    its reply to the final dot. So, as Postfix's own SMTP client has a
    limit per step (smtp_connect_timeout, smtp_helo_timeout, ...,
    smtp_data_done_timeout):

    connect    next_hop_connect_timeout, 30 s (Postfix's smtp_connect_timeout)
    reply      next_hop_timeout, 100 s: the banner, XCLIENT, EHLO, MAIL and
               RCPT, DATA's 354, and each write of the message (Postfix's
               smtpd_proxy_timeout for its own before-queue filter)
    data_done  next_hop_data_done_timeout, 330 s: the reply to the end of
               the message, above Postfix's milter_content_timeout (300 s),
               so a milter that takes its full time is answered by Postfix,
               not cut off by smtpgate; also each reply to a MAIL and RCPT
               sent in one write with `BDAT n LAST` and the message, which
               Postfix may hold until it has taken the message
    total      next_hop_total_timeout, 540 s: the whole hand-off, from the
               end of the client's message to Postfix's reply, under the
               10 minutes a client waits for its reply to the final dot
               (RFC 5321 4.5.3.2.6), so the client hears 451 rather than
               giving up on its own and sending the message again

    A limit missed after the end of the message went out has the risk
    Postfix states for its smtp_data_done_timeout: Postfix may have
    queued the message, and the client, hearing 451, sends it once more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class HopTimeouts:
    connect: float
    reply: float
    data_done: float
    total: float

    @classmethod
    def of(cls, timeout: float | HopTimeouts) -> HopTimeouts:
        if isinstance(timeout, HopTimeouts):
            return timeout
        return cls(timeout, timeout, timeout, timeout * 4)

    @classmethod
    def from_config(cls, config: Any) -> HopTimeouts:
        return cls(config.next_hop_connect_timeout, config.next_hop_timeout,
                   config.next_hop_data_done_timeout, config.next_hop_total_timeout)
