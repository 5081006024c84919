"""The RESP encoding of a command (smtpgate.lookups.redis_pipelined.pack): str, bytes, int and
float as redis-py encodes them, their subclasses as their values; what smtpgate never sends
refused with redis-py's DataError."""

from __future__ import annotations

import enum

import pytest
from redis.exceptions import DataError

from smtpgate.lookups.redis_pipelined import pack


class Name(enum.StrEnum):
    KEY = "smtpgate:k"


class Count(enum.IntEnum):
    TWO = 2


def packed(*args) -> bytes:
    out: list[bytes] = []
    pack(args, out)
    return b"".join(out)


def test_every_type_a_caller_passes():
    assert packed("SET", b"k\xff", 42, -7, 1.5) == (
        b"*5\r\n$3\r\nSET\r\n$2\r\nk\xff\r\n$2\r\n42\r\n$2\r\n-7\r\n$3\r\n1.5\r\n")
    assert packed("GET", "sm\u00f8rrebr\u00f8d") == (
        b"*2\r\n$3\r\nGET\r\n$12\r\nsm\xc3\xb8rrebr\xc3\xb8d\r\n")


def test_subclasses_are_encoded_as_their_base():
    assert packed(Name.KEY, Count.TWO) == b"*2\r\n$10\r\nsmtpgate:k\r\n$1\r\n2\r\n"


@pytest.mark.parametrize("value", [True, None, [1], bytearray(b"x")],
                         ids=["bool", "none", "list", "bytearray"])
def test_what_smtpgate_never_sends_is_refused(value):
    with pytest.raises(DataError):
        packed("SET", "k", value)
