"""gate - the runtime state every session of one worker shares.

SYNOPSIS
    Gate(config, tls, policy, relay_limit, auth=None, hop_pool=None)
    gate.sessions       the sessions in flight (drain waits for them)
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
    sessions: set[Any] = field(default_factory=set)  # smtp.session.Session
    draining: bool = False
