"""hop_choice - which next hop a message tries first, and which are skipped for now.

SYNOPSIS
    choice = HopChoice(count, retry, retry_limit=8 * retry)
    choice.order(now) -> tuple[int, ...]      the hops to try, best first
    choice.failed(index, now) -> float        marks it down; seconds until it is tried again
    choice.worked(index) -> bool              marks it up; True when it was down
    choice.down(index) -> bool ; choice.on_trial(index) -> bool
    choice.retry_in(index, now) -> float

DESCRIPTION
    A pure decision, with the clock passed in; relay.hops does the I/O.

    Hops that are up take messages in turn (round-robin), so several
    Postfix instances share the load. A hop whose connection or greeting
    failed is down: it is skipped for `retry` seconds, after which one
    message tries it first (the trial pushes the next retry out at once,
    so the messages arriving meanwhile do not all try it too). A failed
    trial doubles the wait, up to retry_limit; any success puts the hop
    back in turn. Hops that are down and not yet due come last, the ones
    that failed longest ago first: a message tries them only when every
    other hop failed it too, since the client would hear 451 otherwise.

    With one hop the order is always that hop, as cheap as no choice.
"""

from __future__ import annotations

_ONE = (0,)


class HopChoice:
    __slots__ = ("_backoff", "_cursor", "_down_until", "_failed_at", "_trial", "count", "retry",
                 "retry_limit")

    def __init__(self, count: int, retry: float, retry_limit: float | None = None) -> None:
        if count < 1:
            raise ValueError("no next hop")
        self.count, self.retry = count, retry
        self.retry_limit = max(retry, retry_limit if retry_limit is not None else 8 * retry)
        self._cursor = 0
        self._down_until: list[float | None] = [None] * count  # None: up
        self._backoff = [0.0] * count
        self._failed_at = [0.0] * count
        self._trial = [False] * count  # a message was sent to try it again

    def order(self, now: float) -> tuple[int, ...]:
        if self.count == 1:
            return _ONE
        start = self._cursor
        self._cursor = (start + 1) % self.count
        turn = [(start + i) % self.count for i in range(self.count)]
        down_until = self._down_until
        due = [i for i in turn if down_until[i] is not None and down_until[i] <= now]
        up = [i for i in turn if down_until[i] is None]
        waiting = sorted((i for i in turn if down_until[i] is not None and down_until[i] > now),
                         key=self._failed_at.__getitem__)
        for i in due:  # this message is the trial; the others wait another backoff
            down_until[i] = now + self._backoff[i]
            self._trial[i] = True
        return (*due, *up, *waiting)

    def failed(self, index: int, now: float) -> float:
        if self._down_until[index] is None:
            self._backoff[index] = self.retry
        elif self._trial[index]:  # not the messages that were under way when it went down
            self._backoff[index] = min(self._backoff[index] * 2, self.retry_limit)
        self._trial[index] = False
        self._failed_at[index] = now
        self._down_until[index] = now + self._backoff[index]
        return self._backoff[index]

    def worked(self, index: int) -> bool:
        was_down = self._down_until[index] is not None
        self._down_until[index] = None
        self._backoff[index] = 0.0
        self._trial[index] = False
        return was_down

    def on_trial(self, index: int) -> bool:
        """A message was sent to try it again and has not reported back."""
        return self._trial[index]

    def down(self, index: int) -> bool:
        return self._down_until[index] is not None

    def retry_in(self, index: int, now: float) -> float:
        until = self._down_until[index]
        return 0.0 if until is None else max(0.0, until - now)
