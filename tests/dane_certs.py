"""dane_certs - certificate chains made in the test, for the DANE tests.

SYNOPSIS
    Issuer()                                      a CA of its own (key and self-signed cert)
        .issue(name, key=None, not_before=..., not_after=...) -> Pair
    Pair(chain, key)                              chain: (leaf, ca), cryptography objects
        .write(directory) -> (cert_path, key_path)   fullchain.pem (leaf, then CA), privkey.pem
        .tlsa(usage, selector, matching) -> str   "3 1 1 hex" for this pair
        .spki_sha256 -> str ; .serial -> int   the leaf's

DESCRIPTION
    trustme makes a new key for every certificate; a renewal that keeps its
    key (certbot --reuse-key) needs the key given, so these are made with
    cryptography directly. The CA certificate is written after the leaf, as
    in Let's Encrypt's fullchain.pem, so a DANE-TA record can match it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

UTC = datetime.UTC


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


@dataclass(frozen=True)
class Pair:
    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey

    def write(self, directory: Path) -> tuple[str, str]:
        """Both files replaced whole, each with a later modification time than before."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)
        key = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        for path, data in ((cert_path, pem), (key_path, key)):
            before = path.stat().st_mtime_ns if path.exists() else 0
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            if path.stat().st_mtime_ns <= before:  # a coarse clock: make the change visible
                os.utime(path, ns=(before + 1_000_000, before + 1_000_000))
        return str(cert_path), str(key_path)

    def tlsa(self, usage: int, selector: int, matching: int) -> str:
        cert = self.chain[0] if usage in (1, 3) else self.chain[1]
        if selector == 0:
            data = cert.public_bytes(serialization.Encoding.DER)
        else:
            data = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if matching == 1:
            data = hashlib.sha256(data).digest()
        elif matching == 2:
            data = hashlib.sha512(data).digest()
        return f"{usage} {selector} {matching} {data.hex()}"

    @property
    def serial(self) -> int:
        return self.chain[0].serial_number

    @property
    def spki_sha256(self) -> str:
        return self.tlsa(3, 1, 1).split()[3]


class Issuer:
    def __init__(self, name: str = "Test DANE CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, name: str = "mx.example.test", key: ec.EllipticCurvePrivateKey | None = None,
              not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None) -> Pair:
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before or now - datetime.timedelta(hours=1))
                .not_valid_after(not_after or now + datetime.timedelta(days=90))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
                .sign(self.key, hashes.SHA256()))
        return Pair((cert, self.cert), key)
