"""evidence - refused sessions' records in Redis: written in batches, off the reply path.

SYNOPSIS
    EvidenceStore(redis, ttl=172800.0, size_limit=8192, timeout=2.0, memory=0)
        store.keep(session_id, producer, repeat=None)
                                    producer() -> dict, repeat() -> signature | None,
                                    both called when written
        store.written, store.aliases, store.over_budget
        store.stream = callable() -> list[dict]     entries for keys.SHADOW_LOG, each batch
        store.keep_replay(session_id, producer)     a session's replay record, soon
        store.replay_every, store.replay_sampled_out
        await store.load(session_id) -> dict | None
        await store.flush() ; await store.close()
    encode(record, size_limit) -> bytes
    MAX_ENTRIES, MAX_TEXT, MAX_PENDING

DESCRIPTION
    A session that was refused something hands its record here (the
    engine builds it: smtpgate.smtp.evidence); it is stored as one JSON
    string under smtpgate:session:<id> (smtpgate.lookups.keys) with
    EX ttl, and `smtpgate explain --session` reads it back.

    keep() only notes the session and, if none is due, arms a timer:
    nothing is serialised or sent before the reply that caused it is
    written. Every BATCH seconds the noted sessions are written in one
    pipeline (no transaction: each record is a single key, which is what a
    Redis Cluster needs), each built at that moment from the live session,
    so a session noted several times within a batch costs one write. One
    batch is in flight at a time. A Redis failure costs the records of
    that batch and one warning (then one line when writing works again);
    it never reaches a client. With Redis gone and more than MAX_PENDING
    sessions waiting, further ones are not kept and are counted in that
    warning.

    The bound on a record (encode()): at most MAX_ENTRIES verdicts and
    MAX_ENTRIES replies, the first half and the last half kept when a
    session has more, and the JSON at most size_limit bytes. A record over
    either bound has every text cut at MAX_TEXT characters, then fewer
    entries kept, halving until it fits (a typical refused session, about
    1.5 KB, is written as it is). What was left out is counted in the record's `omitted`
    field ({"verdicts": n, "verdicts_at": i, "replies": m, "replies_at":
    j}, the positions where the gaps are), so `explain` says so.

    Repeats. Most MX refusals are the same client turned away at connect
    (access list, DNSBL, pregreet) again and again. repeat() gives an
    ended session's signature (smtpgate.smtp.evidence.refused_alike:
    client IP, then all that explain shows but the id, port and times); the first session with a
    signature gets its full record, and for REPEAT_WINDOW (10 minutes)
    later sessions with the same one get an alias, "FIRST_ID IP", not
    encoded from the session at all: a field in one hash per minute of
    the session's start (smtpgate.lookups.keys.session_alias_key), so a
    batch's aliases are one HSET, not a SET each; load() gives it back as
    {"same_as": first id, "time": t, "ip": client}. The hash expires a
    minute after the records of its minute; an alias whose record has
    expired sooner is reported so by explain. The signatures are
    remembered per worker, the MAX_REPEATS most recent, only once their
    record was written.

    stream, when set, gives entries (dicts of text) added with the batch to
    the stream keys.SHADOW_LOG (XADD, approximate MAXLEN
    keys.SHADOW_LOG_LENGTH): the shadow rules' disagreements
    (smtpgate.policy.shadow), written off the reply path as the records
    are. They are bounded by the stream's length, not the budget below.

    keep_replay() notes a session's replay record (replay_records: the
    facts each check decided on, smtpgate.smtp.evidence.replay_record),
    written with the next batch as an entry {"r": JSON} of the stream
    keys.REPLAY_LOG, which XADD trims (MINID, approximate) to the records'
    ttl. Replay records count against the budget below, as records do,
    and are sampled before it is spent, so that a busy day is recorded
    thinly throughout rather than fully until noon: every session's while
    half the budget is free, one in 2 while a quarter is, one in 4 while
    an eighth is, and so on to one in MAX_SAMPLE, then none until older
    hours expire (replay_every: the current one in N). Each record says
    the sampling it was written under ("sample": N), so `smtpgate replay`
    says so; replay_sampled_out counts the records left out, and a
    warning says when the sampling grows.

    The budget. memory (session_record_memory divided among the node's
    workers) bounds what this worker's records may take in Redis: the
    bytes written (value + KEY_COST, alias + ALIAS_COST) are counted per hour, an hour
    counting until its records have expired (ttl); past the budget, no
    record or alias is written, each is counted in over_budget (the
    metric smtpgate_session_records_over_budget_total) and a warning says
    so at most once a minute. Overwrites of one session's record count
    again: the bound errs high.

    What a record costs, measured with Redis 7 (MEMORY USAGE, and
    used_memory over 10,000 keys, which adds the expiry table): a
    connect refusal's record, 598 bytes of JSON, 712 by MEMORY USAGE; a
    RCPT refusal's, 667 bytes, 840 (915 in used_memory). KEY_COST, 200,
    rounds that up. An alias, 38 bytes of field and value, takes 132 in
    used_memory in a minute's hash of 3,000 (83 by MEMORY USAGE), 44 in a
    small one (under 128 fields, a listpack); ALIAS_COST, 100, rounds
    that up. So 256 MiB holds about 330,000 full records or 1,900,000
    aliases: with the default ttl (2 days), 1.9 distinct refusals a
    second, or 11 repeats, all day. At 50 refusals a second a node would
    need some 7 GB for 2 days of full records, 1.2 GB if all were
    repeats; past the budget the newest
    go unrecorded until the oldest hour expires, so size the budget (or
    shorten the ttl) to the refusal rate when explain must answer for
    every session.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from smtpgate.lookups import keys
from smtpgate.lookups.expiring_cache import ExpiringCache
from smtpgate.lookups.redis_client import ERRORS
from smtpgate.session_id import time_of as session_time

log = logging.getLogger("smtpgate.evidence")

BATCH = 0.05  # seconds a record waits to share its round trip with others
MAX_ENTRIES = 64
MAX_TEXT = 500
MAX_PENDING = 10000
LISTS = ("verdicts", "replies")
REPEAT_WINDOW = 600.0  # seconds a full record stands for later sessions refused alike
MAX_REPEATS = 4096  # refusals remembered for that, per worker (least recently seen go first)
KEY_COST = 200  # Redis bytes of a key beyond its value (key, entry, expiry): see DESCRIPTION
ALIAS_COST = 100  # Redis bytes of a hash field beyond its name and value: see DESCRIPTION
BUCKET = 3600.0  # the budget counts bytes written per hour
WARN_EVERY = 60.0
REPLAY_COST = 80  # Redis bytes of a stream entry beyond its JSON (id, field name, listpack)
MAX_SAMPLE = 1024  # at the most, one in this many sessions' replay records is written


class EvidenceStore:
    def __init__(self, redis_client: Any, ttl: float = 172800.0, size_limit: int = 8192,
                 timeout: float = 2.0, memory: int = 0) -> None:
        self.redis = redis_client
        self.ttl = ttl
        self.size_limit = size_limit
        self.timeout = timeout
        self.memory = memory  # this worker's share of session_record_memory; 0: no bound
        self.written = 0
        self.aliases = 0  # of those written, how many were aliases
        self.over_budget = 0  # not written: the budget was spent (a running total)
        self.lost = 0  # not written since the last warning (Redis failing, or too many waiting)
        self._pending: dict[str, tuple[Callable[[], dict], Callable[[], Any] | None]] = {}
        self.stream: Callable[[], list[dict]] | None = None  # the shadow rules' log entries
        self._replays: dict[str, Callable[[], dict]] = {}
        self.replay_every = 1  # one in this many sessions' replay records is written
        self.replay_sampled_out = 0
        self._replay_count = 0
        # repeat signature -> (first session's id, when written, when its record expires)
        # (kept REPEAT_WINDOW: a refusal from a client never seen again leaves after that)
        self._recent = ExpiringCache(MAX_REPEATS)
        self._spent: deque[list[float]] = deque()  # [hour start, Redis bytes written]
        self._spent_total = 0.0
        self._over_warned = -WARN_EVERY  # monotonic time of the last over-budget warning
        self._over_since_warning = 0
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task | None = None
        self._failing = False
        self._closed = False

    def keep(self, session_id: str, producer: Callable[[], dict],
             repeat: Callable[[], Any] | None = None) -> None:
        """Write this session's record soon; producer() builds it when the batch goes.

        repeat() then says what the session was refused (client IP first, hashable) or
        None: a session refused alike within REPEAT_WINDOW gets an alias, not a record."""
        if self._closed or self.ttl <= 0:
            return
        if session_id not in self._pending and len(self._pending) >= MAX_PENDING:
            self.lost += 1
            return
        self._pending[session_id] = (producer, repeat)
        if self._timer is None:
            # a context of its own: the batch belongs to no session (its log lines carry none)
            self._timer = asyncio.get_running_loop().call_later(
                BATCH, self._start, context=contextvars.Context())

    def keep_replay(self, session_id: str, producer: Callable[[], dict]) -> None:
        """Write this session's replay record with the next batch."""
        if self._closed or self.ttl <= 0:
            return
        if len(self._replays) >= MAX_PENDING:
            self.lost += 1
            return
        self._replays[session_id] = producer
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                BATCH, self._start, context=contextvars.Context())

    def _start(self) -> None:
        self._timer = None
        if self._writing is not None and not self._writing.done():
            self._timer = asyncio.get_running_loop().call_later(
                BATCH, self._start, context=contextvars.Context())
            return
        self._writing = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Write the sessions noted so far (the timer's job; also at close)."""
        batch, self._pending = self._pending, {}
        replays, self._replays = self._replays, {}
        entries = self.stream() if self.stream is not None else []
        if not batch and not entries and not replays:
            return
        ttl = max(1, int(self.ttl))
        now, clock = time.time(), time.monotonic()
        firsts: dict[Any, tuple[str, float, float]] = {}  # this batch's new full records
        if self.memory:
            self._spend(now, 0)  # the hours whose records have expired stop counting
        spent = aliases = skipped = 0
        buckets: dict[str, dict[str, str]] = {}
        try:
            pipe = self.redis.pipeline(transaction=False)
            for session_id, (producer, repeat) in batch.items():
                if self.memory and self._spent_total + spent >= self.memory:
                    skipped += 1
                    continue
                signature = repeat() if repeat is not None else None
                first = None
                if signature is not None:
                    first = firsts.get(signature) or self._recent.get(signature)
                    if first is not None and (first[0] == session_id or now - first[1] >
                                              REPEAT_WINDOW or first[2] - now < 60):
                        first = None
                if first is not None:
                    alias = f"{first[0]} {signature[0]}"
                    buckets.setdefault(keys.session_alias_key(session_id), {})[session_id] = alias
                    aliases += 1
                    spent += len(alias) + len(session_id) + ALIAS_COST
                    continue
                data = encode(producer(), self.size_limit)
                if signature is not None:
                    firsts[signature] = (session_id, now, now + ttl)
                pipe.set(keys.session_record_key(session_id), data, ex=ttl)
                spent += len(data) + KEY_COST
            for key, mapping in buckets.items():  # a batch's aliases: one HSET per minute
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, ttl + 60)
            for entry in entries:
                pipe.xadd(keys.SHADOW_LOG, entry, maxlen=keys.SHADOW_LOG_LENGTH,
                          approximate=True)
            spent += self._add_replays(pipe, replays, now, ttl, spent)
            if len(pipe) == 0:
                self._over(skipped, clock)
                return
            async with asyncio.timeout(self.timeout):
                await pipe.execute()
        except (*ERRORS, TimeoutError) as exc:
            self.lost += len(batch)
            if not self._failing:
                log.warning("warning: session records: cannot write to Redis: %s; "
                            "%d records lost", exc or "timed out", self.lost)
                self._failing, self.lost = True, 0
            return
        except Exception:  # a bug in a record's producer: say so, keep serving
            log.exception("error: session records: %d not written", len(batch))
            return
        self._spend(now, spent)
        for signature, first in firsts.items():
            self._recent.put(signature, first, REPEAT_WINDOW)
        self.written += len(batch) - skipped
        self.aliases += aliases
        self._over(skipped, clock)
        if self._failing or self.lost:
            log.warning("warning: session records: written again; %d lost meanwhile",
                        self.lost)
            self._failing, self.lost = False, 0

    def _add_replays(self, pipe: Any, replays: dict[str, Callable[[], dict]], now: float,
                     ttl: int, spent: int) -> int:
        """The batch's replay records, sampled (see DESCRIPTION): the bytes they take."""
        added = 0
        oldest = f"{int((now - ttl) * 1000)}-0"
        for producer in replays.values():
            self._replay_count += 1
            every = self._replay_sample(self._spent_total + spent + added)
            if every > self.replay_every:
                log.warning("warning: replay records: %s", f"at most 1/{every} of "
                            f"session_record_memory left; one session in {every} recorded"
                            if every else "session_record_memory spent; none recorded")
            self.replay_every = every or MAX_SAMPLE * 2
            if not every or self._replay_count % every:
                self.replay_sampled_out += 1
                continue
            record = producer()
            record["sample"] = self.replay_every
            data = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
            pipe.xadd(keys.REPLAY_LOG, {"r": data}, minid=oldest, approximate=True)
            added += len(data.encode()) + REPLAY_COST
        return added

    def _replay_sample(self, used: float) -> int:
        """One in how many sessions' replay records to write now: 1 while half the budget
        is free, 2 while a quarter is, 4 while an eighth is...; 0 (none) past MAX_SAMPLE."""
        if not self.memory:
            return 1
        free = self.memory - used
        if free <= self.memory / MAX_SAMPLE:
            return 0
        every = 1
        while free <= self.memory / (every * 2):
            every *= 2
        return every

    def _spend(self, now: float, spent: int) -> None:
        """Count bytes written in this hour's bucket; forget buckets whose records expired."""
        hour = now - now % BUCKET
        if self._spent and self._spent[-1][0] == hour:
            self._spent[-1][1] += spent
        else:
            self._spent.append([hour, float(spent)])
        self._spent_total += spent
        while self._spent and self._spent[0][0] + BUCKET + self.ttl <= now:
            self._spent_total -= self._spent.popleft()[1]

    def _over(self, skipped: int, clock: float) -> None:
        """Count records the budget kept out; say so at most once a minute."""
        if not skipped:
            return
        self.over_budget += skipped
        self._over_since_warning += skipped
        if clock - self._over_warned >= WARN_EVERY:
            log.warning("warning: session records: over session_record_memory (%d bytes "
                        "for this worker); %d records not written", self.memory,
                        self._over_since_warning)
            self._over_warned, self._over_since_warning = clock, 0

    async def load(self, session_id: str) -> dict | None:
        """The stored record, or None when there is none (unknown id, or expired)."""
        async with asyncio.timeout(self.timeout):
            raw = await self.redis.get(keys.session_record_key(session_id))
            if raw is None:
                try:
                    bucket = keys.session_alias_key(session_id)
                except ValueError:  # not an id smtpgate makes: no minute to look in
                    return None
                alias = await self.redis.hget(bucket, session_id)
                if alias is None:
                    return None
                first, _, ip = (alias.decode() if isinstance(alias, bytes) else alias) \
                    .partition(" ")
                return {"same_as": first, "time": session_time(session_id), "ip": ip}
        return json.loads(raw)

    async def close(self) -> None:
        """Write what is still waiting; later keep() calls are ignored."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        await self.flush()


# json.dumps' text, made by one encoder for every record (dumps makes one per call with these
# options) and without the check for circular references: a record is a tree made afresh of
# strings and numbers (smtpgate.smtp.evidence), and the check's bookkeeping per list and dict
# was a third of the encoding (about 4 of 11 us a refused session's record).
_RECORD_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                check_circular=False).encode


def encode(record: dict, size_limit: int) -> bytes:
    """The record as JSON of at most size_limit bytes (see DESCRIPTION)."""
    if all(len(record.get(name) or ()) <= MAX_ENTRIES for name in LISTS):
        data = _RECORD_JSON(record).encode()
        if len(data) <= size_limit:  # the usual case
            return data
    record = {name: _cut(value) for name, value in record.items()}
    keep = MAX_ENTRIES
    while True:
        trimmed, omitted = dict(record), {}
        for name in LISTS:
            entries = record.get(name) or []
            if len(entries) > keep:
                head = (keep + 1) // 2
                tail = keep - head
                trimmed[name] = entries[:head] + (entries[len(entries) - tail:] if tail else [])
                omitted[name] = len(entries) - keep
                omitted[f"{name}_at"] = head
        if omitted:
            trimmed["omitted"] = omitted
        data = json.dumps(trimmed, separators=(",", ":"), ensure_ascii=False).encode()
        if len(data) <= size_limit:
            return data
        if keep == 0:  # even bare, too big: only what names the session
            bare = {k: record.get(k) for k in ("session", "client", "port", "listener",
                                               "started", "ended")}
            bare["omitted"] = {"everything": True}
            return json.dumps(bare, separators=(",", ":")).encode()
        keep //= 2


def _cut(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "..."
    if isinstance(value, list):
        return [_cut(v) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    return value
