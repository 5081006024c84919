"""session_id - a short name for each SMTP session, for replies, log lines and evidence.

SYNOPSIS
    new() -> str                   "0KTJ8M4ZP9AQ": 12 characters, Crockford's base32
    valid(text) -> bool            the shape of an id, for `explain --session`
    time_of(id) -> float           when it was made (Unix time)
    normal(text) -> str            upper case, O read as 0, I and L as 1, a `session=`
                                   copied with it (and the `;` or `,` around) dropped
    current: ContextVar[str | None]  the id of the session whose task is running

DESCRIPTION
    An id is 60 bits: the time in milliseconds since 2025-01-01 (40 bits,
    enough until 2059), then a 20-bit counter that starts at a random value
    in each process (reseeded after fork, so workers start apart) and
    steps by one per id, shown multiplied by an odd constant so that
    neighbouring ids do not look alike. Within one process no two ids repeat; two
    processes, on one host or several, share an id only when they start a
    session in the same millisecond with the same counter value (about
    one chance in a million per such pair). Ids sort by the time they were
    made, and Crockford's alphabet has no I, L, O or U, so an id read out
    over the phone or copied from a bounce survives.

    Making one costs a clock read and twelve table look-ups: the session's
    hot path pays about a microsecond.

    `current` is set by the session's own task (asyncio gives each task a
    copy of the context), so everything logged on that session's behalf,
    the policy's lines included, can carry the id (smtpgate.cli.main's
    JSON log format does).
"""

from __future__ import annotations

import os
import random
import time
from contextvars import ContextVar

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
LENGTH = 12
EPOCH_MS = 1735689600000  # 2025-01-01T00:00:00Z
_COUNTER_BITS = 20
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
_TIME_MASK = (1 << (LENGTH * 5 - _COUNTER_BITS)) - 1
_SPREAD = 0x9E3B5  # odd, so multiplying by it permutes the counter's values
_READ_AS = str.maketrans("OIL", "011")
_PAIRS = [first + second for first in ALPHABET for second in ALPHABET]
# an id's digits as int(..., 32) reads them; what is left after deleting the alphabet
_AS_DIGITS = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")
_NOT_DIGITS = str.maketrans("", "", ALPHABET)

current: ContextVar[str | None] = ContextVar("smtpgate_session", default=None)

_counter = random.getrandbits(_COUNTER_BITS)


def _reseed() -> None:
    global _counter
    _counter = random.SystemRandom().getrandbits(_COUNTER_BITS)


os.register_at_fork(after_in_child=_reseed)


def new() -> str:
    global _counter
    _counter = (_counter + 1) & _COUNTER_MASK
    spread = (_counter * _SPREAD) & _COUNTER_MASK  # one-to-one: neighbours do not look alike
    number = ((time.time_ns() // 1_000_000 - EPOCH_MS) & _TIME_MASK) << _COUNTER_BITS | spread
    p = _PAIRS  # two characters (ten bits) a look-up: six, not twelve and a list
    return (p[number >> 50] + p[number >> 40 & 1023] + p[number >> 30 & 1023]
            + p[number >> 20 & 1023] + p[number >> 10 & 1023] + p[number & 1023])


def normal(text: str) -> str:
    text = text.strip().strip(";,.").strip()
    if text.lower().startswith("session="):
        text = text[len("session="):]
    return text.strip().upper().translate(_READ_AS)


def valid(text: str) -> bool:
    return len(text) == LENGTH and all(c in ALPHABET for c in text)


def time_of(text: str) -> float:
    if text.isascii() and text.isalnum() and not text.translate(_NOT_DIGITS):
        number = int(text.translate(_AS_DIGITS), 32)  # every session's record reads it
    else:
        number = 0
        for char in text:  # ValueError for a character not in the alphabet, as before
            number = number << 5 | ALPHABET.index(char)
    return ((number >> _COUNTER_BITS) + EPOCH_MS) / 1000
