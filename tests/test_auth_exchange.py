"""AUTH's exchange in memory: the policy's leave, PLAIN and LOGIN's challenges, the client's cancel
and bad responses, the policy's outcome, and the exchange on its Authenticating seam alone.

A fake transport and a stub policy (tests/memory_session.py), the TLS handshake replaced; the
real Dovecot and the auth failure counts are test_submission_e2e's and test_auth_limits'.
"""

from __future__ import annotations

import base64

import pytest
from memory_session import StubPolicy, memory_session

from smtpgate import config as config_module
from smtpgate import replies
from smtpgate.policy.stages import AuthOutcome
from smtpgate.policy.state import SUBMISSION, Client, ClientState
from smtpgate.smtp import wire as wire_module
from smtpgate.smtp.auth_exchange import Authenticating, authenticate
from smtpgate.smtp.closing import Closing
from smtpgate.smtp.dialogue import Authenticate, Dialogue, Limits, Stage
from smtpgate.smtp.wire import TOO_LONG
from smtpgate.verdict import Reply

TOO_MANY = Reply(421, "4.7.0", "mx.gate.test Error: too many authentication failures")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class AuthPolicy(StubPolicy):
    """The stub policy, with AUTH: `allowed` is auth_allowed's reply, `outcome` authenticate's;
    what authenticate was given is kept."""

    def __init__(self, outcome: AuthOutcome | None = None, allowed: Reply | None = None) -> None:
        super().__init__()
        self.outcome = outcome or AuthOutcome(replies.AUTH_OK, "user1@example.com")
        self.allowed = allowed
        self.given: list[tuple] = []

    async def auth_allowed(self, state):
        return self.allowed

    async def authenticate(self, state, mechanism, plain, login, secured):
        self.given.append((mechanism, plain, login, secured))
        return self.outcome


class NoTls:
    def context(self, listener):
        return None


@pytest.fixture
def handshake(monkeypatch):
    """STARTTLS succeeds without TLS: the dialogue starts again, as after a real handshake."""
    async def start_tls(self, context, timeout):
        await self.flush()

    monkeypatch.setattr(wire_module.Wire, "start_tls", start_tls)


async def secured(talk) -> None:
    """EHLO, STARTTLS, EHLO again: AUTH is offered."""
    await talk.send(b"EHLO laptop\r\n")
    await talk.reply()
    await talk.send(b"STARTTLS\r\n")
    assert await talk.codes(1) == [220]
    await talk.send(b"EHLO laptop\r\n")
    assert b"AUTH PLAIN LOGIN" in await talk.reply()


def submission(policy: AuthPolicy):
    return memory_session(listener=SUBMISSION, tls=NoTls(), auth=True, policy=policy)


async def test_plain_with_an_initial_response_logs_in(handshake):
    policy = AuthPolicy()
    async with submission(policy) as talk:
        await secured(talk)
        await talk.send(b"AUTH PLAIN " + b64(b"\0user1@example.com\0secret1") + b"\r\n")
        assert await talk.reply() == b"235 2.7.0 Authentication successful\r\n"
        assert talk.session.login == "user1@example.com"
        await talk.send(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n")
        assert (await talk.reply()).startswith(b"503 5.5.1 Error: already authenticated")
    assert policy.given == [("PLAIN", b"\0user1@example.com\0secret1", "user1@example.com",
                             True)]


async def test_plain_without_one_gets_an_empty_challenge(handshake):
    policy = AuthPolicy()
    async with submission(policy) as talk:
        await secured(talk)
        await talk.send(b"AUTH PLAIN\r\n")
        assert await talk.reply() == b"334 \r\n"
        await talk.send(b64(b"\0user1@example.com\0secret1") + b"\r\n")
        assert await talk.codes(1) == [235]
    assert policy.given[0][1] == b"\0user1@example.com\0secret1"


async def test_login_asks_for_user_and_password_and_hands_on_plain(handshake):
    policy = AuthPolicy()
    async with submission(policy) as talk:
        await secured(talk)
        await talk.send(b"AUTH LOGIN\r\n")
        assert await talk.reply() == b"334 VXNlcm5hbWU6\r\n"  # Username:
        await talk.send(b64(b"user1@example.com") + b"\r\n")
        assert await talk.reply() == b"334 UGFzc3dvcmQ6\r\n"  # Password:
        await talk.send(b64(b"secret1") + b"\r\n")
        assert await talk.codes(1) == [235]
    assert policy.given == [("LOGIN", b"\0user1@example.com\0secret1", "user1@example.com",
                             True)]


async def test_login_with_an_initial_response_asks_only_for_the_password(handshake):
    policy = AuthPolicy()
    async with submission(policy) as talk:
        await secured(talk)
        await talk.send(b"AUTH LOGIN " + b64(b"user1@example.com") + b"\r\n")
        assert await talk.reply() == b"334 UGFzc3dvcmQ6\r\n"
        await talk.send(b64(b"secret1") + b"\r\n")
        assert await talk.codes(1) == [235]
    assert policy.given[0][1] == b"\0user1@example.com\0secret1"


@pytest.mark.parametrize(("response", "reply"), [
    pytest.param(b"*", b"501 5.7.0 Authentication aborted", id="cancelled"),
    pytest.param(b"not base64!", b"501 5.5.2 Cannot decode response", id="not-base64"),
    pytest.param(b"A" * 3000, b"500 5.5.2 Error: line too long", id="too-long"),
])
async def test_a_response_refused_ends_the_exchange_not_the_session(handshake, response, reply):
    policy = AuthPolicy()
    async with submission(policy) as talk:
        await secured(talk)
        await talk.send(b"AUTH LOGIN\r\n")
        assert await talk.codes(1) == [334]
        await talk.send(response + b"\r\nNOOP\r\n")
        got = await talk.replies(2)
        assert talk.session.login is None
    assert got[0].startswith(reply + b"; session="), got
    assert got[1].startswith(b"250 2.0.0 Ok")  # the next line is a command again
    assert not policy.given


async def test_an_unknown_mechanism_is_504(handshake):
    policy = AuthPolicy()
    async with submission(policy) as talk:
        await secured(talk)
        await talk.send(b"AUTH CRAM-MD5\r\n")
        assert (await talk.reply()).startswith(b"504 5.5.4 Unsupported authentication mechanism")
    assert not policy.given


@pytest.mark.parametrize(("allowed", "ends"), [
    pytest.param(Reply(450, "4.7.1", "Error: too many AUTH commands"), False, id="450-goes-on"),
    pytest.param(TOO_MANY, True, id="421-ends"),
])
async def test_the_policys_refusal_comes_before_any_challenge(handshake, allowed, ends):
    policy = AuthPolicy(allowed=allowed)
    async with submission(policy) as talk:
        await secured(talk)
        await talk.send(b"AUTH LOGIN\r\nNOOP\r\n")
        first = await talk.reply()
        assert first.startswith(str(allowed).encode() + b"; session=")
        if ends:
            await talk.closed()
        else:
            assert await talk.codes(1) == [250]
    assert b"334" not in talk.transport.out and not policy.given


@pytest.mark.parametrize(("outcome", "ends"), [
    pytest.param(AuthOutcome(replies.AUTH_FAILED), False, id="535-goes-on"),
    pytest.param(AuthOutcome(TOO_MANY), True, id="421-ends"),
])
async def test_a_failed_login_is_the_policys_reply(handshake, outcome, ends):
    async with submission(AuthPolicy(outcome)) as talk:
        await secured(talk)
        await talk.send(b"AUTH PLAIN " + b64(b"\0user1@example.com\0wrong") + b"\r\nNOOP\r\n")
        assert (await talk.reply()).startswith(str(outcome.reply).encode() + b"; session=")
        assert talk.session is None or talk.session.login is None
        if ends:
            await talk.closed()
        else:
            assert await talk.codes(1) == [250]


async def test_a_client_gone_at_a_challenge_ends_the_session(handshake):
    policy = AuthPolicy()
    async with submission(policy) as talk:
        await secured(talk)
        await talk.send(b"AUTH LOGIN\r\n")
        assert await talk.codes(1) == [334]
        talk.wire.eof_received()
        await talk.closed()
    assert not policy.given


# --- the exchange on its seam alone ------------------------------------------------------------


class Lines:
    """A LineWire: the client's lines, in order; None when they run out."""

    def __init__(self, *lines: bytes) -> None:
        self.lines = list(lines)

    async def line(self, timeout: float, limit: int) -> bytes | None:
        return self.lines.pop(0) if self.lines else None


class StandIn:
    """An Authenticating and nothing more (slots): the exchange reaching past it fails."""

    __slots__ = ("answers", "config", "dialogue", "policy", "state", "wire")

    def __init__(self, policy: AuthPolicy, *lines: bytes) -> None:
        self.config = config_module.load({"HOSTNAME": "mx.gate.test"})
        self.policy = policy
        self.state = ClientState(Client("192.0.2.9", 40000, "192.0.2.1", 587, SUBMISSION))
        self.dialogue = Dialogue(SUBMISSION, Limits(), offers_auth=True, tls=True,
                                 stage=Stage.GREETED, helo="laptop", esmtp=True)
        self.wire = Lines(*lines)
        self.answers: list[str] = []

    def reply(self, reply, counted=True) -> None:
        self.answers.append(str(reply))


def test_the_stand_in_is_exactly_the_authenticating_seam():
    seam = {n for n in vars(Authenticating) if not n.startswith("_")}
    seam |= set(Authenticating.__annotations__)
    assert {n for n in dir(StandIn) if not n.startswith("_")} == seam | {"answers"}


async def test_the_exchange_needs_only_its_seam():
    policy = AuthPolicy()
    session = StandIn(policy, b64(b"user1@example.com") + b"\r\n", b64(b"secret1") + b"\r\n")
    await authenticate(session, Authenticate("LOGIN", ""))
    assert session.answers == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", str(replies.AUTH_OK)]
    assert session.dialogue.login == "user1@example.com"
    assert policy.given == [("LOGIN", b"\0user1@example.com\0secret1", "user1@example.com",
                             True)]


async def test_the_exchange_counts_a_too_long_response_as_the_dialogue_does():
    session = StandIn(AuthPolicy(), TOO_LONG)
    await authenticate(session, Authenticate("PLAIN", ""))
    assert session.answers == ["334 ", str(replies.LINE_TOO_LONG)]
    assert session.dialogue.counts == {"UNKNOWN": 1}  # as a command line too long is


async def test_the_exchange_ends_the_session_when_the_client_is_gone():
    session = StandIn(AuthPolicy())
    with pytest.raises(Closing):
        await authenticate(session, Authenticate("LOGIN", ""))
    assert session.answers == ["334 VXNlcm5hbWU6"]
