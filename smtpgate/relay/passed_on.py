"""passed_on - a reply from the next hop (Postfix, or rspamd through it) made fit for the client.

SYNOPSIS
    passed_on(code, raw, tag="") -> bytes

DESCRIPTION
    The reply to a message is Postfix's, in its words, but it reaches the
    client through smtpgate, so smtpgate answers for its form: whatever
    the next hop (or a milter behind it) put in its text, the client gets
    one well-formed SMTP reply and nothing it could read as a second one.

    - Lines are cut at LF only (a CR before it belongs to the line end);
      every line is rewritten with the reply's code: "code-text" for all
      but the last, "code text" for the last. A line that did not start
      with a code keeps all of its text. So a "250 Ok" line inside a 550
      reply becomes "550-250 Ok", text of the refusal.
    - Control characters in the text (C0 but HT, DEL, C1; a bare CR
      included) become "?" (smtpgate.verdict.printable_text, as for
      smtpgate's own replies); the bytes are read as UTF-8 (undecodable
      ones become U+FFFD).
    - tag (smtpgate's "; session=ID") ends the last line, once.
"""

from __future__ import annotations

import re

from smtpgate.verdict import printable_text

_CODE = re.compile(rb"[0-9]{3}(?:[ -]|$)")


def passed_on(code: int, raw: bytes, tag: str = "") -> bytes:
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    texts = []
    for line in lines or [b""]:
        if line.endswith(b"\r"):
            line = line[:-1]
        text = line[4:] if _CODE.match(line) else line
        texts.append(printable_text(text.decode("utf-8", "replace")))
    texts[-1] += tag
    last = len(texts) - 1
    return "".join(f"{code}{' ' if i == last else '-'}{text}\r\n"
                   for i, text in enumerate(texts)).encode("utf-8")
