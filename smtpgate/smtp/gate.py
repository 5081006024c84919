"""gate - the runtime state every session of one worker shares.

SYNOPSIS
    Gate(config, tls, policy, relay_limit, auth=None, hop_pool=None, metrics=None)
    gate.sessions       the sessions in flight (drain waits for them)
    gate.metrics        this worker's counters (smtpgate.service.metrics.Metrics)
    gate.draining       true once SIGTERM arrived

DESCRIPTION
    Built once per worker by smtpgate.service.server.build_gate(); the
    configuration and TLS material are replaced on SIGHUP, so a session
    reads them from here when it starts and keeps what it read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smtpgate.config import Config
from smtpgate.relay.pool import HopPool, TransactionLimit
from smtpgate.smtp.tls import TlsProvider


@dataclass
class Gate:
    config: Config
    tls: TlsProvider | None
    policy: Any
    relay_limit: TransactionLimit  # this worker's share of next_hop_transaction_limit
    auth: Any = None
    hop_pool: HopPool | None = None
    metrics: Any = None  # smtpgate.service.metrics.Metrics; build_gate() always sets it
    sessions: set[Any] = field(default_factory=set)  # smtp.session.Session
    draining: bool = False
