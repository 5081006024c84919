"""The worker's deadline wheel: idle sessions time out at their deadline, without a timer each."""

from __future__ import annotations

import asyncio

from memory_session import memory_session

from smtpgate.smtp import deadlines as deadlines_module
from smtpgate.smtp.deadlines import TICK, deadlines_of


class Waiter:
    """What the wheel asks of a waiter (smtpgate.smtp.wire.Wire has the same)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._filed = None
        self.waiting = True
        self.expired_at: float | None = None

    def _waiting(self) -> bool:
        return self.waiting

    def _expired(self) -> None:
        if self.waiting:
            self.waiting = False
            self.expired_at = asyncio.get_running_loop().time()


async def _until(condition, limit: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not condition():
        assert loop.time() < end, "not within the limit"
        await asyncio.sleep(0.01)


async def test_a_deadline_fires_when_it_has_come_and_not_before():
    loop = asyncio.get_running_loop()
    wheel = deadlines_module.Deadlines()
    waiter = Waiter(loop.time() + 0.3)
    wheel.watch(waiter)
    await _until(lambda: waiter.expired_at is not None)
    assert waiter.expired_at >= waiter.deadline
    assert waiter._filed is None and len(wheel) == 0


async def test_a_deadline_moved_later_is_filed_again_and_one_moved_earlier_at_once():
    loop = asyncio.get_running_loop()
    wheel = deadlines_module.Deadlines()
    later = Waiter(loop.time() + 0.2)
    wheel.watch(later)
    later.deadline = loop.time() + 0.2 + 3 * TICK  # a command came: re-armed, not refiled yet
    wheel.watch(later)
    earlier = Waiter(loop.time() + 60.0)
    wheel.watch(earlier)
    earlier.deadline = loop.time() + 0.2  # a shorter wait than the one filed
    wheel.watch(earlier)
    await _until(lambda: earlier.expired_at is not None)
    assert later.expired_at is None and later._filed is not None  # its old tick came and went
    await _until(lambda: later.expired_at is not None)
    assert later.expired_at >= later.deadline


async def test_a_waiter_that_waits_no_more_or_is_forgotten_leaves_the_wheel():
    loop = asyncio.get_running_loop()
    wheel = deadlines_module.Deadlines()
    busy, closed = Waiter(loop.time() + 0.1), Waiter(loop.time() + 0.1)
    wheel.watch(busy)
    wheel.watch(closed)
    wheel.forget(closed)  # a closed connection is not held until its deadline
    assert len(wheel) == 1
    busy.waiting = False
    busy.deadline = loop.time() + 0.1 + TICK  # moved on, but not waiting when its tick comes
    await asyncio.sleep(0.2 + TICK)
    assert len(wheel) == 0 and busy.expired_at is None and closed.expired_at is None


async def test_an_idle_session_is_closed_at_its_deadline_by_the_wheel():
    loop = asyncio.get_running_loop()
    async with memory_session({"SMTPGATE_SMTPD_TIMEOUT": "1"}) as talk:
        await talk.send(b"EHLO client.test\r\n")
        await talk.reply()
        said = loop.time()
        wheel = deadlines_of(loop)
        assert talk.wire._filed is not None and talk.wire in wheel._buckets[talk.wire._filed]
        reply = await talk.reply()
        assert reply.startswith(b"421 4.4.2 ") and b"timeout" in reply.lower()
        assert loop.time() - said >= 1.0  # never before the deadline
        await talk.closed()  # and out of gate.sessions
        assert talk.wire._filed is None
    assert talk.metrics.ended == ["timeout"]


async def test_idle_sessions_hold_no_timer_of_their_own():
    loop = asyncio.get_running_loop()
    wheel = deadlines_of(loop)
    before = len(wheel)
    async with memory_session() as one, memory_session() as two:
        for talk in (one, two):
            await talk.send(b"EHLO client.test\r\n")
            await talk.reply()
        assert len(wheel) == before + 2
        assert wheel._timer is not None  # one loop timer for both
        for talk in (one, two):
            await talk.send(b"QUIT\r\n")
            await talk.reply()
            await talk.closed()
    await _until(lambda: len(wheel) == before)  # at connection_lost, not at the deadline
