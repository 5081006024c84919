"""table_cache - the in-process copy of the Redis tables, kept correct by invalidation.

SYNOPSIS
    SCANNED = (PSA, REV, HLO, VDOM)      loaded whole, indexed
    POINT = (VALI, VBOX, RECIP, LOGMAP)  cached per key (LRU, absent keys too)

    NetworkIndex()
        .put(redis_key, network, value)  .discard(redis_key)
        .lookup(ip) -> tuple[str, str] | None          (redis key, value), most specific
    NameIndex()
        .put(redis_key, name, value)  .discard(redis_key)
        .lookup(name) -> tuple[str, str] | None        case-insensitive

    TableCache(max_entries=65536)
        .ready -> bool                                 False: callers go to Redis
        .load(pairs)                                   replace the scanned tables
        .apply(redis_key, value | None)                one scanned key changed
        .lookup_ip(prefix, ip) / .lookup_name(prefix, name)
        .lookup_override(ip) -> tuple[str, str] | None   the most specific override key
        .overrides() -> list[str]                      every override value held
        .generation -> int
        .get(redis_key) -> str | None | MISS
        .put(redis_key, value, generation)             ignored if invalidated since
        .invalidate(keys | None)                       None: everything (FLUSHDB)
        .clear()                                       not ready, nothing held

    CacheSync(cache, url, timeout, on_state=None)
        .start() -> asyncio.Task   .stop()   .ready_event
    loaded_text(sizes) -> str     TableCache.sizes() as its log line says them

DESCRIPTION
    The scanned tables are small and need more than exact-key lookups (CIDR
    most-specific match, case-insensitive names), so they are read whole with
    SCAN and indexed: networks per (IP version, prefix length) in dicts keyed
    by the network's integer, so a lookup is one dict probe per prefix length
    in use, longest first. A key that is not an IP or network goes to the
    name index (REV hostnames, HLO, VDOM). The timed overrides
    (keys.OVERRIDE, smtpgate's own) are held the same way, in a network
    index of their own: with none set, looking one up costs a loop over no
    prefix lengths, and no round trip.

    The point tables can be large (one key per address), so only the keys
    asked for are kept, absent ones included, in an LRU of max_entries.

    Invalidation uses Redis client-side caching in broadcast mode (CLIENT
    TRACKING ... BCAST PREFIX PSA: PREFIX REV: ...) redirected to a RESP2
    connection subscribed to __redis__:invalidate, so no server setting
    (notify-keyspace-events) is needed. A server tracks only the keys it
    holds, so on a Cluster there is one such connection per primary
    (redis_client.watch_targets), each also SCANned for the load; when any
    of them fails, all are dropped and the slot map is asked for again. A
    Sentinel set's master is found through the sentinels; after a failover
    the old connection is gone and the cache reloads from the new master.
    A changed point key is dropped; a changed scanned key is read again and
    re-indexed; a flush reloads all.
    put() carries the generation read before the lookup went to Redis, so a
    value read before an invalidation never lands in the cache after it.

    Whenever the invalidation connection is down, the cache is cleared and
    not ready: lookups go to Redis directly (tables.py) until CacheSync has
    reconnected, re-subscribed and reloaded. Stale answers are bounded by the
    delivery delay of one invalidation message (loopback: well under 1 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis

from smtpgate.lookups import keys, redis_client

log = logging.getLogger("smtpgate.tables")

SCANNED = (keys.PSA, keys.REV, keys.HLO, keys.VDOM)
POINT = (keys.VALI, keys.VBOX, keys.RECIP, keys.LOGMAP)
NETWORK_TABLES = (keys.PSA, keys.REV)
# what is loaded whole (the scanned tables, the overrides), and what tracking watches
SCANNED_PREFIXES = (*(f"{p}:" for p in SCANNED), keys.OVERRIDE + ":")
WATCHED = SCANNED_PREFIXES + tuple(f"{p}:" for p in POINT)
INVALIDATE_CHANNEL = "__redis__:invalidate"
MISS = object()


def is_scanned(redis_key: str) -> bool:
    return redis_key.startswith(SCANNED_PREFIXES)


class NetworkIndex:
    """IP and CIDR keys of one table; lookup returns the most specific match."""

    def __init__(self) -> None:
        # (version, prefixlen) -> {network as int: {redis key: value}}
        self._nets: dict[tuple[int, int], dict[int, dict[str, str]]] = {}
        self._where: dict[str, tuple[int, int, int]] = {}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    def __len__(self) -> int:
        return len(self._where)

    def put(self, redis_key: str, net: keys.IPNetwork, value: str) -> None:
        self.discard(redis_key)
        slot = (net.version, net.prefixlen)
        number = int(net.network_address)
        self._nets.setdefault(slot, {}).setdefault(number, {})[redis_key] = value
        self._where[redis_key] = (net.version, net.prefixlen, number)
        lengths = self._lengths[net.version]
        if net.prefixlen not in lengths:
            lengths.append(net.prefixlen)
            lengths.sort(reverse=True)

    def discard(self, redis_key: str) -> None:
        where = self._where.pop(redis_key, None)
        if where is None:
            return
        version, length, number = where
        table = self._nets[(version, length)]
        entries = table[number]
        del entries[redis_key]
        if not entries:
            del table[number]
        if not table:
            del self._nets[(version, length)]
            self._lengths[version].remove(length)

    def lookup(self, ip: keys.IPAddress) -> tuple[str, str] | None:
        number = int(ip)
        bits = ip.max_prefixlen
        for length in self._lengths[ip.version]:
            shift = bits - length
            entries = self._nets[(ip.version, length)].get(number >> shift << shift)
            if entries:
                # Two spellings of one network (10.0.0.1/24, 10.0.0.0/24): pick one stably.
                redis_key = min(entries)
                return redis_key, entries[redis_key]
        return None

    def values(self) -> list[str]:
        return [v for table in self._nets.values() for entries in table.values()
                for v in entries.values()]


class NameIndex:
    """Non-IP keys of one table, matched case-insensitively."""

    def __init__(self) -> None:
        self._names: dict[str, dict[str, str]] = {}
        self._where: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._where)

    def put(self, redis_key: str, name: str, value: str) -> None:
        self.discard(redis_key)
        folded = name.lower().rstrip(".") or name
        self._names.setdefault(folded, {})[redis_key] = value
        self._where[redis_key] = folded

    def discard(self, redis_key: str) -> None:
        folded = self._where.pop(redis_key, None)
        if folded is None:
            return
        entries = self._names[folded]
        del entries[redis_key]
        if not entries:
            del self._names[folded]

    def lookup(self, name: str) -> tuple[str, str] | None:
        entries = self._names.get(name.lower().rstrip(".") or name)
        if not entries:
            return None
        redis_key = min(entries)
        return redis_key, entries[redis_key]


class TableCache:
    def __init__(self, max_entries: int = 65536) -> None:
        self.max_entries = max_entries
        self.ready = False
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self._point: OrderedDict[str, str | None] = OrderedDict()
        self._reset_scanned()

    def _reset_scanned(self) -> None:
        self._nets = {p: NetworkIndex() for p in NETWORK_TABLES}
        self._names = {p: NameIndex() for p in SCANNED}
        self._overrides = NetworkIndex()

    # --- scanned tables

    def load(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._reset_scanned()
        for redis_key, value in pairs:
            self.apply(redis_key, value)

    def apply(self, redis_key: str, value: str | None) -> None:
        override = keys.override_network(redis_key)
        if override is not None:
            self._overrides.discard(redis_key)
            net = keys.parse_network(override)
            if net is not None and value is not None:
                self._overrides.put(redis_key, net, value)
            return
        split = keys.split_key(redis_key)
        if split is None or split[0] not in SCANNED:
            return
        prefix, name = split
        net = keys.parse_network(name) if prefix in self._nets else None
        if net is not None:
            self._nets[prefix].discard(redis_key)
            if value is not None:
                self._nets[prefix].put(redis_key, net, value)
            return
        self._names[prefix].discard(redis_key)
        if value is not None:
            self._names[prefix].put(redis_key, name, value)

    def lookup_ip(self, prefix: str, ip: keys.IPAddress) -> tuple[str, str] | None:
        return self._nets[prefix].lookup(ip)

    def lookup_name(self, prefix: str, name: str) -> tuple[str, str] | None:
        return self._names[prefix].lookup(name)

    def lookup_override(self, ip: keys.IPAddress) -> tuple[str, str] | None:
        return self._overrides.lookup(ip)

    def overrides(self) -> list[str]:
        return self._overrides.values()

    def sizes(self) -> dict[str, int]:
        """Keys held per scanned table, and "point": the point tables' keys remembered."""
        sizes = {p: len(self._names[p]) for p in SCANNED}
        for p in NETWORK_TABLES:
            sizes[p] += len(self._nets[p])
        sizes["overrides"] = len(self._overrides)
        sizes["point"] = len(self._point)
        return sizes

    # --- point tables

    def get(self, redis_key: str) -> str | object | None:
        if not self.ready:
            return MISS
        try:
            value = self._point[redis_key]
        except KeyError:
            self.misses += 1
            return MISS
        self._point.move_to_end(redis_key)
        self.hits += 1
        return value

    def put(self, redis_key: str, value: str | None, generation: int) -> None:
        if not self.ready or generation != self.generation:
            return
        self._point[redis_key] = value
        self._point.move_to_end(redis_key)
        while len(self._point) > self.max_entries:
            self._point.popitem(last=False)

    def invalidate(self, redis_keys: Iterable[str] | None) -> None:
        self.generation += 1
        if redis_keys is None:
            self._point.clear()
            return
        for redis_key in redis_keys:
            self._point.pop(redis_key, None)

    def clear(self) -> None:
        self.ready = False
        self.generation += 1
        self._point.clear()
        self._reset_scanned()


class CacheSync:
    """Keeps a TableCache in step with Redis; one task per process."""

    heartbeat = 5.0
    max_backoff = 5.0

    def __init__(self, cache: TableCache, url: str, timeout: float,
                 on_state: Callable[[bool, str], None] | None = None) -> None:
        self.cache = cache
        self.url = url
        self.timeout = timeout
        self.on_state = on_state or (lambda ok, detail: None)
        self.ready_event = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._reconnected = False
        self._aborted = False
        self._clients: list[aioredis.Redis] = []
        self._last_error = ""

    def start(self) -> asyncio.Task:
        self._stopping = False
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="smtpgate-table-cache")
        return self._task

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            # redis-py may turn a cancellation inside a read into a timeout and carry on; the
            # flag ends the loops, and the wait is bounded either way.
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self.timeout + 1.0)
            self._task = None
        self.cache.clear()
        self.ready_event.clear()

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            clients: list[aioredis.Redis] = []
            try:
                # One RESP2 connection per server holding keys (a Cluster's every primary),
                # without retries: a silent reconnect would subscribe again without CLIENT
                # TRACKING and leave the cache stale. Fail instead, and start over from a
                # full reload.
                clients = await asyncio.wait_for(
                    redis_client.watch_targets(self.url, self.timeout), self.timeout * 2)
                await self._session(clients)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: drop the cache, reconnect
                detail = f"{type(exc).__name__}: {exc}"
                if self.cache.ready:
                    backoff = 0.1  # it was working: a failover or restart, try again soon
                if self.cache.ready or detail != self._last_error:
                    log.warning("table cache: invalidation stream down (%s); reading Redis "
                                "directly until it is back", detail)
                self._last_error = detail
                self.cache.clear()
                self.ready_event.clear()
                self.on_state(False, detail)
            finally:
                for client in clients:
                    with contextlib.suppress(Exception):
                        await client.aclose()
            if self._stopping:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _session(self, clients: list[aioredis.Redis]) -> None:
        pubsubs = [client.pubsub() for client in clients]
        self._aborted = False
        try:
            for pubsub in pubsubs:
                await asyncio.wait_for(self._subscribe(pubsub), self.timeout)
            self._clients = clients
            await self._load()
            self.cache.ready = True
            self.ready_event.set()
            self.on_state(True, "cache loaded")
            log.info("table cache: loaded %s", loaded_text(self.cache.sizes()))
            listeners = [asyncio.create_task(self._listen(p, c))
                         for p, c in zip(pubsubs, clients, strict=True)]
            try:
                done, _ = await asyncio.wait(listeners, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                # One server's stream ended: the others stop too (the flag, since redis-py
                # may turn a cancellation inside a read into a timeout and carry on).
                self._aborted = True
                for task in listeners:
                    task.cancel()
                await asyncio.wait(listeners, timeout=self.timeout + 1.0)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self._clients = []
            for pubsub in pubsubs:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _subscribe(self, pubsub: aioredis.client.PubSub) -> None:
        await pubsub.connect()
        conn = pubsub.connection
        await conn.send_command("CLIENT", "ID")
        client_id = await conn.read_response()
        prefixes: list[str] = []
        for prefix in WATCHED:
            prefixes += ["PREFIX", prefix]
        # Redirect to this very connection: it is then subscribed to the channel, and if it
        # drops, tracking and subscription go together (no silent half state).
        await conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST",
                                *prefixes)
        reply = await conn.read_response()
        if str(reply).upper() != "OK":
            raise ConnectionError(f"CLIENT TRACKING refused: {reply}")
        await pubsub.subscribe(INVALIDATE_CHANNEL)
        self._reconnected = False
        conn.register_connect_callback(self._on_reconnect)
        while True:
            msg = await pubsub.get_message(timeout=self.timeout)
            if msg is None:
                raise TimeoutError("no subscribe confirmation")
            if msg["type"] == "subscribe":
                return

    async def _on_reconnect(self, connection: object) -> None:
        self._reconnected = True

    async def _load(self) -> None:
        pairs: list[tuple[str, str]] = []
        for client in self._clients:
            for prefix in SCANNED_PREFIXES:
                cursor = 0
                while True:
                    cursor, found = await asyncio.wait_for(
                        client.scan(cursor, match=f"{prefix}*", count=1000), self.timeout)
                    if found:
                        values = await self._values(client, found)
                        pairs += [(k, v) for k, v in zip(found, values, strict=True)
                                  if v is not None]
                    if cursor == 0:
                        break
        self.cache.load(pairs)

    async def _values(self, client: aioredis.Redis, redis_keys: list[str]) -> list[str | None]:
        """GETs in one pipeline: a Cluster node refuses an MGET across its hash slots."""
        async with client.pipeline(transaction=False) as pipe:
            for redis_key in redis_keys:
                pipe.get(redis_key)
            return await asyncio.wait_for(pipe.execute(), self.timeout)

    async def _listen(self, pubsub: aioredis.client.PubSub, client: aioredis.Redis) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        ping_sent: float | None = None
        while not self._stopping and not self._aborted:
            msg = await pubsub.get_message(timeout=1.0)
            if self._reconnected:
                raise ConnectionError("invalidation connection was re-established")
            now = loop.time()
            if msg is None:
                if ping_sent is not None and now - ping_sent > self.timeout:
                    raise TimeoutError("Redis did not answer PING on the invalidation connection")
                if ping_sent is None and now - last_heard > self.heartbeat:
                    await pubsub.ping()
                    ping_sent = now
                continue
            last_heard, ping_sent = now, None
            if msg["type"] == "message" and msg["channel"] == INVALIDATE_CHANNEL:
                await self._invalidated(msg["data"], client)

    async def _invalidated(self, data: list[str] | None, client: aioredis.Redis) -> None:
        if data is None:  # FLUSHDB / FLUSHALL
            self.cache.invalidate(None)
            await self._load()
            return
        self.cache.invalidate(data)
        scanned = [k for k in data if is_scanned(k)]
        if scanned:
            values = await self._values(client, scanned)
            for redis_key, value in zip(scanned, values, strict=True):
                self.cache.apply(redis_key, value)



def loaded_text(sizes: dict[str, int]) -> str:
    """The load's log line: `PSA 2 keys, REV 0 keys, ..., 1 override, 0 point lookups
    remembered`."""
    tables = [f"{table} {count} key{'' if count == 1 else 's'}"
              for table, count in sizes.items() if table not in ("point", "overrides")]
    extra = []
    if "overrides" in sizes:
        count = sizes["overrides"]
        extra.append(f"{count} override{'' if count == 1 else 's'}")
    point = sizes.get("point", 0)
    return ", ".join([*tables, *extra,
                      f"{point} point lookup{'' if point == 1 else 's'} remembered"])
