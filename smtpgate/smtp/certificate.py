"""certificate - what the server certificate says: its names, its expiry, whether the key fits.

SYNOPSIS
    read_certificate(cert_path, key_path) -> CertificateInfo     CertificateError naming the file
    CertificateInfo(names, not_after, key_matches, cert_path, key_path, not_before, chain)
    info.days_left(now) -> float
    name_matches(hostname, names) -> bool
    certificate_findings(info, hostname, now) -> list[Finding]
    EXPIRY_WARNING_DAYS

DESCRIPTION
    read_certificate() reads the first certificate of cert_path (the leaf
    of a fullchain.pem) and the private key with `cryptography`; it does
    not build a TLS context (smtpgate.smtp.tls does). The names are the
    DNS names of the subjectAltName extension, or the subject's common
    name when there is no such extension. not_after is an aware datetime
    in UTC (the metrics' expiry gauge reads it). key_matches says whether
    the private key is the certificate's: the two public keys compared.
    chain holds every certificate of cert_path, the leaf first (DANE
    matches the leaf and the CA certificates after it: smtpgate.smtp.dane).

    name_matches() matches as TLS clients do (RFC 6125, as OpenSSL's
    X509_check_host without partial wildcards): case-insensitive, a
    trailing dot ignored, and "*" only as the whole left-most label of a
    name with at least two labels after it, standing for exactly one
    label ("*.example.com" covers mx.example.com, not example.com nor
    a.b.example.com).

    certificate_findings() is pure: an error when the key does not match
    (no TLS context can be built), a warning when HOSTNAME is not among
    the names (a sender checking names, with MTA-STS or DANE, will not
    take the certificate for this host), a warning when the certificate
    has expired or has fewer than EXPIRY_WARNING_DAYS days left (certbot
    renews at 30 days, so that means renewal is failing), else an ok line
    with the names and the days left.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from smtpgate.verdict import Finding

EXPIRY_WARNING_DAYS = 14


class CertificateError(Exception):
    """A certificate or key file that cannot be read or parsed; the message names the file."""


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    names: tuple[str, ...]
    not_after: datetime.datetime  # aware, UTC
    key_matches: bool
    cert_path: str = ""
    key_path: str = ""
    not_before: datetime.datetime | None = None  # aware, UTC
    chain: tuple[x509.Certificate, ...] = ()  # the leaf first

    def days_left(self, now: datetime.datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


def read_certificate(cert_path: str, key_path: str) -> CertificateInfo:
    cert_pem = _read(cert_path, "certificate")
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_pem))
    except ValueError:
        raise CertificateError(
            f"TLS certificate file {cert_path} holds no PEM certificate") from None
    cert = chain[0]
    key_pem = _read(key_path, "key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: a key protected by a password
        raise CertificateError(
            f"TLS key file {key_path} holds no usable PEM private key: {exc}") from None
    return CertificateInfo(
        names=_names(cert), not_after=cert.not_valid_after_utc,
        key_matches=_spki(key.public_key()) == _spki(cert.public_key()),
        cert_path=cert_path, key_path=key_path, not_before=cert.not_valid_before_utc,
        chain=chain)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise CertificateError(
            f"TLS {what} file {path} cannot be read: {exc.strerror or exc}") from None


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return tuple(str(attr.value) for attr in
                     cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return tuple(san.get_values_for_type(x509.DNSName))


def name_matches(hostname: str, names: tuple[str, ...]) -> bool:
    host = hostname.rstrip(".").lower()
    if not host:
        return False
    for name in names:
        name = name.rstrip(".").lower()
        if name == host:
            return True
        first, dot, rest = name.partition(".")
        if (first == "*" and dot and rest.count(".") >= 1 and "*" not in rest
                and host.partition(".")[2] == rest and host.partition(".")[0]):
            return True
    return False


def certificate_findings(info: CertificateInfo, hostname: str,
                         now: datetime.datetime) -> list[Finding]:
    pair = f"{info.cert_path} (key {info.key_path})"
    if not info.key_matches:
        return [Finding("error", f"TLS key {info.key_path} does not match the certificate "
                                 f"{info.cert_path}")]
    found = []
    names = " ".join(info.names) or "(none)"
    days = info.days_left(now)
    expiry = info.not_after.strftime("%Y-%m-%d %H:%M UTC")
    if days < 0:
        found.append(Finding("warning", f"TLS certificate {info.cert_path} expired on {expiry}, "
                                        f"{-days:.0f} days ago: renew it (certbot renew)"))
    elif days < EXPIRY_WARNING_DAYS:
        found.append(Finding("warning", f"TLS certificate {info.cert_path} expires on {expiry}, "
                                        f"in {days:.1f} days: is its renewal failing?"))
    if not name_matches(hostname, info.names):
        found.append(Finding("warning", f"HOSTNAME {hostname} is not among the names of the "
                                        f"TLS certificate {info.cert_path}: {names}"))
    found.append(Finding("ok", f"TLS certificate {pair}: {names}; valid until {expiry} "
                               f"({days:.0f} days left)"))
    return found
