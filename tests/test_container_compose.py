"""compose.yaml brought up as a user would (`podman-compose up -d --build`), and mailed through:
client on the host -> published port 25 -> smtpgate -> the Postfix sidecar (deploy/postfix,
conf/postfix) -> rspamd's milter -> Dovecot over LMTP.

No registry reaches these machines, so the images compose.yaml names but does not build
(redis:7.0-alpine, rspamd/rspamd:3.9, dovecot/dovecot:2.3.21) are stand-ins that
scripts/setup.sh builds from Debian 12's packages under those names, keeping the conventions
compose.yaml and conf/ rely on (tests/containers/*/Containerfile say which); deploy/postfix's
debian:12-slim is a debootstrap of Debian 12. smtpgate's image and the Postfix image are
built by compose from the repository, as for a user.

The stack publishes the host's ports 25, 587 and 465 and its names are fixed (`name:
smtpgate`), so one stack runs per machine: the module holds a lock while it is up.
Everything it made is gone afterwards: `podman-compose down -v` takes containers, network and
volumes; the external ssl-certs volume (the user's, made here) is removed by the test.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
import trustme
from services.podman import podman
from services.smtp_talk import Talk
from services.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.container]

REPO = Path(__file__).resolve().parent.parent
PROJECT = "smtpgate"  # compose.yaml's name:
NAME = "mx.example.test"
LOCK = Path("/run/lock/smtpgate-compose.lock")
IMAGE_GID = 10025
TEST_LABEL = ("org.smtpgate.test", "compose")  # on the ssl-certs volume the tests make


def compose(*args: str, timeout: float = 600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    podman_compose = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    assert podman_compose, "podman-compose is not installed in the venv (scripts/setup.sh)"
    result = subprocess.run([podman_compose, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})},
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"podman-compose {' '.join(args)}: exit status "
                             f"{result.returncode}\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return result


def logs(service: str) -> str:
    result = subprocess.run(["podman", "logs", f"{PROJECT}_{service}_1"], capture_output=True,
                            text=True, timeout=30)
    return result.stdout + result.stderr


def wait_for_log(service: str, regex: str, timeout: float = 60) -> re.Match:
    try:
        return wait_until(lambda: re.search(regex, logs(service)), timeout,
                          f"{regex!r} in {service}'s log", interval=0.3)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; tail:\n{logs(service)[-3000:]}") from None


def table_set(prefix: str, key: str, value: str) -> None:
    """The compose header's way to set a key: the smtpgate command in the running container."""
    compose("exec", "-T", "smtpgate", "smtpgate", "table", "set", prefix, key, value)


def what_is_left() -> dict[str, list[str]]:
    label = f"label=io.podman.compose.project={PROJECT}"
    return {
        "containers": podman("ps", "--all", "--filter", label, "--format", "{{.Names}}").split(),
        "networks": [n for n in podman("network", "ls", "--format", "{{.Name}}").split()
                     if n.startswith(f"{PROJECT}_")],
        "volumes": [v for v in podman("volume", "ls", "--format", "{{.Name}}").split()
                    if v.startswith(f"{PROJECT}_")],
    }


def port_taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def certificate_volume(service_root: Path, ca: trustme.CA) -> None:
    """The external ssl-certs volume as the compose header asks, holding
    live/NAME/{fullchain,privkey}.pem readable by the image's group."""
    cert = ca.issue_cert(NAME)
    folder = service_root / f"ssl-certs-{uuid.uuid4().hex[:6]}"
    live = folder / "live" / NAME
    live.mkdir(parents=True)
    cert.private_key_pem.write_to_path(str(live / "privkey.pem"))
    (live / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    for path in (folder / "live", live, *live.iterdir()):
        os.chown(path, 0, IMAGE_GID)
        path.chmod(0o750 if path.is_dir() else 0o640)
    archive = folder.with_suffix(".tar")
    with tarfile.open(archive, "w") as tar:
        tar.add(folder / "live", arcname="live")
    podman("volume", "create", "--label", "=".join(TEST_LABEL), "ssl-certs")
    podman("volume", "import", "ssl-certs", str(archive))


@pytest.fixture(scope="module")
def stack(smtpgate_image, service_root):
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run's stack holds the ports: wait for it
        taken = [port for port in (25, 587, 465) if port_taken(port)]
        assert not taken, f"ports {taken} of the host are taken: compose.yaml publishes them"
        if any(what_is_left().values()):  # a run killed before its clean-up: ours to end
            compose("down", "-v", timeout=300)
        if podman("volume", "ls", "--quiet", "--filter", "name=ssl-certs").split():
            labels = json.loads(podman("volume", "inspect", "--format", "{{json .Labels}}",
                                       "ssl-certs"))
            assert labels.get(TEST_LABEL[0]) == TEST_LABEL[1], \
                "an ssl-certs volume the tests did not make exists: not touched"
            podman("volume", "rm", "ssl-certs")
        ca = trustme.CA()
        env = {"MAIL_HOSTNAME": NAME, "MAIL_DOMAIN": "example.com", "LETSENCRYPT": NAME}
        try:
            certificate_volume(service_root, ca)
            # compose builds its image from the same context: the run's build is its cache
            podman("tag", smtpgate_image, "localhost/smtpgate:latest")
            compose("up", "-d", "--build", env=env)
            wait_for_log("smtpgate", r"smtpgate: ready")
            wait_for_log("postfix", r"daemon started")
            wait_for_log("dovecot", r"starting up")
            wait_for_log("rspamd", r"rspamd_proxy|proxy_milter|starting worker")
            yield ca
        finally:
            with contextlib.suppress(AssertionError):
                compose("down", "-v", timeout=300)
            podman("volume", "rm", "--force", "ssl-certs", check=False)
            podman("rmi", "localhost/smtpgate:latest", check=False)


def gateway() -> str:
    """The compose network's gateway: the address smtpgate sees host clients come from."""
    network = json.loads(podman("network", "inspect", f"{PROJECT}_default"))[0]
    return network["subnets"][0]["gateway"]


def test_a_client_on_the_access_list_is_refused(stack):
    table_set("PSA", gateway(), "reject")
    try:
        with Talk("127.0.0.1", 25, timeout=30) as talk:
            code, text = talk.banner()
            assert code == 521 and "5.3.2" in text, text
            assert talk.closed()
    finally:
        compose("exec", "-T", "smtpgate", "smtpgate", "table", "del", "PSA", gateway())


def doveadm_search(user: str, subject: str) -> str:
    result = subprocess.run(["podman", "exec", f"{PROJECT}_dovecot_1", "doveadm", "search",
                             "-u", user, "header", "subject", subject],
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip() if result.returncode == 0 else ""


def test_mail_from_the_host_lands_in_dovecot_through_postfix_and_rspamd(stack):
    for prefix, key, value in (("VDOM", "example.com", "example.com"),
                               ("VALI", "user1@example.com", "user1@example.com"),
                               # the host's clients come from the network's gateway, which
                               # has no PTR here, and the test HELO does not resolve
                               ("REV", gateway(), "permit"),
                               ("HLO", "client.example.test", "permit")):
        table_set(prefix, key, value)
    # the user, as conf/dovecot/dovecot.conf's header says (Dovecot delivers to none before)
    compose("exec", "-T", "dovecot", "sh", "-c",
            'echo "user1@example.com:$(doveadm pw -s SHA512-CRYPT -p secret)"'
            " >> /etc/dovecot/users/passwd")
    mark = f"compose-{uuid.uuid4().hex}"
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", "25", "--tls", "--helo",
         "client.example.test", "--from", "sender@example.net", "--to", "user1@example.com",
         "--header", f"Subject: {mark}", "--timeout", "60"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    queued = re.search(r"250 2\.0\.0 Ok: \d+ bytes queued as ([0-9A-F]+)", result.stdout)
    assert queued, result.stdout
    queue_id = queued.group(1)
    # the Postfix sidecar took it over XCLIENT, rspamd's milter saw it, LMTP delivered it
    wait_for_log("postfix", rf"{queue_id}: client=unknown\[{re.escape(gateway())}\]")
    wait_for_log("rspamd", rf"qid: <{queue_id}>")
    wait_for_log("postfix", rf"{queue_id}: to=<user1@example.com>, relay=dovecot\[[^]]+\]:24"
                 r".*status=sent")
    wait_until(lambda: doveadm_search("user1@example.com", mark), 30,
               f"{mark} in user1's mailbox")


def test_compose_down_leaves_nothing_behind(stack):
    """Last in the module: it takes the stack down."""
    assert what_is_left()["containers"]
    compose("down", "-v", timeout=300)
    assert what_is_left() == {"containers": [], "networks": [], "volumes": []}
