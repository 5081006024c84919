"""auth_probe - ask the auth service, before any client does, whether it accepts anyone.

SYNOPSIS
    await probe_auth(auth) -> AuthProbe
    AuthProbe(where, verdict, detail)      verdict: "refused", "accepted", "unknown"
    auth_finding(probe) -> Finding
    AuthGuard(auth, probe=None)
        await guard.safe() -> bool
    PROBE_PASSWORDS

DESCRIPTION
    probe_auth() logs in with a made-up user (a random name under the
    reserved .invalid domain) and, both at once, a random password and
    the password the dovecot/dovecot 2.3 image accepts out of the box
    ("pass": its dovecot.conf has `passdb { driver = static; args =
    password=pass }`, github.com/dovecot/docker, 2.3.21/dovecot.conf). A
    user database the owner configured refuses both. If either is
    accepted, AUTH would let anyone send through submission as anyone:
    the verdict is "accepted". Dovecot unreachable or failing temporarily
    leaves it "unknown".

    auth_finding() says what the probe means: ok, an error naming the
    cause and the fix (accepted), or a warning (unknown).

    AuthGuard holds a worker's verdict. safe() is true once a probe found
    the service refusing the made-up logins; until then each call probes
    again (one probe at a time, shared by the callers waiting), so a
    Dovecot that was not reachable at start is checked before the first
    client's password is given to it. An "accepted" verdict is logged as
    an error each time it is found; the session then answers 454 4.7.0
    (AUTH_TEMPFAIL) and nobody logs in until the user database is fixed.

    The probe's password is never logged; the probe is not counted as a
    client's failure (no client, no auth_limits).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

from smtpgate.lookups.dovecot_auth import AuthResult, DovecotAuth
from smtpgate.verdict import Finding

log = logging.getLogger("smtpgate.auth_probe")

# the dovecot/dovecot image's static passdb password (its README: "accepts any user with
# password pass")
IMAGE_DEFAULT_PASSWORD = "pass"
PROBE_PASSWORDS = ("random", IMAGE_DEFAULT_PASSWORD)
FIX = ("give Dovecot a user database of your own users (conf/dovecot/dovecot.conf: "
       "passdb passwd-file /etc/dovecot/users/passwd) and remove any passdb that accepts "
       "any user, such as the dovecot/dovecot image's `driver = static` with "
       "`args = password=pass`")


@dataclass(frozen=True, slots=True)
class AuthProbe:
    where: str  # host:port of the auth service
    verdict: str  # "refused", "accepted" or "unknown"
    detail: str = ""  # which password got in, or why the probe learned nothing


async def probe_auth(auth: DovecotAuth) -> AuthProbe:
    where = f"{auth.host}:{auth.port}"
    user = f"smtpgate-probe-{secrets.token_hex(8)}@probe.invalid"
    # at once: Dovecot delays each failure (auth_failure_delay, 2 s)
    results = await asyncio.gather(*(_try(auth, user, which) for which in PROBE_PASSWORDS))
    for which, result in zip(PROBE_PASSWORDS, results, strict=True):
        if result.ok:
            told = "a random password" if which == "random" else f'the password "{which}"'
            return AuthProbe(where, "accepted", f"the made-up user {user} with {told}")
    for result in results:
        if result.temporary:
            return AuthProbe(where, "unknown", result.reason or "temporary failure")
    return AuthProbe(where, "refused")


async def _try(auth: DovecotAuth, user: str, which: str) -> AuthResult:
    password = secrets.token_urlsafe(24) if which == "random" else which
    plain = b"\0" + user.encode() + b"\0" + password.encode()
    return await auth.authenticate("PLAIN", plain, client_ip="", local_ip="", secured=True)


def auth_finding(probe: AuthProbe) -> Finding:
    if probe.verdict == "refused":
        return Finding("ok", f"auth service {probe.where} refuses made-up logins")
    if probe.verdict == "accepted":
        return Finding("error", f"auth service {probe.where} accepts any login ({probe.detail} "
                                "got in): submission would relay for anyone; " + FIX)
    return Finding("warning", f"auth service {probe.where} cannot be asked yet "
                              f"({probe.detail}); AUTH waits until it refuses a made-up login")


class AuthGuard:
    def __init__(self, auth: DovecotAuth, probe: AuthProbe | None = None) -> None:
        self.auth = auth
        self._safe = probe is not None and probe.verdict == "refused"
        self._running: asyncio.Task[AuthProbe] | None = None

    async def safe(self) -> bool:
        if self._safe:
            return True
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(probe_auth(self.auth))
        probe = await asyncio.shield(self._running)
        finding = auth_finding(probe)
        if finding.level == "error":
            log.error("error: %s", finding.text)
        self._safe = probe.verdict == "refused"
        return self._safe
