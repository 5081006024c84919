"""tls - the server's TLS context, renewed when the certificate files change.

SYNOPSIS
    TlsProvider(cert_path, key_path)       raises TlsError naming the path
    provider.context(listener=MX) -> ssl.SSLContext   (the current one; cheap)
    provider.info -> CertificateInfo        names, not_after of the certificate in use
    provider.renewed -> CertificateInfo | None   renewed files read but not served yet
    provider.on_renewal = callback | None   when set, a renewal waits for adopt()
    provider.adopt() -> bool                serve the renewed files (False: none waiting)
    provider.dane -> Choice | None          the last DANE decision (smtpgate.service.dane_watch)
    load_tls(config) -> TlsProvider | None
    handshake_error(exc) -> str            why a handshake failed, never empty

DESCRIPTION
    certbot renews /etc/letsencrypt/live/NAME/*.pem in place (new symlink
    targets). context() looks at the files' modification times at most once
    a second and builds a new context when they changed, so new sessions get
    the new certificate without a restart; sessions already running keep
    theirs. A renewal that leaves an unreadable or mismatched pair keeps the
    old context and logs why. A key that is not the certificate's is
    named as such, with both files, rather than as OpenSSL's
    KEY_VALUES_MISMATCH.

    With on_renewal set (the DANE check, smtpgate.service.dane_watch),
    renewed files are read and kept ready but not served: on_renewal()
    is called, and adopt() serves them; a further change while they
    wait replaces them. reload_if_changed() is that look at the files,
    at once (SIGHUP, and the watch once a second).

    TLS 1.2 is the lowest version offered, as the image's
    smtpd_tls_protocols = >=TLSv1.2. The cipher suites depend on the
    listener (TLS 1.3's are all AEAD and the same everywhere):
    - MX (25): opportunistic TLS, where any cipher beats plain text, so
      the breadth of Postfix's smtpd_tls_ciphers = medium
      (tls_medium_cipherlist, "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH";
      no RC4 is left in OpenSSL 3): the CBC and static-RSA suites old
      MTAs need stay, behind the AEAD ones (the server's preference
      picks those first). Anonymous suites are left out (Postfix keeps
      them; TLS 1.3 has none, and a client offering only those is rare).
    - submission (587) and submissions (465): the users' own clients,
      which all speak AEAD, so Mozilla's "intermediate" profile (server
      side TLS guidelines 5.7): ECDHE (and DHE) with AES-GCM or
      ChaCha20-Poly1305, nothing else.

    handshake_error() is the reason in `SSL_accept error from ...: reason`:
    the exception's text, or, for the ones that have none (a client that
    connects and goes away), "lost connection" as Postfix says, "timed
    out", or the exception's name.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from smtpgate.config import Config
from smtpgate.policy.state import MX
from smtpgate.smtp.certificate import CertificateError, CertificateInfo, read_certificate

if TYPE_CHECKING:
    from smtpgate.smtp.dane import Choice

log = logging.getLogger("smtpgate.tls")


# Mozilla's server side TLS guidelines 5.7, "intermediate": AEAD suites only
SUBMISSION_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"))
# Postfix's medium breadth (HIGH:MEDIUM) behind the AEAD suites, which the server's
# preference picks first; anonymous, null and pre-shared-key suites are left out
MX_CIPHERS = f"{SUBMISSION_CIPHERS}:HIGH:MEDIUM:!aNULL:!eNULL:!PSK:!SRP"


class TlsError(Exception):
    pass


def build_context(cert_path: str, key_path: str, ciphers: str = MX_CIPHERS) -> ssl.SSLContext:
    return _load(cert_path, key_path, ciphers)[0]


def _load(cert_path: str, key_path: str,
          ciphers: str = MX_CIPHERS) -> tuple[ssl.SSLContext, CertificateInfo]:
    for path in (cert_path, key_path):
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise TlsError(f"TLS certificate file {path} does not exist") from None
        except OSError as exc:
            # certbot keeps live/ and archive/ root-only: a file behind a folder this user
            # may not enter is unreadable, not missing; say whose permission is lacking
            raise TlsError(f"TLS certificate file {path} cannot be read by uid {os.getuid()}"
                           f" (groups {' '.join(map(str, os.getgroups()))}): {exc.strerror}"
                           ) from None
    try:
        info = read_certificate(cert_path, key_path)
    except CertificateError as exc:
        raise TlsError(str(exc)) from None
    if not info.key_matches:
        raise TlsError(f"TLS key {key_path} does not match the certificate {cert_path}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers(ciphers)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"cannot load TLS certificate {cert_path} with key {key_path}: {exc}") from None
    return context, info


class TlsProvider:
    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.on_renewal: Callable[[], None] | None = None
        self.dane: Choice | None = None
        self._waiting: tuple[ssl.SSLContext, ssl.SSLContext, CertificateInfo] | None = None
        self._context, self._submission, self.info = self._read()
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[float, float]:
        try:
            return (os.stat(self.cert_path).st_mtime, os.stat(self.key_path).st_mtime)
        except OSError:
            return (0.0, 0.0)

    def _read(self) -> tuple[ssl.SSLContext, ssl.SSLContext, CertificateInfo]:
        context, info = _load(self.cert_path, self.key_path, MX_CIPHERS)
        submission, _ = _load(self.cert_path, self.key_path, SUBMISSION_CIPHERS)
        return context, submission, info

    @property
    def renewed(self) -> CertificateInfo | None:
        return None if self._waiting is None else self._waiting[2]

    def adopt(self) -> bool:
        if self._waiting is None:
            return False
        self._context, self._submission, self.info = self._waiting
        self._waiting = None
        log.info("loaded renewed TLS certificate %s", self.cert_path)
        return True

    def context(self, listener: str = MX) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            self.reload_if_changed()
        return self._context if listener == MX else self._submission

    def reload_if_changed(self) -> bool:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        try:
            self._waiting = self._read()
        except TlsError as exc:
            log.warning("warning: keeping the previous certificate: %s", exc)
            return False
        self._stamp = stamp
        if self.on_renewal is None:
            return self.adopt()
        self.on_renewal()
        return True


def load_tls(config: Config) -> TlsProvider | None:
    """The provider, or None when no certificate is configured and tls_optional allows it."""
    paths = config.tls_paths
    if paths is None:
        if config.tls_optional:
            log.warning("warning: no TLS certificate configured: STARTTLS is not offered")
            return None
        raise TlsError("no TLS certificate: set LETSENCRYPT or SMTPGATE_TLS_CERT and "
                       "SMTPGATE_TLS_KEY (or SMTPGATE_TLS_OPTIONAL=yes to run without STARTTLS)")
    try:
        return TlsProvider(*paths)
    except TlsError as exc:
        if config.tls_optional:
            log.warning("warning: %s: STARTTLS is not offered", exc)
            return None
        raise


def handshake_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if text:
        return text
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionError | ssl.SSLEOFError | EOFError):
        return "lost connection"
    return type(exc).__name__
