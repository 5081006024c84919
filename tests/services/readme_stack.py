"""readme_stack - the README's "Running it in front of Postfix" on the shipped ports, for real

SYNOPSIS
    run_in_namespace(workdir, timeout=180) -> dict     from a test: the result, as below
    python -m services.readme_stack WORKDIR            inside `unshare --net --mount` only

DESCRIPTION
    The README's example runs smtpgate with SMTPGATE_NEXT_HOP=127.0.0.1:10025
    and nothing else about Postfix, in front of a Postfix running the
    shipped conf/postfix/main.cf and master.cf, whose services listen on
    127.0.0.1:10025 and 127.0.0.1:10587. To run that as written, without
    taking those ports on the machine, run_in_namespace() starts this module
    in a network namespace of its own (only its loopback, up), with
    /etc/resolv.conf bind-mounted, in a mount namespace of its own, to a DNS
    server of the world below on port 53 (Postfix's resolver knows no other
    port).

    Inside: unbound (outside.example.net has an MX), Redis (LOGMAP for
    user1), Dovecot (the harness's users, auth on the image's port 11330),
    services.postfix_server.PostfixServer on the shipped ports, and
    `smtpgate serve` with the README's environment plus what a real host
    has (a certificate, DOVECOT). swaks then sends as user1, from
    127.0.0.77 (a stranger to Postfix's mynetworks), over 587 with
    STARTTLS and AUTH, to someone@outside.example.net. Every process is
    stopped before the module exits.

    The result, printed as JSON on the last line of stdout: swaks's exit
    status and output, the gate's log, and the lines of Postfix's log about
    the outside recipient (the harness's Postfix discards outbound mail:
    "status=sent (no outbound mail in tests)").
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from .dns_server import DnsServer
from .dovecot_server import DovecotServer
from .gate_process import GateProcess, make_certificate
from .postfix_server import SHIPPED_MX_SERVICE, SHIPPED_SUBMISSION_SERVICE, PostfixServer
from .redis_server import RedisServer

RECIPIENT = "someone@outside.example.net"
# a user out on the internet: not in Postfix's mynetworks (127.0.0.1/32), which would relay
# for anyone
USER_ADDRESS = "127.0.0.77"
TESTS = Path(__file__).resolve().parent.parent


def run_in_namespace(workdir: Path, timeout: float = 180) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    script = (f"mount --bind {resolv} /etc/resolv.conf && ip link set lo up && "
              f"exec {sys.executable} -m services.readme_stack {workdir}")
    result = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", script],
                            capture_output=True, text=True, timeout=timeout, cwd=TESTS,
                            env={**os.environ, "PYTHONPATH": str(TESTS)})
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"readme_stack exited with {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def _main(workdir: Path) -> dict:
    stopping = []
    try:
        dns = DnsServer(workdir / "dns")
        dns.port, dns.nameserver = 53, "127.0.0.1:53"
        dns.start()
        stopping.append(dns)
        dns.set([("outside.example.net", "MX", "10 mail.outside.example.net"),
                 ("mail.outside.example.net", "A", "192.0.2.25")])
        redis = RedisServer(workdir / "redis")
        redis.start()
        stopping.append(redis)
        with redis.client() as client:
            client.set("LOGMAP:user1@example.com", "user1@example.com")
        dovecot = DovecotServer(workdir / "dovecot")
        dovecot.auth_port = 11330
        dovecot.start()
        stopping.append(dovecot)
        postfix = PostfixServer(workdir / "postfix", lmtp_port=dovecot.lmtp_port,
                                sasl_port=dovecot.auth_port)
        postfix.port = int(SHIPPED_MX_SERVICE.rpartition(":")[2])
        postfix.submission_port = int(SHIPPED_SUBMISSION_SERVICE.rpartition(":")[2])
        postfix.start()
        stopping.append(postfix)
        (workdir / "tls").mkdir(exist_ok=True)
        _, cert, key = make_certificate(workdir / "tls")
        gate = GateProcess(workdir / "gate", {
            # the README's example, as written
            "REDIS": redis.url, "HOSTNAME": "mx.example.test",
            "SMTPGATE_NEXT_HOP": SHIPPED_MX_SERVICE,
            # what a host has besides: a certificate, Dovecot (on its default port)
            "SMTPGATE_TLS_CERT": str(cert), "SMTPGATE_TLS_KEY": str(key),
            "SMTPGATE_TLS_OPTIONAL": "no", "DOVECOT": "127.0.0.1",
            "SMTPGATE_NAMESERVERS": dns.nameserver,
        }, listeners=("mx", "submission"))
        stopping.append(gate)
        gate.start(timeout=30)
        mark = postfix.log_mark()
        swaks = subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(gate.submission_port), "--tls",
             "--local-interface", USER_ADDRESS,
             "--auth", "PLAIN", "--auth-user", "user1@example.com", "--auth-password",
             "secret1", "--from", "user1@example.com", "--to", RECIPIENT, "--timeout", "30"],
            capture_output=True, text=True, timeout=90)
        if swaks.returncode == 0:
            with contextlib.suppress(TimeoutError):  # the result says what Postfix logged
                postfix.wait_for_log(rf"to=<{RECIPIENT}>.*status=sent", since=mark, timeout=20)
        return {"swaks_status": swaks.returncode, "swaks": swaks.stdout + swaks.stderr,
                "gate_log": gate.log_text(),
                "postfix_lines": [line for line in postfix.log_text()[mark:].splitlines()
                                  if RECIPIENT in line]}
    finally:
        for service in reversed(stopping):
            service.stop()


if __name__ == "__main__":
    print(json.dumps(_main(Path(sys.argv[1]))))
