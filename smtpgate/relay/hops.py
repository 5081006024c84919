"""hops - the next hops of one kind: a pool each, and the move to another one on failure.

SYNOPSIS
    hops = Hops(addresses, timeouts, ehlo_name, pool_size, retry)
    await hops.deliver(identity, envelope, chunks, size, client_label) -> HopReply
    hops.check() -> list[HopHealth]            for /healthz; pools replace closed connections
    hops.label ; hops.close()

DESCRIPTION
    SMTPGATE_NEXT_HOP may name several Postfix instances. relay.hop_choice
    says in which order a message tries them; each hop has its own
    relay.pool.HopPool (none when pool_size is 0). A connection that
    cannot be made or greeted, or a hop that fails before the message
    itself went out, moves the message to the next hop within the same
    transaction, so the client hears no 451 while one hop still takes
    mail. Once the end of the message went out, Postfix may have queued
    it: a failure then is the client's 451, never a second copy through
    another hop.

    Log lines, with several hops: `warning: next hop A is down (reason);
    skipped for 10 s` when A fails, `warning: next hop A: reason; trying B
    for client` when a message moves on, `warning: next hop A is still
    down (reason); next try in 20 s` after a failed retry, `next hop A is
    up again` when a connection to it succeeds (a message's, or a pool's
    background one).

    `chunks` is a callable giving the message's chunks afresh, since a
    message that moves on is sent again from its start.

    `timeouts` (smtpgate.relay.hop_timeouts) limit each step of a hand-off,
    and all of deliver() together to their total: a message that is moving
    on from a stalled hop still ends before its client stops waiting.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from smtpgate.config import HostPort
from smtpgate.relay.hop_choice import HopChoice
from smtpgate.relay.hop_timeouts import HopTimeouts
from smtpgate.relay.next_hop import Envelope, HandOffOverdue, HopReply, NextHop, RelayError
from smtpgate.relay.pool import HopPool
from smtpgate.relay.xclient import ClientIdentity

log = logging.getLogger("smtpgate.relay")


@dataclass(frozen=True, slots=True)
class HopHealth:
    address: HostPort
    ok: bool | None  # None: not tried yet
    detail: str
    retry_in: float  # seconds until a message tries it again (0 when up)


class Hops:
    def __init__(self, addresses: tuple[HostPort, ...], timeout: float | HopTimeouts,
                 ehlo_name: str, pool_size: int, retry: float) -> None:
        self.addresses, self.ehlo_name = addresses, ehlo_name
        self.timeouts = HopTimeouts.of(timeout)
        self.label = ",".join(map(str, addresses))
        self.choice = HopChoice(len(addresses), retry)
        self.ok: list[bool | None] = [None] * len(addresses)
        self.detail = [""] * len(addresses)
        self.pools = [HopPool(address, self.timeouts, ehlo_name, size=pool_size,
                              on_outcome=functools.partial(self._outcome, index))
                      if pool_size else None for index, address in enumerate(addresses)]

    async def deliver(self, identity: ClientIdentity, envelope: Envelope,
                      chunks: Callable[[], Iterable[bytes]], size: int,
                      client_label: str) -> HopReply:
        """Postfix's answer to the message, from the first hop that gives one; RelayError
        (naming the hop) when none could take it, or not within the total time limit.

        The total is a deadline each wait of the hand-off keeps to (NextHop's replies, and a
        connect when no pooled connection is idle), not a timer of its own per message.
        """
        total = self.timeouts.total
        end = asyncio.get_running_loop().time() + total
        order = self.choice.order(time.monotonic())
        last = len(order) - 1
        for position, index in enumerate(order):  # in this coroutine: no other per message
            pool, hop = self.pools[index], None
            try:
                hop = pool.take_idle() if pool is not None else None
                if hop is None:
                    async with asyncio.timeout_at(end):
                        # none idle just now: a fresh one (not take(), which would look again)
                        hop = await (pool.connect() if pool is not None
                                     else self._greeted(index))
                return await hop.deliver(identity, envelope, chunks(), size, end)
            except (TimeoutError, HandOffOverdue):
                raise RelayError(f"{self.label}: the hand-off took over {total:g} s "
                                 "(next_hop_total_timeout)") from None
            except RelayError as exc:
                address = self.addresses[index]
                if hop is not None:  # a failed connect or greeting is already recorded
                    if pool is not None:
                        pool.forget(str(exc))
                    else:
                        self._outcome(index, False, str(exc))
                if position == last or (hop is not None and hop.quit_sent):
                    raise RelayError(f"{address}: {exc}") from None
                log.warning("warning: next hop %s: %s; trying %s for %s", address, exc,
                            self.addresses[order[position + 1]], client_label)
            finally:
                if hop is not None:
                    hop.close_quietly()
        raise AssertionError("unreachable: the order names every hop")

    async def _greeted(self, index: int) -> NextHop:
        try:
            hop = await NextHop.greeted(self.addresses[index], self.timeouts, self.ehlo_name)
        except RelayError as exc:
            self._outcome(index, False, str(exc))
            raise
        self._outcome(index, True, "")
        return hop

    def _outcome(self, index: int, ok: bool, detail: str) -> None:
        """Every connection attempt's outcome, from a message or a pool's background fill."""
        self.ok[index], self.detail[index] = ok, detail
        choice, address = self.choice, self.addresses[index]
        if ok:
            if choice.worked(index) and choice.count > 1:
                log.info("next hop %s is up again", address)
            return
        was_down, on_trial = choice.down(index), choice.on_trial(index)
        wait = choice.failed(index, time.monotonic())
        if choice.count == 1:
            return  # never skipped: the session's own warning says what failed
        if not was_down:
            log.warning("warning: next hop %s is down (%s); skipped for %.0f s", address,
                        detail, wait)
        elif on_trial:  # not the messages under way when it went down, nor a pool's refill
            log.warning("warning: next hop %s is still down (%s); next try in %.0f s",
                        address, detail, wait)

    def probed(self, address: HostPort) -> None:
        """The start-up probe reached `address`: healthy until a message says otherwise, so
        /healthz does not show a hop nothing has used yet as unknown."""
        for index, known in enumerate(self.addresses):
            if known == address and self.ok[index] is None:
                self.ok[index] = True

    def check(self) -> list[HopHealth]:
        """Each hop's health after its pool replaced the connections Postfix closed."""
        for pool in self.pools:
            if pool is not None:
                pool.check()
        return self.status()

    def status(self) -> list[HopHealth]:
        """Each hop's health as last seen, touching nothing."""
        now = time.monotonic()
        return [HopHealth(address, self.ok[i], self.detail[i], self.choice.retry_in(i, now))
                for i, address in enumerate(self.addresses)]

    def close(self) -> None:
        for pool in self.pools:
            if pool is not None:
                pool.close()
