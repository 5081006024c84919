"""spool - one received message, in memory up to a bound, then in a temporary file.

SYNOPSIS
    Spool(memory_limit, budget=None)
    spool.write(data) ; spool.size ; spool.full
    spool.chunks(chunk_size=262144) -> Iterator[bytes]
    spool.close()

DESCRIPTION
    The engine receives a whole message before it uses a Postfix
    connection (Postfix's speed_adjust), so a slow client never holds a
    Postfix process. Small messages stay in memory; past memory_limit the
    message moves to an unnamed temporary file (tempfile.TemporaryFile:
    gone from the file system at once, gone from the disk when closed), so
    a 25 MB message costs memory_limit bytes of RAM, not 25 MB. The size
    limit is the message intake's to enforce (smtpgate.smtp.intake): it
    stops writing once the message is too big.

    Each byte stored is taken from the worker's SpoolBudget
    (smtpgate.smtp.spool_budget) and given back by close(). A write the
    budget has no room for sets `full` and stores nothing from then on: the
    intake reads the message to its end and answers 452 4.3.1.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from smtpgate.smtp.spool_budget import SpoolBudget


class Spool:
    __slots__ = ("_file", "_memory", "_taken", "budget", "full", "memory_limit", "size")

    def __init__(self, memory_limit: int, budget: SpoolBudget | None = None) -> None:
        self.memory_limit = memory_limit
        self.budget = budget
        self.full = False
        self._taken = 0  # from the budget, given back by close()
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.full:
            return
        if self.budget is not None:
            if not self.budget.take(len(data)):
                self.full = True
                self.budget.refused += 1
                self._taken += self.budget.take_rest()
                return
            self._taken += len(data)
        self.size += len(data)
        if self._memory is not None:
            if len(self._memory) + len(data) <= self.memory_limit:
                self._memory += data
                return
            self._file = tempfile.TemporaryFile(prefix="smtpgate-")  # noqa: SIM115
            self._file.write(self._memory)
            self._memory = None
        self._file.write(data)

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def chunks(self, chunk_size: int = 262144) -> Iterator[bytes]:
        if self._memory is not None:
            if self._memory:
                yield bytes(self._memory)
            return
        self._file.seek(0)
        while chunk := self._file.read(chunk_size):
            yield chunk

    def close(self) -> None:
        if self.budget is not None:
            self.budget.give(self._taken)
            self.budget = None
        self._memory = None
        if self._file is not None:
            self._file.close()
            self._file = None
