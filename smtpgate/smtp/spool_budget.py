"""spool_budget - how many bytes of received messages one worker may hold at once.

SYNOPSIS
    SpoolBudget(limit)                 limit in bytes, 0: no bound
    budget.room() -> int | None        what is left (None: no bound)
    budget.spent -> bool
    budget.take(n) -> bool ; budget.take_rest() -> int ; budget.give(n)
    budget.refused                     messages refused for want of room, counted

DESCRIPTION
    Every message is received whole before the next hop sees it
    (smtpgate.smtp.spool), in memory up to spool_memory_limit and in a
    temporary file after that. Without a bound, enough clients trickling
    25 MB messages at once fill the disk (or a pod's emptyDir) or the
    memory; with it, the worker answers as Postfix does when its queue
    file system is short of space, "452 4.3.1 Insufficient system
    storage": at MAIL when the declared SIZE is more than is left, at DATA
    when nothing is left, and after the final dot when a message outgrew
    what was left while it came (the rest of it is read and dropped, so
    the dialogue stays in step). A 4xx: the client tries again later.

    The budget counts bytes as stored, memory and file alike, taken as a
    spool grows and given back when it is closed. A spool that outgrows it
    takes what was left (take_rest), so that while its client sends the
    rest of a message that will be refused, other sessions see the budget
    spent and hear 452 at DATA rather than after their whole message. It is the worker's only:
    workers do not share memory, and each gets spool_budget.
"""

from __future__ import annotations


class SpoolBudget:
    __slots__ = ("limit", "refused", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def room(self) -> int | None:
        if not self.limit:
            return None
        return max(0, self.limit - self.used)

    @property
    def spent(self) -> bool:
        return bool(self.limit) and self.used >= self.limit

    def take(self, size: int) -> bool:
        """Reserve size bytes; False (and nothing taken) when they do not fit."""
        if self.limit and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def take_rest(self) -> int:
        """Take whatever room is left; how much that was."""
        rest = self.room() or 0
        self.used += rest
        return rest

    def give(self, size: int) -> None:
        self.used -= size
