"""gate - the runtime state every session of one worker shares, and the seams it is made of.

SYNOPSIS
    Gate(config, tls, policy, relay_limit, hops, auth=None, submission_hops=None,
         metrics=None)
    gate.sessions       the sessions in flight (drain waits for them)
    gate.metrics        this worker's counters, told the sessions' events
    gate.draining       true once SIGTERM arrived
    gate.spool_budget   bytes of messages this worker may hold (smtpgate.smtp.spool_budget)
    gate.handshakes     465 handshakes in progress (smtpgate.smtp.handshake_limit)
    gate.ehlo_tail[listener] ; gate.offered[listener]
    gate.carry(listener, extensions)   offer only what the next hop carries
    SessionPolicy, EvidenceKeeper, Authenticator, EventSink, NextHops   the seams (Protocols)

DESCRIPTION
    Built once per worker by smtpgate.service.server.build_gate(); the
    configuration and TLS material are replaced on SIGHUP, so a session
    reads them from here when it starts and keeps what it read.

    8BITMIME, DSN and SMTPUTF8 are offered to a listener's clients only
    when the next hop its mail goes to offers them (smtpgate.relay.probe
    finds out; carry() with None, "not known", offers all three). The
    EHLO keywords that follow AUTH are kept ready per listener (ehlo_tail),
    and `offered` is what MAIL and RCPT parameters may use.

    The seams are what the engine uses of the parts it is given, as
    typing.Protocols: the policy (smtpgate.policy.stages.Policy; the
    tests' in-memory stub), the authenticator (Dovecot), the metrics
    (smtpgate.service.metrics.Metrics, which subscribes to the events of
    smtpgate.smtp.events) and the next hops (smtpgate.relay.hops.Hops).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from smtpgate.address import Path
from smtpgate.config import Config
from smtpgate.policy.state import MX, SUBMISSION, SUBMISSIONS, Client, ClientState, GreetWait
from smtpgate.relay.hops import Hops
from smtpgate.relay.next_hop import Envelope, HopReply
from smtpgate.relay.pool import TransactionLimit
from smtpgate.relay.probe import CARRIED
from smtpgate.relay.xclient import ClientIdentity
from smtpgate.smtp.events import Event
from smtpgate.smtp.handshake_limit import HandshakeLimit
from smtpgate.smtp.spool_budget import SpoolBudget
from smtpgate.smtp.tls import TlsProvider
from smtpgate.verdict import Reply


class EvidenceKeeper(Protocol):
    def keep(self, session_id: str, producer: Callable[[], dict],
             repeat: Callable[[], Any] | None = None) -> None: ...


class AuthResult(Protocol):
    reply: Reply
    user: str | None


class SessionPolicy(Protocol):
    """What a session asks the policy (smtpgate.policy.stages.Policy), stage by stage."""

    evidence: EvidenceKeeper

    def open(self, client: Client) -> ClientState: ...
    async def connect(self, state: ClientState) -> Reply | GreetWait | None: ...
    async def screened(self, state: ClientState, received: bytes,
                       delay: float) -> Reply | None: ...
    async def helo(self, state: ClientState, name: str) -> Reply | None: ...
    async def mail(self, state: ClientState, path: Path, login: str | None) -> Reply | None: ...
    async def rcpt(self, state: ClientState, path: Path, login: str | None,
                   smtputf8: bool) -> Reply | None: ...
    def wants_protocol_tests(self, state: ClientState) -> bool: ...
    async def protocol(self, state: ClientState, test: str, line: bytes, pending: bytes,
                       after: str, esmtp: bool) -> Reply | None: ...
    async def starttls(self, state: ClientState) -> Reply | None: ...
    async def tls_started(self, state: ClientState, resumed: bool) -> Reply | None: ...
    async def tls_service_refused(self, client: Client) -> bool: ...
    async def auth_allowed(self, state: ClientState) -> Reply | None: ...
    async def authenticate(self, state: ClientState, mechanism: str, plain: bytes, login: str,
                           secured: bool) -> AuthResult: ...
    def close_session(self, state: ClientState) -> None: ...


class Authenticator(Protocol):
    async def authenticate(self, mechanism: str, initial_response: bytes, *, client_ip: str,
                           local_ip: str, secured: bool, service: str = "smtp") -> Any: ...


class EventSink(Protocol):
    def notify(self, event: Event) -> None: ...


class NextHops(Protocol):
    label: str

    async def deliver(self, identity: ClientIdentity, envelope: Envelope,
                      chunks: Callable[[], Iterable[bytes]], size: int,
                      client: str) -> HopReply: ...


class _NoMetrics:
    def notify(self, event: Event) -> None:
        pass


@dataclass
class Gate:
    config: Config
    tls: TlsProvider | None
    policy: SessionPolicy
    relay_limit: TransactionLimit  # this worker's share of next_hop_transaction_limit
    hops: Hops | NextHops  # next_hop, pooled when next_hop_pool > 0
    auth: Authenticator | None = None
    submission_hops: Hops | NextHops | None = None  # submission_next_hop, for logged-in clients
    metrics: EventSink = field(default_factory=_NoMetrics)  # build_gate(): service.metrics
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
