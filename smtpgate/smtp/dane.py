"""dane - whether a certificate matches the published TLSA records, and which one to serve.

SYNOPSIS
    TlsaRecord.parse("3 1 1 ab12...") -> TlsaRecord       ValueError when it is no TLSA text
    TlsaRecord(usage, selector, matching, data)
        .usable -> bool
    record_matches(record, chain) -> bool
    chain_matches(records, chain) -> bool
    publish_line(name, chain) -> str       name: "_25._tcp.HOST"; the zone-file line of its 3 1 1
    choose(answer, serving, renewed, now, hold) -> Choice
    Choice(serve, state, level, text, publish)
    STATES

DESCRIPTION
    A sender that does DANE for SMTP (RFC 7672) looks up the TLSA records
    of _25._tcp.HOSTNAME and, when the answer is DNSSEC-secure, takes the
    server's certificate only if one usable record matches it. Usable in
    SMTP are DANE-TA(2) and DANE-EE(3) with selector 0 (the whole
    certificate) or 1 (its SubjectPublicKeyInfo) and matching type 0 (the
    data itself), 1 (SHA-256) or 2 (SHA-512); PKIX-TA(0) and PKIX-EE(1)
    are not (RFC 7672 3.1.3), and a sender with no usable record falls
    back to unauthenticated TLS. A DANE-EE record is matched against the
    leaf, a DANE-TA one against the CA certificates after the leaf in the
    file (fullchain.pem: the chain the server sends, where the sender
    finds the trust anchor).

    record_matches() and chain_matches() say whether the certificates of a
    chain (the leaf first, cryptography's x509 objects) satisfy one record
    or some usable record of several. publish_line() is the record an
    operator publishes for a new key, "_25._tcp.HOST. IN TLSA 3 1 1 HEX":
    the SHA-256 of the leaf's public key, which stays right across
    renewals that keep the key (certbot --reuse-key).

    choose() is the decision, pure: given the TLSA answer
    (smtpgate.lookups.tlsa.TlsaAnswer), the certificate being served, a
    renewed one read from the files but not served yet (or None), the
    time and hold (seconds), it says which to serve and what to report:
      state "unknown"     the lookup failed, or the records came without
                          the resolver's AD bit (it does not validate, or
                          the zone is not signed): nothing can be told;
                          serve the renewed certificate as without DANE
      state "no_records"  no TLSA record, or none usable: DANE is not in
                          use; serve the renewed certificate
      state "match"       the certificate served from now on matches
      state "held"        the renewed certificate matches no record while
                          the served one does and has more than hold
                          left: keep serving it; publish says which record
                          to add
      state "mismatch"    the certificate served from now on matches no
                          record: DANE senders cannot deliver (level
                          "error" when a matching one was just given up
                          because it had hold or less left, else
                          "warning"); publish says which record to add
    serve is "serving" or "renewed"; level is "info", "warning" or
    "error"; text is the log line's words.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smtpgate.smtp.certificate import CertificateInfo

if TYPE_CHECKING:
    from smtpgate.lookups.tlsa import TlsaAnswer

DANE_TA, DANE_EE = 2, 3
STATES = ("unknown", "no_records", "match", "held", "mismatch")
_DIGESTS = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    usage: int
    selector: int
    matching: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> TlsaRecord:
        """"usage selector matching hex" (the hex may be split by blanks, as in zone files)."""
        fields = text.split()
        try:
            usage, selector, matching = (int(f) for f in fields[:3])
            data = bytes.fromhex("".join(fields[3:]))
        except ValueError:
            raise ValueError(f"not a TLSA record: {text!r}") from None
        if len(fields) < 4:
            raise ValueError(f"not a TLSA record: {text!r}")
        return cls(usage, selector, matching, data)

    @property
    def usable(self) -> bool:
        return (self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1)
                and self.matching in _DIGESTS)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _association(cert: x509.Certificate, selector: int, matching: int) -> bytes:
    selected = _selected(cert, selector)
    digest = _DIGESTS[matching]
    return selected if digest is None else digest(selected).digest()


def record_matches(record: TlsaRecord, chain: tuple[x509.Certificate, ...]) -> bool:
    if not record.usable or not chain:
        return False
    candidates = chain[:1] if record.usage == DANE_EE else chain[1:]
    return any(_association(cert, record.selector, record.matching) == record.data
               for cert in candidates)


def chain_matches(records: tuple[TlsaRecord, ...], chain: tuple[x509.Certificate, ...]) -> bool:
    return any(record_matches(record, chain) for record in records)


def publish_line(name: str, chain: tuple[x509.Certificate, ...]) -> str:
    return f"{name.rstrip('.')}. IN TLSA 3 1 1 {_association(chain[0], 1, 1).hex()}"


@dataclass(frozen=True, slots=True)
class Choice:
    serve: str  # "serving" | "renewed"
    state: str  # one of STATES
    level: str  # "info" | "warning" | "error"
    text: str
    publish: str = ""


def choose(answer: TlsaAnswer, serving: CertificateInfo, renewed: CertificateInfo | None,
           now: datetime.datetime, hold: float) -> Choice:
    name = answer.name
    after = "renewed" if renewed is not None else "serving"
    if answer.status == "tempfail":
        return Choice(after, "unknown", "warning",
                      f"cannot tell whether the certificate matches the TLSA records at {name}: "
                      f"the lookup failed ({answer.error or 'no answer'})")
    records = tuple(_parsed(answer.values))
    usable = tuple(r for r in records if r.usable)
    if answer.status != "ok" or not usable:
        what = "no usable TLSA record" if records else "no TLSA record"
        return Choice(after, "no_records", "info", f"{what} at {name}: DANE is not in use")
    if not answer.validated:
        return Choice(after, "unknown", "warning",
                      f"cannot tell whether the certificate matches the TLSA records at {name}: "
                      "the resolver did not mark the answer DNSSEC-validated (no AD bit); "
                      "a validating resolver (SMTPGATE_NAMESERVERS) can tell")
    serving_ok = chain_matches(usable, serving.chain)
    if renewed is None:
        if serving_ok:
            return Choice("serving", "match", "info",
                          f"TLS certificate {serving.cert_path} matches a TLSA record at {name}")
        return _mismatch("serving", serving, name, "warning",
                         f"TLS certificate {serving.cert_path} matches no TLSA record at {name}: "
                         "senders that use DANE cannot deliver")
    if chain_matches(usable, renewed.chain):
        return Choice("renewed", "match", "info",
                      f"renewed TLS certificate {renewed.cert_path} matches a TLSA record at "
                      f"{name}: serving it")
    if not serving_ok:
        return _mismatch("renewed", renewed, name, "warning",
                         f"renewed TLS certificate {renewed.cert_path} matches no TLSA record at "
                         f"{name}, nor did the one it replaces: serving it; senders that use "
                         "DANE cannot deliver")
    days = serving.days_left(now)
    started = serving.not_before is None or serving.not_before <= now
    if started and days * 86400 > hold:
        publish = publish_line(name, renewed.chain)
        return Choice("serving", "held", "warning",
                      f"renewed TLS certificate {renewed.cert_path} matches no TLSA record at "
                      f"{name}; still serving the previous one ({days:.1f} days left), which "
                      f"does, until a record for the new one is published or {hold / 86400:g} "
                      f"days are left; publish beside the current record: {publish}", publish)
    return _mismatch("renewed", renewed, name, "error",
                     f"switching to the renewed TLS certificate {renewed.cert_path}, which "
                     f"matches no TLSA record at {name}: the previous one has {max(days, 0):.1f} "
                     "days left; senders that use DANE cannot deliver until a record is "
                     "published")


def _mismatch(serve: str, info: CertificateInfo, name: str, level: str, text: str) -> Choice:
    publish = publish_line(name, info.chain)
    return Choice(serve, "mismatch", level, f"{text}; publish: {publish}", publish)


def _parsed(values: tuple[str, ...]):
    for value in values:
        try:
            yield TlsaRecord.parse(value)
        except ValueError:
            continue  # a record that says nothing usable
