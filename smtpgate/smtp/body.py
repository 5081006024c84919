"""body - the DATA phase's scanner: end of data, bare newlines, dot-unstuffing, size.

SYNOPSIS
    BodyReader(spool, limit)
    reader.feed(buf: bytearray) -> bool       True once the end of data was consumed
    reader.size ; reader.too_big ; reader.bare_newline

DESCRIPTION
    feed() consumes the complete lines at the front of buf (it deletes
    what it consumed, and leaves a partial last line for the next call)
    and writes the message, dot-unstuffed, to the spool. After the end of
    data, whatever the client pipelined behind it stays in buf for the
    command reader.

    The rules, as the relay guarantees them (no SMTP smuggling):
    - The end of data is CRLF "." CRLF only. The CRLF that ends the DATA
      command counts as the first CRLF, so a message may be empty.
    - A bare LF ends a line for the message's sake: it is stored as CRLF
      and `bare_newline` is set (postscreen's bare newline test). A "."
      line ended by a bare LF, or preceded by a line that was, is message
      content, never the end: it is stored as "." and so reaches Postfix as
      data (a BDAT chunk, or ".." under DATA), not as an end.
    - A bare CR is content, passed on as it is.
    - A line starting with "." loses that first "." (RFC 5321 4.5.2).
    - `size` counts the message as stored; past `limit` (0: none) the
      reader sets `too_big` and stores nothing more, but keeps reading to
      the end of data so the intake (smtpgate.smtp.intake) can answer 552
      in step.

    Speed: each chunk of complete lines is searched once for an LF that is
    bare or followed by a dot; most chunks of real mail have neither and
    are stored as they came. A chunk with dots but no bare LF costs one
    find for the end and one replace; only a chunk with a bare LF goes line
    by line. About 1 ms per MB in all (tests/test_body_reader.py for the
    rules, benchmarks/ for the figure).
"""

from __future__ import annotations

import re

from smtpgate.smtp.spool import Spool

LONGEST_PIECE = 65536  # a "line" without LF is stored in pieces of this size
# An LF that is bare or starts a line with a dot: where anything but copying is needed.
# The literal LF first lets the regex engine skip ahead as fast as a plain find.
_SPECIAL = re.compile(rb"\n(?:\.|(?<!\r\n))")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


class BodyReader:
    __slots__ = ("_line_start", "_proper", "bare_newline", "limit", "size", "spool", "too_big")

    def __init__(self, spool: Spool, limit: int) -> None:
        self.spool = spool
        self.limit = limit
        self.size = 0
        self.too_big = False
        self.bare_newline = False
        self._line_start = True  # the next byte begins a line
        self._proper = True  # the line before it ended with CRLF

    def feed(self, buf: bytearray) -> bool:
        last = buf.rfind(b"\n")
        if last < 0:
            if len(buf) > LONGEST_PIECE:
                self._piece(buf)
            return False
        with memoryview(buf) as view:  # one copy, not two (a bytearray slice copies too)
            block = bytes(view[:last + 1])
        special = _SPECIAL.search(block)
        if special is None and not (self._line_start and block[:1] == b"."):
            self._store(block)  # whole CRLF lines, none starting with a dot: as they came
            self._line_start = self._proper = True
            del buf[:len(block)]
            return False
        if _BARE_LF.search(block) is None:
            return self._crlf_block(buf, block)
        return self._mixed_block(buf, block)

    def _crlf_block(self, buf: bytearray, block: bytes) -> bool:
        if self._line_start and self._proper and block.startswith(b".\r\n"):
            del buf[:3]
            return True
        end = block.find(b"\r\n.\r\n")
        content = block if end < 0 else block[:end + 2]
        if content[:1] == b"." and self._line_start and not content.startswith(b".\r\n"):
            content = content[1:]
        if b"\r\n." in content:
            content = content.replace(b"\r\n.", b"\r\n")
        self._store(content)
        self._line_start = self._proper = True
        if end < 0:
            del buf[:len(block)]
            return False
        del buf[:end + 5]
        return True

    def _mixed_block(self, buf: bytearray, block: bytes) -> bool:
        start = 0
        out = []
        while start < len(block):
            stop = block.index(b"\n", start) + 1
            line = block[start:stop]
            start = stop
            if self._line_start and self._proper and line == b".\r\n":
                self._store(b"".join(out))
                del buf[:start]
                return True
            proper = line.endswith(b"\r\n")
            text = line[:-2] if proper else line[:-1]
            if not proper:
                self.bare_newline = True
            if self._line_start and text[:1] == b"." and text != b".":
                text = text[1:]
            out.append(text + b"\r\n")
            self._line_start, self._proper = True, proper
        self._store(b"".join(out))
        del buf[:len(block)]
        return False

    def _piece(self, buf: bytearray) -> None:
        """Store most of an over-long line; a final CR waits, as its LF may come next."""
        keep = 1 if buf.endswith(b"\r") else 0
        piece = bytes(buf[:len(buf) - keep])
        del buf[:len(piece)]
        if self._line_start and piece[:1] == b".":
            piece = piece[1:]
        self._store(piece)
        self._line_start = False

    def _store(self, content: bytes) -> None:
        if not content:
            return
        self.size += len(content)
        if self.too_big:
            return
        if self.limit and self.size > self.limit:
            self.too_big = True
            return
        self.spool.write(content)
