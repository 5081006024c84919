"""A real `smtpgate serve` whose certificate is renewed with a new key while TLSA records are
published for the old one: the renewal is held back (the handshake shows the old certificate),
the log, /metrics and `check-config --live` say which record to publish, and once it is
published the renewal is served: found by the periodic lookup, and by the one SIGHUP makes."""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import urllib.request

import pytest
from cryptography import x509
from dane_certs import Issuer
from services.waiting import wait_until

pytestmark = pytest.mark.slow

NAME = "_25._tcp.mx.example.test"
ISSUER = Issuer()


def served_serial(port: int) -> int:
    """The serial number of the certificate the MX listener shows after STARTTLS."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test",
                      source_address=("127.0.0.91", 0), timeout=10) as smtp:
        smtp.starttls(context=context)
        der = smtp.sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def dane_state(port: int) -> str | None:
    """The state whose smtpgate_tls_dane_state series is 1, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    on = [line.split('"')[1] for line in text.splitlines()
          if line.startswith("smtpgate_tls_dane_state{") and line.endswith(" 1.0")]
    return on[0] if len(on) == 1 else None


def check_config_live(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SMTPGATE_") and k not in ("REDIS", "HOSTNAME", "LETSENCRYPT")}
    result = subprocess.run([sys.executable, "-m", "smtpgate", "check-config", "--live"],
                            env={**clean, "SMTPGATE_ENV_FILE": "", **env},
                            capture_output=True, text=True, timeout=60)
    return result.stdout


def test_a_renewal_that_breaks_dane_is_held_until_its_record_is_published(
        start_gate, signed_zone, redis_server, tmp_path):
    old, new, newer = ISSUER.issue(), ISSUER.issue(), ISSUER.issue()
    signed_zone.set([(NAME, "TLSA", old.tlsa(3, 1, 1), 1)])  # a TTL of 1 s: looked up again soon
    cert, key = old.write(tmp_path)
    env = {"HOSTNAME": "mx.example.test", "SMTPGATE_NAMESERVERS": signed_zone.nameserver,
           "SMTPGATE_TLS_CERT": cert, "SMTPGATE_TLS_KEY": key}
    gate = start_gate(listeners=("mx", "metrics"), **env)
    try:
        gate.wait_for_log(rf"DANE: TLS certificate {cert} matches a TLSA record at {NAME}")
        assert served_serial(gate.mx_port) == old.serial

        new.write(tmp_path)
        held = gate.wait_for_log(r"warning: DANE: renewed TLS certificate .* no TLSA record.*")
        publish = f"{NAME}. IN TLSA 3 1 1 {new.spki_sha256}"
        assert held.group(0).endswith(f"publish beside the current record: {publish}")
        assert served_serial(gate.mx_port) == old.serial
        wait_until(lambda: dane_state(gate.metrics_port) == "held", 10, "the held state shown")
        live = check_config_live({**env, "REDIS": redis_server.url,
                                  "SMTPGATE_NEXT_HOP": "127.0.0.1:1"})
        assert f"warning: TLS certificate {cert} matches no TLSA record at {NAME}: senders " \
               f"that use DANE cannot deliver; publish: {publish}" in live, live

        # published: the next lookup (the TTL's second) finds it, no signal needed
        signed_zone.set([(NAME, "TLSA", old.tlsa(3, 1, 1), 3600),
                         (NAME, "TLSA", new.tlsa(3, 1, 1), 3600)])
        gate.wait_for_log(rf"renewed TLS certificate {cert} matches a TLSA record .*serving it")
        assert served_serial(gate.mx_port) == new.serial
        wait_until(lambda: dane_state(gate.metrics_port) == "match", 10, "the match shown")

        # renewed again; the records now live an hour, so only SIGHUP makes it look again
        newer.write(tmp_path)
        wait_until(lambda: gate.log_text().count("warning: DANE: renewed TLS certificate") == 2,
                   10, "the second renewal held back")
        signed_zone.set([(NAME, "TLSA", newer.tlsa(3, 1, 1), 3600)])
        assert served_serial(gate.mx_port) == new.serial
        gate.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: gate.log_text().count("serving it") == 2, 10,
                   "the second renewal served after SIGHUP")
        assert served_serial(gate.mx_port) == newer.serial
    finally:
        gate.stop()
        signed_zone.set([])
