"""The shipped image, run for real: the repository's Dockerfile built unchanged and started
with podman in front of the harness's Postfix, mail delivered to Dovecot.

The Dockerfile starts FROM python:3.13-slim, which no registry serves here: scripts/setup.sh
stands it in by an image of Debian 13 (Python 3.13.5) made with debootstrap, tagged
docker.io/library/python:3.13-slim, and the build runs with --pull=never. What the image
adds on top (its user, its entry point, its HEALTHCHECK, the pip install) is the shipped one.

The container reaches the harness's Redis, DNS, Postfix and Dovecot, which listen on the
host's loopback, through slirp4netns at 10.0.2.2 (services.podman says why not the bridge);
clients on the host reach its published ports, and smtpgate sees them as 10.0.2.2, which
gets its own PTR here. Docker runs containers with net.ipv4.ip_unprivileged_port_start=0,
which lets the image's uid 10025 bind 25, 587 and 465; podman does not, so the test sets it,
as compose.yaml does for podman users.
"""

from __future__ import annotations

import email
import os
import re
import socket
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from services.podman import HOST_LOOPBACK, Container, podman
from services.smtp_talk import Talk, deliver_across_stop
from services.waiting import wait_until
from services.world import populate

pytestmark = [pytest.mark.slow, pytest.mark.container]

NAME = "mx.example.test"
GATEWAY_NAME = "gw.podman.example.test"
IMAGE_UID = 10025


class LetsEncryptDir:
    """/etc/letsencrypt as certbot keeps it: archive/NAME/*N.pem, live/NAME/ symlinks to them,
    readable by the image's group only (as a deploy hook would make it)."""

    def __init__(self, root: Path, ca: trustme.CA) -> None:
        self.root = root
        self.ca = ca
        self.serials: list[int] = []
        (root / "archive" / NAME).mkdir(parents=True)
        (root / "live" / NAME).mkdir(parents=True)
        for path in (root / "archive", root / "archive" / NAME, root / "live",
                     root / "live" / NAME):
            path.chmod(0o750)
            _chgrp(path)
        self.renew()

    def renew(self) -> int:
        """A new certificate as certbot renews it: new archive files, then the links flip."""
        number = len(self.serials) + 1
        cert = self.ca.issue_cert(NAME)
        archive = self.root / "archive" / NAME
        key_path = archive / f"privkey{number}.pem"
        cert.private_key_pem.write_to_path(str(key_path))
        (archive / f"fullchain{number}.pem").write_bytes(
            b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        for path in archive.glob(f"*{number}.pem"):
            path.chmod(0o640)
            _chgrp(path)
        for kind in ("fullchain", "privkey"):
            link = self.root / "live" / NAME / f"{kind}.pem"
            tmp = link.with_suffix(".tmp")
            tmp.symlink_to(f"../../archive/{NAME}/{kind}{number}.pem")
            tmp.replace(link)
        serial = _serial(self.root / "live" / NAME / "fullchain.pem")
        self.serials.append(serial)
        return serial


def _chgrp(path: Path) -> None:
    os.chown(path, 0, IMAGE_UID)


def _serial(pem: Path) -> int:
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


def served_serial(port: int, ca: trustme.CA, implicit: bool) -> int:
    """The serial of the certificate a new session is shown (465 implicit TLS, else STARTTLS)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if not implicit:
            reader = raw.makefile("rb")
            try:
                assert reader.readline().startswith(b"220")
                raw.sendall(b"EHLO client.example.test\r\n")
                while not reader.readline().startswith(b"250 "):
                    pass
                raw.sendall(b"STARTTLS\r\n")
                assert reader.readline().startswith(b"220")
            finally:
                reader.close()
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            der = tls.getpeercert(binary_form=True)
            if implicit:
                assert tls.recv(512).startswith(b"220")
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def letsencrypt(service_root, ca) -> LetsEncryptDir:
    return LetsEncryptDir(service_root / f"letsencrypt-{uuid.uuid4().hex[:6]}", ca)


def prepare_world(redis_server, dns_server) -> None:
    populate(redis_server.client(), dns_server)
    dns_server.set([(GATEWAY_NAME, "A", HOST_LOOPBACK)])
    dns_server.add_ptr(HOST_LOOPBACK, GATEWAY_NAME)


@pytest.fixture(scope="module")
def container(smtpgate_image, letsencrypt, redis_server, dns_server, postfix_server,
              dovecot_server):
    prepare_world(redis_server, dns_server)
    gate = Container(smtpgate_image, "smtpgate-image", {
        "REDIS": f"redis://{HOST_LOOPBACK}:{redis_server.port}/0",
        "HOSTNAME": NAME,
        "LETSENCRYPT": NAME,
        "DOVECOT": HOST_LOOPBACK,
        "SMTPGATE_DOVECOT_AUTH_PORT": str(dovecot_server.auth_port),
        "SMTPGATE_NEXT_HOP": f"{HOST_LOOPBACK}:{postfix_server.port}",
        "SMTPGATE_SUBMISSION_NEXT_HOP": f"{HOST_LOOPBACK}:{postfix_server.submission_port}",
        "SMTPGATE_SUBMISSIONS_LISTEN": "0.0.0.0:465",
        "SMTPGATE_NAMESERVERS": f"{HOST_LOOPBACK}:{dns_server.port}",
        "SMTPGATE_WORKERS": "2",
        "SMTPGATE_GREET_WAIT": "0",
        "SMTPGATE_DRAIN_GRACE": "20",
    }, ports=(25, 587, 465), volumes=(f"{letsencrypt.root}:/etc/letsencrypt:ro",),
        sysctls=("net.ipv4.ip_unprivileged_port_start=0",))
    try:
        gate.start()
        wait_until(lambda: gate.logs().count("smtpgate: ready") >= 2, 60,
                   "both workers of the container to be ready")
        yield gate
    finally:
        gate.remove()


def listening_ports(gate: Container) -> dict[int, int]:
    """{port: uid} of the container's listening TCP sockets, from its /proc/net/tcp."""
    found = {}
    for line in gate.exec("cat", "/proc/net/tcp").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # LISTEN
            address, port = fields[1].split(":")
            if address == "00000000":
                found[int(port, 16)] = int(fields[7])
    return found


def test_the_image_runs_as_its_user_and_binds_the_three_ports(container, smtpgate_image):
    config = podman("image", "inspect", "--format", "{{.Config.User}}", smtpgate_image)
    assert config.strip() == f"{IMAGE_UID}:{IMAGE_UID}"
    assert container.exec("id", "-u").stdout.strip() == str(IMAGE_UID)
    assert container.exec("id", "-g").stdout.strip() == str(IMAGE_UID)
    ports = listening_ports(container)
    assert {port: ports.get(port) for port in (25, 587, 465)} == \
        {25: IMAGE_UID, 587: IMAGE_UID, 465: IMAGE_UID}, ports
    # the Python it runs is the image's 3.13, not the host's
    assert container.exec("python", "-c", "import sys; print(sys.version_info[:2])").stdout \
        .strip() == "(3, 13)"


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(port), "--helo", "client.example.test",
         "--from", "sender@example.net", "--timeout", "30", *args],
        capture_output=True, text=True, timeout=90)


def test_mail_through_the_container_reaches_postfix_and_dovecot(container, postfix_server,
                                                                 dovecot_server):
    mark = f"image-{uuid.uuid4().hex}"
    result = swaks(container.host_port(25), "--to", "user1@example.com", "--tls",
                   "--header", f"Subject: {mark}", "--body", f"body {mark}")
    assert result.returncode == 0, result.stdout + result.stderr
    queued = re.search(r"250 2\.0\.0 Ok: \d+ bytes queued as ([0-9A-F]+)", result.stdout)
    assert queued, result.stdout
    raw = dovecot_server.wait_for_message("user1@example.com", lambda r: mark.encode() in r)
    received = " ".join(email.message_from_bytes(raw).get_all("Received"))
    # Postfix heard of the client through XCLIENT, as smtpgate in the container saw it
    assert f"{GATEWAY_NAME} [{HOST_LOOPBACK}]" in received, received
    postfix_server.wait_for_log(
        rf"{queued.group(1)}: client={re.escape(GATEWAY_NAME)}\[{re.escape(HOST_LOOPBACK)}\]")
    container.wait_for_log(rf"{queued.group(1)}: client={re.escape(GATEWAY_NAME)}")


def test_a_stranger_is_refused_by_the_container(container, redis_server):
    with Talk("127.0.0.1", container.host_port(25), timeout=20) as talk:
        assert talk.banner()[0] == 220
        talk.cmd("EHLO client.example.test")
        talk.cmd("MAIL FROM:<sender@example.net>")
        code, text = talk.cmd("RCPT TO:<nobody@example.com>")
        assert code == 550 and "User unknown" in text, text
        talk.cmd("QUIT")


def test_the_certificate_comes_from_the_mount_and_a_renewal_is_picked_up(container, ca,
                                                                         letsencrypt):
    first = letsencrypt.serials[0]
    assert served_serial(container.host_port(465), ca, implicit=True) == first
    assert served_serial(container.host_port(25), ca, implicit=False) == first
    renewed = letsencrypt.renew()
    assert renewed != first
    # new sessions get the renewed certificate on every port, without a restart or a signal
    for port, implicit in ((465, True), (587, False), (25, False)):
        wait_until(lambda p=port, i=implicit: served_serial(container.host_port(p), ca, i)
                   == renewed, 20, f"the renewed certificate on port {port}")
    container.wait_for_log(r"loaded renewed TLS certificate /etc/letsencrypt/live/")


def healthcheck(container: Container) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "healthcheck", "run", container.name],
                          capture_output=True, text=True, timeout=60)


def test_the_healthcheck_command_answers(container, smtpgate_image):
    kept = podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}",
                  smtpgate_image)
    assert "127.0.0.1:9425/healthz" in kept  # the build used --format docker
    result = healthcheck(container)
    assert result.returncode == 0, result.stdout + result.stderr
    assert podman("inspect", "--format", "{{.State.Health.Status}}", container.name).strip() \
        == "healthy"
    # test_podman_stop_drains_and_exits_0 sees it fail while the gate drains


def test_podman_stop_drains_and_exits_0(container, dovecot_server):
    """Last in the module: it stops the container."""
    mark = f"image-drain-{uuid.uuid4().hex}"

    def draining():
        container.wait_for_log(r"draining|stopping", 20)
        unhealthy = healthcheck(container)  # a balancer stops sending clients
        assert unhealthy.returncode != 0, unhealthy.stdout + unhealthy.stderr

    status = deliver_across_stop(container.host_port(25), lambda: container.stop(timeout=40),
                                 draining, mark)
    assert status == 0, container.logs()[-3000:]
    dovecot_server.wait_for_message("user1@example.com", lambda raw: mark.encode() in raw)
