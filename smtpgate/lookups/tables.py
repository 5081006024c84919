"""tables - the image's Redis tables, looked up per SMTP phase.

SYNOPSIS
    Tables(url, timeout=2.0, *, cache=True, max_connections=64, cache_entries=65536)
    Tables.from_config(config) -> Tables
    await tables.start()    await tables.close()    async with Tables(...) as tables: ...

    await tables.connect_facts(ip) -> ConnectFacts(psa: Hit | None, rev: Hit | None,
                                                   override: Override | None)
    tables.overrides_in_force(now) -> dict[str, int] | None   per action; None: cache not loaded
    await tables.rev_by_name(hostname) -> Hit | None
    await tables.helo(name) -> Hit | None
    await tables.rcpt_facts(address) -> RcptFacts(address, domain, vdom, vali, vbox, recip)
    await tables.logmap(sender) -> Hit | None
    await tables.lookup(prefix, name) -> Hit | None      exactly one key
    await tables.lookup_address(prefix, address) -> Hit | None   with the table's fall-backs
    await tables.get(prefix, name) -> str | None         raw value of exactly one key

    Hit(table, key, value, action=None, targets=(), error="")    .invalid -> bool
    (Override: smtpgate.override_record)
    tables.health -> Health(ok, detail, since)     tables.stats -> Stats
    TableError                     Redis down, slow or failing: tempfail the phase
    CONNECT_TEMPFAIL, RCPT_TEMPFAIL, tempfail_reply(phase, subject="") -> Reply

DESCRIPTION
    Every phase method answers from one Redis round trip at most (a single
    MGET of all the keys the phase needs, in lookup order), and from none
    when the in-process cache (table_cache) is loaded and holds the keys.
    The lookup orders are those of keys.py: PSA/REV by exact IP then the
    most specific CIDR network, REV by hostname, HLO and VDOM
    case-insensitively, VALI/VBOX by address, address without +extension,
    @domain, RECIP by address then domain, LOGMAP by sender then @domain.

    A Hit names the key that matched and its raw value. Access tables (PSA,
    REV, HLO, RECIP) carry the parsed access_value.Action; VALI and LOGMAP
    carry their targets split on spaces and commas. A value smtpgate cannot
    use (an unknown action, an empty alias) gives a Hit with `error` set and
    `invalid` true; it is logged once per key and value, and callers must
    treat it as a temporary error for that lookup (451 4.3.0), never as a
    match that permits.

    Failure contract: any Redis error, a connection that cannot be made, or
    a round trip longer than `timeout` seconds raises TableError; nothing
    else escapes the phase methods. Callers answer CONNECT_TEMPFAIL (421
    4.3.0, then close) at connect and RCPT_TEMPFAIL (451 4.3.0) at RCPT.
    The pool reconnects by itself on the next lookup; `health` records the
    last outcome for the health endpoint. For one server a
    BlockingConnectionPool bounds the connections; waiting for one counts
    against the same timeout (a Sentinel or Cluster pool is unbounded).

    With the cache loaded, answers come from memory and stay correct within
    one invalidation message of a change; a Redis outage is noticed by the
    cache's own connection at once (closed) or within its heartbeat (hung),
    after which every lookup goes to Redis and tempfails as above.

    connect_facts() raises ValueError for a string that is not an IP
    address (IPv6 may be bracketed or written IPv6:...). Its override is
    the most specific timed override covering the client (keys.OVERRIDE),
    read in the same MGET or from the cache; one whose value this version
    cannot read counts as none (logged once).

    `url` is what config.parse_redis_url accepts: host, host:port,
    redis://[:password@]host[:port][/db], rediss:// (TLS), unix://[:password@]/path,
    a Sentinel set or a Cluster (smtpgate.redis_url; clients from redis_client). On a
    Cluster a phase's MGET is split per hash slot (one MGET per slot, sent at once
    to each node), so it is no longer one atomic read; each key is still read once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpgate.address import client_address
from smtpgate.checks import access_value
from smtpgate.config import parse_redis_url
from smtpgate.lookups import keys, redis_client
from smtpgate.lookups.table_cache import MISS, CacheSync, TableCache
from smtpgate.override_record import ACTIONS, Override, decode
from smtpgate.verdict import Reply

log = logging.getLogger("smtpgate.tables")

CONNECT_TEMPFAIL = Reply(421, "4.3.0", "Temporary lookup failure")
RCPT_TEMPFAIL = Reply(451, "4.3.0", "Temporary lookup failure")


def tempfail_reply(phase: str, subject: str = "") -> Reply:
    """The reply for a lookup that could not be made: 421 at connect, 451 after it."""
    base = CONNECT_TEMPFAIL if phase == "connect" else RCPT_TEMPFAIL
    text = f"{subject}: {base.text}" if subject else base.text
    return Reply(base.code, base.status, text)


class TableError(Exception):
    """Redis could not answer in time; the lookup's answer is unknown (tempfail)."""


@dataclass(frozen=True, slots=True)
class Hit:
    table: str
    key: str
    value: str
    action: access_value.Action | None = None
    targets: tuple[str, ...] = ()
    error: str = ""

    @property
    def invalid(self) -> bool:
        return bool(self.error)


@dataclass(frozen=True, slots=True)
class ConnectFacts:
    psa: Hit | None
    rev: Hit | None
    override: Override | None = None


@dataclass(frozen=True, slots=True)
class RcptFacts:
    address: str
    domain: str
    vdom: Hit | None
    vali: Hit | None
    vbox: Hit | None
    recip: Hit | None

    @property
    def invalid(self) -> bool:
        hits = (self.vdom, self.vali, self.vbox, self.recip)
        return any(h is not None and h.invalid for h in hits)


@dataclass
class Health:
    ok: bool | None = None  # None: not tried yet
    detail: str = "not started"
    since: float = field(default_factory=time.time)
    cache_ready: bool = False


@dataclass
class Stats:
    lookups: int = 0  # phase calls
    round_trips: int = 0  # MGETs sent to Redis
    cache_answers: int = 0  # phase calls answered with no round trip


class Tables:
    def __init__(self, url: str, timeout: float = 2.0, *, cache: bool = True,
                 max_connections: int = 64, cache_entries: int = 65536) -> None:
        self.url = parse_redis_url(url)
        self.timeout = timeout
        self.health = Health()
        self.stats = Stats()
        self.cache = TableCache(cache_entries)
        self._warned: set[tuple[str, str]] = set()
        # what a key and value mean, and which keys an address is looked up under: the same
        # few answers for every message to the same recipients (pure, so kept while small)
        self._hits: dict[tuple[str, str], Hit] = {}
        self._rcpt_keys: dict[str, tuple] = {}
        # the hot path's client: one pipelined connection, sent again once if it broke
        self._redis = redis_client.connect_hot(self.url, timeout,
                                               max_connections=max_connections)
        self._sync = CacheSync(self.cache, self.url, timeout, self._cache_state) if cache else None

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Tables:
        return cls(config.redis, config.redis_timeout, **kwargs)

    async def start(self, wait_for_cache: float = 0.0) -> None:
        """Check Redis and start the cache; never raises for an unreachable Redis."""
        try:
            await self._call(self._redis.ping())
        except TableError as exc:
            log.warning("redis %s unreachable at start: %s", _safe(self.url), exc)
        if self._sync is not None:
            self._sync.start()
            if wait_for_cache > 0:
                await self.wait_cache_ready(wait_for_cache)

    async def close(self) -> None:
        if self._sync is not None:
            await self._sync.stop()
        await self._redis.aclose()

    async def __aenter__(self) -> Tables:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def cache_ready(self) -> bool:
        return self.cache.ready

    async def wait_cache_ready(self, timeout: float) -> bool:
        if self._sync is None:
            return False
        try:
            await asyncio.wait_for(self._sync.ready_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- the phases

    async def connect_facts(self, ip: str | keys.IPAddress) -> ConnectFacts:
        addr = client_address(ip)
        self.stats.lookups += 1
        if self.cache.ready:
            self.stats.cache_answers += 1
            return ConnectFacts(self._hit_of(self.cache.lookup_ip(keys.PSA, addr)),
                                self._hit_of(self.cache.lookup_ip(keys.REV, addr)),
                                self._override(self.cache.lookup_override(addr)))
        psa_keys = keys.network_keys(keys.PSA, addr)
        rev_keys = keys.network_keys(keys.REV, addr)
        override_keys = keys.network_keys(keys.OVERRIDE, addr)
        found = await self._mget(psa_keys + rev_keys + override_keys)
        override = next(((k, found[k]) for k in override_keys if found.get(k) is not None), None)
        return ConnectFacts(self._first(psa_keys, found), self._first(rev_keys, found),
                            self._override(override))

    def overrides_in_force(self, now: float) -> dict[str, int] | None:
        """How many overrides of each action are in force, from the cache (None when it is
        not loaded: the count is not known without a SCAN)."""
        if not self.cache.ready:
            return None
        counts = dict.fromkeys(ACTIONS, 0)
        for value in self.cache.overrides():
            override = decode(value)
            if override is not None and override.in_force(now):
                counts[override.action] += 1
        return counts

    async def rev_by_name(self, hostname: str) -> Hit | None:
        return await self._by_name(keys.REV, hostname.rstrip("."))

    async def helo(self, name: str) -> Hit | None:
        return await self._by_name(keys.HLO, name)

    async def rcpt_facts(self, address: str) -> RcptFacts:
        self.stats.lookups += 1
        found_keys = self._rcpt_keys.get(address)
        if found_keys is None:
            found_keys = _bounded(self._rcpt_keys)[address] = _rcpt_keys(address)
        domain, vali, vbox, recip, vdom_key = found_keys
        if self.cache.ready and domain:
            vdom = self._hit_of(self.cache.lookup_name(keys.VDOM, domain))
            found = await self._point(vali + vbox + recip)
        else:
            found = await self._mget([vdom_key, *vali, *vbox, *recip])
            vdom = self._first([vdom_key], found) if domain else None
        return RcptFacts(address, domain, vdom, self._first(vali, found),
                         self._first(vbox, found), self._first(recip, found))

    async def logmap(self, sender: str) -> Hit | None:
        self.stats.lookups += 1
        candidates = keys.logmap_keys(sender)
        return self._first(candidates, await self._point(candidates))

    async def lookup_address(self, prefix: str, address: str) -> Hit | None:
        """An address in a VALI, VBOX, RECIP or LOGMAP table with that table's fall-backs."""
        self.stats.lookups += 1
        if prefix == keys.RECIP:
            candidates = keys.recip_keys(address)
        elif prefix == keys.LOGMAP:
            candidates = keys.logmap_keys(address)
        else:
            candidates = keys.address_keys(prefix, address)
        return self._first(candidates, await self._point(candidates))

    async def lookup(self, prefix: str, name: str) -> Hit | None:
        """Exactly the key PREFIX:name (names of scanned tables case-insensitively)."""
        self.stats.lookups += 1
        if prefix in (keys.VDOM, keys.HLO) or (
                prefix == keys.REV and keys.parse_network(name) is None):
            if self.cache.ready:
                self.stats.cache_answers += 1
                return self._hit_of(self.cache.lookup_name(prefix, name))
            candidates = list(dict.fromkeys([keys.key(prefix, name.lower()),
                                             keys.key(prefix, name)]))
            return self._first(candidates, await self._mget(candidates))
        candidates = [keys.key(prefix, name)]
        return self._first(candidates, await self._point(candidates))

    async def get(self, prefix: str, name: str) -> str | None:
        hit = await self.lookup(prefix, name)
        return None if hit is None else hit.value

    # --- internals

    async def _by_name(self, prefix: str, name: str) -> Hit | None:
        self.stats.lookups += 1
        if self.cache.ready:
            self.stats.cache_answers += 1
            return self._hit_of(self.cache.lookup_name(prefix, name))
        # Without the index: the name as the image stored it (lower-cased), and as sent.
        candidates = list(dict.fromkeys([keys.key(prefix, name.lower()), keys.key(prefix, name)]))
        return self._first(candidates, await self._mget(candidates))

    async def _point(self, redis_keys: Sequence[str]) -> dict[str, str | None]:
        """Values of point-table keys: from the cache, the misses in one MGET."""
        found: dict[str, str | None] = {}
        missing = []
        for k in redis_keys:
            value = self.cache.get(k)
            if value is MISS:
                missing.append(k)
            else:
                found[k] = value  # type: ignore[assignment]
        if not missing:
            self.stats.cache_answers += 1
            return found
        generation = self.cache.generation
        fetched = await self._mget(missing)
        for k in missing:
            self.cache.put(k, fetched[k], generation)
        found.update(fetched)
        return found

    async def _mget(self, redis_keys: Sequence[str]) -> dict[str, str | None]:
        unique = list(dict.fromkeys(redis_keys))
        values = await self._call(redis_client.mget(self._redis, unique))
        return dict(zip(unique, values, strict=True))

    async def _call(self, awaitable: Any) -> Any:
        self.stats.round_trips += 1
        try:
            async with asyncio.timeout(self.timeout):
                result = await awaitable
        except (*redis_client.ERRORS, TimeoutError) as exc:
            reason = ("timed out" if isinstance(exc, TimeoutError)
                      else f"{type(exc).__name__}: {exc}")
            self._set_health(False, reason)
            raise TableError(f"redis lookup failed: {reason}") from None
        if self.health.ok is not True:
            self._set_health(True, "ok")
        return result

    def _set_health(self, ok: bool, detail: str) -> None:
        if self.health.ok is not ok:
            (log.info if ok else log.warning)("redis %s: %s", _safe(self.url), detail)
            self.health.since = time.time()
        self.health.ok = ok
        self.health.detail = detail

    def _cache_state(self, ready: bool, detail: str) -> None:
        self.health.cache_ready = ready

    def _first(self, candidates: Sequence[str], found: dict[str, str | None]) -> Hit | None:
        for k in candidates:
            value = found.get(k)
            if value is not None:
                return self._hit(k, value)
        return None

    def _override(self, pair: tuple[str, str] | None) -> Override | None:
        if pair is None:
            return None
        override = decode(pair[1])
        if override is None and pair not in self._warned:
            if len(self._warned) < 10000:
                self._warned.add(pair)
            log.warning("warning: redis key %s has a value this version cannot read; "
                        "ignoring that override", pair[0])
        return override

    def _hit_of(self, pair: tuple[str, str] | None) -> Hit | None:
        return None if pair is None else self._hit(*pair)

    def _hit(self, redis_key: str, value: str) -> Hit:
        hit = self._hits.get((redis_key, value))
        if hit is None:
            hit = _bounded(self._hits)[redis_key, value] = interpret(redis_key, value)
        if hit.invalid and (redis_key, value) not in self._warned:
            if len(self._warned) < 10000:
                self._warned.add((redis_key, value))
            log.warning("warning: redis key %s has value %r: %s; treating it as a temporary "
                        "lookup error", redis_key, value, hit.error)
        return hit


def _rcpt_keys(address: str) -> tuple:
    """The domain, and the VALI, VBOX, RECIP and VDOM keys of an address, in lookup order."""
    _, domain = keys.split_address(address)
    return (domain, keys.address_keys(keys.VALI, address), keys.address_keys(keys.VBOX, address),
            keys.recip_keys(address), keys.key(keys.VDOM, domain))


def _bounded(memo: dict) -> dict:
    """The memo, emptied first once it holds 4096 answers: a flood of made-up recipients
    must not make it grow."""
    if len(memo) >= 4096:
        memo.clear()
    return memo


def interpret(redis_key: str, value: str) -> Hit:
    """The meaning of one stored value (pure): action, targets, or the reason it is unusable."""
    prefix = (keys.split_key(redis_key) or (redis_key, ""))[0]
    if prefix in keys.ACCESS_TABLES:
        action = access_value.parse(value)
        error = action.reason if action.kind is access_value.Kind.INVALID else ""
        if not error and prefix == keys.PSA and action.kind not in keys.PSA_ACTIONS:
            error = f"{value.strip()!r} is not permit, reject or dunno"
            action = access_value.invalid(error)
        return Hit(prefix, redis_key, value, action=action, error=error)
    if prefix in (keys.VALI, keys.LOGMAP):
        targets = keys.split_targets(value)
        error = "" if targets else "empty value"
        return Hit(prefix, redis_key, value, targets=targets, error=error)
    return Hit(prefix, redis_key, value, error="" if value.strip() else "empty value")


def _safe(url: str) -> str:
    from smtpgate.config import mask_secret

    return mask_secret(url)
