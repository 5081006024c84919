"""The server certificate read with cryptography: names, expiry, key match; what serve says."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from services.ports import free_port

from smtpgate.smtp.certificate import (
    CertificateError,
    CertificateInfo,
    certificate_findings,
    name_matches,
    read_certificate,
)
from smtpgate.smtp.tls import TlsError, TlsProvider

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def issue(directory, *names, not_after=None, key_from=None):
    """(cert_path, key_path) from a throwaway CA; key_from: another pair's key file instead."""
    ca = trustme.CA()
    leaf = ca.issue_cert(*names, not_after=not_after)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_path))
    if key_from is not None:
        key_path.write_bytes(key_from.read_bytes())
    return str(cert_path), str(key_path)


def test_matching_pair(tmp_path):
    not_after = datetime.datetime(2027, 3, 1, 10, 30, tzinfo=UTC)
    cert, key = issue(tmp_path, "mx.example.test", "*.mail.example.test", not_after=not_after)
    info = read_certificate(cert, key)
    assert info.names == ("mx.example.test", "*.mail.example.test")
    assert info.not_after == not_after and info.not_after.tzinfo is not None
    assert info.key_matches
    findings = certificate_findings(info, "mx.example.test", NOW)
    assert [f.level for f in findings] == ["ok"]
    assert "mx.example.test *.mail.example.test; valid until 2027-03-01 10:30 UTC (92 days left)" \
        in findings[0].text


def test_wrong_key(tmp_path):
    (tmp_path / "other").mkdir()
    _, other_key = issue(tmp_path / "other", "mx.example.test")
    cert, key = issue(tmp_path, "mx.example.test", key_from=tmp_path / "other" / "privkey.pem")
    assert Path(key).read_bytes() == Path(other_key).read_bytes()
    info = read_certificate(cert, key)
    assert not info.key_matches
    (finding,) = certificate_findings(info, "mx.example.test", NOW)
    assert finding.level == "error"
    assert finding.text == f"TLS key {key} does not match the certificate {cert}"
    with pytest.raises(TlsError) as caught:
        TlsProvider(cert, key)
    assert str(caught.value) == f"TLS key {key} does not match the certificate {cert}"


def test_hostname_not_among_the_names(tmp_path):
    info = read_certificate(*issue(tmp_path, "other.example.test", "*.example.net"))
    levels = {f.level: f.text for f in certificate_findings(info, "mx.example.test", NOW)}
    assert levels["warning"].startswith("HOSTNAME mx.example.test is not among the names")
    assert levels["warning"].endswith(": other.example.test *.example.net")
    assert "error" not in levels


@pytest.mark.parametrize(("days", "expected"), [
    (-3, r"expired on 2026-11-26 12:00 UTC, 3 days ago"),
    (5, r"expires on 2026-12-04 12:00 UTC, in 5.0 days"),
    (30, None),
], ids=["expired", "expiring", "fine"])
def test_expiry(tmp_path, days, expected):
    info = CertificateInfo(("mx.example.test",), NOW + datetime.timedelta(days=days), True,
                           "c.pem", "k.pem")
    warnings = [f.text for f in certificate_findings(info, "mx.example.test", NOW)
                if f.level == "warning"]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0]


def test_expired_certificate_read_from_file(tmp_path):
    # trustme issues what it is told, so an expired certificate is a real file too
    past = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    info = read_certificate(*issue(tmp_path, "mx.example.test", not_after=past))
    assert info.not_after == past and info.days_left(NOW) < 0
    assert any("expired on 2026-01-01" in f.text for f in
               certificate_findings(info, "mx.example.test", NOW))


def test_common_name_when_there_is_no_subject_alt_name(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=60))
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    info = read_certificate(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    assert info.names == ("mx.example.test",) and info.key_matches


@pytest.mark.parametrize(("hostname", "names", "matches"), [
    ("mx.example.com", ("mx.example.com",), True),
    ("MX.Example.COM.", ("mx.example.com",), True),
    ("mx.example.com", ("*.example.com",), True),
    ("example.com", ("*.example.com",), False),
    ("a.mx.example.com", ("*.example.com",), False),
    ("mx.example.com", ("*.com",), False),
    ("mx.example.com", ("m*.example.com",), False),
    ("mx.example.com", ("mx.*.com",), False),
    ("mx.example.com", ("other.example.com", "*.example.org"), False),
    ("", ("*.example.com",), False),
], ids=["exact", "case-and-dot", "wildcard", "wildcard-not-the-parent",
        "wildcard-one-label-only", "wildcard-under-a-tld", "partial-wildcard",
        "wildcard-not-left-most", "none", "empty"])
def test_name_matches_as_tls_does(hostname, names, matches):
    assert name_matches(hostname, names) is matches


def test_unreadable_and_not_pem_files_are_named(tmp_path):
    cert, key = issue(tmp_path, "mx.example.test")
    with pytest.raises(CertificateError, match=f"TLS certificate file {tmp_path}/nope.pem "
                                               "cannot be read: No such file"):
        read_certificate(str(tmp_path / "nope.pem"), key)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(CertificateError, match="holds no PEM certificate"):
        read_certificate(str(tmp_path / "junk.pem"), key)
    with pytest.raises(CertificateError, match="holds no usable PEM private key"):
        read_certificate(cert, str(tmp_path / "junk.pem"))


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", "serve"],
                          env={**os.environ, "SMTPGATE_MX_LISTEN": f"127.0.0.1:{free_port()}",
                               "SMTPGATE_SUBMISSION_LISTEN": "", "SMTPGATE_METRICS_LISTEN": "",
                               "SMTPGATE_SOCKETMAP_LISTEN": "", "SMTPGATE_WORKERS": "1",
                               "SMTPGATE_NEXT_HOP": f"127.0.0.1:{free_port()}", **env},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_a_key_that_is_not_the_certificates(tmp_path, workers):
    (tmp_path / "other").mkdir()
    issue(tmp_path / "other", "mx.example.test")
    cert, key = issue(tmp_path, "mx.example.test", key_from=tmp_path / "other" / "privkey.pem")
    result = _serve({"SMTPGATE_TLS_CERT": cert, "SMTPGATE_TLS_KEY": key,
                     "SMTPGATE_TLS_OPTIONAL": "no", "SMTPGATE_WORKERS": workers})
    assert result.returncode == 1  # with workers too: the master says so, not 0
    assert "Traceback" not in result.stderr
    assert f"smtpgate: fatal: TLS key {key} does not match the certificate {cert}\n" \
        in result.stderr
