"""TLS material (missing files, renewal without restart) and the XCLIENT line given to Postfix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trustme
from services.gate_process import make_certificate
from services.ports import free_port
from services.smtp_talk import Talk
from services.waiting import wait_until

from smtpgate.relay.xclient import ClientIdentity, xclient_command, xtext

ALL = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT"})


@pytest.mark.parametrize(("value", "encoded"), [
    ("mail.example.com", "mail.example.com"),
    ("a+b=c", "a+2Bb+3Dc"),
    ("two words", "two+20words"),
    ("ünï", "+C3+BCn+C3+AF"),
], ids=["plain", "plus-and-equals", "space", "utf8"])
def test_xtext(value, encoded):
    assert xtext(value) == encoded


def test_xclient_ipv6_and_attributes():
    identity = ClientIdentity(addr="2001:db8::1", port=4242, name="[UNAVAILABLE]",
                              helo="mail.example.net", proto="ESMTP", login=None,
                              destaddr="::1", destport=25)
    line = xclient_command(identity, ALL).decode()
    assert line == ("XCLIENT ADDR=IPV6:2001:db8::1 PORT=4242 NAME=[UNAVAILABLE] PROTO=ESMTP "
                    "HELO=mail.example.net DESTADDR=IPV6:::1 DESTPORT=25\r\n")


def test_xclient_only_offered_attributes_and_under_512_bytes():
    identity = ClientIdentity(addr="192.0.2.1", port=1, name="x.example", helo="h" * 600,
                              proto="SMTP", login="user@example.com")
    line = xclient_command(identity, frozenset({"ADDR", "NAME", "HELO", "LOGIN"}))
    assert len(line) <= 512
    # offered and short: sent, in order; PORT and PROTO were not offered: left out
    assert line == b"XCLIENT ADDR=192.0.2.1 NAME=x.example LOGIN=user@example.com\r\n"
    assert b"HELO=" not in line  # offered, but too long to fit: left out
    # the same identity with a HELO that fits: it is sent
    short = ClientIdentity(addr="192.0.2.1", port=1, name="x.example", helo="h.example",
                           proto="SMTP", login=None)
    assert xclient_command(short, frozenset({"ADDR", "NAME", "HELO", "LOGIN"})) == (
        b"XCLIENT ADDR=192.0.2.1 NAME=x.example HELO=h.example\r\n")


def test_xclient_encodes_each_value_that_needs_it_among_plain_ones():
    identity = ClientIdentity(addr="192.0.2.1", port=25, name="mx.example", helo="two words",
                              proto="ESMTP", login="a+b=c")
    line = xclient_command(identity, ALL)
    assert line == (b"XCLIENT ADDR=192.0.2.1 PORT=25 NAME=mx.example PROTO=ESMTP "
                    b"LOGIN=a+2Bb+3Dc HELO=two+20words\r\n")
    utf8 = ClientIdentity(addr="192.0.2.1", port=25, name="mx.example", helo="hé.example",
                          proto="ESMTP")
    assert xclient_command(utf8, ALL) == (b"XCLIENT ADDR=192.0.2.1 PORT=25 NAME=mx.example "
                                          b"PROTO=ESMTP HELO=h+C3+A9.example\r\n")


def serve(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", "serve"],
                          env={**os.environ, "SMTPGATE_MX_LISTEN": f"127.0.0.1:{free_port()}",
                               "SMTPGATE_SUBMISSION_LISTEN": "", "SMTPGATE_METRICS_LISTEN": "",
                               "SMTPGATE_SOCKETMAP_LISTEN": "", "SMTPGATE_WORKERS": "1", **env},
                          capture_output=True, text=True, timeout=30)


def test_missing_certificate_is_a_clear_startup_error(tmp_path):
    result = serve({"SMTPGATE_TLS_CERT": str(tmp_path / "nope.pem"),
                    "SMTPGATE_TLS_KEY": str(tmp_path / "nope.key")})
    assert result.returncode == 1
    assert f"TLS certificate file {tmp_path / 'nope.pem'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_letsencrypt_folder_is_named_when_missing():
    result = serve({"LETSENCRYPT": "mx.invalid", "SMTPGATE_TLS_CERT": "", "SMTPGATE_TLS_KEY": ""})
    assert result.returncode == 1
    assert "/etc/letsencrypt/live/mx.invalid/fullchain.pem" in result.stderr


def peer_certificate_serial(port: int, ca_path) -> int:
    with Talk("127.0.0.1", port, source="127.0.0.1") as talk:
        talk.banner()
        talk.cmd("EHLO laptop")
        assert talk.cmd("STARTTLS")[0] == 220
        talk.starttls(str(ca_path))
        der = talk.sock.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def test_renewed_certificate_is_used_without_restart(start_gate, tmp_path, redis_server,
                                                     dns_server):
    ca_path, cert, key = make_certificate(tmp_path)
    gate = start_gate(SMTPGATE_TLS_CERT=str(cert), SMTPGATE_TLS_KEY=str(key))
    try:
        first = peer_certificate_serial(gate.mx_port, ca_path)
        # certbot renews in place: same paths, new files, new times
        ca = trustme.CA()
        renewed = ca.issue_cert("mx.example.test")
        renewed.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(b.bytes() for b in renewed.cert_chain_pems))
        os.utime(cert, (os.path.getmtime(cert) + 5,) * 2)
        new_ca = tmp_path / "new-ca.pem"
        ca.cert_pem.write_to_path(str(new_ca))
        # the provider looks at the files once a second; until then the old one is served,
        # which the new CA does not verify (wait_until counts that error as "not yet")
        second = wait_until(lambda: peer_certificate_serial(gate.mx_port, new_ca), 10,
                            "the renewed certificate to be served")
        assert second != first
    finally:
        gate.stop()


def test_busy_port_is_a_clear_startup_error_even_with_redis_down():
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = serve({"SMTPGATE_MX_LISTEN": f"127.0.0.1:{port}", "SMTPGATE_TLS_OPTIONAL": "yes",
                        "REDIS": f"127.0.0.1:{free_port()}"})
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (mx)" in result.stderr
