"""state - what the engine tells the policy about a connection, and what the policy keeps.

SYNOPSIS
    Client(ip, port, local_ip, local_port, listener, proxied)   facts, set by the engine
    ClientState(client)                                   kept by the policy
    state.note(verdict)  keep a Verdict in the session's record
    state.record        the first RECORD_LIMIT verdicts taken for this session, in order
    state.unrecorded    how many were taken after those ; state.latest  the last one
    state.client_name   the verified host name once FCrDNS passed, else "unknown"
    state.label         "name[ip]", as Postfix writes a client in its log
    state.disagreements what the shadow rules would have done otherwise (None: nothing)
    state.keep_facts(verdict, facts)   state.facts: the replay record's checks
    GreetWait(seconds, decided, hold)

DESCRIPTION
    The engine creates a Client when a connection starts and asks
    Policy.open(client) for a ClientState; it hands that state back at each
    stage and reads from it only what the policy found (client_name for
    XCLIENT NAME and the log, record for the log and `explain`,
    protocol_failed so that a deep protocol test is asked once). The policy
    changes nothing but its own state: it writes to no socket and sets no
    field of the engine's session.

    The record is bounded: a client that repeats commands for hours must
    not grow its session without end, so past RECORD_LIMIT verdicts only
    a count and the latest verdict are kept (the evidence record and
    `explain` say how many were left out).

    GreetWait is the policy's request for postscreen's greet wait: the
    engine sends the "220-" teaser, then waits `seconds` for the client to
    speak too early, or until `decided` (when given) is done, which means
    the DNSBL score already decided and waiting longer changes nothing.
    It may hold the teaser back until `hold` (when given: the DNSBL's
    outcome known) is done, so that a client dropped at once hears only
    its refusal. It then hands what it received, and how long after the
    teaser, to Policy.screened().
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, ClassVar

from smtpgate.verdict import Reply, Verdict

MX, SUBMISSION, SUBMISSIONS = "mx", "submission", "submissions"


@dataclass(frozen=True, slots=True)
class Client:
    ip: str
    port: int
    local_ip: str = "0.0.0.0"
    local_port: int = 0
    listener: str = MX
    proxied: bool = False  # the addresses came from a load balancer's PROXY header


@dataclass(frozen=True, slots=True)
class GreetWait:
    seconds: float
    decided: asyncio.Future | None = None
    hold: asyncio.Future | None = None


@dataclass(slots=True)
class ClientState:
    RECORD_LIMIT: ClassVar[int] = 100
    FACTS_LIMIT: ClassVar[int] = 32  # a session's checks decided, for its replay record

    client: Client
    record: list[Verdict] = field(default_factory=list)
    unrecorded: int = 0  # verdicts taken past RECORD_LIMIT, counted only
    latest: Verdict | None = None
    client_name: str = "unknown"
    # screening, kept between stages
    lease: Any = None  # the connection count's lease, released when the session ends
    permitted: bool = False  # PSA permit or mynetworks: skip screening
    trusted: bool = False  # mynetworks: permit at every stage
    rate_exempt: bool = False  # client_event_limit_exceptions: no per-client limit counts
    enforced: Reply | None = None  # an `enforce` finding: the answer to every RCPT
    table_facts: Any = None  # the connect stage's table answers (overrides, PSA, REV)
    rev_ip: str | None = None
    rev_key: str = ""  # the REV key that gave rev_ip (its name: an address or a network)
    fcrdns_task: asyncio.Future | None = None  # while FCrDNS runs (or if it failed)
    fcrdns: Any = None  # its facts once it succeeded; the task is let go then
    settle: asyncio.Future | None = None  # the DNSBL score being gathered
    dnsbl_seen: tuple | None = None  # (result, verdict): the last DNSBL result judged
    greet_tested: bool = False
    helo_reject: Reply | None = None
    sender_reject: Reply | None = None
    protocol_failed: tuple[str, ...] = ()  # a tuple, not a set: most sessions fail none
    client_verdict: Verdict | None = None  # FCrDNS and REV, decided at the first RCPT
    sender: str | None = None  # MAIL FROM's address ("" for the null sender)
    dnsbl_asked: bool = False  # the DNSBL was asked in this session (greylisting's doubt)
    # greylisting's answers by key tail ("" once the network passed), asked once a session
    greylist_seen: dict[str, Any] | None = None
    recorded_rcpt_pass: bool = False
    # what screening found, written to the cache with the session's release (None: nothing
    # passed; made when something does, as an idle session's dicts are)
    screening_passes: dict[str, float] | None = None
    screening_failed: tuple[str, ...] = ()
    # shadow rules (smtpgate.policy.shadow), when on: the candidate's run of this session
    shadow: Any = None  # a smtpgate.policy.decisions.Redecider
    disagreements: list[dict] | None = None  # where it differed from the live verdicts
    # replay_records: [check, facts, outcome, reply] per check decided, the first FACTS_LIMIT
    facts: list[list] | None = None
    facts_left_out: int = 0

    def note(self, verdict: Verdict) -> Verdict:
        self.latest = verdict
        if len(self.record) < self.RECORD_LIMIT:
            self.record.append(verdict)
        else:
            self.unrecorded += 1
        return verdict

    def keep_facts(self, verdict: Verdict, facts: dict) -> None:
        """A check's verdict with the facts it was decided on, for the replay record."""
        if self.facts is None:
            self.facts = []
        if len(self.facts) < self.FACTS_LIMIT:
            self.facts.append([verdict.check, facts, str(verdict.outcome),
                               str(verdict.reply) if verdict.reply is not None else None])
        else:
            self.facts_left_out += 1

    def name_found(self, task: asyncio.Future) -> None:
        """The verified host name for the log and XCLIENT as soon as FCrDNS has it, as
        Postfix's smtpd knows it from the connect on."""
        if task.cancelled() or task.exception() is not None:
            return
        self.fcrdns, self.fcrdns_task = task.result(), None
        if self.fcrdns.hostname:
            self.client_name = self.fcrdns.hostname

    @property
    def label(self) -> str:
        return f"{self.client_name}[{self.client.ip}]"

    @property
    def cached_passes(self) -> dict[str, float]:
        """The screening cache as read with the connection count."""
        return self.lease.screening if self.lease is not None else {}
