"""memory_session - one smtpgate session driven in memory: a fake transport, a stub policy and hop.

SYNOPSIS
    async with memory_session(environ={}, listener=MX, policy=None, hop=None, high=65536,
                              tls=None, auth=False) as talk:
        await talk.send(b"EHLO x\\r\\n") ; await talk.replies(n) -> list[bytes]
        talk.transport        FakeTransport: out, writes, reading, closed, stalled
        talk.policy, talk.hop, talk.session, talk.gate

DESCRIPTION
    uvicorn's way of testing a protocol without sockets: the session's Wire
    is connected to a FakeTransport that records what is written, pauses
    and resumes like a real one and, when `stalled` (a client that does
    not read), holds what was written and calls pause_writing() past
    `high` bytes until client_reads(); what the client sends while reading
    is paused is held, as the kernel would, until it resumes. The policy and the next hop are
    stubs that answer at once and count what they were asked (`auth`: an
    authenticator is configured, so submission offers AUTH once TLS is on;
    it is never called), so a test of
    the dialogue's sequencing and bounds runs in milliseconds. The real
    policy and Postfix are the end-to-end tests' (test_engine_e2e and
    friends).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from smtpgate import config as config_module
from smtpgate.checks import protocol as protocol_check
from smtpgate.policy.state import MX, ClientState
from smtpgate.relay.next_hop import HopReply
from smtpgate.relay.pool import TransactionLimit
from smtpgate.service.metrics import session_outcome
from smtpgate.smtp.events import Ended, Refused
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.session import protocol_factory
from smtpgate.verdict import Outcome, Reply, Verdict

DEADLINE = 5.0


class FakeTransport:
    def __init__(self, protocol, peer: str = "192.0.2.7", high: int = 65536) -> None:
        self.protocol = protocol
        self.peer = peer
        self.high = high
        self.out = bytearray()  # everything written, in order
        self.writes: list[bytes] = []
        self.reading = True
        self.closed = False
        self.aborted = False
        self.stalled = False  # the client reads nothing: writes pile up here
        self.unread = 0
        self._writing_paused = False
        self.held: list[bytes] = []  # what the client sent while reading was paused (the kernel's)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self.out += data
        self.writes.append(bytes(data))
        if self.stalled:
            self.unread += len(data)
            if self.unread > self.high and not self._writing_paused:
                self._writing_paused = True
                self.protocol.pause_writing()

    def client_reads(self) -> None:
        self.stalled, self.unread = False, 0
        if self._writing_paused:
            self._writing_paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.unread

    def client_sends(self, data: bytes) -> None:
        if self.reading:
            self.protocol.data_received(data)
        else:
            self.held.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        asyncio.get_running_loop().call_soon(self._deliver_held)  # as a socket's next read

    def _deliver_held(self) -> None:
        held, self.held = self.held, []
        for data in held:
            self.client_sends(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def get_extra_info(self, name: str, default=None):
        return {"peername": (self.peer, 40000), "sockname": ("192.0.2.1", 25)}.get(name, default)


@dataclass
class StubEvidence:
    kept: list[str] = field(default_factory=list)
    producers: dict = field(default_factory=dict)  # session id -> its record's producer

    def keep(self, session_id, producer, repeat=None) -> None:
        self.kept.append(session_id)
        self.producers[session_id] = producer


class StubPolicy:
    """Accepts everything, takes one verdict per HELO, MAIL and RCPT as the real one does,
    and runs the real protocol checks with the `ignore` action, counting each call."""

    def __init__(self, protocol_tests: bool = False) -> None:
        self.evidence = StubEvidence()
        self.protocol_tests = protocol_tests
        self.protocol_calls: list[tuple[str, bytes]] = []
        self.mail_reply: Reply | None = None
        self.rcpt_reply: Reply | None = None
        self.closed = 0

    def open(self, client) -> ClientState:
        return ClientState(client)

    async def connect(self, state):
        return None

    async def screened(self, state, received, delay):
        return None

    async def helo(self, state, name):
        state.note(Verdict("helo", Outcome.PASS))
        return None

    async def mail(self, state, path, login):
        state.note(Verdict("sender", Outcome.PASS if self.mail_reply is None
                           else Outcome.FAIL, self.mail_reply))
        return self.mail_reply

    async def rcpt(self, state, path, login, smtputf8):
        state.note(Verdict("recipient", Outcome.PASS if self.rcpt_reply is None
                           else Outcome.FAIL, self.rcpt_reply))
        return self.rcpt_reply

    def wants_protocol_tests(self, state) -> bool:
        return self.protocol_tests

    async def protocol(self, state, test, line, pending, after, esmtp):
        self.protocol_calls.append((test, pending))
        if test == "pipelining":
            verdict = protocol_check.pipelining(
                line.decode("utf-8", "replace"), pending, "192.0.2.7", 40000,
                pipelining_offered=esmtp, action="ignore")
            if verdict.ignored and test not in state.protocol_failed:
                state.protocol_failed += (test,)
        return None

    async def starttls(self, state):
        return None

    async def tls_started(self, state, resumed):
        return None

    async def tls_service_refused(self, client):
        return False

    async def auth_allowed(self, state):
        return None

    async def authenticate(self, state, mechanism, plain, login, secured):
        raise AssertionError("no AUTH in these tests")

    def close_session(self, state) -> None:
        self.closed += 1


class StubHop:
    """The next hop: takes every message and answers `answer`, keeping what it got."""

    label = "stub"

    def __init__(self, answer: bytes = b"250 2.0.0 Ok: queued as 4XyZ1\r\n") -> None:
        self.answer = answer
        self.messages: list[tuple] = []
        self.started = asyncio.Event()
        self.release: asyncio.Event | None = None  # set: hold each hand-off until released

    async def deliver(self, identity, envelope, chunks, size, label) -> HopReply:
        self.started.set()
        if self.release is not None:
            await self.release.wait()
        self.messages.append((envelope, b"".join(chunks()), size))
        return HopReply(int(self.answer[:3]), self.answer)


class StubMetrics:
    """The events the session published, and the outcome labels the real metrics give."""

    def __init__(self) -> None:
        self.events: list = []

    def notify(self, event) -> None:
        self.events.append(event)

    @property
    def ended(self) -> list[str]:
        return [session_outcome(e.how, e.last_command, e.eof, e.draining, e.rejected)
                for e in self.events if isinstance(e, Ended)]

    @property
    def rejections(self) -> int:
        return sum(1 for e in self.events if isinstance(e, Refused) and e.reply is not None)


class Talk:
    def __init__(self, gate: Gate, transport: FakeTransport, wire) -> None:
        self.gate, self.transport, self.wire = gate, transport, wire
        self.policy, self.hop, self.metrics = gate.policy, gate.hops, gate.metrics
        self._read = 0

    @property
    def session(self):
        return next(iter(self.gate.sessions), None)

    async def send(self, data: bytes) -> None:
        self.transport.client_sends(data)
        await asyncio.sleep(0)

    async def until(self, condition, what: str = "condition") -> None:
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {what} within {DEADLINE} s; "
                                     f"got {bytes(self.transport.out)!r}")
            await asyncio.sleep(0.001)

    def _complete(self) -> list[bytes]:
        """The whole replies written so far and not yet taken (a multi-line one as one)."""
        found, start, out = [], self._read, bytes(self.transport.out)
        pos = start
        while (end := out.find(b"\r\n", pos)) >= 0:
            line = out[pos:end]
            pos = end + 2
            if line[3:4] != b"-":
                found.append(out[start:pos])
                start = pos
        return found

    async def replies(self, n: int) -> list[bytes]:
        await self.until(lambda: len(self._complete()) >= n or self.transport.closed, "replies")
        got = self._complete()[:n]
        self._read += sum(len(r) for r in got)
        return got

    async def reply(self) -> bytes:
        got = await self.replies(1)
        assert got, f"no reply; closed={self.transport.closed}"
        return got[0]

    async def codes(self, n: int) -> list[int]:
        return [int(r[:3]) for r in await self.replies(n)]

    async def closed(self) -> None:
        await self.until(lambda: self.transport.closed and not self.gate.sessions, "close")


@contextlib.asynccontextmanager
async def memory_session(environ: dict | None = None, listener: str = MX,
                         policy: StubPolicy | None = None, hop: StubHop | None = None,
                         high: int = 65536, tls=None, auth: bool = False):
    config = config_module.load({"HOSTNAME": "mx.gate.test", "SMTPGATE_GREET_WAIT": "0",
                                 **(environ or {})})
    gate = Gate(config, tls, policy or StubPolicy(), TransactionLimit(10, 1.0),
                hop or StubHop(), auth=object() if auth else None,  # AUTH offered, never used
                metrics=StubMetrics())
    wire = protocol_factory(gate, listener)()
    transport = FakeTransport(wire, high=high)
    wire.connection_made(transport)
    talk = Talk(gate, transport, wire)
    try:
        banner = await talk.reply()
        assert banner.startswith(b"220 mx.gate.test"), banner
        yield talk
    finally:
        transport.close()
        with contextlib.suppress(AssertionError):
            await talk.until(lambda: not gate.sessions, "session end")
