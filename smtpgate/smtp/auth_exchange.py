"""auth_exchange - AUTH with one client: the policy's leave, challenges and responses, the outcome.

SYNOPSIS
    await authenticate(session, auth)    `session`: an Authenticating; `auth`: the dialogue's
                                         Authenticate; raises Closing when the session must end
    Authenticating, LineWire             the seams (Protocols): what the exchange uses

DESCRIPTION
    The session (smtpgate.smtp.session) hands an AUTH command the dialogue
    accepted (smtpgate.smtp.dialogue.Authenticate) to authenticate(),
    which does what Postfix's smtpd does with it:
    - The policy may refuse AUTH for this client first
      (SessionPolicy.auth_allowed: the AUTH rate limit, the failure
      limit); its refusal is the reply, and a 421 ends the session.
    - A mechanism other than PLAIN or LOGIN gets 504 5.5.4; each challenge
      of the mechanism (smtpgate.smtp.sasl.MECHANISMS) is sent as a 334
      and its response read as one line, within smtpd_timeout and
      line_length_limit, the initial response answering the first. A
      response that is too long, cancelled (`*`) or not base64 is refused
      and the exchange is over; a client gone ends the session.
    - The responses, as the PLAIN string they amount to, go to the policy
      (SessionPolicy.authenticate: Dovecot and the auth failure counts),
      whose reply is the client's: the login is the dialogue's when it
      names a user; a 421 without one ends the session.

    What the responses mean is smtpgate.smtp.sasl's (no I/O there); the
    replies go through the session, so the log, the evidence and the
    metrics see them as any other.

    The seams are what the exchange uses, as typing.Protocols: the
    session (Authenticating: its configuration, policy, state, dialogue
    and replies) and its connection (LineWire: smtpgate.smtp.wire.Wire).
"""

from __future__ import annotations

from typing import Protocol

from smtpgate import replies
from smtpgate.config import Config
from smtpgate.policy.state import ClientState
from smtpgate.smtp.closing import Closing
from smtpgate.smtp.dialogue import Authenticate, Dialogue
from smtpgate.smtp.gate import SessionPolicy
from smtpgate.smtp.sasl import MECHANISMS, as_plain, decode_response, login_of
from smtpgate.smtp.wire import TOO_LONG
from smtpgate.verdict import Reply


class LineWire(Protocol):
    """What the exchange uses of the connection (smtpgate.smtp.wire.Wire)."""

    async def line(self, timeout: float, limit: int) -> bytes | None: ...


class Authenticating(Protocol):
    """The session as the exchange sees it (smtpgate.smtp.session.Session)."""

    config: Config  # the session's: read when it started, kept across a reload
    policy: SessionPolicy
    state: ClientState | None  # opened by the policy before any command
    dialogue: Dialogue
    wire: LineWire

    def reply(self, reply: Reply | str, counted: bool = True) -> None: ...


async def authenticate(session: Authenticating, auth: Authenticate) -> None:
    refusal = await session.policy.auth_allowed(session.state)
    if refusal is not None:
        session.reply(refusal)
        if refusal.code == 421:
            raise Closing
        return
    mechanism, initial = auth.mechanism, auth.initial
    challenges = MECHANISMS.get(mechanism)
    if challenges is None:
        session.reply(replies.AUTH_MECHANISM)
        return
    responses = []
    for challenge in challenges:
        response = await _read(session, initial, challenge)
        if response is None:
            return
        responses.append(response)
        initial = ""  # answers the first challenge only
    plain = as_plain(mechanism, responses)
    outcome = await session.policy.authenticate(session.state, mechanism, plain,
                                                login_of(plain), session.dialogue.tls)
    session.reply(outcome.reply)
    if outcome.user is not None:
        session.dialogue.authenticated(outcome.user)
    elif outcome.reply.code == 421:
        raise Closing


async def _read(session: Authenticating, initial: str, challenge: str) -> bytes | None:
    """One SASL response: the initial one if given, else a 334 challenge and a line;
    None when it was refused (answered)."""
    if initial:
        text = initial
    else:
        session.reply(f"334 {challenge}")
        line = await session.wire.line(session.config.smtpd_timeout,
                                       session.config.line_length_limit)
        if line is None:
            raise Closing
        if line is TOO_LONG:
            answer = session.dialogue.too_long()
            session.reply(answer.reply, answer.counted)
            return None
        text = line.decode("ascii", "replace").strip()
    response = decode_response(text)
    if isinstance(response, Reply):
        session.reply(response)
        return None
    return response
