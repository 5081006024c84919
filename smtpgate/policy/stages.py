"""stages - each stage's checks, in order: facts fetched, decisions taken, actions applied.

SYNOPSIS
    await Policy.create(config, auth=None, dry_run=False, auth_probe=None) -> Policy
    policy.open(client: Client) -> ClientState
    await policy.connect(state) -> Reply | GreetWait | None     None: send the banner
    await policy.screened(state, received: bytes, delay: float) -> Reply | None
    await policy.helo(state, name) -> Reply | None
    await policy.mail(state, path, login) -> Reply | None
    await policy.rcpt(state, path, login, smtputf8) -> Reply | None   None: accept
    await policy.protocol(state, test, line, pending, after, esmtp) -> Reply | None
    await policy.starttls(state) -> Reply | None                  before the handshake: 454
    await policy.tls_started(state, resumed) -> Reply | None      after it: 421, then close
    await policy.tls_service_refused(client) -> bool              465, before its handshake
    await policy.auth_allowed(state) -> Reply | None              a 421 closes, a 450 not
    await policy.authenticate(state, mechanism, plain, login, secured) -> AuthOutcome
    policy.close_session(state) ; await policy.close()
    policy.evidence     refused sessions' records (smtpgate.lookups.evidence), kept by the engine
    policy.shadow       the shadow rules (smtpgate.policy.shadow), None when off
    await policy.start_shadow()      begin, change or end them as Config.shadow says
    STAGES              each stage's checks, in the order they run (README's table says the same)

DESCRIPTION
    Facts in, decisions out. The engine passes what it knows (the client's
    addresses and listener, the HELO name, the parsed path, the login) and
    gets a reply to send or None; what the policy learns along the way
    stays in the ClientState it handed out (smtpgate.policy.state). It
    writes to no socket and reads none: the greet wait is the engine's, at
    the policy's request (GreetWait). The checks themselves are pure
    (smtpgate.checks.*); this module is the I/O edge around them: it asks
    the tables (Redis), the resolver (DNS), the DNSBL querier, the
    screening cache, the counters and the authenticator, hands the facts to
    each decide(), and turns verdicts into replies. Every verdict taken is
    kept in state.record (the decision record, bounded by
    smtpgate.policy.state).

    On the MX listener, in postscreen's order at connect, after the
    operator's timed overrides (an allow as a PSA permit, a deny answered
    at once; read with the PSA keys, from memory when the table cache is
    loaded): the permanent
    access list (mynetworks, PSA; a drop answers before anything is
    counted), the connection limits, the screening cache, then pregreet and
    DNSBL together during the greet wait. `drop` answers at
    once and hangs up; `enforce` keeps the session and answers every RCPT
    with the reject, so the log names sender and recipient; `ignore` logs.
    Client (FCrDNS, REV) and HELO (HLO, DNS) restrictions are reported at
    RCPT when smtpd_delay_reject is on (Postfix's default), else at once.
    The FCrDNS lookups start once screening has let the client through.

    Submission listeners (587, 465) skip the access list (a PSA reject
    included: postscreen only ever guarded port 25, and a network blocked
    there must not lock its own users out), screening, FCrDNS and HELO
    checks; the connection limits apply. They require AUTH before MAIL and
    check the sender against LOGMAP.

    anvil's event rates (smtpgate.checks.rate_limits, counted by
    smtpgate.lookups.event_rates) come first at STARTTLS, AUTH, MAIL and
    RCPT, as in Postfix's smtpd: the client's (spared for
    client_event_limit_exceptions) and, on submission, the login's, in one
    round trip; with every limit at 0 (the default) nothing is sent.

    A lookup that cannot be answered (Redis down, DNS timing out) is a
    temporary failure: 421 4.3.0 at connect, 451 4.3.0 at RCPT; never a
    permit.

    Shadow rules (Config.shadow) and replay records (replay_records): each
    check's verdict, with the facts it was decided on as plain values
    (smtpgate.policy.decisions), is kept in the session's state for its
    replay record and handed to policy.shadow, which decides it again
    under the candidate rules and changes nothing here. With both off
    nothing of that is built: one test of `self.watching` per check.

    A dry_run policy (`smtpgate explain --ip`) decides with the same
    facts and writes nothing: the connection counts are read, not
    counted (ConnectionCounter.peek), and the screening cache is read only.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from smtpgate import replies
from smtpgate.address import Path
from smtpgate.checks import (
    access_list,
    client_fcrdns,
    destination,
    greylist,
    helo,
    limits,
    override,
    pregreet,
    protocol,
    rate_limits,
    recipient,
    sender,
    sender_login,
)
from smtpgate.checks import dnsbl as dnsbl_check
from smtpgate.checks.screening_action import hangs_up
from smtpgate.config import Config
from smtpgate.dnsbl_sites import parse_sites
from smtpgate.lookups import keys, redis_client
from smtpgate.lookups.auth_limits import AuthLimits, failure_delay
from smtpgate.lookups.auth_probe import AuthGuard, AuthProbe
from smtpgate.lookups.client_dns import client_hostname_soon, helo_facts
from smtpgate.lookups.dnsbl import DnsblQuerier
from smtpgate.lookups.event_rates import EventRateError, EventRates
from smtpgate.lookups.evidence import EvidenceStore
from smtpgate.lookups.greylist_store import GreylistError, GreylistStore
from smtpgate.lookups.resolver import Resolver
from smtpgate.lookups.screening_cache import (
    NO_TESTS,
    ConnectionCounter,
    ScreeningCache,
    ScreeningStoreError,
    allowlisted,
    passed,
)
from smtpgate.lookups.tables import CONNECT_TEMPFAIL, RCPT_TEMPFAIL, TableError, Tables
from smtpgate.policy.shadow import Shadow
from smtpgate.policy.state import MX, Client, ClientState, GreetWait
from smtpgate.verdict import Outcome, Reply, Verdict

log = logging.getLogger("smtpgate.policy")

SCREENING_TESTS = ("pregreet", "dnsbl")
REDIS_CONNECTIONS = 2000  # per worker, at most: each call holds one for well under a ms
TEMPFAIL = "tempfail"

# The checks of each stage, in the order they run; README's stage table is tested against it.
# Every stage runs its checks from here, one method per check (_CONNECT_STEPS and
# _SCREENING_STEPS, _HELO_STEPS, _MAIL_STEPS, _RCPT_STEPS); at connect the screening tests
# (pregreet, dnsbl) are decided after the greet wait, in screened(), the others before it. At RCPT,
# "screening" is an `enforce` finding of the access list or a screening test, and
# client_fcrdns, helo and sender are those restrictions' findings reported late
# (smtpd_delay_reject); on submission only sender_login, sender, destination and recipient
# apply. "rate_limits" is anvil's count of the stage's event (smtpgate.checks.rate_limits),
# first as in Postfix's smtpd; it costs nothing while its limits are 0.
STAGES: dict[str, tuple[str, ...]] = {
    "connect": ("override", "access_list", "limits", "screening_cache", "pregreet", "dnsbl"),
    "helo": ("helo",),
    "starttls": ("rate_limits",),
    "auth": ("rate_limits", "auth_limit"),
    "mail": ("rate_limits", "sender_login", "sender"),
    "rcpt": ("rate_limits", "screening", "client_fcrdns", "helo", "sender", "destination",
             "recipient", "greylist"),
    "data": (),
}


@dataclass(slots=True)
class Request:
    """What one MAIL or RCPT asks, and the facts its checks share."""

    path: Path
    login: str | None
    smtputf8: bool = False
    facts: Any = None  # RCPT: the tables' answer for the recipient


@dataclass(slots=True)
class Screening:
    """What the greet wait brought, and what the screening tests found of it."""

    received: bytes  # what the client said before the banner
    delay: float
    result: Any  # the DNSBL score (smtpgate.lookups.dnsbl), None when not queried
    passes: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    outcome: Reply | None = None  # the reply to hang up with


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    reply: Reply
    user: str | None = None  # the authenticated name (Dovecot's canonical one) on success


class Policy:
    def __init__(self, config: Config, tables: Tables, resolver: Resolver,
                 redis_client: Any, auth: Any = None, dry_run: bool = False,
                 auth_probe: AuthProbe | None = None) -> None:
        self.config = config
        self.dry_run = dry_run  # explain: decide, count and cache nothing
        self.tables = tables
        self.resolver = resolver
        self.redis = redis_client
        self.auth = auth  # the authenticator (Dovecot), None where submission is off
        # no password reaches Dovecot before it refused a made-up login
        self.auth_guard = AuthGuard(auth, auth_probe) if auth is not None else None
        self.sites = parse_sites(" ".join(config.dnsbl_sites))
        self.querier = DnsblQuerier(
            resolver, self.sites, config.dnsbl_timeout, threshold=config.dnsbl_threshold,
            allowlist_threshold=config.dnsbl_allowlist_threshold)
        self.cache = ScreeningCache(redis_client, timeout=config.redis_timeout,
                                    read_only=dry_run)
        self.counter = ConnectionCounter(redis_client, ipv6_prefix=config.ipv6_prefix,
                                         timeout=config.redis_timeout,
                                         rate_window=config.anvil_rate_time_unit)
        self.auth_limits = AuthLimits(
            redis_client, config.auth_failure_limit, ipv6_prefix=config.ipv6_prefix,
            timeout=config.redis_timeout)
        self.event_rates = EventRates(redis_client, timeout=config.redis_timeout)
        self.redis_ok = True  # the connection counters' last round trip, for /healthz
        self.greylist = greylist_store(redis_client, config)
        self.greylist_counts: Counter[str] = Counter()  # store answers, for the metrics
        self.evidence = EvidenceStore(  # refused sessions' records, for explain --session
            redis_client, ttl=config.session_record_ttl,
            size_limit=config.session_record_size_limit, timeout=config.redis_timeout,
            memory=record_memory(config))
        self.shadow: Shadow | None = None  # made by start_shadow(), when configured
        # whether checks hand on their facts: to the shadow rules, or to the replay record
        self.watching = config.replay_records and not dry_run
        self._refresher: asyncio.Task | None = None
        self._shadow_task: asyncio.Task | None = None

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: new settings for the next decisions; Redis clients and counters stay."""
        self.config = config
        self.counter.rate_window_ms = max(1, int(config.anvil_rate_time_unit * 1000))
        self.resolver.close()  # once the lookups in flight end
        self.resolver = Resolver(config.nameservers, config.dns_timeout)
        self.sites = parse_sites(" ".join(config.dnsbl_sites))
        self.querier = DnsblQuerier(
            self.resolver, self.sites, config.dnsbl_timeout, threshold=config.dnsbl_threshold,
            allowlist_threshold=config.dnsbl_allowlist_threshold)
        self.auth_limits = AuthLimits(
            self.redis, config.auth_failure_limit, ipv6_prefix=config.ipv6_prefix,
            timeout=config.redis_timeout)
        self.evidence.ttl = config.session_record_ttl
        self.evidence.size_limit = config.session_record_size_limit
        self.evidence.memory = record_memory(config)
        self.greylist = greylist_store(self.redis, config)
        self.watching = self.shadow is not None or (config.replay_records and not self.dry_run)
        if self.shadow is not None or config.shadow is not None:
            # held, so the task is not collected before it ran
            self._shadow_task = asyncio.get_running_loop().create_task(self.start_shadow())

    async def start_shadow(self) -> None:
        """The shadow rules of self.config (None: off), begun or ended; a reload's too."""
        old, candidate = self.shadow, None if self.dry_run else self.config.shadow
        self.watching = self.config.replay_records and not self.dry_run
        if old is not None and candidate is not None:
            old.config = candidate  # the candidate keys' copy goes on
            self.watching = True
            return
        if old is not None:
            self.shadow = None
            self.evidence.stream = None
            await old.stop()
        if candidate is not None:
            shadow = Shadow(candidate, self.redis)
            await shadow.start()
            self.shadow = shadow
            self.evidence.stream = shadow.take_log
            log.info("shadow rules: on; %d candidate keys", len(shadow.refresher.tables))
        self.watching = self.shadow is not None or (self.config.replay_records
                                                     and not self.dry_run)

    @classmethod
    async def create(cls, config: Config, auth: Any = None, dry_run: bool = False,
                     auth_probe: AuthProbe | None = None) -> Policy:
        tables = Tables.from_config(config)
        await tables.start()
        resolver = Resolver(config.nameservers, config.dns_timeout)
        # the sessions' calls share one pipelined connection (redis_client.connect_hot); the
        # pool bounds the redis-py client behind it (SCAN, XRANGE, a Cluster's calls): room for
        # a burst (redis-py's default refuses the 101st call at once: a 421), without a
        # blocking pool's cost on every call
        client = redis_client.connect_hot(config.redis, config.redis_timeout, decode=False,
                                          max_connections=REDIS_CONNECTIONS, wait=False)
        policy = cls(config, tables, resolver, client, auth, dry_run, auth_probe)
        policy._refresher = asyncio.get_running_loop().create_task(
            policy.counter.run_refresher())
        await policy.start_shadow()
        return policy

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.shadow is not None:
            await self.shadow.stop()
        await self.counter.flush()
        await self.evidence.close()
        await self.tables.close()
        await self.redis.aclose()
        self.resolver.close()

    # --- helpers ---------------------------------------------------------------------------

    def open(self, client: Client) -> ClientState:
        return ClientState(client)

    def _mynetworks(self, client: Client) -> tuple:
        """mynetworks, except for a loopback address from a PROXY header: no balancer
        forwards such a client, and a peer in proxy_trusted that is not really the balancer
        must not claim to be this host and relay through it."""
        return () if _proxied_loopback(client) else self.config.mynetworks

    def _spared(self, client: Client) -> bool:
        """client_event_limit_exceptions, with mynetworks' caution about a proxied loopback."""
        return not _proxied_loopback(client) and rate_limits.exempt(
            client.ip, self.config.event_limit_exceptions)

    def _trusted_network(self, client: Client) -> bool:
        # access_list.decide()'s PERMIT for mynetworks, without the verdict it would make
        return access_list.network_of(client.ip, self._mynetworks(client)) is not None

    def _decided(self, state: ClientState, verdict: Verdict, facts: dict) -> None:
        """A check's verdict and its facts, for the replay record and the shadow rules."""
        if self.config.replay_records and not self.dry_run:
            state.keep_facts(verdict, facts)
        if self.shadow is not None:
            self.shadow.weigh(state, verdict, facts)

    @staticmethod
    def _note(state: ClientState, verdict: Verdict) -> Verdict:
        """Keep the verdict in the session's record; log what a postmaster needs to see.

        Passes go to the debug log: at a few hundred sessions a second, one line per check
        per session would cost more than the checks themselves. A failure stays at info, a
        DNSBL drop's included: its rank and the sites that listed the client are what
        postscreen logs too ("DNSBL rank N for [ip]:port"), and the NOQUEUE line names only
        the top zone (or the reply map's text).
        """
        state.note(verdict)
        if verdict.outcome is Outcome.FAIL or verdict.ignored:
            log.info("%s %s: %s", verdict.check, verdict.outcome, verdict.logged)
        elif verdict.reason and verdict.outcome is not Outcome.SKIP and log.isEnabledFor(10):
            log.debug("%s %s: %s", verdict.check, verdict.outcome, verdict.reason)
        return verdict

    # --- connect ---------------------------------------------------------------------------

    async def connect(self, state: ClientState) -> Reply | GreetWait | None:
        """postscreen's order (STAGES["connect"]): the operator's timed overrides and the
        permanent access list, then the counts, then the screening cache; the screening tests
        themselves are decided after the greet wait, by screened(), or at once when no wait
        is due.

        A client the access list drops is answered before it is counted: from the table
        cache that costs no Redis round trip, which is what makes a flood of denylisted
        clients cheap.
        """
        client = state.client
        state.trusted = self._trusted_network(client)
        state.rate_exempt = self._spared(client)
        for check in _BEFORE_GREET_WAIT:
            outcome = await _CONNECT_STEPS[check](self, state)
            if outcome is not _GO_ON:
                return outcome
        return await self.screened(state, b"", 0.0)

    async def _connect_override(self, state: ClientState) -> Any:
        """The operator's timed overrides (smtpgate allow / deny), port 25 only, with the
        access list's table facts in the same lookup. An allow is a PSA permit (no access
        list, no screening; the counts still apply); a deny answers in place of the banner,
        before anything is counted. Without an override nothing is noted for it (a dry run
        notes "no override", for explain)."""
        client = state.client
        if client.listener != MX:
            return _GO_ON
        ip = client.ip
        facts = await self._table_facts(state)
        if facts is None:
            return CONNECT_TEMPFAIL
        if facts.override is not None or self.dry_run:
            verdict = self._note(state, override.decide(ip, facts.override, time.time()))
            if verdict.outcome is Outcome.PERMIT:
                log.info("%s %s: %s", verdict.check, verdict.outcome, verdict.reason)
                state.permitted = True
            elif verdict.failed:
                return verdict.reply
        return _GO_ON

    async def _table_facts(self, state: ClientState) -> Any:
        """The connect stage's table answers (overrides, PSA, REV) in one lookup, kept in
        the state; None when the tables cannot answer (logged: the client hears 421)."""
        try:
            facts = state.table_facts = await self.tables.connect_facts(state.client.ip)
        except TableError as exc:
            self.redis_ok = False
            log.warning("warning: %s: connect from %s: %s", CONNECT_TEMPFAIL, state.label, exc)
            return None
        if facts.rev is not None:
            state.rev_ip, state.rev_key = facts.rev.value, facts.rev.key.partition(":")[2]
        return facts

    async def _connect_access_list(self, state: ClientState) -> Any:
        """postscreen_access_list (mynetworks, PSA): port 25 only, as postscreen guarded
        only port 25; a network denied there keeps its users' submission on 587 and 465."""
        client = state.client
        if client.listener != MX or state.permitted:
            return _GO_ON
        facts = state.table_facts or await self._table_facts(state)  # the override step's
        if facts is None:
            return CONNECT_TEMPFAIL
        ip, port = client.ip, client.port
        psa = facts.psa
        if psa is not None and psa.invalid:
            return CONNECT_TEMPFAIL
        psa_key = psa.key.partition(":")[2] if psa else ""  # the name, not the Redis key
        mynetworks = self._mynetworks(client)
        verdict = self._note(state, access_list.decide(
            ip, psa.value if psa else None, mynetworks=mynetworks,
            action=self.config.access_reject_action, psa_key=psa_key))
        if self.watching:
            self._decided(state, verdict, {
                "ip": ip, "mynet": mynetworks is self.config.mynetworks,
                "psa": [psa_key, psa.value] if psa else None})
        if verdict.outcome is Outcome.PERMIT:
            state.permitted = True
        elif verdict.failed:
            if hangs_up(verdict):
                log.info("DENYLISTED [%s]:%s", ip, port)
                return verdict.reply
            state.enforced = verdict.reply
        return _GO_ON

    async def _connect_limits(self, state: ClientState) -> Any:
        """The connection limits: every listener, as anvil counts for every smtpd. What
        follows is postscreen's, on port 25 only, and not for a client the access list let
        through."""
        client = state.client
        ip = client.ip
        try:
            state.lease = await (self.counter.peek(ip) if self.dry_run
                                 else self.counter.connect(ip))
        except ScreeningStoreError as exc:
            self.redis_ok = False
            log.warning("warning: %s: connect from %s: %s", CONNECT_TEMPFAIL, state.label, exc)
            return CONNECT_TEMPFAIL
        self.redis_ok = True
        verdict = self._note(state, limits.decide(
            ip, client_count=state.lease.client_count, client_rate=state.lease.client_rate,
            total=state.lease.total, count_limit=self.config.client_connection_count_limit,
            rate_limit=self.config.client_connection_rate_limit,
            connection_limit=self.config.connection_limit,
            hostname=self.config.hostname, exempt=state.rate_exempt,
            window=self.config.anvil_rate_time_unit))
        if self.watching:
            self._decided(state, verdict, {
                "ip": ip, "count": state.lease.client_count, "rate": state.lease.client_rate,
                "total": state.lease.total, "exempt": state.rate_exempt})
        if verdict.failed:
            return verdict.reply
        if client.listener != MX:
            return None
        if state.permitted:
            self._look_up_name(state)
            return None
        return _GO_ON

    def _look_up_name(self, state: ClientState) -> None:
        """FCrDNS in the background, for RCPT and XCLIENT NAME: once screening has let the
        client through, as smtpd looks up a client postscreen handed over. A client refused
        at connect (most first contacts: DNSBL) costs no PTR and A queries."""
        if not state.trusted and state.fcrdns_task is None and state.fcrdns is None:
            # a future the resolver's callbacks complete: no task and no coroutine per client
            state.fcrdns_task = client_hostname_soon(
                self.resolver, state.client.ip, asyncio.get_running_loop())
            state.fcrdns_task.add_done_callback(state.name_found)

    async def _connect_screening_cache(self, state: ClientState) -> Any:
        """postscreen's cache: all tests passed before, or a greet wait (with the DNSBL
        queries under way), or the tests decided at once."""
        ip, port = state.client.ip, state.client.port
        entries = state.cached_passes  # read with the connection count, in one round trip
        now = time.time()
        tests = [t for t in SCREENING_TESTS if self._enabled(t)] or [NO_TESTS]
        if allowlisted(entries, tests, now):
            log.info("PASS OLD [%s]:%s", ip, port)
            self._look_up_name(state)
            return None
        dnsbl_wanted = bool(self.sites) and not passed(entries, "dnsbl", now)
        state.greet_tested = self.config.greet_wait > 0 and not passed(entries, "pregreet", now)
        if dnsbl_wanted:
            state.settle = self.querier.settling(ip)  # a future: no task per client
            state.dnsbl_asked = True  # greylisting reads the zones' answers at RCPT
        if not state.greet_tested:
            return _GO_ON
        decided = None
        if state.settle is not None:
            decided = state.settle.get_loop().create_future()  # no getpid(): Python 3.11
            state.settle.add_done_callback(functools.partial(self._settled, state, decided))
        return GreetWait(self._greet_wait_now(state), decided, state.settle)

    def _settled(self, state: ClientState, decided: asyncio.Future,
                 settle: asyncio.Future) -> None:
        if decided.done() or settle.cancelled() or settle.exception() is not None:
            return
        verdict = self._dnsbl_verdict_of(state, settle.result())
        if verdict.outcome is Outcome.PERMIT or hangs_up(verdict):
            decided.set_result(True)

    async def screened(self, state: ClientState, received: bytes,
                       delay: float) -> Reply | None:
        """The screening tests of STAGES["connect"], in its order: what the client said too
        early (pregreet) and the DNSBL score, after the greet wait."""
        ip, port = state.client.ip, state.client.port
        settle, state.settle = state.settle, None
        try:
            if settle is not None and state.greet_tested and not settle.done():
                result = self.querier.snapshot(ip)  # postscreen: the score as it stands
            elif settle is not None:
                result = await settle
            else:
                result = None
        finally:
            if settle is not None and not settle.done():
                settle.cancel()
        screening = Screening(received, delay, result)
        for check in _AFTER_GREET_WAIT:
            _SCREENING_STEPS[check](self, state, screening)
        passes, failed, outcome = screening.passes, screening.failed, screening.outcome
        if not passes and not failed and not any(map(self._enabled, SCREENING_TESTS)):
            passes = {NO_TESTS: self.config.greet_ttl}  # nothing to test: PASS OLD next time
        state.screening_failed += tuple(failed)  # written when the session ends
        if not failed and passes:
            if state.screening_passes:
                state.screening_passes.update(passes)
            else:
                state.screening_passes = passes  # the screening's own: no copy kept
        if outcome is None and not failed:
            log.info("PASS NEW [%s]:%s", ip, port)
        if outcome is None:
            self._look_up_name(state)
        return outcome

    def _screen_pregreet(self, state: ClientState, screening: Screening) -> None:
        if state.greet_tested:
            config = self.config
            ip, port = state.client.ip, state.client.port
            verdict = self._note(state, pregreet.decide(
                screening.received, screening.delay, ip, port,
                action=config.greet_action, ttl=config.greet_ttl))
            if self.watching:
                self._decided(state, verdict, {
                    "ip": ip, "port": port, "delay": screening.delay,
                    "received": screening.received.decode("latin-1")})
            screening.outcome = self._apply(state, verdict, screening) or screening.outcome

    def _screen_dnsbl(self, state: ClientState, screening: Screening) -> None:
        result = screening.result
        if result is None:
            return
        verdict = self._note(state, self._dnsbl_verdict_of(state, result))
        if self.watching:
            self._decided(state, verdict, dnsbl_facts(result))
        if verdict.outcome is Outcome.PERMIT:
            screening.passes = dict.fromkeys(SCREENING_TESTS, verdict.ttl or 60.0)
            state.permitted = True
        else:
            screening.outcome = self._apply(state, verdict, screening) or screening.outcome

    def _enabled(self, test: str) -> bool:
        if test == "dnsbl":
            return bool(self.sites)
        if test == "pregreet":
            return self.config.greet_wait > 0
        return True

    @staticmethod
    def _apply(state: ClientState, verdict: Verdict, screening: Screening) -> Reply | None:
        """A screening verdict under its action: a reply to hang up with, or None."""
        if verdict.outcome is Outcome.PASS:
            if verdict.ttl:
                screening.passes[verdict.check] = verdict.ttl
            elif verdict.ignored:
                screening.failed.append(verdict.check)
            return None
        if not verdict.failed:
            return None
        screening.failed.append(verdict.check)
        if hangs_up(verdict):
            return verdict.reply
        state.enforced = state.enforced or verdict.reply
        return None

    def _greet_wait_now(self, state: ClientState) -> float:
        """postscreen_greet_wait = ${stress?{2}:{6}}s: shorter when the gate is busy."""
        lease = state.lease
        busy = lease is not None and lease.total >= 0.8 * self.config.connection_limit
        if busy:
            return min(self.config.greet_wait, self.config.greet_wait_under_stress)
        return self.config.greet_wait

    def _dnsbl_verdict_of(self, state: ClientState, result) -> Verdict:
        """The verdict on this result, taken once: the greet wait's early end and the
        screening that follows it judge the same result."""
        seen = state.dnsbl_seen
        if seen is not None and seen[0] is result:
            return seen[1]
        verdict = self._dnsbl_verdict(result)
        state.dnsbl_seen = (result, verdict)
        return verdict

    def _dnsbl_verdict(self, result) -> Verdict:
        config = self.config
        return dnsbl_check.decide(
            result, self.sites, threshold=config.dnsbl_threshold,
            allowlist_threshold=config.dnsbl_allowlist_threshold,
            action=config.dnsbl_action, reply_map=config.dnsbl_reply_map)

    # --- HELO ------------------------------------------------------------------------------

    async def helo(self, state: ClientState, name: str) -> Reply | None:
        state.helo_reject = None
        for check in STAGES["helo"]:
            reply = await _HELO_STEPS[check](self, state, name)
            if reply is not None:
                return reply
        return None

    async def _helo_name(self, state: ClientState, name: str) -> Reply | None:
        if state.client.listener != MX or state.trusted:
            return None
        try:
            hit = await self.tables.helo(name.lower())
            access = TEMPFAIL if hit is not None and hit.invalid else (hit.value if hit else None)
        except TableError:
            access = TEMPFAIL
        dns = None
        if helo.needs_dns(name) and access is None:
            dns = await helo_facts(self.resolver, name.rstrip("."))
        verdict = self._note(state, _same_as_before(state, helo.decide(
            name, access=access, dns=dns, unknown_code=self.config.unknown_helo_reject_code)))
        if self.watching:
            facts = {"name": name, "access": access}
            if dns is not None:  # left out when not asked: the shadow cannot decide without
                facts["dns"] = [dns.status, dns.ttl, list(dns.addresses), list(dns.mx)]
            self._decided(state, verdict, facts)
        if not verdict.failed:
            return None
        if self.config.smtpd_delay_reject:
            state.helo_reject = verdict.reply
            return None
        return verdict.reply

    # --- anvil's event rates ---------------------------------------------------------------

    def _rate_limits_of(self, state: ClientState, event: str,
                        login: str | None = None) -> list[rate_limits.Limit]:
        """The limits that count this event: the client's unless it is exempt, the login's."""
        config = self.config
        found = []
        limit = getattr(config, rate_limits.CLIENT_SETTINGS[event])
        if limit > 0 and not state.rate_exempt:
            found.append(rate_limits.Limit(
                event, limit, limits.client_key(state.client.ip, config.ipv6_prefix)))
        if login and event in rate_limits.LOGIN_SETTINGS:
            login_event, name = rate_limits.LOGIN_SETTINGS[event]
            limit = getattr(config, name)
            if limit > 0:
                found.append(rate_limits.Limit(login_event, limit, login.lower()))
        return found

    def _window(self, event: str) -> float:
        if event in (rate_limits.LOGIN_MESSAGE, rate_limits.LOGIN_RECIPIENT):
            return self.config.login_rate_time_unit
        return self.config.anvil_rate_time_unit

    async def _count_event(self, state: ClientState, event: str,
                           login: str | None = None) -> Reply | None:
        """Count the event for its client and login in one round trip; the reply of the
        first limit it passes. Redis failing lets the event through, as Postfix's smtpd
        does when anvil cannot be reached; a dry run reads the counts and writes none."""
        counted = self._rate_limits_of(state, event, login)
        if not counted:
            return None
        rate_keys = [keys.event_rate_key(c.event, c.key) for c in counted]
        windows = [self._window(c.event) for c in counted]
        try:
            if self.dry_run:
                rates = [await self.event_rates.peek(key) + 1 for key in rate_keys]
            else:
                rates = await self.event_rates.count(list(zip(rate_keys, windows, strict=True)))
        except EventRateError as exc:
            log.warning("warning: %s: %s rate not counted: %s", state.label, event, exc)
            return None
        for limit, rate, window in zip(counted, rates, windows, strict=True):
            verdict = self._note(state, rate_limits.decide(
                limit.event, rate, limit.limit, ip=state.client.ip, name=state.client_name,
                login=login or "", hostname=self.config.hostname, window=window))
            if verdict.failed:
                return verdict.reply
        return None

    async def _tls_sessions_so_far(self, client: Client, name: str,
                                   spared: bool) -> Verdict | None:
        """The look before a handshake: the client's new TLS sessions read, not counted
        (the handshake that follows is counted by tls_started()); None when not limited."""
        limit = self.config.client_new_tls_session_rate_limit
        if limit <= 0 or spared or self.dry_run:
            return None
        key = keys.event_rate_key(rate_limits.NEW_TLS,
                                  limits.client_key(client.ip, self.config.ipv6_prefix))
        try:
            rate = await self.event_rates.peek(key)
        except EventRateError as exc:
            log.warning("warning: %s[%s]: TLS session rate not read: %s", name, client.ip, exc)
            return None
        return rate_limits.starttls_refused(rate, limit, ip=client.ip, name=name,
                                            window=self.config.anvil_rate_time_unit)

    async def starttls(self, state: ClientState) -> Reply | None:
        """Before the STARTTLS handshake: 454 once the client has had too many new TLS
        sessions; the session goes on without TLS."""
        verdict = await self._tls_sessions_so_far(state.client, state.client_name,
                                                  state.rate_exempt)
        if verdict is None:
            return None
        self._note(state, verdict)
        return verdict.reply if verdict.failed else None

    async def tls_service_refused(self, client: Client) -> bool:
        """Port 465, before its handshake: whether the client has had too many new TLS
        sessions already, so that no handshake is started (Postfix's wrapper mode closes
        the connection without a word then)."""
        verdict = await self._tls_sessions_so_far(client, "unknown", self._spared(client))
        return verdict is not None and verdict.failed

    async def tls_started(self, state: ClientState, resumed: bool) -> Reply | None:
        """After a handshake (STARTTLS, or port 465's): a new session is counted, and one
        too many ends the session with 421; a resumed one is not counted (Postfix's rule)."""
        if resumed:
            return None
        return await self._count_event(state, rate_limits.NEW_TLS)

    # --- MAIL ------------------------------------------------------------------------------

    async def mail(self, state: ClientState, path: Path, login: str | None) -> Reply | None:
        state.sender_reject = None
        state.sender = path.address
        if state.greylist_seen is not None and "" not in state.greylist_seen:
            state.greylist_seen = None  # a new transaction asks again (the delay may be over)
        request = Request(path, login)
        for check in STAGES["mail"]:
            reply = await _MAIL_STEPS[check](self, state, request)
            if reply is not None:
                return reply
        return None

    async def _mail_rate_limits(self, state: ClientState, request: Request) -> Reply | None:
        return await self._count_event(state, rate_limits.MESSAGE, request.login)

    async def _mail_sender_login(self, state: ClientState, request: Request) -> Reply | None:
        if state.client.listener == MX:
            return None
        if request.login is None:
            return replies.AUTH_REQUIRED
        verdict = await self._sender_login(state, request.path, request.login)
        return verdict.reply if verdict.failed else None

    async def _mail_sender(self, state: ClientState, request: Request) -> Reply | None:
        if request.path.null:
            return None
        utf8 = "SMTPUTF8" in request.path.params
        verdict = self._note(state, sender.decide(request.path, smtputf8=utf8))
        if self.watching:
            self._decided(state, verdict, {"sender": request.path.address, "utf8": utf8})
        if verdict.failed and not self.config.smtpd_delay_reject:
            return verdict.reply
        state.sender_reject = verdict.reply if verdict.failed else None
        return None

    async def _sender_login(self, state: ClientState, path: Path, login: str) -> Verdict:
        owners: object
        hit = None
        try:
            hit = await self.tables.logmap(path.address)
            owners = (sender_login.TEMPFAIL if hit is not None and hit.invalid
                      else frozenset(hit.targets) if hit else None)
        except TableError:
            owners = sender_login.TEMPFAIL
        verdict = self._note(state, sender_login.decide(
            path.address, login, owners, enabled=self.config.sender_login_check))
        if self.watching:
            self._decided(state, verdict, {
                "sender": path.address, "login": login, "hit": hit.key if hit else None,
                "owners": sorted(owners) if isinstance(owners, frozenset) else owners})
        return verdict

    # --- RCPT ------------------------------------------------------------------------------

    async def rcpt(self, state: ClientState, path: Path, login: str | None,
                   smtputf8: bool) -> Reply | None:
        """Postfix's order under smtpd_delay_reject: what screening enforces, then client,
        HELO and sender restrictions, then the recipient's (STAGES["rcpt"])."""
        request = Request(path, login, smtputf8)
        for check in STAGES["rcpt"]:
            reply = await _RCPT_STEPS[check](self, state, request)
            if reply is not None:
                return reply
        await self._protocol_passes(state)
        return None

    @staticmethod
    def _delayed(state: ClientState) -> bool:
        """Whether the client, HELO and sender findings apply (MX, not mynetworks)."""
        return state.client.listener == MX and not state.trusted

    async def _rcpt_rate_limits(self, state: ClientState, request: Request) -> Reply | None:
        return await self._count_event(state, rate_limits.RECIPIENT, request.login)

    async def _rcpt_screening(self, state: ClientState, request: Request) -> Reply | None:
        return state.enforced if self._delayed(state) else None

    async def _rcpt_client(self, state: ClientState, request: Request) -> Reply | None:
        return await self._client_reject(state) if self._delayed(state) else None

    async def _rcpt_helo(self, state: ClientState, request: Request) -> Reply | None:
        return state.helo_reject if self._delayed(state) else None

    async def _rcpt_sender(self, state: ClientState, request: Request) -> Reply | None:
        return state.sender_reject if self._delayed(state) else None

    async def _client_reject(self, state: ClientState) -> Reply | None:
        verdict = state.client_verdict
        if verdict is not None:  # the same for every recipient of the session
            return verdict.reply if verdict.failed else None
        if state.fcrdns is None and state.fcrdns_task is None:
            return None  # not looked up: a trusted client
        try:
            if state.fcrdns is not None:  # the usual case: answered before the first RCPT
                facts = state.fcrdns
            else:
                facts = await asyncio.wait_for(asyncio.shield(state.fcrdns_task),
                                               self.config.dns_timeout * 3)
        except TimeoutError:
            return Reply(450, "4.7.25", "Client host rejected: cannot find your hostname, "
                         f"[{state.client.ip}]")
        state.fcrdns = facts  # also for greylisting's signals, when the task had to be awaited
        if facts.hostname:
            state.client_name = facts.hostname
        rev_by_name = {}
        try:
            for name in client_fcrdns.rev_names(facts):
                hit = await self.tables.rev_by_name(name)
                if hit is not None:
                    rev_by_name[name] = TEMPFAIL if hit.invalid else hit.value
        except TableError:
            return RCPT_TEMPFAIL
        verdict = self._note(state, client_fcrdns.decide(
            facts, rev_ip=state.rev_ip, rev_by_name=rev_by_name,
            unknown_code=self.config.unknown_client_reject_code))
        state.client_verdict = verdict
        if self.watching:
            self._decided(state, verdict, fcrdns_facts(state, facts, rev_by_name))
        return verdict.reply if verdict.failed else None

    async def _rcpt_destination(self, state: ClientState, request: Request) -> Reply | None:
        path = request.path
        address = path.address
        if destination.is_postmaster(path):
            address = f"postmaster@{self.config.domain}"
        try:
            facts = await self.tables.rcpt_facts(address.lower())
        except TableError:
            return RCPT_TEMPFAIL
        if facts.invalid:
            return RCPT_TEMPFAIL
        request.facts = facts  # the recipient check's too: one round trip for both
        trusted = state.trusted or request.login is not None
        verdict = self._note(state, destination.decide(
            path, local=facts.vdom is not None or destination.is_postmaster(path),
            trusted=trusted, smtputf8=request.smtputf8,
            allow_trusted_routing=self.config.allow_trusted_routing))
        if self.watching:
            self._decided(state, verdict, {
                "rcpt": path.address, "route": list(path.route), "looked": facts.address,
                "vdom": facts.vdom.key if facts.vdom else None, "trusted": trusted,
                "utf8": request.smtputf8})
        return verdict.reply if verdict.failed else None

    async def _rcpt_recipient(self, state: ClientState, request: Request) -> Reply | None:
        facts = request.facts
        recip = facts.recip.value if facts.recip is not None else None
        verdict = self._note(state, recipient.decide(
            request.path.address, local=facts.vdom is not None,
            listed=facts.vali is not None or facts.vbox is not None, access=recip,
            show_table=self.config.show_user_unknown_table_name))
        if self.watching:
            self._decided(state, verdict, {
                "rcpt": request.path.address, "looked": facts.address,
                "vdom": facts.vdom.key if facts.vdom else None,
                "vali": facts.vali.key if facts.vali else None,
                "vbox": facts.vbox.key if facts.vbox else None,
                "recip": [facts.recip.key, recip] if facts.recip is not None else None})
        return verdict.reply if verdict.failed else None

    async def _rcpt_greylist(self, state: ClientState, request: Request) -> Reply | None:
        """Last at RCPT, as postgrey sits after reject_unauth_destination: a recipient that
        does not exist is refused for good, not deferred."""
        config = self.config
        if config.greylist == "off":
            return None
        ip = state.client.ip
        score = self._dnsbl_score_now(state)
        why_not = greylist.exempt(
            config.greylist, listener_mx=state.client.listener == MX,
            trusted=state.trusted or request.login is not None, permitted=state.permitted,
            dnswl=(score or 0) < 0)
        if why_not is not None:
            if state.client.listener == MX:
                self._note(state, Verdict(greylist.CHECK, Outcome.SKIP,
                                          reason=f"[{ip}] not greylisted: {why_not}"))
            return None
        why: tuple[str, ...] | str = "greylisting every client"
        if config.greylist == "selective":
            why = greylist.doubts(ip, _suspicion(state, score, config.dnsbl_threshold),
                                  config.greylist_signals, config.greylist_dynamic_pattern)
            if not why:
                self._note(state, Verdict(greylist.CHECK, Outcome.PASS,
                                          reason=f"[{ip}] not doubtful"))
                return None
        address = request.path.address
        network, tail = greylist.triplet(ip, state.sender or "",
                                         address if config.greylist_recipient else None)
        seen = await self._greylist_seen(state, network, tail)
        if seen is None:
            return RCPT_TEMPFAIL
        verdict = self._note(state, greylist.decide(
            ip, address, network, tail, seen, why, config.greylist_delay,
            config.greylist_retry_window))
        if not verdict.failed:
            return None
        # No cached DNSBL pass for a client greylisted: its retry asks the DNSBL again (the
        # querier's memory, mostly), so its score, the doubt, is known then too.
        if state.screening_passes:
            state.screening_passes.pop("dnsbl", None)
        return verdict.reply

    def _dnsbl_score_now(self, state: ClientState) -> int | None:
        """The DNSBL score as known now: screening goes on once no answer can change its
        outcome, but the zones still pending have usually answered by RCPT (in memory)."""
        if not state.dnsbl_asked:
            return None
        latest = self.querier.snapshot(state.client.ip)
        if latest is None and state.dnsbl_seen is not None:
            latest = state.dnsbl_seen[0]  # the result screening judged
        return 0 if latest is None else dnsbl_check.score(self.sites, latest).total

    async def _greylist_seen(self, state: ClientState, network: str,
                             tail: str) -> greylist.Seen | None:
        """The store's answer, once per session and key (a pass for the whole session);
        None when Redis cannot answer."""
        known = state.greylist_seen
        if known is None:
            known = state.greylist_seen = {}
        if "" in known:
            return known[""]  # the network passed in this session
        if tail in known:
            return known[tail]
        try:
            seen = await self.greylist.see(network, tail, write=not self.dry_run)
        except GreylistError as exc:
            log.warning("warning: %s: RCPT from %s: %s", RCPT_TEMPFAIL, state.label, exc)
            return None
        self.greylist_counts[seen.state] += 1
        known[tail] = seen
        if seen.state in ("passed", "retried"):
            known[""] = greylist.Seen("passed")
        return seen

    async def _protocol_passes(self, state: ClientState) -> None:
        """postscreen counts its deep protocol tests as passed once a client reaches RCPT."""
        if state.client.listener != MX or state.recorded_rcpt_pass or state.protocol_failed:
            return
        state.recorded_rcpt_pass = True
        # renew only when half the pass has run out: a regular sender costs no extra round trip
        fresh = time.time() + self.config.greet_ttl / 2
        if all(state.cached_passes.get(t, 0.0) > fresh for t in protocol.TESTS):
            return
        state.screening_passes = {**(state.screening_passes or {}),
                                  **dict.fromkeys(protocol.TESTS, self.config.greet_ttl)}

    # --- protocol tests --------------------------------------------------------------------

    def wants_protocol_tests(self, state: ClientState) -> bool:
        """Whether the engine need report pipelining, non-SMTP commands and bare newlines."""
        return state.client.listener == MX and not (state.permitted or state.trusted)

    async def protocol(self, state: ClientState, test: str, line: bytes, pending: bytes,
                       after: str, esmtp: bool) -> Reply | None:
        """A deep protocol test on the MX listener; a reply means hang up with it."""
        if not self.wants_protocol_tests(state) or test in state.protocol_failed:
            return None  # a test is reported once per session: the first finding decides
        ip, port = state.client.ip, state.client.port
        text = line.decode("utf-8", "replace")
        if test == "pipelining":
            verdict = protocol.pipelining(
                text, pending, ip, port, pipelining_offered=esmtp,
                action=self.config.pipelining_action)
        elif test == "non_smtp_command":
            verdict = protocol.non_smtp_command(
                text, ip, port, after=after, action=self.config.non_smtp_command_action)
        else:
            verdict = protocol.bare_newline(
                line, ip, port, after=after, action=self.config.bare_newline_action)
        if not verdict.failed and not verdict.ignored:
            return None  # a pass is one under any action: nothing for the shadow to weigh
        self._note(state, verdict)
        if self.watching:
            self._decided(state, verdict, {
                "ip": ip, "port": port, "after": after, "esmtp": esmtp,
                "line": line.decode("latin-1") if test == "bare_newline" else text,
                "pending": pending.decode("latin-1")})
        if test not in state.protocol_failed:
            state.protocol_failed += (test,)
            state.screening_failed += (test,)
        if verdict.failed:
            if hangs_up(verdict):
                return verdict.reply
            state.enforced = state.enforced or verdict.reply
        return None

    # --- AUTH ------------------------------------------------------------------------------

    async def auth_allowed(self, state: ClientState) -> Reply | None:
        """At each AUTH command (STAGES["auth"]): a 450 lets the session go on, a 421
        (too many failures) ends it."""
        for check in STAGES["auth"]:
            reply = await _AUTH_STEPS[check](self, state)
            if reply is not None:
                return reply
        return None

    async def _auth_rate_limits(self, state: ClientState) -> Reply | None:
        return await self._count_event(state, rate_limits.AUTH)

    async def _auth_limit(self, state: ClientState) -> Reply | None:
        verdict = self._note(state, await self.auth_limits.check(state.client.ip, None))
        return verdict.reply if verdict.failed else None

    async def authenticate(self, state: ClientState, mechanism: str, plain: bytes,
                           login: str, secured: bool) -> AuthOutcome:
        ip = state.client.ip
        verdict = await self.auth_limits.check(ip, login or None)
        if verdict.failed:
            return AuthOutcome(verdict.reply)
        if self.auth is None or self.auth_guard is None:
            return AuthOutcome(replies.AUTH_NOT_ENABLED)
        if not await self.auth_guard.safe():
            log.warning("warning: %s: SASL %s authentication refused: the auth service is not "
                        "known to refuse made-up logins", state.label, mechanism)
            return AuthOutcome(replies.AUTH_TEMPFAIL)
        result = await self.auth.authenticate(
            "PLAIN", plain, client_ip=ip, local_ip=state.client.local_ip, secured=secured)
        if result.ok:
            await self.auth_limits.record_success(ip, login)
            user = result.user or login  # Dovecot's canonical name, for XCLIENT LOGIN
            log.info("%s: sasl_method=%s, sasl_username=%s", state.label, mechanism, user)
            return AuthOutcome(replies.AUTH_OK, user)
        if result.temporary:
            log.warning("warning: %s: SASL %s authentication failed: %s",
                        state.label, mechanism, result.reason)
            return AuthOutcome(replies.AUTH_TEMPFAIL)
        failures = await self.auth_limits.record_failure(ip, login or None)
        log.warning("warning: %s: SASL %s authentication failed: %s", state.label,
                    mechanism, result.reason or "authentication failure")
        await asyncio.sleep(failure_delay(failures))
        return AuthOutcome(replies.AUTH_FAILED)

    # --- end -------------------------------------------------------------------------------

    def close_session(self, state: ClientState) -> None:
        for task in (state.fcrdns_task, state.settle):
            if task is not None and not task.done():
                task.cancel()
        lease, state.lease = state.lease, None
        if lease is not None:  # its count and what screening found: one round trip
            try:
                write = self.cache.session_write(
                    state.client.ip, state.screening_passes or {}, state.screening_failed,
                    held=lease.screening)
            except ValueError:  # a test name it does not know: a bug, but the count must go
                log.exception("screening results of %s not written", state.client.ip)
                write = None
            self.counter.release_soon(lease, write)


def greylist_store(redis: Any, config: Config) -> GreylistStore:
    return GreylistStore(redis, delay=config.greylist_delay,
                         retry_window=config.greylist_retry_window,
                         pass_ttl=config.greylist_pass_ttl, timeout=config.redis_timeout)


def _suspicion(state: ClientState, dnsbl_score: int | None,
               dnsbl_threshold: int) -> greylist.Suspicion:
    """What the earlier stages found that greylisting's signals read."""
    facts = state.fcrdns
    return greylist.Suspicion(
        no_fcrdns=facts is None or facts.hostname is None,
        names=facts.ptr_names if facts is not None else (),
        dnsbl_score=dnsbl_score, dnsbl_threshold=dnsbl_threshold,
        failed_tests=tuple(t for t in state.screening_failed if t != "dnsbl"))


def dnsbl_facts(result) -> dict:
    """A DNSBL result as decisions.dnsbl_result() reads it back."""
    return {"ip": result.ip, "ttl": result.ttl,
            "zones": [[z.zone, z.status, list(z.answers), z.ttl] for z in result.zones]}


def fcrdns_facts(state: ClientState, facts, rev_by_name: dict) -> dict:
    """The FCrDNS facts and REV answers as decisions.fcrdns_facts() reads them back."""
    return {"ip": facts.ip, "status": facts.status, "ptr": list(facts.ptr_names),
            "forward": [[f.name, f.status, list(f.addresses)] for f in facts.forward],
            "ttl": facts.ttl, "rev_names": list(client_fcrdns.rev_names(facts)),
            "rev_ip": [state.rev_key, state.rev_ip] if state.rev_ip is not None else None,
            "rev_by_name": rev_by_name}


def _same_as_before(state: ClientState, verdict: Verdict) -> Verdict:
    """The session's earlier verdict of this check when it is equal: EHLO said again after
    STARTTLS (as every client does) is judged alike, and the record keeps one object twice,
    not a copy of its reason for every idle session."""
    for earlier in reversed(state.record):
        if earlier.check == verdict.check:
            return earlier if earlier == verdict else verdict
    return verdict


def record_memory(config: Config) -> int:
    """This worker's share of the node's session_record_memory."""
    return config.session_record_memory // (config.workers or os.cpu_count() or 1)



def _proxied_loopback(client: Client) -> bool:
    """A loopback address named by a PROXY header: no balancer forwards such a client."""
    return client.proxied and ipaddress.ip_address(client.ip).is_loopback


_GO_ON: Any = object()  # a connect step's "no answer yet: the next check"
_CONNECT_STEPS = {"override": Policy._connect_override,
                  "access_list": Policy._connect_access_list, "limits": Policy._connect_limits,
                  "screening_cache": Policy._connect_screening_cache}
_SCREENING_STEPS = {"pregreet": Policy._screen_pregreet, "dnsbl": Policy._screen_dnsbl}
_BEFORE_GREET_WAIT = tuple(c for c in STAGES["connect"] if c not in SCREENING_TESTS)
_AFTER_GREET_WAIT = tuple(c for c in STAGES["connect"] if c in SCREENING_TESTS)
_HELO_STEPS = {"helo": Policy._helo_name}
_AUTH_STEPS = {"rate_limits": Policy._auth_rate_limits, "auth_limit": Policy._auth_limit}
_MAIL_STEPS = {"rate_limits": Policy._mail_rate_limits, "sender_login": Policy._mail_sender_login,
               "sender": Policy._mail_sender}
_RCPT_STEPS = {
    "rate_limits": Policy._rcpt_rate_limits, "screening": Policy._rcpt_screening,
    "client_fcrdns": Policy._rcpt_client,
    "helo": Policy._rcpt_helo, "sender": Policy._rcpt_sender,
    "destination": Policy._rcpt_destination, "recipient": Policy._rcpt_recipient,
    "greylist": Policy._rcpt_greylist,
}
