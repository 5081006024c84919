"""auth_limits - failed AUTH attempts per client and per login, counted in Redis.

SYNOPSIS
    AuthLimits(redis, limit=5, *, window=600.0, ipv6_prefix=64, timeout=2.0)
    await AuthLimits.check(ip: str, login: str | None) -> Verdict
    await AuthLimits.record_failure(ip: str, login: str | None) -> int    (the larger count)
    await AuthLimits.record_success(ip: str, login: str | None) -> None

    decide(ip, login, ip_failures, login_failures, limit) -> Verdict
    failure_delay(failures: int) -> float
    ip_key(ip, ipv6_prefix=64) -> str
    login_key(login) -> str

KEYS (smtpgate/keys.py: AUTHFAIL_IP, AUTHFAIL_LOGIN)
    smtpgate:authfail:ip:<address>       IPv4 address, or IPv6 network
                                          (<prefix>/<ipv6_prefix>)
    smtpgate:authfail:login:<login>      the login name, lower-cased
    Both hold a failure count and expire `window` seconds (10 minutes)
    after the last failure counted.

DESCRIPTION
    The session calls check() when it knows the login (after decoding the
    AUTH response, before asking Dovecot), record_failure() after Dovecot
    said no, then awaits failure_delay(count) before its 535 reply, and
    record_success() after 235. Each is one Redis round trip.

    decide() is the pure decision: when the client address (IPv6 clients
    counted per ipv6_prefix network, config ipv6_prefix, as they can change
    address within it at will) or the login has `limit` failures or more
    (config auth_failure_limit), FAIL with
        421 4.7.0 Error: too many authentication failures from <ip>
        421 4.7.0 Error: too many authentication failures
    (the first for the client, the second for the login), worded like
    Postfix's `421 4.7.0 Error: too many connections from <ip>`; the
    session replies and hangs up. The login is not echoed back: it is
    untrusted client input, and the reply would confirm that the account
    is under attack. The reason names the counter and its value. Else PASS.

    A failure is counted for the client and for the login; both windows
    restart with each failure (EXPIRE on every INCR), so a source that keeps
    failing stays locked out until it has been quiet for `window` seconds.
    A success clears only the login's counter: one good password must not
    wipe out a client's record of failures against other logins.

    failure_delay() is the wait before a 535 reply: none for no failure,
    then 1, 2, 4, 8 s, capped at 10 s.

    When Redis does not answer within `timeout` or fails, check() returns
    SKIP (Dovecot still verifies the password; refusing every login for a
    counter outage would lock out all users), record_failure() returns 1
    (the session still waits failure_delay(1) before its 535) and
    record_success() does nothing; each logs a warning. This module never
    sees a password.

    The per-login limit lets anyone lock a known login out for `window`
    seconds by failing against it `limit` times: the price of stopping a
    password spray spread over many addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from smtpgate.address import client_address
from smtpgate.lookups import redis_client
from smtpgate.lookups.keys import AUTHFAIL_IP, AUTHFAIL_LOGIN
from smtpgate.verdict import Outcome, Reply, Verdict

CHECK = "auth_limit"
WINDOW = 600.0
MAX_DELAY = 10.0

log = logging.getLogger("smtpgate.auth_limits")


def ip_key(ip: str, ipv6_prefix: int = 64) -> str:
    try:
        address = client_address(ip)
    except ValueError:
        return AUTHFAIL_IP + ip.strip()  # not an address: count it under its own text
    if address.version == 6:
        return AUTHFAIL_IP + str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))
    return AUTHFAIL_IP + str(address)


def login_key(login: str) -> str:
    return AUTHFAIL_LOGIN + login.strip().lower()


def failure_delay(failures: int) -> float:
    if failures <= 0:
        return 0.0
    return min(2.0 ** min(failures - 1, 16), MAX_DELAY)


def decide(
    ip: str, login: str | None, ip_failures: int, login_failures: int, limit: int
) -> Verdict:
    if ip_failures >= limit:
        return Verdict(
            CHECK, Outcome.FAIL,
            Reply(421, "4.7.0", f"Error: too many authentication failures from {ip}"),
            reason=f"{ip_failures} failed logins from [{ip}] (limit {limit})")
    if login and login_failures >= limit:
        return Verdict(
            CHECK, Outcome.FAIL, Reply(421, "4.7.0", "Error: too many authentication failures"),
            reason=f"{login_failures} failed logins for {login!r} (limit {limit})")
    return Verdict(
        CHECK, Outcome.PASS,
        reason=f"[{ip}] {ip_failures} and login {login_failures} failures (limit {limit})")


class AuthLimits:
    def __init__(
        self, redis, limit: int = 5, *, window: float = WINDOW, ipv6_prefix: int = 64,
        timeout: float = 2.0,
    ) -> None:
        self.redis = redis
        self.limit = limit
        self.window = max(1, int(window))
        self.ipv6_prefix = ipv6_prefix
        self.timeout = timeout

    async def check(self, ip: str, login: str | None) -> Verdict:
        keys = [ip_key(ip, self.ipv6_prefix)]
        if login:
            keys.append(login_key(login))
        try:
            async with asyncio.timeout(self.timeout):
                values = await redis_client.mget(self.redis, keys)  # per slot on a Cluster
        except Exception as exc:  # redis-py's errors, OSError and TimeoutError alike
            log.warning("auth failure counters unavailable: %s", _describe(exc))
            return Verdict(CHECK, Outcome.SKIP, reason=f"counters unavailable: {_describe(exc)}")
        counts = [_count(v) for v in values] + [0]
        return decide(ip, login, counts[0], counts[1] if login else 0, self.limit)

    async def record_failure(self, ip: str, login: str | None) -> int:
        """Count one failure; return the larger of the two counts (for failure_delay)."""
        keys = [ip_key(ip, self.ipv6_prefix)]
        if login:
            keys.append(login_key(login))
        try:
            async with asyncio.timeout(self.timeout):
                pipe = self.redis.pipeline(transaction=False)
                for key in keys:
                    pipe.incr(key)
                    pipe.expire(key, self.window)
                results = await pipe.execute()
        except Exception as exc:
            log.warning("cannot count failed login from [%s]: %s", ip, _describe(exc))
            return 1  # still a failure: the session keeps its shortest delay
        return max(_count(n) for n in results[::2])

    async def record_success(self, ip: str, login: str | None) -> None:
        if not login:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self.redis.delete(login_key(login))
        except Exception as exc:
            log.warning("cannot clear failed logins from [%s]: %s", ip, _describe(exc))


def _count(value) -> int:
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
