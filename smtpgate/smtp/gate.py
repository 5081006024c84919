"""gate - the runtime state every session of one worker shares.

SYNOPSIS
    Gate(config, tls, policy, relay_limit, hops, auth=None, submission_hops=None,
         metrics=None)
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
from smtpgate.relay.hops import Hops
from smtpgate.relay.pool import TransactionLimit
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
