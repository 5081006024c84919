"""session - one client connection: the SMTP dialogue, translated to the policy and the relay.

SYNOPSIS
    Session(gate, reader, writer, listener)
    await session.run()

DESCRIPTION
    The session owns the protocol state of one connection and decides
    nothing itself: at each stage it asks the policy (smtpgate.policy) for a
    verdict and hands accepted transactions to Postfix through a NextHop
    (smtpgate.relay). Replies are queued and written in one go when the
    client has nothing more pipelined, so a pipelining client costs one
    write per batch.

    Before-queue guarantees:
    - A RCPT is answered only after Postfix answered it; a message's final
      reply is Postfix's reply to the final dot, passed through unchanged.
    - Any failure to reach or finish with Postfix gives 451 4.3.0; the
      client never sees 250 for a message Postfix did not queue.
    - End of data is CRLF.CRLF only. A bare LF ends a line for the body's
      sake (normalised to CRLF towards Postfix) but never ends the message,
      and a lone "." line that results is dot-stuffed, so no second message
      can be smuggled through Postfix.
    - A message over message_size_limit is read to its end and refused with
      552 5.3.4; the Postfix connection is aborted so the partial copy is
      thrown away.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING

from smtpgate import replies
from smtpgate.address import AddressError, parse_mail_arg, parse_rcpt_arg
from smtpgate.proxy_header import expects_header, read_header
from smtpgate.relay import ClientIdentity, NextHop, RelayError
from smtpgate.verdict import Reply, Verdict

if TYPE_CHECKING:
    from smtpgate.server import Gate

log = logging.getLogger("smtpgate.smtpd")

MX, SUBMISSION, SUBMISSIONS = "mx", "submission", "submissions"
NON_SMTP_COMMANDS = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD", "USER", "PASS"})
MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


TOO_LONG = b"<too long>"  # a marker, compared by identity


class Closing(Exception):
    """The session ends after the queued replies are written."""


class Session:
    def __init__(self, gate: Gate, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, listener: str) -> None:
        self.gate = gate
        self.config = gate.config
        self.reader = reader
        self.writer = writer
        self.listener = listener
        peer = writer.get_extra_info("peername") or ("0.0.0.0", 0)
        sock = writer.get_extra_info("sockname") or ("0.0.0.0", 0)
        self.client_ip, self.client_port = _unmap(peer[0]), peer[1]
        self.local_ip, self.local_port = _unmap(sock[0]), sock[1]
        self.client_name = "unknown"  # verified hostname once FCrDNS passed
        self.helo: str | None = None
        self.esmtp = False
        self.tls = listener == SUBMISSIONS
        self.login: str | None = None
        self.errors = 0
        self.counts: Counter[str] = Counter()
        self.record: list[Verdict] = []
        self.bare_newline = False
        self.screening = None  # the policy's per-session screening state
        self._out: list[bytes] = []
        self._hop: NextHop | None = None
        self._reset_transaction()

    # --- state -----------------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self.sender: str | None = None
        self.mail_params: dict[str, str | None] = {}
        self.mail_line = b""
        self.recipients: list[str] = []
        self.hop_in_transaction = False
        self.sender_reject: Reply | None = None

    @property
    def client_label(self) -> str:
        return f"{self.client_name}[{self.client_ip}]"

    @property
    def proto(self) -> str:
        return "ESMTP" if self.esmtp else "SMTP"

    # --- output ----------------------------------------------------------------------------

    def reply(self, reply: Reply | str) -> None:
        text = str(reply)
        self._out.append(text.encode("utf-8", "replace") + b"\r\n")
        if isinstance(reply, Reply) and reply.code >= 400:
            self.errors += 1

    def reply_raw(self, raw: bytes, code: int) -> None:
        self._out.append(raw)
        if code >= 400:
            self.errors += 1

    async def flush(self) -> None:
        if self._out:
            self.writer.write(b"".join(self._out))
            self._out.clear()
            await self.writer.drain()

    def _pipelined(self) -> bool:
        return bool(self.reader._buffer)

    def shut_down(self) -> None:
        """The drain's last word: 421, then the connection closes.

        A transaction still open at Postfix is aborted, so Postfix throws it away and the
        client, having heard no 250, sends it again later: nothing is lost.
        """
        self._out.append(str(replies.shutting_down(self.config.hostname)).encode() + b"\r\n")
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self.writer.write(b"".join(self._out))
        self._out.clear()
        if self._hop is not None:
            self._hop.abort()
            self._hop = None
            self.hop_in_transaction = False
        self.writer.close()

    # --- the dialogue ----------------------------------------------------------------------

    async def run(self) -> None:
        self.gate.sessions.add(self)
        if not await self._proxy_header():
            self.gate.sessions.discard(self)
            self.writer.close()
            return
        log.info("connect from %s to [%s]:%s", self.client_label, self.local_ip, self.local_port)
        try:
            await self._dialogue()
        except Closing:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:
            log.exception("error: session with %s failed", self.client_label)
            self.reply(replies.SERVICE_TEMPFAIL)
        finally:
            await self._close()

    async def _proxy_header(self) -> bool:
        """Take the client's addresses from a trusted load balancer's PROXY header."""
        config = self.config
        if not expects_header(self.client_ip, config.proxy_protocol, config.proxy_trusted):
            return True
        found = await read_header(self.reader, config.proxy_protocol)
        if isinstance(found, str):
            log.warning("warning: PROXY from [%s]:%s: %s", self.client_ip, self.client_port, found)
            return False
        if found is not None:
            self.client_ip, self.client_port = _unmap(found.client_ip), found.client_port
            self.local_ip, self.local_port = _unmap(found.local_ip), found.local_port
        return True

    async def _close(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.flush()
        if self._hop is not None:
            # QUIT even with an envelope open: Postfix drops an envelope that never got DATA,
            # and logs a normal disconnect instead of "lost connection" for the real client
            # (fail2ban reads those lines). A body in flight was aborted where it failed.
            await self._hop.quit()
        self.gate.sessions.discard(self)
        await self.gate.policy.session_closed(self)
        self.writer.close()
        words = [f"{k.lower()}={v}" for k, v in self.counts.items()]
        words.append(f"commands={sum(self.counts.values())}")
        log.info("disconnect from %s %s", self.client_label, " ".join(words))

    async def _dialogue(self) -> None:
        if not await self._greet():
            return
        while True:
            if not self._pipelined():
                await self.flush()
            line = await self._read_command_line()
            if line is None:
                return
            if line is not TOO_LONG:
                await self._dispatch(line)
            if self.errors >= self.config.smtpd_hard_error_limit:
                self.reply(replies.too_many_errors(self.config.hostname))
                return

    async def _greet(self) -> bool:
        """Banner, with the pregreet wait and the connect-time checks of the policy."""
        banner = f"220 {self.config.hostname} ESMTP smtpgate"
        outcome = await self.gate.policy.connect(self, banner)
        if outcome is not None:  # refused at connect: the reply is the last word
            self.reply(outcome)
            return False
        if self.listener == SUBMISSIONS:
            pass  # the TLS handshake happened in the listener
        self.reply(banner)
        return True

    async def _read_command_line(self) -> bytes | None:
        limit = self.config.line_length_limit
        try:
            async with asyncio.timeout(self.config.smtpd_timeout):
                line = await self.reader.readuntil(b"\n")
        except TimeoutError:
            self.reply(replies.timeout(self.config.hostname))
            log.info("timeout after %s from %s", self._last_command(), self.client_label)
            raise Closing from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.info("lost connection after %s from %s", self._last_command(),
                         self.client_label)
            return None
        except asyncio.LimitOverrunError:
            await self._discard_long_line()
            self.reply(replies.LINE_TOO_LONG)
            return TOO_LONG
        if len(line) > limit:
            self.reply(replies.LINE_TOO_LONG)
            return TOO_LONG
        if not line.endswith(b"\r\n"):
            self.bare_newline = True
            return line[:-1]
        return line[:-2]

    async def _discard_long_line(self) -> None:
        while True:
            try:
                await self.reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self.reader.readexactly(exc.consumed)

    def _last_command(self) -> str:
        return self.last_command or "CONNECT"

    last_command = ""

    async def _dispatch(self, line: bytes) -> None:
        if not line:
            self.reply(replies.BAD_SYNTAX)
            return
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.decode("ascii").upper()
        except UnicodeDecodeError:
            self.reply(replies.BAD_SYNTAX)
            return
        handler = _HANDLERS.get(verb)
        if handler is None:
            await self._unknown(verb, line)
            return
        if self.listener == MX and self._pipelined():
            pending = bytes(self.reader._buffer)
            await self._protocol_test("pipelining", line, pending)
        self.last_command = verb
        self.counts[verb] += 1
        try:
            arg = arg_bytes.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.reply(replies.BAD_UTF8)
            return
        if self.listener == SUBMISSION and not self.tls and verb not in (
                "EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "RSET"):
            self.reply(replies.MUST_STARTTLS)
            return
        await handler(self, arg)

    async def _unknown(self, verb: str, line: bytes) -> None:
        self.counts["unknown"] += 1
        looks_like_header = verb.endswith(":") or b":" in line.split(b" ", 1)[0]
        if self.listener == MX and (verb in NON_SMTP_COMMANDS or looks_like_header):
            await self._protocol_test("non_smtp_command", line, b"")
        self.reply(replies.UNKNOWN_COMMAND)

    async def _protocol_test(self, test: str, line: bytes, pending: bytes) -> None:
        hang_up = await self.gate.policy.protocol(self, test, line, pending)
        if hang_up is not None:
            self.reply(hang_up)
            raise Closing

    # --- commands --------------------------------------------------------------------------

    async def smtp_HELO(self, arg: str) -> None:
        await self._hello(arg, esmtp=False)

    async def smtp_EHLO(self, arg: str) -> None:
        await self._hello(arg, esmtp=True)

    async def _hello(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg:
            self.reply(replies.EHLO_SYNTAX if esmtp else replies.HELO_SYNTAX)
            return
        await self._abandon_transaction()
        self.helo, self.esmtp = arg, esmtp
        verdict = await self.gate.policy.helo(self)
        if verdict is not None:
            self.reply(verdict)
            self.helo = None
            return
        if not esmtp:
            self.reply(f"250 {self.config.hostname}")
            return
        self.reply("\r\n".join(f"250-{line}" for line in self._ehlo_lines()[:-1])
                   + f"\r\n250 {self._ehlo_lines()[-1]}")

    def _ehlo_lines(self) -> list[str]:
        lines = [self.config.hostname, "PIPELINING"]
        if self.config.message_size_limit:
            lines.append(f"SIZE {self.config.message_size_limit}")
        if not self.tls and self.gate.tls is not None:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
        return lines

    def _auth_offered(self) -> bool:
        return (self.listener != MX and self.tls and self.login is None
                and self.gate.auth is not None)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.reply(replies.NO_ARGS)
            return
        if self.tls:
            self.reply(replies.TLS_ACTIVE)
            return
        if self.gate.tls is None:
            self.reply(replies.NOT_IMPLEMENTED)
            return
        # RFC 3207: nothing the client sent after STARTTLS in clear may count (CVE-2011-0411)
        self.reader._buffer.clear()
        # The client's TLS hello may follow our 220 at once: it must reach the TLS layer,
        # not the plain-text reader, so reading stops until start_tls takes the socket over.
        self.writer.transport.pause_reading()
        self.reply(replies.START_TLS)
        await self.flush()
        try:
            await asyncio.wait_for(
                self.writer.start_tls(self.gate.tls.context()), self.config.smtpd_timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.info("SSL_accept error from %s: %s", self.client_label, exc)
            raise Closing from None
        self.tls = True
        self.helo, self.esmtp = None, False
        await self._abandon_transaction()

    async def smtp_AUTH(self, arg: str) -> None:
        if not self._auth_offered():
            if self.login is not None:
                self.reply(replies.AUTH_ALREADY)
            else:
                self.reply(replies.AUTH_NOT_ENABLED)
            return
        if self.helo is None:
            self.reply(replies.NEED_HELO)
            return
        if self.sender is not None:
            self.reply(replies.AUTH_IN_MAIL)
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        refusal = await self.gate.policy.auth_allowed(self)
        if refusal is not None:
            self.reply(refusal)
            raise Closing
        if mechanism == "PLAIN":
            response = await self._auth_read(initial, "")
            if response is None:
                return
            plain = response
        elif mechanism == "LOGIN":
            user = await self._auth_read(initial, "VXNlcm5hbWU6")
            if user is None:
                return
            password = await self._auth_read("", "UGFzc3dvcmQ6")
            if password is None:
                return
            plain = b"\0" + user + b"\0" + password
        else:
            self.reply(replies.AUTH_MECHANISM)
            return
        login = plain.split(b"\0")[1].decode("utf-8", "replace") if plain.count(b"\0") == 2 else ""
        result = await self.gate.policy.authenticate(self, mechanism, plain, login)
        self.reply(result)
        if result.code == 235 and self.login is None:
            self.login = login
        elif result.code == 421:
            raise Closing

    async def _auth_read(self, initial: str, challenge: str) -> bytes | None:
        """One SASL response: the initial one if given, else a 334 challenge and a line."""
        if initial:
            text = initial
        else:
            self.reply(f"334 {challenge}")
            await self.flush()
            line = await self._read_command_line()
            if line is None:
                raise Closing
            if line is TOO_LONG:
                return None
            text = line.decode("ascii", "replace").strip()
        if text == "*":
            self.reply(replies.AUTH_CANCELLED)
            return None
        if text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.reply(replies.AUTH_BAD_BASE64)
            return None

    async def smtp_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self.reply(replies.NEED_HELO)
            return
        if self.sender is not None:
            self.reply(replies.NESTED_MAIL)
            return
        try:
            path = parse_mail_arg(arg, smtputf8="SMTPUTF8" in arg.upper())
        except AddressError as exc:
            self.reply(exc.reply)
            return
        for name in path.params:
            if name not in MAIL_PARAMS:
                self.reply(replies.unsupported_option(name))
                return
        size = path.params.get("SIZE")
        limit = self.config.message_size_limit
        if size is not None and (not size.isdigit() or (limit and int(size) > limit)):
            self.reply(replies.SIZE_TOO_BIG if size.isdigit() else replies.MAIL_SYNTAX)
            return
        verdict = await self.gate.policy.mail(self, path)
        if verdict is not None:
            self.reply(verdict)
            return
        self.sender = path.address
        self.mail_params = path.params
        self.mail_line = b"MAIL FROM:" + arg[5:].strip().encode("utf-8") + b"\r\n"
        self.reply(replies.MAIL_OK)

    async def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            self.reply(replies.NEED_MAIL)
            return
        try:
            path = parse_rcpt_arg(arg, smtputf8="SMTPUTF8" in self.mail_params)
        except AddressError as exc:
            self.reply(exc.reply)
            return
        for name in path.params:
            if name not in RCPT_PARAMS:
                self.reply(replies.unsupported_option(name))
                return
        if len(self.recipients) >= self.config.smtpd_recipient_limit:
            self.reply(replies.TOO_MANY_RECIPIENTS)
            return
        verdict = await self.gate.policy.rcpt(self, path)
        if verdict is not None:
            self.reply(verdict)
            self._log_reject("RCPT", verdict, path.address)
            return
        await self._relay_rcpt(b"RCPT TO:" + arg[3:].strip().encode("utf-8") + b"\r\n",
                               path.address)

    async def _relay_rcpt(self, rcpt_line: bytes, address: str) -> None:
        """Ask Postfix; its answer is the client's answer."""
        try:
            if self._hop is None or self._hop.closed:
                self._hop = await self._open_hop()
            if not self.hop_in_transaction:
                mail_reply, rcpt_reply = await self._hop.commands([self.mail_line, rcpt_line])
                if not mail_reply.ok:
                    # Postfix refused the sender: that is the answer to this recipient too
                    self.reply_raw(mail_reply.raw, mail_reply.code)
                    await self._hop.command(b"RSET\r\n")
                    return
                self.hop_in_transaction = True
            else:
                rcpt_reply = await self._hop.command(rcpt_line)
        except RelayError as exc:
            log.warning("warning: next hop %s: %s", self.config.next_hop, exc)
            self._drop_hop()
            self.reply(replies.RELAY_UNAVAILABLE)
            return
        self.reply_raw(rcpt_reply.raw, rcpt_reply.code)
        if rcpt_reply.ok:
            self.recipients.append(address)

    async def _open_hop(self) -> NextHop:
        identity = ClientIdentity(
            addr=self.client_ip, port=self.client_port, name=self.client_xclient_name(),
            helo=self.helo or "", proto=self.proto, login=self.login,
            destaddr=self.local_ip, destport=self.local_port)
        hop, pool = self.config.next_hop, self.gate.hop_pool
        if self.login is not None and self.config.submission_next_hop is not None:
            hop, pool = self.config.submission_next_hop, None
        return await NextHop.open(hop, identity, self.config.next_hop_timeout,
                                  self.config.hostname, pool)

    def client_xclient_name(self) -> str:
        return self.client_name if self.client_name != "unknown" else "[UNAVAILABLE]"

    def _drop_hop(self) -> None:
        if self._hop is not None:
            self._hop.abort()
        self._hop = None
        self.hop_in_transaction = False

    async def smtp_DATA(self, arg: str) -> None:
        if arg:
            self.reply(replies.NO_ARGS)
            return
        if self.sender is None:
            self.reply(replies.NEED_MAIL)
            return
        if not self.recipients:
            self.reply(replies.NEED_RCPT)
            return
        verdict = await self.gate.policy.data(self)
        if verdict is not None:
            self.reply(verdict)
            return
        assert self._hop is not None
        try:
            start = await self._hop.command(b"DATA\r\n")
        except RelayError as exc:
            log.warning("warning: next hop %s: %s", self.config.next_hop, exc)
            self._drop_hop()
            self.reply(replies.RELAY_UNAVAILABLE)
            self._reset_transaction()
            return
        if start.code != 354:
            self.reply_raw(start.raw, start.code)
            return
        self.reply(replies.START_DATA)
        await self.flush()
        final = await self._stream_body()
        self.reply(final) if isinstance(final, Reply) else self.reply_raw(final.raw, final.code)
        self.hop_in_transaction = False
        self._reset_transaction()

    async def _stream_body(self):
        """Copy the message to Postfix until CRLF.CRLF; return the reply for the client."""
        hop = self._hop
        assert hop is not None
        limit = self.config.message_size_limit
        size = 0
        too_big = False
        at_line_start = True
        proper_boundary = True  # the previous line ended with CRLF
        out: list[bytes] = []  # lines for Postfix, written in one go per batch of input
        held_cr = False  # a piece of an over-long line ended in CR
        reader = self.reader
        while True:
            if b"\n" not in reader._buffer:
                # nothing complete is buffered: pass on what we have, then wait for the client
                if out:
                    hop.send_data(b"".join(out))
                    out.clear()
                    if hop.needs_drain():
                        await hop.drain()
                line = await self._read_body_line(hop)
            else:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:  # a line longer than the buffer
                    line = await reader.readexactly(exc.consumed)
            if held_cr:
                line = b"\r" + line
                held_cr = False
            if at_line_start and proper_boundary and line == b".\r\n":
                break
            size += len(line)
            if limit and size > limit:
                too_big = True
            if line.endswith(b"\n"):
                proper_boundary = line.endswith(b"\r\n")
                line_was_start = at_line_start
                at_line_start = True
                if too_big:
                    continue
                if proper_boundary:
                    if line_was_start and line == b".\r\n":
                        line = b"..\r\n"  # a "." line that is not CRLF.CRLF must not end it
                    out.append(line)
                    continue
                self.bare_newline = True
                content = line[:-1]
                if line_was_start and content == b".":
                    content = b".."
                out.append(content + b"\r\n")
            else:
                at_line_start = False
                if line.endswith(b"\r"):  # its LF may start the next piece: keep them together
                    line, held_cr = line[:-1], True
                if not too_big:
                    out.append(line)
        if too_big:
            self._drop_hop()
            log.info("NOQUEUE: reject: message from %s: 552 5.3.4 message file too big",
                     self.client_label)
            return replies.MESSAGE_TOO_BIG
        if self.bare_newline and self.listener == MX:
            await self._protocol_test("bare_newline", b"DATA", b"")
        try:
            if hop.closed:
                raise RelayError("connection closed during DATA")
            return await hop.finish_data(b"".join(out))  # the rest and the dot in one write
        except RelayError as exc:
            log.warning("warning: next hop %s: %s", self.config.next_hop, exc)
            self._drop_hop()
            return replies.RELAY_UNAVAILABLE

    async def _read_body_line(self, hop: NextHop) -> bytes:
        """The next line of the message, waiting for the client at most smtpd_timeout."""
        try:
            async with asyncio.timeout(self.config.smtpd_timeout):
                return await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            return await self.reader.readexactly(exc.consumed)
        except TimeoutError:
            hop.abort()
            self._hop = None
            self.reply(replies.timeout(self.config.hostname))
            raise Closing from None
        except asyncio.IncompleteReadError:
            hop.abort()
            self._hop = None
            raise Closing from None

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            self.reply(replies.NO_ARGS)
            return
        await self._abandon_transaction()
        self.reply(replies.OK)

    async def _abandon_transaction(self) -> None:
        if self.hop_in_transaction and self._hop is not None:
            try:
                await self._hop.command(b"RSET\r\n")
            except RelayError:
                self._drop_hop()
        self._reset_transaction()

    async def smtp_NOOP(self, arg: str) -> None:
        self.reply(replies.OK)

    async def smtp_QUIT(self, arg: str) -> None:
        self.reply(replies.BYE)
        raise Closing

    async def smtp_VRFY(self, arg: str) -> None:
        self.reply(replies.VRFY_DISABLED)

    async def smtp_EXPN(self, arg: str) -> None:
        self.reply(replies.VRFY_DISABLED)

    def _log_reject(self, stage: str, reply: Reply, recipient: str | None = None) -> None:
        to = f" to=<{recipient}>" if recipient is not None else ""
        log.info("NOQUEUE: reject: %s from %s: %s; from=<%s>%s proto=%s helo=<%s>",
                 stage, self.client_label, reply, self.sender or "", to, self.proto,
                 self.helo or "")


_HANDLERS = {
    name[5:]: getattr(Session, name) for name in dir(Session) if name.startswith("smtp_")
}


def _unmap(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip
