"""local_stack - the whole mail path on loopback: Redis, DNS, Dovecot, Postfix and smtpgate.

SYNOPSIS
    .venv/bin/python scripts/local_stack.py [--mx-port N] [--submission-port N]
        [--submissions-port N] [--metrics-port N] [--check]
    make run ARGS="--mx-port N ..."

DESCRIPTION
    Starts, in one temporary directory and on loopback only, redis-server
    (with the example keys), a DNS server (unbound) answering for a small
    test world, Dovecot (LMTP to Maildir, SASL auth), and a private Postfix
    that smtpgate relays to with XCLIENT. The services are the test
    harness's own (tests/services), and Postfix runs the shipped
    conf/postfix/main.cf and master.cf, reading the Redis keys through
    smtpgate's socketmap as in compose.yaml: what `make run` shows is what
    the tests exercise and what a deployment runs. rspamd is left out to
    keep the start fast.

    The example keys are the image README's: example.com with user1 and
    user2, sales@ for both, and postmaster@ and abuse@ aliased to user1
    (RFC 5321 4.5.1 requires postmaster; RFC 2142 names abuse). Postfix's
    recipient_delimiter = + delivers user1+tag@example.com to user1.

    Without --check, `smtpgate serve` runs in the foreground on
    127.0.0.1:2525 (MX), 127.0.0.1:2587 (submission, STARTTLS) and
    127.0.0.1:2465 (submissions, implicit TLS), with /metrics and /healthz
    on 127.0.0.1:9425, after a note on how to send a first message, where
    it lands, and how to point the CLI at this gate; its log goes to this
    terminal and to smtpgate.log in the directory. Its settings are also
    written to smtpgate.env in the directory, the file the CLI reads with
    SMTPGATE_ENV_FILE or --env-file (smtpgate.env_file), so that `smtpgate
    explain` and `smtpgate table` see this gate's Redis and mynetworks.
    Readiness is smtpgate's "ready" line (written once every listener is
    bound), so no session is opened to find out. Ctrl-C or SIGTERM stops smtpgate, then
    every service, and keeps the directory (logs and Maildirs, to look at
    what happened); its path is printed, and each run makes a new one.

    With --check, smtpgate listens on free ports unless ports are given,
    and the printed examples are run: through smtpgate's MX port to user1,
    to user1+tag and to postmaster (delivered to user1), through submission
    (STARTTLS, AUTH as user1) to user2, and through submissions (implicit
    TLS, AUTH as user2) to user1; each must reach its Maildir within 30 s.
    It prints OK and exits 0, or prints what went wrong with the logs'
    tails and exits 1; the directory is removed either way.
    tests/test_local_stack.py runs it, so the quick start cannot rot. The
    check also fails if smtpgate does not exit with status 0 after SIGTERM.

    Exit status: 0 after a clean stop or a passed check, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the harness's services: the same, tested code

from services import procs  # noqa: E402
from services.dns_server import DnsServer  # noqa: E402
from services.dovecot_server import DovecotServer  # noqa: E402
from services.gate_process import READY, make_certificate  # noqa: E402
from services.ports import free_port, start_on_free_ports  # noqa: E402
from services.postfix_server import PostfixServer  # noqa: E402
from services.redis_server import RedisServer  # noqa: E402
from services.waiting import log_tail  # noqa: E402

HOSTNAME = "mx.example.test"
CLIENT_HELO = "client.example.test"
SENDER = "you@example.net"

# The image's example keys (reference/semantics.md): one domain, two mailboxes, an alias,
# and the LOGMAP keys that let each login send as itself on submission
# (reject_sender_login_mismatch rejects a sender with no LOGMAP owner).
EXAMPLE_KEYS = {
    "VDOM:example.com": "example.com",
    "VALI:user1@example.com": "user1@example.com",
    "VALI:user2@example.com": "user2@example.com",
    "VALI:sales@example.com": "user1@example.com user2@example.com",
    # RFC 5321 4.5.1: every domain accepts postmaster; RFC 2142 adds abuse. In the image they
    # are VALI aliases (its README's own example is VALI:postmaster@example.com user1@...).
    "VALI:postmaster@example.com": "user1@example.com",
    "VALI:abuse@example.com": "user1@example.com",
    "LOGMAP:user1@example.com": "user1@example.com",
    "LOGMAP:user2@example.com": "user2@example.com",
}

# A client on 127.0.0.1 passes smtpgate's FCrDNS and HELO checks only if DNS knows it:
# the PTR of 127.0.0.1 and the A records that confirm it and the HELO name.
DNS_RECORDS = [
    ("1.0.0.127.in-addr.arpa", "PTR", "localhost.example.test"),
    ("localhost.example.test", "A", "127.0.0.1"),
    (CLIENT_HELO, "A", "127.0.0.1"),
    (HOSTNAME, "A", "127.0.0.1"),
    ("example.com", "MX", f"10 {HOSTNAME}"),
    # the sender's domain resolves, for reject_unknown_sender_domain
    ("example.net", "MX", "10 mail.example.net"),
    ("mail.example.net", "A", "127.0.0.1"),
]

# Variables of the image and of smtpgate that must not leak from the caller's shell.
IMAGE_VARIABLES = ("REDIS", "HOSTNAME", "DOMAIN", "LETSENCRYPT", "DOVECOT", "TIMEZONE", "RSPAMD")


class Stopped(Exception):
    """SIGINT or SIGTERM arrived: stop everything and leave."""


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def _die_with_parent() -> None:
    # smtpgate must not outlive this script, even if it is killed with SIGKILL.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _copy_log(stream, path: Path, echo: bool) -> None:
    """smtpgate's output, line by line, into path (and onto this terminal if echo)."""
    with stream, open(path, "ab", buffering=0) as log:
        for line in stream:
            log.write(line)
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()


class Stack:
    """The services, started in order and stopped in reverse order."""

    def __init__(self, root: Path, mx_port: int, submission_port: int,
                 submissions_port: int, metrics_port: int) -> None:
        self.root = root
        self.mx_port = mx_port
        self.submission_port = submission_port
        self.submissions_port = submissions_port
        self.metrics_port = metrics_port
        self.socketmap_port = free_port()
        self.redis = RedisServer(root / "redis")
        self.dns = DnsServer(root / "dns")
        self.dovecot = DovecotServer(root / "dovecot")
        self.postfix = PostfixServer(
            root / "postfix", lmtp_port=self.dovecot.lmtp_port, milter_port=None,
            sasl_port=self.dovecot.auth_port)
        self.gate_log = root / "smtpgate.log"
        self.env_file = root / "smtpgate.env"
        self.gate: subprocess.Popen | None = None
        self._copier: threading.Thread | None = None
        self._started: list = []

    def start_services(self) -> None:
        for name, service in (("redis-server", self.redis), ("DNS (unbound)", self.dns),
                              ("Dovecot", self.dovecot), ("Postfix", self.postfix)):
            print(f"local_stack: starting {name}", flush=True)
            self._started.append(service)
            if service is self.postfix:  # Dovecot may have moved to other ports
                self.postfix.lmtp_port = self.dovecot.lmtp_port
                self.postfix.sasl_port = self.dovecot.auth_port
            start_on_free_ports(service)  # a port taken meanwhile: new ports, try again
        with self.redis.client() as client:
            client.mset(EXAMPLE_KEYS)
        # Postfix reads the same keys through smtpgate's socketmap, as the shipped main.cf does
        # (there on 127.0.0.1:10027): one source of truth for both.
        self.postfix.postconf(**{
            key: f"socketmap:inet:127.0.0.1:{self.socketmap_port}:{table}"
            for key, table in (("virtual_mailbox_domains", "vdom"),
                               ("virtual_alias_maps", "vali"),
                               ("virtual_mailbox_maps", "vbox"))})
        self.postfix.postconf(smtpd_recipient_restrictions=(
            f"check_recipient_access socketmap:inet:127.0.0.1:{self.socketmap_port}:recip"))
        self.dns.set(DNS_RECORDS)
        _, self.cert, self.key = make_certificate(self.root, (HOSTNAME,))

    def gate_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SMTPGATE_") and k not in IMAGE_VARIABLES}
        env.update(self.settings())
        return env

    def settings(self) -> dict[str, str]:
        """smtpgate's settings here: its environment, and the env file the CLI reads."""
        return {
            "REDIS": self.redis.url,
            "HOSTNAME": HOSTNAME,
            "SMTPGATE_MX_LISTEN": f"127.0.0.1:{self.mx_port}",
            "SMTPGATE_SUBMISSION_LISTEN": f"127.0.0.1:{self.submission_port}",
            "SMTPGATE_SUBMISSIONS_LISTEN": f"127.0.0.1:{self.submissions_port}",
            "SMTPGATE_SOCKETMAP_LISTEN": f"127.0.0.1:{self.socketmap_port}",
            "SMTPGATE_NEXT_HOP": f"127.0.0.1:{self.postfix.port}",
            "SMTPGATE_SUBMISSION_NEXT_HOP": f"127.0.0.1:{self.postfix.submission_port}",
            "SMTPGATE_TLS_CERT": str(self.cert),
            "SMTPGATE_TLS_KEY": str(self.key),
            # trust nobody, so a client on 127.0.0.1 meets every check a stranger meets
            "SMTPGATE_MYNETWORKS": "",
            # no pregreet wait: the banner comes at once (postscreen would wait 6 s)
            "SMTPGATE_GREET_WAIT": "0",
            "SMTPGATE_NAMESERVERS": self.dns.nameserver,
            "DOVECOT": "127.0.0.1",
            "SMTPGATE_DOVECOT_AUTH_PORT": str(self.dovecot.auth_port),
            "SMTPGATE_WORKERS": "1",
            "SMTPGATE_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
        }

    def write_env_file(self) -> None:
        lines = ["# smtpgate's settings under `make run` (scripts/local_stack.py); the CLI reads",
                 f"# them with SMTPGATE_ENV_FILE={self.env_file} or --env-file"]
        lines += [f"{name}={shlex.quote(value) if value else ''}"
                  for name, value in self.settings().items()]
        self.env_file.write_text("\n".join(lines) + "\n")

    def start_gate(self, foreground: bool, timeout: float = 20.0) -> None:
        print("local_stack: starting smtpgate", flush=True)
        self.write_env_file()
        # smtpgate's log always goes to smtpgate.log; in the foreground also to this terminal.
        self.gate = subprocess.Popen(
            [sys.executable, "-m", "smtpgate", "serve"], env=self.gate_env(), cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            # its own session: Ctrl-C reaches this script, which stops smtpgate first
            start_new_session=True, preexec_fn=_die_with_parent)
        self._copier = threading.Thread(
            target=_copy_log, args=(self.gate.stdout, self.gate_log, foreground), daemon=True)
        self._copier.start()
        # "ready" comes once every listener is bound: connecting to find out would log
        # sessions (and an SSL_accept error on the implicit-TLS port) that nobody opened
        deadline = time.monotonic() + timeout
        while not self.gate_log.is_file() \
                or READY not in self.gate_log.read_text(errors="replace"):
            if time.monotonic() > deadline or self.gate.poll() is not None:
                raise RuntimeError("smtpgate did not get ready:\n" + log_tail(self.gate_log))
            time.sleep(0.05)

    def stop(self) -> str | None:
        """Stop smtpgate, then every service; what went wrong with smtpgate's exit, if anything
        (None: it exited with status 0 after SIGTERM, within the drain deadline)."""
        problem = None
        if self.gate is not None and self.gate.poll() is None:
            print("local_stack: stopping smtpgate", flush=True)
            self.gate.send_signal(signal.SIGTERM)
            try:
                self.gate.wait(40)  # smtpgate drains sessions for up to 30 s
            except subprocess.TimeoutExpired:
                self.gate.kill()
                self.gate.wait()
                problem = "smtpgate did not exit within 40 s of SIGTERM and was killed"
        if self._copier is not None:
            self._copier.join(5)  # the pipe closes when smtpgate exits
        if problem is None and self.gate is not None and self.gate.returncode != 0:
            problem = f"smtpgate exited with status {self.gate.returncode}"
        for service in reversed(self._started):
            try:
                service.stop()
            except Exception as exc:  # stop the rest regardless
                print(f"local_stack: stopping {service!r}: {exc}", file=sys.stderr)
        self._started.clear()
        return problem

    def swaks_command(self, to: str = "user1@example.com") -> list[str]:
        return ["swaks", "--server", f"127.0.0.1:{self.mx_port}", "--to", to,
                "--from", SENDER, "--helo", CLIENT_HELO]

    def swaks_submission_command(self) -> list[str]:
        return ["swaks", "--server", f"127.0.0.1:{self.submission_port}", "--tls",
                "--auth", "PLAIN", "--auth-user", "user1@example.com",
                "--auth-password", "secret1", "--from", "user1@example.com",
                "--to", "user2@example.com", "--helo", CLIENT_HELO]

    def swaks_submissions_command(self) -> list[str]:
        return ["swaks", "--server", f"127.0.0.1:{self.submissions_port}", "--tlsc",
                "--auth", "PLAIN", "--auth-user", "user2@example.com",
                "--auth-password", "secret2", "--from", "user2@example.com",
                "--to", "user1@example.com", "--helo", CLIENT_HELO]

    def log_paths(self) -> list[Path]:
        return [self.gate_log, self.postfix.log_path, self.dovecot.log_path,
                self.redis.log_path, self.dns.log_path]

    def instructions(self) -> str:
        logs = "\n".join(f"    {path}" for path in self.log_paths())
        return f"""
=====================================================================
smtpgate runs on 127.0.0.1: {self.mx_port} (MX), {self.submission_port} (submission, STARTTLS),
{self.submissions_port} (submissions, implicit TLS)
Postfix on 127.0.0.1: {self.postfix.port} (MX), {self.postfix.submission_port} (submission),
configured from conf/postfix/main.cf and master.cf; it reads the Redis keys
through smtpgate's socketmap on 127.0.0.1:{self.socketmap_port}. Redis {self.redis.url}
DNS: {self.dns.nameserver} (unbound, SMTPGATE_NAMESERVERS)
No pregreet wait here (SMTPGATE_GREET_WAIT=0; postscreen's default is 6 s).
SMTPGATE_MYNETWORKS is empty, so 127.0.0.1 is a stranger and meets every
check; the test DNS server gives it a PTR (localhost.example.test) that
resolves back, and resolves the HELO name {CLIENT_HELO}.

Send a first message:
    {" ".join(self.swaks_command())}
It lands in user1's Maildir:
    {self.dovecot.maildir("user1@example.com")}/new/
So do user1+tag@example.com, postmaster@example.com and abuse@example.com
(VALI aliases to user1; sales@example.com goes to user1 and user2).
Submission (STARTTLS, then AUTH as user1@example.com, password secret1):
    {" ".join(self.swaks_submission_command())}
and it lands in user2's Maildir:
    {self.dovecot.maildir("user2@example.com")}/new/
Submissions (implicit TLS, AUTH as user2@example.com, password secret2):
    {" ".join(self.swaks_submissions_command())}
The CLI against this gate (its settings, Redis and mynetworks included, are in
{self.env_file}):
    export SMTPGATE_ENV_FILE={self.env_file}
    .venv/bin/smtpgate explain --ip 127.0.0.1 --helo {CLIENT_HELO} \\
        --from {SENDER} --rcpt user1@example.com
    .venv/bin/smtpgate table list
REDIS={self.redis.url}
    redis-cli -u {self.redis.url} keys '*'
Metrics: http://127.0.0.1:{self.metrics_port}/metrics  health: http://127.0.0.1:{self.metrics_port}/healthz
Logs:
{logs}
Stop with Ctrl-C: smtpgate, then every service, stops; the directory
{self.root} stays (logs, Maildirs) and its path is printed again.
=====================================================================
"""


def send_and_wait(stack: Stack, what: str, command: list[str], user: str) -> bool:
    """Send one message with swaks, and wait (30 s at most) for it in user's Maildir."""
    token = f"local-stack-check-{uuid.uuid4().hex}"
    argv = [*command, "--header", f"Subject: {token}", "--timeout", "20"]
    print(f"local_stack: {what}: " + " ".join(argv), flush=True)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"local_stack: FAILED: {what}: swaks: {exc}")
        return False
    if result.returncode != 0:
        print(f"local_stack: FAILED: {what}: swaks exit status {result.returncode}\n"
              f"{result.stdout}{result.stderr}\nsmtpgate log:\n{log_tail(stack.gate_log)}\n"
              f"Postfix log:\n{log_tail(stack.postfix.log_path, 20)}")
        return False
    try:
        stack.dovecot.wait_for_message(user, lambda raw: token.encode() in raw, timeout=30)
    except TimeoutError as exc:
        print(f"local_stack: FAILED: {what}: {exc}\n"
              f"Postfix log:\n{log_tail(stack.postfix.log_path, 20)}")
        return False
    print(f"local_stack: {what}: delivered to {stack.dovecot.maildir(user)}", flush=True)
    return True


def check(stack: Stack) -> bool:
    """The quick start's examples, each delivered: MX (plain, +tag, postmaster), submission
    (STARTTLS), submissions (implicit TLS)."""
    examples = [
        ("MX", stack.swaks_command(), "user1@example.com"),
        ("MX user1+tag", stack.swaks_command("user1+tag@example.com"), "user1@example.com"),
        ("MX postmaster", stack.swaks_command("postmaster@example.com"), "user1@example.com"),
        ("submission", stack.swaks_submission_command(), "user2@example.com"),
        ("submissions", stack.swaks_submissions_command(), "user1@example.com"),
    ]
    ok = all(send_and_wait(stack, what, command, user) for what, command, user in examples)
    missing = [str(path) for path in stack.log_paths() if not path.is_file()]
    if ok and missing:
        print(f"local_stack: FAILED: no log file at {', '.join(missing)}")
        ok = False
    print("local_stack: OK" if ok else "local_stack: check FAILED", flush=True)
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    top = argparse.ArgumentParser(
        prog="local_stack.py", description=__doc__.split("\n")[0].split(" - ", 1)[1])
    top.add_argument("--mx-port", type=int, help="smtpgate's MX port (default 2525)")
    top.add_argument("--submission-port", type=int,
                     help="smtpgate's submission port (default 2587)")
    top.add_argument("--submissions-port", type=int,
                     help="smtpgate's implicit-TLS submission port (default 2465)")
    top.add_argument("--metrics-port", type=int,
                     help="smtpgate's /metrics and /healthz port (default 9425)")
    top.add_argument("--check", action="store_true",
                     help="send the examples through smtpgate, wait for delivery, stop and "
                          "remove the directory; free ports unless given")
    args = top.parse_args(argv)
    for name in ("mx_port", "submission_port", "submissions_port", "metrics_port"):
        port = getattr(args, name)
        if port is not None and not 0 < port < 65536:
            top.error(f"--{name.replace('_', '-')}: {port} is not a port number")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("local_stack: must run as root (Postfix and Dovecot deliver as their own users)",
              file=sys.stderr)
        return 1
    missing = [p for p in ("redis-server", "unbound", "dovecot", "postfix", "swaks")
               if shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        print(f"local_stack: missing {', '.join(missing)}: run scripts/setup.sh",
              file=sys.stderr)
        return 1
    ports = {}
    for option, default in (("--mx-port", 2525), ("--submission-port", 2587),
                            ("--submissions-port", 2465), ("--metrics-port", 9425)):
        given = getattr(args, option[2:].replace("-", "_"))
        port = given or (free_port() if args.check else default)
        while not given and port in ports.values():
            port = free_port()
        if port in ports.values():
            print(f"local_stack: {option} {port} is taken by another of the options",
                  file=sys.stderr)
            return 1
        if not port_free(port):
            print(f"local_stack: 127.0.0.1:{port} is in use (choose another with {option}; "
                  f"with make: make run ARGS=\"{option} N\")", file=sys.stderr)
            return 1
        ports[option] = port

    root = procs.make_root(prefix="smtpgate-local-")
    stack = Stack(root, *ports.values())
    signal.signal(signal.SIGINT, _raise_stopped)
    signal.signal(signal.SIGTERM, _raise_stopped)
    status = 1
    try:
        stack.start_services()
        stack.start_gate(foreground=not args.check)
        if args.check:
            status = 0 if check(stack) else 1
        else:
            print(stack.instructions(), flush=True)
            code = stack.gate.wait()
            print(f"local_stack: smtpgate exited with status {code}", file=sys.stderr)
    except Stopped as exc:
        print(f"\nlocal_stack: {exc}: stopping", flush=True)
        status = 0
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        print(f"local_stack: FAILED: {exc}", file=sys.stderr)
        if stack.gate_log.exists():
            print(f"smtpgate log:\n{log_tail(stack.gate_log)}", file=sys.stderr)
    finally:
        # A second Ctrl-C must not cut the cleanup short; every stop has a deadline.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        gate_problem = stack.stop()
        if args.check and status == 0 and gate_problem:
            # the check holds smtpgate to a clean stop too, as the tests do
            print(f"local_stack: FAILED: {gate_problem}\nsmtpgate log:\n"
                  f"{log_tail(stack.gate_log)}", file=sys.stderr)
            status = 1
        if args.check:
            shutil.rmtree(root, ignore_errors=True)
            print("local_stack: stopped; removed " + str(root), flush=True)
        else:
            # The logs and Maildirs are what one looks at after trying it out; each run makes
            # a new directory, so keeping this one costs the next run nothing.
            print(f"local_stack: stopped; kept {root} (logs and Maildirs; "
                  f"rm -rf {root} when done)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
