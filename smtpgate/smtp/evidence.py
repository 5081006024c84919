"""evidence - what a refused session leaves for `smtpgate explain --session`.

SYNOPSIS
    SessionEvidence(session, store)             one session's evidence, a Recorded
    evidence.notify(event)                      a subscriber of the session's events
    evidence.envelope -> (sender, recipients)   what a refusal's record names
    Refusal(time, command, reply, verdicts)     one 4xx/5xx reply the client got
    session_record(session: Recorded, rows=None) -> dict
                                                the record smtpgate.lookups.evidence stores
    refused_alike(session, rows=None) -> tuple | None
                                                what makes a later session a repeat of it
    verdict_rows(state) -> list[tuple]          each verdict's (check, outcome, reason, reply)
    replay_record(session) -> dict              what `smtpgate replay` decides again

DESCRIPTION
    A session keeps nothing of this until it refuses something: then its
    SessionEvidence, told the session's events (smtpgate.smtp.events),
    keeps a Refusal per 4xx/5xx reply that counts as an error (its own,
    and Postfix's answers that it passed through) and asks the policy's
    EvidenceStore to write the record, again at each refusal and once
    more when the session ends (Ended). The record is built only when the
    store writes it, after the reply; it names the transaction under way,
    or, once that ended (a refusal after the dot, an RSET after a refused
    RCPT), the one the latest refusal was given in.

    The record: the session id; the client (ip, port, verified name),
    the listener and local address; when it started (from the id) and
    ended; HELO name, login, sender and the recipients accepted in the
    transaction in progress; `commands`, the disconnect line's counts;
    `verdicts`, every verdict of the policy (check, outcome, reason: which
    key, zone and answer; reply) the session kept, `unrecorded` the number
    taken past that cap (smtpgate.policy.state); `replies`, the refusals, each with the
    number of verdicts taken before it, so `explain` can print each
    refusal after the verdicts that led to it; `shadow`, when the shadow
    rules would have decided a check otherwise, those disagreements (check,
    direction, live and shadow verdicts, the shadow's reason;
    smtpgate.policy.shadow). A command's argument is
    shown for HELO, EHLO, MAIL and RCPT only: never AUTH's.

    replay_record() (replay_records on; every session, refused or not):
    the format version `v` (smtpgate.policy.decisions.FACTS_VERSION), the
    session id, when it started, listener, client ip and verified name,
    HELO, sender and the recipients accepted, and `checks`: each check
    decided, as [check, facts, outcome, reply], the facts those of
    smtpgate.policy.decisions; `left_out`, the checks past the state's cap.

    Both read the verdicts as verdict_rows() gives them; SessionEvidence
    makes the rows once for both (the store asks for the signature, then,
    for a first refusal, the record, in one go), unless a verdict came
    between the two.

    refused_alike() is the session's signature once it has ended: the
    client IP first, then everything else the record shows but the
    session's id, port and times: listener and local address, the
    client's name, HELO, login, sender, recipients, the command counts,
    every verdict (the client's port taken out of its reason, and a
    passed limits check's counts, which change with every connect) and every
    refusal's command and reply. The store keeps one full record per
    signature for a while and writes later sessions with the same
    signature as aliases of it (most MX refusals are the same client
    turned away at connect again and again): `explain --session` of an
    alias prints the first session's record, which must then say nothing
    that is not also true of the alias.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Protocol

from smtpgate import session_id
from smtpgate.policy.decisions import FACTS_VERSION
from smtpgate.smtp.events import Ended, Event, Refused


class Refusal(NamedTuple):
    time: float
    command: str
    reply: str
    verdicts: int  # how many verdicts the policy had taken when it was given


class Recorded(Protocol):
    """What a record is made of: the session as smtpgate.smtp.session.Session shows it."""

    id: str
    client: Any  # smtpgate.policy.state.Client
    state: Any  # smtpgate.policy.state.ClientState, None before the policy opened one
    ended: float | None
    refusals: list[Refusal] | None

    @property
    def helo(self) -> str | None: ...
    @property
    def login(self) -> str | None: ...
    @property
    def envelope(self) -> tuple[str | None, tuple[str, ...]]: ...
    def command_counts(self) -> str: ...


class SessionEvidence:
    """A Recorded: the session's own facts read through `session` (the driver,
    smtpgate.smtp.session.Session), the refusals kept here."""

    __slots__ = ("_rows", "ended", "refusals", "refused_tx", "session", "store")

    def __init__(self, session: Any, store: Any) -> None:
        self.session = session
        self.store = store  # the policy's EvidenceStore (smtpgate.lookups.evidence)
        self.refusals: list[Refusal] | None = None
        self.refused_tx: Any = None  # the transaction (smtpgate.smtp.dialogue) at the latest
        self.ended: float | None = None
        self._rows: tuple[int, list[tuple]] | None = None  # (verdicts taken, their rows)

    def notify(self, event: Event) -> None:
        kind = type(event)
        if kind is Refused:
            if event.counted:
                self._keep(event.text)
        elif kind is Ended:
            state = self.session.state
            if self.refusals is not None or (state is not None and state.disagreements):
                self.ended = time.time()  # a record for explain: refused, or the shadow differed
                self.store.keep(self.session.id, self.record, self.repeat)
            if state is not None and state.facts:
                self.store.keep_replay(self.session.id, self.replay_record)

    def _keep(self, text: str) -> None:
        dialogue, state = self.session.dialogue, self.session.state
        verb = dialogue.last_command or "CONNECT"
        refusal = Refusal(time.time(), f"{verb} {dialogue.last_arg}" if dialogue.last_arg
                          else verb, text, len(state.record) if state is not None else 0)
        self.refused_tx = dialogue.tx
        if self.refusals is None:
            self.refusals = [refusal]
        else:
            self.refusals.append(refusal)
        self.store.keep(self.session.id, self.record, self.repeat)

    def record(self) -> dict:
        return session_record(self, self.rows())

    def repeat(self) -> tuple | None:
        return refused_alike(self, self.rows())

    def rows(self) -> list[tuple]:
        """verdict_rows() of the session's state, made again only when a verdict came."""
        state = self.session.state
        if state is None:
            return []
        taken = len(state.record) + state.unrecorded
        if self._rows is None or self._rows[0] != taken:
            self._rows = (taken, verdict_rows(state))
        return self._rows[1]

    def replay_record(self) -> dict:
        return replay_record(self)

    # --- what the record reads of the session --------------------------------------------------

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def client(self) -> Any:
        return self.session.client

    @property
    def state(self) -> Any:
        return self.session.state

    @property
    def helo(self) -> str | None:
        return self.session.dialogue.helo

    @property
    def login(self) -> str | None:
        return self.session.dialogue.login

    @property
    def envelope(self) -> tuple[str | None, tuple[str, ...]]:
        tx = self.session.dialogue.tx
        if (tx is None or tx.sender is None) and self.refused_tx is not None:
            tx = self.refused_tx
        return (tx.sender, tx.recipients) if tx is not None else (None, ())

    def command_counts(self) -> str:
        return self.session.dialogue.command_counts()


def verdict_rows(state: Any) -> list[tuple]:
    """Each verdict of the record as (check, outcome, reason as logged, reply or None)."""
    return [(v.check, str(v.outcome), v.logged, str(v.reply) if v.reply is not None else None)
            for v in state.record]


def session_record(session: Recorded, rows: list[tuple] | None = None) -> dict:
    client, state = session.client, session.state
    if rows is None:
        rows = verdict_rows(state) if state is not None else []
    sender, recipients = session.envelope
    return {
        "session": session.id,
        "listener": client.listener,
        "client": client.ip,
        "port": client.port,
        "name": state.client_name if state is not None else "unknown",
        "local": f"[{client.local_ip}]:{client.local_port}",
        "started": session_id.time_of(session.id),
        "ended": session.ended,
        "helo": session.helo,
        "login": session.login,
        "sender": sender,
        "recipients": list(recipients),
        "commands": session.command_counts(),
        **({"unrecorded": state.unrecorded} if state is not None and state.unrecorded else {}),
        "verdicts": [{"check": check, "outcome": outcome, "reason": reason, "reply": reply}
                     for check, outcome, reason, reply in rows],
        "replies": [
            {"time": r.time, "command": r.command, "reply": r.reply, "verdicts": r.verdicts}
            for r in session.refusals or ()],
        **({"shadow": state.disagreements} if state is not None and state.disagreements
           else {}),
    }


def replay_record(session: Recorded) -> dict:
    client, state = session.client, session.state
    return {
        "v": FACTS_VERSION, "session": session.id, "time": session_id.time_of(session.id),
        "listener": client.listener, "client": client.ip, "name": state.client_name,
        "helo": session.helo, "sender": session.envelope[0],
        "recipients": list(session.envelope[1]), "checks": state.facts or [],
        **({"left_out": state.facts_left_out} if state.facts_left_out else {}),
    }


def refused_alike(session: Recorded, rows: list[tuple] | None = None) -> tuple | None:
    if session.ended is None or not session.refusals:
        return None  # still running: more may come
    client, state = session.client, session.state
    if rows is None:
        rows = verdict_rows(state) if state is not None else []
    # the client's port, the session's id and times, and the connection counts of the moment
    # (a passed limits check) are what two sessions never share; everything else explain
    # prints must be the same, or the alias would show another session
    with_port, without = f"[{client.ip}]:{client.port}", f"[{client.ip}]"
    tag = f"; session={session.id}"
    verdicts = tuple(
        (check, outcome,
         "" if check == "limits" and reply is None else reason.replace(with_port, without),
         reply)
        for check, outcome, reason, reply in rows)
    replies = tuple((r.command, r.reply.replace(tag, ""), r.verdicts) for r in session.refusals)
    return (client.ip, client.listener, client.local_ip, client.local_port,
            state.client_name if state is not None else "unknown", session.helo, session.login,
            *session.envelope, session.command_counts(), verdicts,
            state.unrecorded if state is not None else 0, replies,
            tuple(tuple(d.values()) for d in (state.disagreements or ())) if state is not None
            else ())
