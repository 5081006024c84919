"""The DATA scanner as a table of labelled cases: chunks in, stored message and flags out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.relay.next_hop import dot_stuffed
from smtpgate.smtp.body import LONGEST_PIECE, BodyReader
from smtpgate.smtp.spool import Spool


def scan(chunks: list[bytes], limit: int = 0, memory: int = 1 << 20):
    spool = Spool(memory)
    reader = BodyReader(spool, limit)
    buf = bytearray()
    ended = False
    for i, chunk in enumerate(chunks):
        buf += chunk
        if reader.feed(buf):
            ended = True
            buf += b"".join(chunks[i + 1:])  # what the client sent after the end
            break
    stored = b"".join(spool.chunks())
    spool.close()
    return stored, ended, bytes(buf), reader


CASES = [
    ("crlf-message", [b"Subject: x\r\n\r\nbody\r\n.\r\n"], b"Subject: x\r\n\r\nbody\r\n", True,
     b"", False),
    ("empty-message", [b".\r\n"], b"", True, b"", False),
    ("pipelined-after-end", [b"a\r\n.\r\nQUIT\r\n"], b"a\r\n", True, b"QUIT\r\n", False),
    ("dot-unstuffed", [b"..leading\r\n.\r\n"], b".leading\r\n", True, b"", False),
    ("dot-unstuffed-inside", [b"a\r\n..b\r\n...\r\n.\r\n"], b"a\r\n.b\r\n..\r\n", True, b"",
     False),
    ("end-split-across-chunks", [b"a\r\n.", b"\r", b"\n"], b"a\r\n", True, b"", False),
    ("crlf-split-across-chunks", [b"a\r", b"\nb\r\n.\r\n"], b"a\r\nb\r\n", True, b"", False),
    ("bare-lf-dot-is-not-the-end", [b"a\n.\nb\r\n.\r\n"], b"a\r\n.\r\nb\r\n", True, b"", True),
    ("dot-after-bare-lf-line-is-not-the-end", [b"a\n.\r\nb\r\n.\r\n"], b"a\r\n.\r\nb\r\n", True,
     b"", True),
    ("lf-dot-crlf-smuggling", [b"a\r\n.\nMAIL FROM:<x@y>\r\n.\r\n"],
     b"a\r\n.\r\nMAIL FROM:<x@y>\r\n", True, b"", True),
    ("bare-cr-is-content", [b"a\rb\r\n.\r\n"], b"a\rb\r\n", True, b"", False),
    ("no-end-yet", [b"a\r\nb"], b"a\r\n", False, b"b", False),
]


@pytest.mark.parametrize(("chunks", "stored", "ended", "left", "bare"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_scanner(chunks, stored, ended, left, bare):
    got, got_ended, got_left, reader = scan(chunks)
    assert (got, got_ended, got_left, reader.bare_newline) == (stored, ended, left, bare)


def test_over_long_line_is_stored_whole_in_pieces():
    line = b"x" * (LONGEST_PIECE * 3 + 7)
    pieces = [line[i:i + 4096] for i in range(0, len(line), 4096)]
    got, ended, _, _ = scan([*pieces, b"\r\n.\r\n"])
    assert ended and got == line + b"\r\n"


def test_size_limit_keeps_reading_to_the_end_and_stores_nothing_more():
    got, ended, left, reader = scan([b"a" * 50 + b"\r\n", b"b" * 100 + b"\r\n.\r\nQUIT\r\n"],
                                    limit=100)
    assert (ended, left, reader.too_big) == (True, b"QUIT\r\n", True)
    assert got == b"a" * 50 + b"\r\n"


def test_spool_moves_to_a_file_past_its_memory_bound():
    body = b"".join(b"line %d\r\n" % i for i in range(5000))
    spool = Spool(1024)
    reader = BodyReader(spool, 0)
    buf = bytearray(body + b".\r\n")
    assert reader.feed(buf)
    assert not spool.in_memory
    assert b"".join(spool.chunks(4096)) == body and spool.size == len(body)
    spool.close()


STUFFING = [
    ("leading-dot", [b".a\r\n"], b"..a\r\n"),
    ("dot-after-crlf", [b"a\r\n.b\r\n"], b"a\r\n..b\r\n"),
    ("dot-line", [b"a\r\n.\r\n"], b"a\r\n..\r\n"),
    ("chunk-starts-at-line-start", [b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n"),
    ("crlf-cut-between-chunks", [b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n"),
    ("dot-mid-line-untouched", [b"a.b\r\n", b"c.\r\n"], b"a.b\r\nc.\r\n"),
    ("lone-lf-chunk", [b"a\r", b"\n", b".\r\n"], b"a\r\n..\r\n"),
    ("cr-lf-dot-in-one-byte-chunks", [b"a", b"\r", b"\n", b".", b"b\r\n"], b"a\r\n..b\r\n"),
]


@pytest.mark.parametrize(("chunks", "wire"), [c[1:] for c in STUFFING],
                         ids=[c[0] for c in STUFFING])
def test_dot_stuffing_for_data(chunks, wire):
    assert b"".join(dot_stuffed(chunks)) == wire


@given(st.lists(st.sampled_from([b"a", b".", b"\r\n", b"\r", b"\n"]), max_size=40),
       st.integers(min_value=1, max_value=4))
@settings(max_examples=300, deadline=None)
def test_dot_stuffing_in_any_chunking_never_ends_the_data_early(pieces, size):
    message = b"".join(pieces)
    message = message.replace(b"\r", b"").replace(b"\n", b"\r\n")  # the spool holds CRLF
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    chunks = [message[i:i + size] for i in range(0, len(message), size)]
    wire = b"".join(dot_stuffed(chunks)) + b".\r\n"
    got, ended, left, _ = scan([wire])
    assert (got, ended, left) == (message, True, b"")


@pytest.mark.parametrize("message", [b"a\r\n.b\r\n..\r\n.\r\nc\r\n", b".\r\n", b""])
def test_stuffing_undoes_unstuffing(message):
    wire = b"".join(dot_stuffed([message])) + b".\r\n"
    got, ended, left, _ = scan([wire])
    assert (got, ended, left) == (message, True, b"")


def reference(data: bytes) -> tuple[bytes, bool, bytes, bool]:
    """The rules, line by line and slowly: what any chunking must agree with."""
    out, start, proper, bare = [], 0, True, False
    while (stop := data.find(b"\n", start)) >= 0:
        line = data[start:stop + 1]
        start = stop + 1
        if proper and line == b".\r\n":
            return b"".join(out), True, data[start:], bare
        proper = line.endswith(b"\r\n")
        text = line[:-2] if proper else line[:-1]
        bare = bare or not proper
        if text[:1] == b"." and text != b".":
            text = text[1:]
        out.append(text + b"\r\n")
    return b"".join(out), False, data[start:], bare


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n"]),
                max_size=60),
       st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20))
@settings(max_examples=400, deadline=None)
def test_any_chunking_agrees_with_the_line_by_line_rules(pieces, cuts):
    data = b"".join(pieces)
    chunks, at = [], 0
    for size in cuts * (len(data) // max(1, sum(cuts)) + 1):
        if at >= len(data):
            break
        chunks.append(data[at:at + size])
        at += size
    stored, ended, left, reader = scan(chunks)
    want_stored, want_ended, want_left, want_bare = reference(data)
    if ended:
        assert (stored, left, reader.bare_newline) == (want_stored, want_left, want_bare)
    else:  # not ended: what was stored is the reference's output for the complete lines
        assert not want_ended
        assert stored == want_stored[:len(stored)]
