"""Cipher suites per port: AEAD only on submission (587, 465), Postfix's breadth on 25.

Probed with openssl s_client offering TLS 1.2 and only the named suites (TLS 1.3's suites are
all AEAD and the same on every port), and with testssl.sh's cipher categories (its scan of
every suite, -E, takes half a minute a port: run by hand, see the branch's report).
"""

from __future__ import annotations

import subprocess

import pytest
from services.world import gate_in_world

pytestmark = pytest.mark.slow

# the certificate may be RSA or ECDSA: each probe offers both kinds of the same suite
CBC = "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"
CBC_SHA384 = "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384"
GCM = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
CHACHA = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    yield from gate_in_world(start_gate, redis_server, dns_server,
                             listeners=("mx", "submission", "submissions"))


def handshake(port: int, ciphers: str, starttls: bool) -> str | None:
    """The suite agreed on with TLS 1.2 and only `ciphers` offered; None when refused."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
               "-cipher", ciphers, "-servername", "mx.example.test", "-brief"]
    if starttls:
        command += ["-starttls", "smtp"]
    done = subprocess.run(command, input=b"QUIT\r\n", capture_output=True, timeout=30)
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("Ciphersuite:"):
            return line.split(":", 1)[1].strip()
    # refused: a handshake_failure alert, or the connection closed (asyncio's TLS ends so)
    assert done.returncode != 0 and ("alert" in text or "unexpected eof" in text), text
    return None


@pytest.mark.parametrize("ciphers", [CBC, CBC_SHA384])
def test_submission_ports_refuse_suites_without_aead(gate, ciphers):
    assert handshake(gate.submission_port, ciphers, starttls=True) is None
    assert handshake(gate.submissions_port, ciphers, starttls=False) is None


@pytest.mark.parametrize("ciphers", [CBC, CBC_SHA384])
def test_port_25_keeps_them_for_opportunistic_tls(gate, ciphers):
    assert handshake(gate.mx_port, ciphers, starttls=True) in ciphers.split(":")


@pytest.mark.parametrize("ciphers", [GCM, CHACHA])
def test_every_port_takes_aead_suites(gate, ciphers):
    for port, starttls in ((gate.mx_port, True), (gate.submission_port, True),
                           (gate.submissions_port, False)):
        assert handshake(port, ciphers, starttls) in ciphers.split(":")


def categories(port: int, starttls: bool) -> dict[str, str]:
    """testssl.sh's cipher categories (-s): name -> verdict."""
    command = ["testssl", "--quiet", "--color", "0", "--warnings", "off", "-s"]
    command += ["--starttls", "smtp"] if starttls else []
    done = subprocess.run([*command, f"127.0.0.1:{port}"], capture_output=True, timeout=300)
    found, started = {}, False
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        started = started or "Testing cipher categories" in line
        name, _, verdict = line.strip().partition("  ")
        if started and verdict.strip() and not name.startswith("Done"):
            found[name.strip()] = verdict.strip()
    assert "Strong encryption (AEAD ciphers)" in found, done.stdout
    return found


def test_testssl_sees_cbc_on_25_and_aead_only_on_587(gate):
    cbc, aead = "Obsolete CBC ciphers (AES, ARIA etc.)", "Strong encryption (AEAD ciphers)"
    mx = categories(gate.mx_port, starttls=True)
    assert mx[cbc] == "offered" and mx[aead] == "offered (OK)", mx
    found = categories(gate.submission_port, starttls=True)  # 465: the s_client probes above
    assert found[cbc] == "not offered" and found[aead] == "offered (OK)", found
    assert all(verdict.startswith("not offered") for name, verdict in found.items()
               if name != aead), found
