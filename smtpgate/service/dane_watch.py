"""dane_watch - a worker's watch over its certificate and the TLSA records that must match it.

SYNOPSIS
    DaneWatch(gate, lookup=lookup_tlsa, clock=None)
        await watch.run()          until cancelled: run_worker's task
        watch.poke()               look up again now (SIGHUP; a renewal calls it itself)
        await watch.check() -> float    one lookup and decision; seconds until the next

DESCRIPTION
    Once a second run() has the certificate provider (smtpgate.smtp.tls)
    look at its files, so a renewal is seen without waiting for a STARTTLS.
    While dane_check is on, the provider keeps a renewed certificate
    ready but not served (its on_renewal is this watch's poke()), and
    check() decides what to serve: it looks up the TLSA records of
    _25._tcp.HOSTNAME (smtpgate.lookups.tlsa) and applies
    smtpgate.smtp.dane.choose() to the certificate served and the renewed
    one; a choice to serve the renewed one is carried out with adopt().
    The choice is kept in provider.dane (the metrics read it).

    The lookups: at start, on poke() (a renewal, SIGHUP), and then every
    dane_recheck_time seconds or the records' TTL when that is shorter.
    A failed lookup (tempfail) is retried within a minute, and meanwhile
    the last answer that came decides, so a resolver's hiccup at the
    moment of a renewal does not give up a matching certificate.

    The log: a line when the state, the certificate served or the record
    to publish changes; a warning or error that stays is repeated once an
    hour (REMINDER). With dane_check off, a waiting renewal is served and
    nothing is looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable

from smtpgate.lookups.tlsa import TlsaAnswer, lookup_tlsa
from smtpgate.smtp.dane import Choice, choose
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.tls import TlsProvider

log = logging.getLogger("smtpgate.dane")

FILE_CHECK = 1.0  # seconds between looks at the certificate files
TEMPFAIL_RETRY = 60.0
REMINDER = 3600.0

Lookup = Callable[..., Awaitable[TlsaAnswer]]


class DaneWatch:
    def __init__(self, gate: Gate, lookup: Lookup = lookup_tlsa,
                 clock: Callable[[], datetime.datetime] | None = None) -> None:
        self.gate = gate
        self._lookup = lookup
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._wake = asyncio.Event()
        self._last_answer: TlsaAnswer | None = None
        self._logged: tuple | None = None
        self._logged_at = 0.0

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        next_check = 0.0
        while True:
            provider = self._provider()
            if provider is not None:
                provider.reload_if_changed()
            if self._wake.is_set() or time.monotonic() >= next_check:
                self._wake.clear()
                try:
                    next_check = time.monotonic() + await self.check()
                except Exception:  # the watch must outlive a bug in one check
                    log.exception("error: DANE check failed")
                    next_check = time.monotonic() + TEMPFAIL_RETRY
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FILE_CHECK):
                    await self._wake.wait()

    def _provider(self) -> TlsProvider | None:
        """The provider (a reload may have made a new one), hooked to this watch or not."""
        provider = self.gate.tls
        if provider is None:
            return None
        if self.gate.config.dane_check:
            provider.on_renewal = self.poke
        else:
            provider.on_renewal = None
            provider.dane = None
            provider.adopt()
        return provider

    async def check(self) -> float:
        config = self.gate.config
        provider = self._provider()
        if provider is None or not config.dane_check:
            return config.dane_recheck_time
        answer = await self._lookup(config.hostname, config.nameservers, config.dns_timeout)
        if provider is not self.gate.tls:  # a reload replaced it meanwhile: ask again
            self.poke()
            return config.dane_recheck_time
        decided_on = answer
        if answer.status == "tempfail" and self._last_answer is not None \
                and self._last_answer.name == answer.name:
            log.warning("warning: TLSA lookup of %s failed (%s); deciding on the last answer",
                        answer.name, answer.error)
            decided_on = self._last_answer
        elif answer.status != "tempfail":
            self._last_answer = answer
        choice = choose(decided_on, provider.info, provider.renewed, self._clock(),
                        config.dane_hold_time)
        if choice.serve == "renewed":
            provider.adopt()
        provider.dane = choice
        self._report(choice, provider)
        if answer.status == "tempfail":
            return min(TEMPFAIL_RETRY, config.dane_recheck_time)
        if answer.status == "ok":  # a cached answer's TTL may have come down to 0
            return max(1.0, min(config.dane_recheck_time, answer.ttl))
        return config.dane_recheck_time

    def _report(self, choice: Choice, provider: TlsProvider) -> None:
        key = (choice.state, choice.level, choice.publish, provider.info.not_after)
        now = time.monotonic()
        if key == self._logged and (choice.level == "info" or now - self._logged_at < REMINDER):
            return
        self._logged, self._logged_at = key, now
        if choice.level == "info":
            log.info("DANE: %s", choice.text)
        else:
            log.log(logging.ERROR if choice.level == "error" else logging.WARNING,
                    "%s: DANE: %s", choice.level, choice.text)
