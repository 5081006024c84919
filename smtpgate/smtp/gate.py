"""gate - the runtime state every session of one worker shares.

SYNOPSIS
    Gate(config, tls, policy, relay_limit, hops, auth=None, submission_hops=None,
         metrics=None)
    gate.sessions       the sessions in flight (drain waits for them)
    gate.metrics        this worker's counters (smtpgate.service.metrics.Metrics)
    gate.draining       true once SIGTERM arrived
    gate.spool_budget   bytes of messages this worker may hold (smtpgate.smtp.spool_budget)
    gate.handshakes     465 handshakes in progress (smtpgate.smtp.handshake_limit)
    gate.ehlo_tail[listener] ; gate.offered[listener]
    gate.carry(listener, extensions)   offer only what the next hop carries

DESCRIPTION
    Built once per worker by smtpgate.service.server.build_gate(); the
    configuration and TLS material are replaced on SIGHUP, so a session
    reads them from here when it starts and keeps what it read.

    8BITMIME, DSN and SMTPUTF8 are offered to a listener's clients only
    when the next hop its mail goes to offers them (smtpgate.relay.probe
    finds out; carry() with None, "not known", offers all three). The
    EHLO keywords that follow AUTH are kept ready per listener (ehlo_tail),
    and `offered` is what MAIL and RCPT parameters may use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smtpgate.config import Config
from smtpgate.policy.state import MX, SUBMISSION, SUBMISSIONS
from smtpgate.relay.hops import Hops
from smtpgate.relay.pool import TransactionLimit
from smtpgate.relay.probe import CARRIED
from smtpgate.smtp.handshake_limit import HandshakeLimit
from smtpgate.smtp.spool_budget import SpoolBudget
from smtpgate.smtp.tls import TlsProvider


@dataclass
class Gate:
    config: Config
    tls: TlsProvider | None
    policy: Any
    relay_limit: TransactionLimit  # this worker's share of next_hop_transaction_limit
    hops: Hops  # next_hop, pooled when next_hop_pool > 0
    auth: Any = None
    submission_hops: Hops | None = None  # submission_next_hop, for authenticated clients
    metrics: Any = None  # smtpgate.service.metrics.Metrics; build_gate() always sets it
    sessions: set[Any] = field(default_factory=set)  # smtp.session.Session
    draining: bool = False
    spool_budget: SpoolBudget = field(default_factory=lambda: SpoolBudget(0))
    handshakes: HandshakeLimit = field(default_factory=lambda: HandshakeLimit(0, 0))
    ehlo_tail: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        kind: ("ENHANCEDSTATUSCODES", *CARRIED) for kind in (MX, SUBMISSION, SUBMISSIONS)})
    offered: dict[str, frozenset[str]] = field(default_factory=lambda: {
        kind: frozenset(CARRIED) for kind in (MX, SUBMISSION, SUBMISSIONS)})

    def carry(self, listener: str, extensions: frozenset[str] | None) -> None:
        """Offer on `listener` only those of CARRIED in extensions (None: all of them)."""
        kept = tuple(name for name in CARRIED if extensions is None or name in extensions)
        self.ehlo_tail[listener] = ("ENHANCEDSTATUSCODES", *kept)
        self.offered[listener] = frozenset(kept)
