"""smtp_talk - a line-level SMTP client for tests that need to misbehave on purpose.

SYNOPSIS
    with Talk(host, port, source="127.0.0.1", timeout=10) as talk: ...
    .send(data: bytes) ; .reply() -> (code, text) ; .cmd(line) -> (code, text)
    .banner() -> (code, text) ; .starttls(ca_path) ; .closed() -> bool ; .close()
    open_clients() -> list[Talk]
    untag(reply) -> reply        a refusal without smtpgate's `; session=ID` (asserted there)
    deliver_across_stop(port, stop, draining, mark, source="127.0.0.1") -> stop()'s result
    SESSION_TAG                  the regex of that ending; group 1 is the id

DESCRIPTION
    Every read has a deadline; reply() returns a whole multi-line reply.
    The source address may be any 127.x.y.z, so each test client can have
    its own DNS story.

    close() closes the file object made from the socket as well as the
    socket itself: a socket with a makefile() reader is only really closed
    (FIN sent) when both are, and a connection left half-open keeps the gate
    under test draining at shutdown. close() may be called more than once.
    A Talk is a context manager that closes on exit.

    untag() takes a (code, text) reply or a reply line; for a 4xx/5xx it
    asserts that the last line ends with smtpgate's session id and returns
    the reply without it, so a test can compare Postfix's wording exactly.

    deliver_across_stop() opens a transaction to user1@example.com, calls
    stop() in a thread (podman stop, systemctl stop: whatever sends the
    SIGTERM and waits), waits for draining() to return (it waits for the
    drain to show, with a deadline), then sends the message, which must be
    accepted (250) although the gate is stopping; it returns what stop()
    returned, once it has.

    open_clients() lists the clients not closed yet; tests/conftest.py
    closes them after each test and fails a test that left one open.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
from collections.abc import Callable

SESSION_TAG = re.compile(r"; session=([0-9A-HJKMNP-TV-Z]{12})$")

_open: dict[int, Talk] = {}


def open_clients() -> list[Talk]:
    return list(_open.values())


def untag(reply):
    if isinstance(reply, tuple):
        code, text = reply
        return (code, untag(text)) if code >= 400 else reply
    if reply[:1] not in ("4", "5"):
        return reply
    stripped, found = SESSION_TAG.subn("", reply)
    assert found == 1, f"no session id at the end of {reply!r}"
    return stripped


class Talk:
    def __init__(self, host: str, port: int, source: str = "127.0.0.1",
                 timeout: float = 10.0) -> None:
        self.peer = f"{host}:{port} from {source}"
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        _open[id(self)] = self

    def __enter__(self) -> Talk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Talk {self.peer}>"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed; got " + repr(lines))
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        return int(lines[0][:3]), "\n".join(lines)

    def banner(self) -> tuple[int, str]:
        return self.reply()

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def starttls(self, ca_path: str | None = None, server_name: str = "mx.example.test") -> None:
        context = ssl.create_default_context(cafile=ca_path)
        if ca_path is None:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        # The plain reader must go before the socket is wrapped (the wrapper takes the
        # descriptor over); nothing is buffered in it, as the server waits for the handshake.
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_hostname=server_name)
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        """True when the server closes the connection (EOF or reset) within the read timeout.

        False when it sends another line instead, or stays silent past the timeout.
        """
        try:
            return self.file.readline() == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        _open.pop(id(self), None)
        for part in (self.file, self.sock):
            with contextlib.suppress(OSError):
                part.close()


def send_marked(port: int, mark: str, source: str = "127.0.0.77",
                host: str = "127.0.0.1") -> tuple[int, str]:
    """One message from a good client to user1@; the final reply. The mark is the
    Message-ID's local part and the Subject, to find the message at Postfix or Dovecot."""
    with Talk(host, port, source=source) as talk:
        assert talk.banner()[0] == 220
        talk.cmd("EHLO client.example.test")
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        talk.send(f"Message-ID: <{mark}@example.net>\r\nSubject: {mark}\r\n\r\nmarked\r\n.\r\n"
                  .encode())
        reply = talk.reply()
        talk.cmd("QUIT")
    return reply


def deliver_across_stop(port: int, stop: Callable[[], object], draining: Callable[[], object],
                        mark: str, source: str = "127.0.0.1"):
    """A message whose body began before the stop and ends during the drain: the drain lets
    it finish (a DATA command given during the drain would get 421, and the client would
    send the message again later)."""
    stopped: list = []
    with Talk("127.0.0.1", port, source=source, timeout=30) as busy:
        assert busy.banner()[0] == 220
        busy.cmd("EHLO client.example.test")
        busy.cmd("MAIL FROM:<sender@example.net>")
        assert busy.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert busy.cmd("DATA")[0] == 354
        stopper = threading.Thread(target=lambda: stopped.append(stop()))
        stopper.start()
        try:
            draining()
            busy.send(f"Subject: {mark}\r\n\r\nfinished while draining\r\n.\r\n".encode())
            code, text = busy.reply()
            assert code == 250, text
            busy.cmd("QUIT")
        finally:
            stopper.join(60)
    assert stopped, "the stop did not return within 60 s"
    return stopped[0]
