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
    await policy.auth_allowed(state) -> Reply | None
    await policy.authenticate(state, mechanism, plain, login, secured) -> AuthOutcome
    policy.close_session(state) ; await policy.close()
    policy.evidence     refused sessions' records (smtpgate.lookups.evidence), kept by the engine
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

    On the MX listener, in postscreen's order at connect: the permanent
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

    A lookup that cannot be answered (Redis down, DNS timing out) is a
    temporary failure: 421 4.3.0 at connect, 451 4.3.0 at RCPT; never a
    permit.

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
from dataclasses import dataclass
from typing import Any

from smtpgate import replies
from smtpgate.address import Path
from smtpgate.checks import (
    access_list,
    client_fcrdns,
    destination,
    helo,
    limits,
    pregreet,
    protocol,
    recipient,
    sender,
    sender_login,
)
from smtpgate.checks import dnsbl as dnsbl_check
from smtpgate.checks.screening_action import hangs_up
from smtpgate.config import Config
from smtpgate.dnsbl_sites import parse_sites
from smtpgate.lookups import redis_client
from smtpgate.lookups.auth_limits import AuthLimits, failure_delay
from smtpgate.lookups.auth_probe import AuthGuard, AuthProbe
from smtpgate.lookups.client_dns import client_hostname, helo_facts
from smtpgate.lookups.dnsbl import DnsblQuerier
from smtpgate.lookups.evidence import EvidenceStore
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
from smtpgate.policy.state import MX, Client, ClientState, GreetWait
from smtpgate.verdict import Outcome, Reply, Verdict

log = logging.getLogger("smtpgate.policy")

SCREENING_TESTS = ("pregreet", "dnsbl")
REDIS_CONNECTIONS = 2000  # per worker, at most: each call holds one for well under a ms
TEMPFAIL = "tempfail"

# The checks of each stage, in the order they run; README's stage table is tested against it.
# HELO, MAIL and RCPT run theirs from here (_MAIL_STEPS, _RCPT_STEPS, one method per check);
# connect runs in this order in connect() and screened(), around the greet wait. At RCPT,
# "screening" is an `enforce` finding of the access list or a screening test, and
# client_fcrdns, helo and sender are those restrictions' findings reported late
# (smtpd_delay_reject); on submission only sender_login, sender, destination and recipient
# apply.
STAGES: dict[str, tuple[str, ...]] = {
    "connect": ("access_list", "limits", "screening_cache", "pregreet", "dnsbl"),
    "helo": ("helo",),
    "mail": ("sender_login", "sender"),
    "rcpt": ("screening", "client_fcrdns", "helo", "sender", "destination", "recipient"),
    "data": (),
}


@dataclass(slots=True)
class Request:
    """What one MAIL or RCPT asks, and the facts its checks share."""

    path: Path
    login: str | None
    smtputf8: bool = False
    facts: Any = None  # RCPT: the tables' answer for the recipient


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
                                         timeout=config.redis_timeout)
        self.auth_limits = AuthLimits(
            redis_client, config.auth_failure_limit, ipv6_prefix=config.ipv6_prefix,
            timeout=config.redis_timeout)
        self.redis_ok = True  # the connection counters' last round trip, for /healthz
        self.evidence = EvidenceStore(  # refused sessions' records, for explain --session
            redis_client, ttl=config.session_record_ttl,
            size_limit=config.session_record_size_limit, timeout=config.redis_timeout,
            memory=record_memory(config))
        self._refresher: asyncio.Task | None = None

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: new settings for the next decisions; Redis clients and counters stay."""
        self.config = config
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

    @classmethod
    async def create(cls, config: Config, auth: Any = None, dry_run: bool = False,
                     auth_probe: AuthProbe | None = None) -> Policy:
        tables = Tables.from_config(config)
        await tables.start()
        resolver = Resolver(config.nameservers, config.dns_timeout)
        # one quick retry on a broken connection: a pooled one may be stale after a Redis restart;
        # room for a burst of sessions (redis-py's own default refuses the 101st call at once,
        # which a session answers with 421), without a blocking pool's cost on every call
        client = redis_client.connect(config.redis, config.redis_timeout, decode=False,
                                      max_connections=REDIS_CONNECTIONS, wait=False)
        policy = cls(config, tables, resolver, client, auth, dry_run, auth_probe)
        policy._refresher = asyncio.get_running_loop().create_task(
            policy.counter.run_refresher())
        return policy

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
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
        if client.proxied and ipaddress.ip_address(client.ip).is_loopback:
            return ()
        return self.config.mynetworks

    def _trusted_network(self, client: Client) -> bool:
        return access_list.decide(client.ip, None, mynetworks=self._mynetworks(client)) \
            .outcome is Outcome.PERMIT

    @staticmethod
    def _note(state: ClientState, verdict: Verdict) -> Verdict:
        """Keep the verdict in the session's record; log what a postmaster needs to see.

        Passes go to the debug log: at a few hundred sessions a second, one line per check
        per session would cost more than the checks themselves.
        """
        state.note(verdict)
        if verdict.outcome is Outcome.FAIL or verdict.ignored:
            log.info("%s %s: %s", verdict.check, verdict.outcome, verdict.logged)
        elif verdict.reason and verdict.outcome is not Outcome.SKIP and log.isEnabledFor(10):
            log.debug("%s %s: %s", verdict.check, verdict.outcome, verdict.reason)
        return verdict

    # --- connect ---------------------------------------------------------------------------

    async def connect(self, state: ClientState) -> Reply | GreetWait | None:
        """postscreen's order: the permanent access list, then the counts, then screening.

        A client the access list drops is answered before it is counted: from the table
        cache that costs no Redis round trip, which is what makes a flood of denylisted
        clients cheap.
        """
        client = state.client
        state.trusted = self._trusted_network(client)
        if client.listener == MX:
            refused = await self._access_list(state)
            if refused is not None:
                return refused
        return await self._count_and_screen(state)

    async def _access_list(self, state: ClientState) -> Reply | None:
        """postscreen_access_list (mynetworks, PSA): port 25 only, as postscreen guarded
        only port 25; a network denied there keeps its users' submission on 587 and 465."""
        client = state.client
        ip, port = client.ip, client.port
        try:
            facts = await self.tables.connect_facts(ip)
        except TableError as exc:
            self.redis_ok = False
            log.warning("warning: %s: connect from %s: %s", CONNECT_TEMPFAIL, state.label, exc)
            return CONNECT_TEMPFAIL
        psa = facts.psa
        if psa is not None and psa.invalid:
            return CONNECT_TEMPFAIL
        state.rev_ip = facts.rev.value if facts.rev is not None else None
        verdict = self._note(state, access_list.decide(
            ip, psa.value if psa else None, mynetworks=self._mynetworks(client),
            action=self.config.access_reject_action,
            psa_key=psa.key.partition(":")[2] if psa else ""))  # the name, not the Redis key
        if verdict.outcome is Outcome.PERMIT:
            state.permitted = True
        elif verdict.failed:
            if hangs_up(verdict):
                log.info("DENYLISTED [%s]:%s", ip, port)
                return verdict.reply
            state.enforced = verdict.reply
        return None

    async def _count_and_screen(self, state: ClientState) -> Reply | GreetWait | None:
        """The connection limits (every listener, as anvil counts for every smtpd), then
        postscreen's tests (port 25)."""
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
            hostname=self.config.hostname, exempt=state.trusted))
        if verdict.failed:
            return verdict.reply
        if client.listener != MX:
            return None
        if state.permitted:
            self._look_up_name(state)
            return None
        return await self._start_screening(state)

    def _look_up_name(self, state: ClientState) -> None:
        """FCrDNS in the background, for RCPT and XCLIENT NAME: once screening has let the
        client through, as smtpd looks up a client postscreen handed over. A client refused
        at connect (most first contacts: DNSBL) costs no PTR and A queries."""
        if not state.trusted and state.fcrdns_task is None and state.fcrdns is None:
            state.fcrdns_task = asyncio.get_running_loop().create_task(
                client_hostname(self.resolver, state.client.ip))
            state.fcrdns_task.add_done_callback(state.name_found)

    async def _start_screening(self, state: ClientState) -> Reply | GreetWait | None:
        """postscreen's tests before the banner: cached passes, else a greet wait or DNSBL."""
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
        if not state.greet_tested:
            return await self.screened(state, b"", 0.0)
        decided = None
        if state.settle is not None:
            decided = asyncio.get_running_loop().create_future()
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
        """The verdicts of the greet wait (what the client said too early) and the DNSBL."""
        config = self.config
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
        passes: dict[str, float] = {}
        failed: list[str] = []
        outcome: Reply | None = None
        if state.greet_tested:
            verdict = self._note(state, pregreet.decide(
                received, delay, ip, port, action=config.greet_action, ttl=config.greet_ttl))
            outcome = self._apply(state, verdict, passes, failed) or outcome
        if result is not None:
            verdict = self._note(state, self._dnsbl_verdict_of(state, result))
            if verdict.outcome is Outcome.PERMIT:
                passes = dict.fromkeys(SCREENING_TESTS, verdict.ttl or 60.0)
                state.permitted = True
            else:
                outcome = self._apply(state, verdict, passes, failed) or outcome
        if not passes and not failed and not any(map(self._enabled, SCREENING_TESTS)):
            passes = {NO_TESTS: config.greet_ttl}  # nothing to test: PASS OLD next time
        state.screening_failed += tuple(failed)  # written when the session ends
        if not failed:
            state.screening_passes.update(passes)
        if outcome is None and not failed:
            log.info("PASS NEW [%s]:%s", ip, port)
        if outcome is None:
            self._look_up_name(state)
        return outcome

    def _enabled(self, test: str) -> bool:
        if test == "dnsbl":
            return bool(self.sites)
        if test == "pregreet":
            return self.config.greet_wait > 0
        return True

    def _apply(self, state: ClientState, verdict: Verdict, passes: dict[str, float],
               failed: list[str]) -> Reply | None:
        """A screening verdict under its action: a reply to hang up with, or None."""
        if verdict.outcome is Outcome.PASS:
            if verdict.ttl:
                passes[verdict.check] = verdict.ttl
            elif verdict.ignored:
                failed.append(verdict.check)
            return None
        if not verdict.failed:
            return None
        failed.append(verdict.check)
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
        verdict = self._note(state, helo.decide(
            name, access=access, dns=dns, unknown_code=self.config.unknown_helo_reject_code))
        if not verdict.failed:
            return None
        if self.config.smtpd_delay_reject:
            state.helo_reject = verdict.reply
            return None
        return verdict.reply

    # --- MAIL ------------------------------------------------------------------------------

    async def mail(self, state: ClientState, path: Path, login: str | None) -> Reply | None:
        state.sender_reject = None
        request = Request(path, login)
        for check in STAGES["mail"]:
            reply = await _MAIL_STEPS[check](self, state, request)
            if reply is not None:
                return reply
        return None

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
        verdict = self._note(state, sender.decide(request.path,
                                                  smtputf8="SMTPUTF8" in request.path.params))
        if verdict.failed and not self.config.smtpd_delay_reject:
            return verdict.reply
        state.sender_reject = verdict.reply if verdict.failed else None
        return None

    async def _sender_login(self, state: ClientState, path: Path, login: str) -> Verdict:
        owners: object
        try:
            hit = await self.tables.logmap(path.address)
            owners = (sender_login.TEMPFAIL if hit is not None and hit.invalid
                      else frozenset(hit.targets) if hit else None)
        except TableError:
            owners = sender_login.TEMPFAIL
        return self._note(state, sender_login.decide(
            path.address, login, owners, enabled=self.config.sender_login_check))

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
        verdict = self._note(state, destination.decide(
            path, local=facts.vdom is not None or destination.is_postmaster(path),
            trusted=state.trusted or request.login is not None, smtputf8=request.smtputf8,
            allow_trusted_routing=self.config.allow_trusted_routing))
        return verdict.reply if verdict.failed else None

    async def _rcpt_recipient(self, state: ClientState, request: Request) -> Reply | None:
        facts = request.facts
        recip = facts.recip.value if facts.recip is not None else None
        verdict = self._note(state, recipient.decide(
            request.path.address, local=facts.vdom is not None,
            listed=facts.vali is not None or facts.vbox is not None, access=recip,
            show_table=self.config.show_user_unknown_table_name))
        return verdict.reply if verdict.failed else None

    async def _protocol_passes(self, state: ClientState) -> None:
        """postscreen counts its deep protocol tests as passed once a client reaches RCPT."""
        if state.client.listener != MX or state.recorded_rcpt_pass or state.protocol_failed:
            return
        state.recorded_rcpt_pass = True
        # renew only when half the pass has run out: a regular sender costs no extra round trip
        fresh = time.time() + self.config.greet_ttl / 2
        if all(state.cached_passes.get(t, 0.0) > fresh for t in protocol.TESTS):
            return
        state.screening_passes.update(dict.fromkeys(protocol.TESTS, self.config.greet_ttl))

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
            return None
        self._note(state, verdict)
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
                    state.client.ip, state.screening_passes, state.screening_failed,
                    held=lease.screening)
            except ValueError:  # a test name it does not know: a bug, but the count must go
                log.exception("screening results of %s not written", state.client.ip)
                write = None
            self.counter.release_soon(lease, write)


def record_memory(config: Config) -> int:
    """This worker's share of the node's session_record_memory."""
    return config.session_record_memory // (config.workers or os.cpu_count() or 1)


_MAIL_STEPS = {"sender_login": Policy._mail_sender_login, "sender": Policy._mail_sender}
_RCPT_STEPS = {
    "screening": Policy._rcpt_screening, "client_fcrdns": Policy._rcpt_client,
    "helo": Policy._rcpt_helo, "sender": Policy._rcpt_sender,
    "destination": Policy._rcpt_destination, "recipient": Policy._rcpt_recipient,
}
