"""aiosmtpd_front - smtpgate's design as first sketched: aiosmtpd, smtpgate's policy, aiosmtplib.

SYNOPSIS
    python -m benchmarks.aiosmtpd_front       same environment as `smtpgate serve`
    PolicyHandler(policy, config)             the aiosmtpd handler (handle_EHLO/HELO/MAIL/RCPT/DATA)
    FrontSMTP(handler, **kwargs)              aiosmtpd.smtp.SMTP that ends the policy's session
    await relay(config, state, helo, esmtp, envelope) -> (reply to the dot, connection to QUIT)

DESCRIPTION
    The comparison front end of the benchmark (benchmarks.run, target
    "aiosmtpd-front"): an aiosmtpd (>= 1.4.6) server whose handler hooks ask
    smtpgate's policy (smtpgate.policy.stages.Policy, the same object the
    smtpgate engine asks) and relay each accepted message to Postfix with
    aiosmtplib and XCLIENT. It reads the configuration with
    smtpgate.config.load(), so the environment that starts `smtpgate serve`
    (REDIS, HOSTNAME, SMTPGATE_NEXT_HOP, SMTPGATE_MX_LISTEN, ...) starts it
    too. It listens on the first MX listener (SMTPGATE_MX_LISTEN), runs
    SMTPGATE_WORKERS processes (0: one per CPU) that share one listening
    socket, each with its own event loop (uvloop when installed, unless
    SMTPGATE_UVLOOP=no) and its own Policy, prints one line starting
    "aiosmtpd-front: ready" to stderr once every worker serves (with the
    Python, event loop and aiosmtpd version it runs), and exits 0 on
    SIGTERM. aiosmtpd is given hostname= so that it does not call
    socket.getfqdn() for every connection, and aiosmtplib local_hostname=
    for the same reason.

    What aiosmtpd allows, and so what this front end does (on purpose: it is
    the design as first sketched, measured as it is):

    - There is no hook before the banner: aiosmtpd sends "220 HOSTNAME ..."
      as soon as a client connects. policy.connect() runs lazily in the
      first hook of a connection (EHLO or HELO: aiosmtpd refuses MAIL, RCPT
      and DATA before it without asking the handler). A connect Reply
      (access list, limits, DNSBL) is sent as the answer to that command
      and the connection is closed; so a denied client is refused after a
      220 banner and one command, not before the banner.
    - A GreetWait (postscreen's pregreet window) cannot be honoured: there
      is no "220-" teaser and nothing is read before the banner. The front
      end calls policy.screened(state, b"", 0.0) at once, which means no
      pregreet test (nothing was received) and a DNSBL verdict only from
      the score as it stands at that instant (the querier's cache, or
      nothing on a first contact from an address).
    - The connection is the session's key: the policy's ClientState is kept
      on the aiosmtpd SMTP instance handed to every hook (aiosmtpd replaces
      its Session object at STARTTLS, the instance stays). aiosmtpd has no
      disconnect hook either; FrontSMTP.connection_lost ends the policy
      session (policy.close_session releases the connection count).
    - Addresses are parsed twice: first by aiosmtpd (its own syntax errors,
      e.g. "553 5.1.3 Error: malformed address"), then the address it
      extracted and the parameters are rebuilt into "<address> PARAMS" and
      parsed with smtpgate.address.parse_path, whose AddressError reply is
      the answer.
    - MAIL and RCPT are answered by the policy alone; Postfix is asked
      nothing until DATA is complete. aiosmtpd keeps the whole message in
      memory, then handle_DATA opens a new connection to the next hop
      (SMTPGATE_NEXT_HOP), sends XCLIENT ADDR/PORT/NAME/HELO/PROTO (Postfix
      answers with a new 220), EHLO with the client's HELO name, and
      aiosmtplib's sendmail() (MAIL, RCPT..., DATA, the message). The
      client's answer is Postfix's answer to the message: "250 <Postfix's
      text>" only when Postfix queued it; a 4xx/5xx reply Postfix gave to
      MAIL, RCPT or the message is passed on as Postfix wrote it (an rspamd
      reject included); anything else (no connection, XCLIENT refused, a
      timeout, a lost connection) is "451 4.3.0 Error: queue file write
      error" (Postfix's temporary failure), never 250. The next-hop
      connection is closed with QUIT after the client has its answer.
    - No STARTTLS unless a certificate is configured (SMTPGATE_TLS_CERT and
      SMTPGATE_TLS_KEY, or LETSENCRYPT); then aiosmtpd offers it. No
      protocol tests (pipelining, bare newlines, non-SMTP commands): aiosmtpd
      reads one command at a time and tells the handler nothing of them.
      No submission listener, no AUTH, no PROXY header, no drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import socket
import ssl
import sys
import time

import aiosmtplib
from aiosmtpd import __version__ as AIOSMTPD_VERSION
from aiosmtpd.smtp import SMTP

from smtpgate import config as gate_config
from smtpgate.address import AddressError, parse_path
from smtpgate.policy.stages import Policy
from smtpgate.policy.state import MX, Client, ClientState, GreetWait
from smtpgate.verdict import Reply

log = logging.getLogger("aiosmtpd-front")

RELAY_TEMPFAIL = "451 4.3.0 Error: queue file write error"
READY = "aiosmtpd-front: ready"


def xtext(value: str) -> str:
    """RFC 3461 xtext, as XCLIENT wants its attribute values."""
    out = []
    for byte in value.encode("utf-8"):
        out.append(chr(byte) if 33 <= byte <= 126 and byte not in (43, 61) else f"+{byte:02X}")
    return "".join(out)


class FrontSMTP(SMTP):
    """aiosmtpd's SMTP protocol, plus the end of the policy session when the connection ends."""

    policy_state: ClientState | None = None
    policy_closed: bool = False

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.event_handler.session_ended(self)


class PolicyHandler:
    """aiosmtpd handler hooks that ask smtpgate's policy, and relay DATA to Postfix."""

    def __init__(self, policy: Policy, config: gate_config.Config) -> None:
        self.policy = policy
        self.config = config
        self.servers: set[FrontSMTP] = set()  # live connections, for the shutdown
        self._quits: set[asyncio.Task] = set()

    # --- the session --------------------------------------------------------------------------

    async def _state(self, server: FrontSMTP) -> ClientState:
        """The connection's ClientState; the first call runs policy.connect (no earlier hook)."""
        state = server.policy_state
        if state is not None:
            return state
        transport = server.transport
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        local = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        state = self.policy.open(Client(peer[0], peer[1], local[0], local[1], MX))
        server.policy_state = state
        self.servers.add(server)
        reply = await self.policy.connect(state)
        if isinstance(reply, GreetWait):
            # no hook before the banner: no greet wait; the verdicts as they stand right now
            reply = await self.policy.screened(state, b"", 0.0)
        if reply is not None:
            await self._refuse(server, reply)
        return state

    async def _refuse(self, server: FrontSMTP, reply: Reply) -> None:
        """Send a connect-time refusal as the answer to this command, and hang up."""
        server.policy_closed = True
        with contextlib.suppress(ConnectionError):
            await server.push(str(reply))
        if server.transport is not None:
            server.transport.close()
        # aiosmtpd ends its command loop on CancelledError (as after QUIT); nothing more is sent
        raise asyncio.CancelledError

    def session_ended(self, server: FrontSMTP) -> None:
        self.servers.discard(server)
        state, server.policy_state = server.policy_state, None
        if state is not None:
            self.policy.close_session(state)

    # --- the hooks ----------------------------------------------------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        state = await self._state(server)
        reply = await self.policy.helo(state, hostname)
        if reply is not None:
            return [str(reply)]
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server, session, envelope, hostname: str) -> str:
        state = await self._state(server)
        reply = await self.policy.helo(state, hostname)
        if reply is not None:
            return str(reply)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address: str,
                          mail_options: list[str]) -> str:
        state = await self._state(server)
        text = "<>" if address == "<>" else f"<{address}>"
        try:
            path = parse_path(" ".join([text, *mail_options]), envelope.smtp_utf8, mail=True)
        except AddressError as exc:
            return str(exc.reply)
        reply = await self.policy.mail(state, path, None)
        if reply is not None:
            return str(reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address: str,
                          rcpt_options: list[str]) -> str:
        state = await self._state(server)
        try:
            path = parse_path(" ".join([f"<{address}>", *rcpt_options]), envelope.smtp_utf8)
        except AddressError as exc:
            return str(exc.reply)
        reply = await self.policy.rcpt(state, path, None, envelope.smtp_utf8)
        if reply is not None:
            return str(reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope) -> str:
        state = await self._state(server)
        answer, smtp = await relay(self.config, state, session.host_name or "",
                                   session.extended_smtp, envelope)
        if smtp is not None:  # QUIT after the client has its answer
            task = asyncio.get_running_loop().create_task(_quit(smtp))
            self._quits.add(task)
            task.add_done_callback(self._quits.discard)
        return answer


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.quit(timeout=10)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        smtp.close()


async def relay(config: gate_config.Config, state: ClientState, helo: str, esmtp: bool,
                envelope) -> tuple[str, aiosmtplib.SMTP | None]:
    """Hand the envelope to Postfix with XCLIENT: (the client's answer, the connection to QUIT)."""
    hop = config.next_hop[0]  # the baseline knows one next hop
    smtp = aiosmtplib.SMTP(hostname=hop.host, port=hop.port, start_tls=False,
                           local_hostname=config.hostname, timeout=config.next_hop_timeout)
    client = state.client
    name = state.client_name if state.client_name != "unknown" else "[UNAVAILABLE]"
    attributes = [b"ADDR=" + xtext(client.ip).encode(), b"PORT=%d" % client.port,
                  b"NAME=" + xtext(name).encode()]
    if helo:
        attributes.append(b"HELO=" + xtext(helo).encode())
    attributes.append(b"PROTO=ESMTP" if esmtp else b"PROTO=SMTP")
    sender = "" if envelope.mail_from == "<>" else envelope.mail_from
    options = [o for o in envelope.mail_options if not o.upper().startswith("SIZE=")]
    try:
        await smtp.connect()
        reply = await smtp.execute_command(b"XCLIENT", *attributes)
        if reply.code != 220:
            log.warning("warning: %s: XCLIENT: %s %s", hop, reply.code, reply.message)
            smtp.close()
            return RELAY_TEMPFAIL, None
        smtp._reset_server_state()  # a new session: EHLO again
        try:
            await smtp.ehlo(hostname=helo or config.hostname)
        except ValueError:  # a HELO name aiosmtplib will not put on a command line
            await smtp.ehlo(hostname=config.hostname)
        _, message = await smtp.sendmail(sender, envelope.rcpt_tos, envelope.original_content,
                                         mail_options=options)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0] if exc.recipients else None
        smtp.close()
        if first is not None and 400 <= first.code < 600:
            return f"{first.code} {first.message}", None
        return RELAY_TEMPFAIL, None
    except aiosmtplib.SMTPResponseException as exc:
        smtp.close()
        if 400 <= exc.code < 600 and not isinstance(exc, aiosmtplib.SMTPConnectError):
            return f"{exc.code} {exc.message}", None
        return RELAY_TEMPFAIL, None
    except (TimeoutError, aiosmtplib.SMTPException, OSError, ValueError) as exc:
        log.warning("warning: relay to %s failed: %s", hop, exc)
        smtp.close()
        return RELAY_TEMPFAIL, None
    return f"250 {message}", smtp


# --- the process ----------------------------------------------------------------------------


def _tls_context(config: gate_config.Config) -> ssl.SSLContext | None:
    paths = config.tls_paths
    if not paths:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*paths)
    return ctx


def _use_uvloop() -> bool:
    if os.environ.get("SMTPGATE_UVLOOP", "yes").lower() in ("no", "0", "off", "false"):
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def runtime(loop: asyncio.AbstractEventLoop) -> str:
    """What runs this process: Python, its implementation, the event loop, aiosmtpd."""
    cls = type(loop)
    return (f"python={platform.python_version()} impl={sys.implementation.name} "
            f"loop={cls.__module__}.{cls.__qualname__} aiosmtpd={AIOSMTPD_VERSION} "
            f"aiosmtplib={aiosmtplib.__version__}")


async def serve(config: gate_config.Config, sock: socket.socket, ready) -> int:
    """One worker: a Policy, an aiosmtpd server on sock, until SIGTERM."""
    loop = asyncio.get_running_loop()
    policy = await Policy.create(config, auth=None)
    handler = PolicyHandler(policy, config)
    tls = _tls_context(config)
    limit = config.message_size_limit or None

    def factory() -> FrontSMTP:
        return FrontSMTP(handler, hostname=config.hostname, ident="ESMTP", tls_context=tls,
                         data_size_limit=limit, timeout=config.smtpd_timeout, loop=loop)

    server = await loop.create_server(factory, sock=sock, backlog=4096)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(True))
    ready(runtime(loop))
    await stop
    server.close()
    for live in list(handler.servers):
        if live.transport is not None:
            live.transport.abort()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5)
    await policy.close()
    return 0


def _worker(config: gate_config.Config, sock: socket.socket, ready) -> int:
    if _use_uvloop():
        import uvloop

        return uvloop.run(serve(config, sock, ready))
    return asyncio.run(serve(config, sock, ready))


def _listen(config: gate_config.Config) -> socket.socket:
    if not config.mx_listen:
        raise SystemExit("aiosmtpd-front: SMTPGATE_MX_LISTEN is empty")
    where = config.mx_listen[0]
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((where.host, where.port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        config = gate_config.load()
    except gate_config.ConfigError as exc:
        print(f"aiosmtpd-front: {exc}", file=sys.stderr)
        return 2
    sock = _listen(config)
    workers = config.workers or os.cpu_count() or 1
    where = config.mx_listen[0]
    if workers == 1:
        def ready(info: str) -> None:
            print(f"{READY} on {where} workers=1 {info}", file=sys.stderr, flush=True)

        return _worker(config, sock, ready)
    return _supervise(config, sock, workers)


def _supervise(config: gate_config.Config, sock: socket.socket, workers: int) -> int:
    """Fork the workers (they share sock), say ready once all serve, pass SIGTERM on."""
    read_end, write_end = os.pipe()
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            code = 1
            try:
                def ready(info: str, fd: int = write_end) -> None:
                    os.write(fd, (info + "\n").encode())

                code = _worker(config, sock, ready)
            except BaseException as exc:  # the child must never return into main()
                print(f"aiosmtpd-front: worker failed: {exc!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        children.append(pid)
    os.close(write_end)
    sock.close()
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    infos: list[str] = []
    buffer = b""
    deadline = time.monotonic() + 60
    while len(infos) < workers and time.monotonic() < deadline and not stopping:
        try:
            chunk = os.read(read_end, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        infos += [line.decode() for line in lines]
    os.close(read_end)
    if len(infos) == workers:
        print(f"{READY} on {config.mx_listen[0]} workers={workers} {infos[0]}",
              file=sys.stderr, flush=True)
    elif not stopping:
        print(f"aiosmtpd-front: only {len(infos)} of {workers} workers started", file=sys.stderr,
              flush=True)
        stop(signal.SIGTERM, None)
    code = 0 if len(infos) == workers else 1
    for child in children:
        while True:
            try:
                _, status = os.waitpid(child, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                break
            if os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM):
                code = code or 1
            break
    return code


if __name__ == "__main__":
    raise SystemExit(main())
