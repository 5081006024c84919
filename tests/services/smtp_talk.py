"""smtp_talk - a line-level SMTP client for tests that need to misbehave on purpose.

SYNOPSIS
    Talk(host, port, source="127.0.0.1", timeout=10)
    .send(data: bytes) ; .reply() -> (code, text) ; .cmd(line) -> (code, text)
    .banner() -> (code, text) ; .starttls(ca_path) ; .closed() -> bool ; .close()

DESCRIPTION
    Every read has a deadline; reply() returns a whole multi-line reply.
    The source address may be any 127.x.y.z, so each test client can have
    its own DNS story.
"""

from __future__ import annotations

import contextlib
import socket
import ssl


class Talk:
    def __init__(self, host: str, port: int, source: str = "127.0.0.1",
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")

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
        self.sock = context.wrap_socket(self.sock, server_hostname=server_name)
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        try:
            return self.file.readline() == b""
        except (ConnectionError, TimeoutError):
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
