"""hand_off - one received message to Postfix, within the worker's limit of hand-offs at once.

SYNOPSIS
    await hand_off(gate, identity, envelope, header, spool, size, label)
        -> (HopReply | "busy" | "tempfail", seconds)
    identity_of(client, name, helo, proto, login) -> ClientIdentity     XCLIENT's facts
    tls_facts(ssl_object) -> (version, cipher, bits) | None             for the Received header
    RELAY_BUSY                                                          451 4.3.2

DESCRIPTION
    The message goes, with the Received header smtpgate adds before it,
    to the next hops (smtpgate.relay.hops), or to the submission next hops
    for a logged-in client where those are set, once a slot of the
    worker's next_hop_transaction_limit is free. The answer is Postfix's
    reply, or "busy" (no slot within next_hop_busy_wait: the client hears
    RELAY_BUSY) or "tempfail" (no next hop reached, a step timed out, the
    spool could not be read back: 451 4.3.0); the reason of those two is
    logged here as a warning, with the next hop's name. The seconds are
    those of a hand-off Postfix answered, None otherwise.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from smtpgate.policy.state import Client
from smtpgate.relay.next_hop import Envelope, HopReply, RelayError
from smtpgate.relay.pool import RelayBusy
from smtpgate.relay.xclient import ClientIdentity
from smtpgate.smtp.spool import Spool
from smtpgate.verdict import Reply

log = logging.getLogger("smtpgate.smtpd")

RELAY_BUSY = Reply(451, "4.3.2", "Error: too many messages in flight to the mail system; "
                                 "try again later")


async def hand_off(gate: Any, identity: ClientIdentity, envelope: Envelope, header: bytes,
                   spool: Spool, size: int, label: str) -> tuple[HopReply | str, float | None]:
    """`gate`: the worker's smtpgate.smtp.gate.Gate; `size`: the body's, without the header."""
    hops = gate.hops
    if identity.login is not None and gate.submission_hops is not None:
        hops = gate.submission_hops
    started = time.monotonic()
    try:
        async with gate.relay_limit.slot():
            answer = await hops.deliver(
                identity, envelope, lambda: itertools.chain((header,), spool.chunks()),
                len(header) + size, label)
    except RelayBusy:
        log.warning("warning: next hop %s: %d messages in flight; 451 4.3.2 to %s",
                    hops.label, gate.relay_limit.limit, label)
        return "busy", None
    except (RelayError, OSError) as exc:  # OSError: reading the spool back
        log.warning("warning: next hop %s", exc if isinstance(exc, RelayError)
                    else f"{hops.label}: {exc}")
        return "tempfail", None
    return answer, time.monotonic() - started


def identity_of(client: Client, name: str, helo: str | None, proto: str,
                login: str | None) -> ClientIdentity:
    return ClientIdentity(
        addr=client.ip, port=client.port,
        name=name if name != "unknown" else "[UNAVAILABLE]",  # XCLIENT's word for it
        helo=helo or "", proto=proto, login=login, destaddr=client.local_ip,
        destport=client.local_port)


def tls_facts(ssl_object) -> tuple[str, str, int] | None:
    if ssl_object is None:
        return None
    cipher, _, bits = ssl_object.cipher() or ("unknown", "", 0)
    return (ssl_object.version() or "TLS", cipher, bits)
