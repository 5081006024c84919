"""shadow_tables - the candidate table keys, held in memory, laid over the live answers.

SYNOPSIS
    ShadowTables(pairs=())              pairs: (image key "PSA:192.0.2.7", value)
        view.facts(check, facts) -> facts      the check's table answers as the candidate
                                               keys would have given them
        len(view)
    await load(redis) -> ShadowTables    every smtpgate:shadow:* key (SCAN; a Cluster: every
                                         primary)
    ShadowRefresher(redis, every=5.0, timeout=2.0)
        .tables ; await .refresh() ; await .run() ; .failed

DESCRIPTION
    `smtpgate table set --shadow PREFIX KEY VALUE` writes a candidate key
    beside the live one (keys.shadow_key). A candidate set is a handful of
    keys an operator is trying out, so every worker holds all of them in
    memory (the table cache's indexes: smtpgate.lookups.table_cache) and
    reads them again every few seconds: a session's shadow decision costs
    no Redis round trip.

    facts() takes a check's facts as the policy recorded them
    (smtpgate.policy.decisions), which name the live key that matched, and
    gives the answer of the live keys and the candidate keys together,
    the candidate winning where both have the same key: for PSA and REV by
    address, the most specific network of either; for HLO, VDOM and REV by
    name, the candidate's name if it has one; for VALI, VBOX, RECIP and
    LOGMAP, the first key in the table's lookup order (keys.py) that either
    has. A check without candidate keys of its tables gets its facts back
    unchanged (the same object). To try a key's removal, give the candidate
    DUNNO (the access tables); a candidate cannot remove a VALI, VBOX,
    VDOM or LOGMAP key.

    A failed refresh keeps the keys last read and sets `failed` (logged
    once, until one works again).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from smtpgate.address import client_address
from smtpgate.lookups import keys
from smtpgate.lookups.redis_client import ERRORS
from smtpgate.lookups.table_cache import TableCache

log = logging.getLogger("smtpgate.shadow")

Facts = dict[str, Any]


class ShadowTables:
    def __init__(self, pairs: Any = ()) -> None:
        self._index = TableCache()
        self._point: dict[str, str] = {}
        pairs = list(pairs)
        self._index.load(pairs)
        self.prefixes: set[str] = set()
        for redis_key, value in pairs:
            split = keys.split_key(redis_key)
            if split is None:
                continue
            self.prefixes.add(split[0])
            if split[0] in (keys.VALI, keys.VBOX, keys.RECIP, keys.LOGMAP):
                self._point[redis_key] = value
        self._count = len(pairs)

    def __len__(self) -> int:
        return self._count

    # --- one table each ---------------------------------------------------------------------

    def _network(self, prefix: str, ip: str, live: list | None) -> list | None:
        """[name, value] deciding for ip: the more specific of live and candidate."""
        if prefix not in self.prefixes:
            return live
        try:
            found = self._index.lookup_ip(prefix, client_address(ip))
        except ValueError:
            return live
        if found is None:
            return live
        name = found[0].partition(":")[2]
        if live is not None:
            mine, theirs = keys.parse_network(name), keys.parse_network(live[0])
            if mine is not None and theirs is not None and theirs.prefixlen > mine.prefixlen:
                return live
        return [name, found[1]]

    def _name(self, prefix: str, name: str) -> str | None:
        if prefix not in self.prefixes:
            return None
        found = self._index.lookup_name(prefix, name)
        return None if found is None else found[1]

    def _first(self, candidates: list[str], live_key: str | None) -> tuple[str, str] | None:
        """(key, candidate value) when a candidate key comes first; None: the live answer."""
        for candidate in candidates:
            value = self._point.get(candidate)
            if value is not None:
                return candidate, value
            if candidate == live_key:
                return None
        return None

    # --- a check's facts -----------------------------------------------------------------------

    def facts(self, check: str, facts: Facts) -> Facts:
        if not self.prefixes:
            return facts
        change = _CHANGES.get(check)
        return change(self, facts) if change is not None else facts

    def _access_list(self, f: Facts) -> Facts:
        psa = self._network(keys.PSA, f["ip"], f.get("psa"))
        return f if psa is f.get("psa") else {**f, "psa": psa}

    def _helo(self, f: Facts) -> Facts:
        value = self._name(keys.HLO, f["name"].lower())
        return f if value is None else {**f, "access": value}

    def _sender_login(self, f: Facts) -> Facts:
        if keys.LOGMAP not in self.prefixes or not f["sender"]:
            return f
        found = self._first(keys.logmap_keys(f["sender"]), f.get("hit"))
        if found is None:
            return f
        return {**f, "hit": found[0], "owners": sorted(keys.split_targets(found[1]))}

    def _domain(self, f: Facts) -> Facts:
        domain = keys.split_address(f["looked"])[1]
        if domain and self._name(keys.VDOM, domain) is not None:
            return {**f, "vdom": keys.key(keys.VDOM, domain)}
        return f

    def _destination(self, f: Facts) -> Facts:
        return self._domain(f)

    def _recipient(self, f: Facts) -> Facts:
        f = self._domain(f)
        looked = f["looked"]
        changed = {}
        for prefix, field in ((keys.VALI, "vali"), (keys.VBOX, "vbox")):
            if prefix in self.prefixes:
                found = self._first(keys.address_keys(prefix, looked), f.get(field))
                if found is not None:
                    changed[field] = found[0]
        if keys.RECIP in self.prefixes:
            live = f.get("recip")
            found = self._first(keys.recip_keys(looked), live[0] if live else None)
            if found is not None:
                changed["recip"] = list(found)
        return {**f, **changed} if changed else f


def _client_fcrdns(view: ShadowTables, f: Facts) -> Facts:
    if keys.REV not in view.prefixes:
        return f
    rev_ip = view._network(keys.REV, f["ip"], f.get("rev_ip"))
    by_name = dict(f.get("rev_by_name") or {})
    for name in f.get("rev_names") or ():
        value = view._name(keys.REV, name)
        if value is not None:
            by_name[name] = value
    return {**f, "rev_ip": rev_ip, "rev_by_name": by_name}


_CHANGES = {
    "access_list": ShadowTables._access_list, "helo": ShadowTables._helo,
    "client_fcrdns": _client_fcrdns, "sender_login": ShadowTables._sender_login,
    "destination": ShadowTables._destination, "recipient": ShadowTables._recipient,
}


async def load(redis: Any) -> ShadowTables:
    """Every candidate key, read with SCAN and GETs in pipelines of 500."""
    found = [k.decode() if isinstance(k, bytes) else k
             async for k in redis.scan_iter(match=f"{keys.SHADOW_TABLES}*", count=500)]
    pairs = []
    for start in range(0, len(found), 500):
        batch = found[start:start + 500]
        async with redis.pipeline(transaction=False) as pipe:
            for redis_key in batch:
                pipe.get(redis_key)
            values = await pipe.execute()
        for redis_key, value in zip(batch, values, strict=True):
            if value is not None:
                text = value.decode() if isinstance(value, bytes) else value
                pairs.append((redis_key[len(keys.SHADOW_TABLES):], text))
    return ShadowTables(pairs)


class ShadowRefresher:
    """The worker's copy of the candidate keys, read again every `every` seconds."""

    def __init__(self, redis: Any, every: float = 5.0, timeout: float = 2.0) -> None:
        self.redis = redis
        self.every = every
        self.timeout = timeout
        self.tables = ShadowTables()
        self.failed = False

    async def refresh(self) -> None:
        try:
            async with asyncio.timeout(self.timeout * 5):
                self.tables = await load(self.redis)
        except (*ERRORS, TimeoutError) as exc:
            if not self.failed:
                log.warning("warning: shadow rules: cannot read the candidate keys: %s; "
                            "keeping the %d read before", exc or "timed out", len(self.tables))
            self.failed = True
            return
        if self.failed:
            log.info("shadow rules: candidate keys read again (%d)", len(self.tables))
        self.failed = False

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.every)

