"""The shipped systemd unit under a real systemd: conf/systemd/smtpgate.service installed as
its header says into a booted Debian 13 (systemd-nspawn), in front of the harness's Postfix.

The root is made once per machine by scripts/setup.sh (services.nspawn); the booted system
shares the host's network, so the unit's smtpgate reaches the harness's Redis, DNS, Postfix
and Dovecot on loopback, and the tests' clients reach its listeners there. What is checked
is what the unit's hardening could break: the dynamic user reading a certificate kept as
certbot keeps it (root-only until the deploy hook the header gives), the spool for large
messages, the metrics directory of several workers, DNS and Redis; and the service manager's
verbs: reload (SIGHUP) and stop (drain, exit 0).
"""

from __future__ import annotations

import email
import re
import shutil
import urllib.request
import uuid
from pathlib import Path

import pytest
import trustme
from services.nspawn import BootedRoot, systemd_root
from services.ports import free_port
from services.smtp_talk import Talk, deliver_across_stop
from services.waiting import wait_until
from services.world import populate

pytestmark = [pytest.mark.slow, pytest.mark.container]

REPO = Path(__file__).resolve().parent.parent
NAME = "mx.example.test"
UNIT = "smtpgate.service"
DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser range
# The deploy hook the unit's header gives, for a certificate certbot keeps root-only.
DEPLOY_HOOK = (("chgrp", "-R", "ssl-cert", "/etc/letsencrypt/live", "/etc/letsencrypt/archive"),
               ("chmod", "-R", "g+rX", "/etc/letsencrypt/live", "/etc/letsencrypt/archive"))


def keep_like_certbot(root: Path, ca: trustme.CA) -> None:
    """/etc/letsencrypt as certbot leaves it: live/ and archive/ 0700, keys 0600, root's."""
    letsencrypt = root / "etc" / "letsencrypt"
    archive, live = letsencrypt / "archive" / NAME, letsencrypt / "live" / NAME
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    cert = ca.issue_cert(NAME)
    cert.private_key_pem.write_to_path(str(archive / "privkey1.pem"))
    (archive / "fullchain1.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    (archive / "privkey1.pem").chmod(0o600)
    for kind in ("fullchain", "privkey"):
        (live / f"{kind}.pem").symlink_to(f"../../archive/{NAME}/{kind}1.pem")
    for path in (letsencrypt / "archive", letsencrypt / "live"):
        path.chmod(0o700)


class Gate:
    """The unit's ports, chosen on the host's loopback (the booted system shares it)."""

    def __init__(self) -> None:
        self.mx_port = free_port()
        self.submission_port = free_port()
        self.metrics_port = free_port()


@pytest.fixture(scope="module")
def booted(service_root):
    machine = BootedRoot(service_root / f"nspawn-{uuid.uuid4().hex[:6]}", systemd_root())
    try:
        machine.boot()
        yield machine
    finally:
        machine.shutdown()


@pytest.fixture(scope="module")
def installed(booted, redis_server, dns_server, postfix_server, dovecot_server):
    """smtpgate installed in the booted system by the unit header's steps, not started."""
    src = booted.root / "root" / "smtpgate"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    for name in ("smtpgate", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    gate = Gate()
    env = {
        "REDIS": redis_server.url, "HOSTNAME": NAME, "LETSENCRYPT": NAME,
        "DOVECOT": "127.0.0.1", "SMTPGATE_DOVECOT_AUTH_PORT": str(dovecot_server.auth_port),
        "SMTPGATE_NEXT_HOP": f"127.0.0.1:{postfix_server.port}",
        "SMTPGATE_SUBMISSION_NEXT_HOP": f"127.0.0.1:{postfix_server.submission_port}",
        "SMTPGATE_MX_LISTEN": f"127.0.0.1:{gate.mx_port}",
        "SMTPGATE_SUBMISSION_LISTEN": f"127.0.0.1:{gate.submission_port}",
        "SMTPGATE_METRICS_LISTEN": f"127.0.0.1:{gate.metrics_port}",
        "SMTPGATE_SOCKETMAP_LISTEN": "",
        "SMTPGATE_NAMESERVERS": dns_server.nameserver,
        "SMTPGATE_MYNETWORKS": "",
        "SMTPGATE_GREET_WAIT": "0",
        "SMTPGATE_WORKERS": "2",            # the metrics directory is shared by the workers
        "SMTPGATE_SPOOL_MEMORY_LIMIT": "65536",  # larger messages go to a temporary file
        "SMTPGATE_DRAIN_GRACE": "20",
    }
    steps = [
        "python3 -m venv /opt/smtpgate",
        "/opt/smtpgate/bin/pip install --quiet .",
        "install -d -m 0755 /etc/smtpgate",
        "install -m 0644 conf/smtpgate.toml /etc/smtpgate/smtpgate.toml",
        "printf '%s\\n' " + " ".join(f"'{key}={value}'" for key, value in env.items())
        + " > /etc/smtpgate/smtpgate.env",
        "chmod 0640 /etc/smtpgate/smtpgate.env",
        "install -m 0644 conf/systemd/smtpgate.service /etc/systemd/system/smtpgate.service",
        "systemctl daemon-reload",
    ]
    for step in steps:
        booted.run("sh", "-ec", f"cd /root/smtpgate && {step}", timeout=300)
    populate(redis_server.client(), dns_server)
    return gate


def main_pid(booted: BootedRoot) -> int:
    return int(booted.show(UNIT, "MainPID")["MainPID"])


def proc_status(booted: BootedRoot, pid: int) -> dict[str, str]:
    """/proc/PID/status of a process of the booted system (PID in its own pid namespace)."""
    lines = booted.run("cat", f"/proc/{pid}/status").stdout.splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def in_journal(booted: BootedRoot, text: str, what: str, timeout: float = 30) -> None:
    try:
        wait_until(lambda: text in booted.journal(UNIT), timeout, what)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; journal tail:\n{booted.journal(UNIT)[-3000:]}") from None


def ready_workers(booted: BootedRoot) -> int:
    return booted.journal(UNIT).count("smtpgate: ready")


@pytest.fixture(scope="module")
def running(booted, installed):
    """The unit started once the certificate is readable (test 1 shows it is needed)."""
    ca = trustme.CA()
    keep_like_certbot(booted.root, ca)
    # as certbot left it, the dynamic user cannot read the key: the start fails, clearly
    booted.systemctl("start", UNIT, check=False)
    in_journal(booted, f"TLS certificate file /etc/letsencrypt/live/{NAME}/fullchain.pem cannot "
               "be read by uid", "smtpgate to say it cannot read the certificate")
    booted.systemctl("stop", UNIT, check=False)
    booted.systemctl("reset-failed", UNIT, check=False)
    for command in DEPLOY_HOOK:
        booted.run(*command)
    before = ready_workers(booted)
    booted.systemctl("start", UNIT)
    wait_until(lambda: ready_workers(booted) >= before + 2, 60,
               "both workers of the unit to be ready")
    return installed


def test_the_unit_runs_smtpgate_as_a_dynamic_user_in_the_ssl_cert_group(booted, running):
    journal = booted.journal(UNIT)
    # before the deploy hook (certbot's 0700 folders) it said why it could not start
    assert re.search(r"fullchain.pem cannot be read by uid \d+ \(groups [\d ]+\): "
                     "Permission denied", journal), journal[-3000:]
    state = booted.show(UNIT, "ActiveState", "SubState")
    assert state == {"ActiveState": "active", "SubState": "running"}, journal[-3000:]
    status = proc_status(booted, main_pid(booted))
    uid = int(status["Uid"].split()[0])
    assert uid in DYNAMIC_UIDS
    passwd = booted.run("getent", "passwd", str(uid)).stdout  # libnss-systemd names it
    assert passwd.startswith("smtpgate:"), passwd
    ssl_cert = booted.run("getent", "group", "ssl-cert").stdout.split(":")[2]
    assert ssl_cert in status["Groups"].split()
    assert status["CapEff"] == "0000000000000400"  # CAP_NET_BIND_SERVICE, nothing else


def send(port: int, mark: str, body: str = "") -> str:
    """One message from a well-behaved client (FCrDNS passes); the final reply's text."""
    with Talk("127.0.0.1", port, source="127.0.0.77", timeout=30) as talk:
        assert talk.banner()[0] == 220
        assert talk.cmd("EHLO client.example.test")[0] == 250
        assert talk.cmd("MAIL FROM:<sender@example.net>")[0] == 250
        code, text = talk.cmd("RCPT TO:<user1@example.com>")
        assert code == 250, text
        assert talk.cmd("DATA")[0] == 354
        talk.send(f"Subject: {mark}\r\n\r\n{body}{mark}\r\n.\r\n".encode())
        code, text = talk.reply()
        assert code == 250, text
        talk.cmd("QUIT")
        return text


def test_mail_through_the_unit_uses_dns_redis_the_spool_and_the_metrics(
        booted, running, dovecot_server):
    small, large = f"unit-{uuid.uuid4().hex}", f"unit-large-{uuid.uuid4().hex}"
    send(running.mx_port, small)
    # past spool_memory_limit: the message goes to a temporary file (PrivateTmp)
    send(running.mx_port, large, body=("x" * 998 + "\r\n") * 300)
    for mark in (small, large):
        raw = dovecot_server.wait_for_message("user1@example.com", lambda r, m=mark: m.encode()
                                              in r)
        received = " ".join(email.message_from_bytes(raw).get_all("Received"))
        # the PTR and A lookups (DNS) and VALI (Redis) worked, or RCPT would have failed
        assert "host77.clients.example.test [127.0.0.77]" in received, received
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics",
                                timeout=10) as response:
        metrics = response.read().decode()
    relayed = [line for line in metrics.splitlines()
               if line.startswith("smtpgate_messages_relayed_total") and 'result="queued"' in line]
    assert relayed and sum(float(line.split()[-1]) for line in relayed) >= 2, metrics[-2000:]
    assert "Read-only file system" not in booted.journal(UNIT)


def ehlo_size(port: int) -> int:
    with Talk("127.0.0.1", port, source="127.0.0.77", timeout=20) as talk:
        talk.banner()
        _, text = talk.cmd("EHLO client.example.test")
        talk.cmd("QUIT")
    return int(next(line[4:].split()[1] for line in text.splitlines()
                    if line[4:].startswith("SIZE ")))


def test_systemctl_reload_rereads_the_configuration(booted, running):
    pid = main_pid(booted)
    assert ehlo_size(running.mx_port) == 26214400
    toml = booted.root / "etc" / "smtpgate" / "smtpgate.toml"
    toml.write_text(toml.read_text() + "\nmessage_size_limit = 10240000\n")
    booted.systemctl("reload", UNIT)
    wait_until(lambda: booted.journal(UNIT).count("reloaded configuration") >= 2, 20,
               "both workers to reload")
    assert ehlo_size(running.mx_port) == 10240000
    assert main_pid(booted) == pid  # reloaded, not restarted


def test_systemctl_stop_drains_and_exits_0(booted, running, dovecot_server):
    """Last in the module: it stops the unit."""
    mark = f"unit-drain-{uuid.uuid4().hex}"
    deliver_across_stop(
        running.mx_port, lambda: booted.systemctl("stop", UNIT),
        lambda: wait_until(lambda: re.search("draining|stopping", booted.journal(UNIT)), 20,
                           "smtpgate to drain"),
        mark, source="127.0.0.78")
    state = booted.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, \
        booted.journal(UNIT)[-3000:]
    dovecot_server.wait_for_message("user1@example.com", lambda raw: mark.encode() in raw)
