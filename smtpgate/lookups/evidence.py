"""evidence - refused sessions' records in Redis: written in batches, off the reply path.

SYNOPSIS
    EvidenceStore(redis, ttl=172800.0, size_limit=8192, timeout=2.0)
        store.keep(session_id, producer)        producer() -> dict, called when written
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
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import Callable
from typing import Any

import redis.exceptions

from smtpgate.lookups import keys

log = logging.getLogger("smtpgate.evidence")

BATCH = 0.05  # seconds a record waits to share its round trip with others
MAX_ENTRIES = 64
MAX_TEXT = 500
MAX_PENDING = 10000
LISTS = ("verdicts", "replies")


class EvidenceStore:
    def __init__(self, redis_client: Any, ttl: float = 172800.0, size_limit: int = 8192,
                 timeout: float = 2.0) -> None:
        self.redis = redis_client
        self.ttl = ttl
        self.size_limit = size_limit
        self.timeout = timeout
        self.written = 0
        self.lost = 0  # not written since the last warning (Redis failing, or too many waiting)
        self._pending: dict[str, Callable[[], dict]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task | None = None
        self._failing = False
        self._closed = False

    def keep(self, session_id: str, producer: Callable[[], dict]) -> None:
        """Write this session's record soon; producer() builds it when the batch goes."""
        if self._closed or self.ttl <= 0:
            return
        if session_id not in self._pending and len(self._pending) >= MAX_PENDING:
            self.lost += 1
            return
        self._pending[session_id] = producer
        if self._timer is None:
            # a context of its own: the batch belongs to no session (its log lines carry none)
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
        if not batch:
            return
        ttl = max(1, int(self.ttl))
        try:
            pipe = self.redis.pipeline(transaction=False)
            for session_id, producer in batch.items():
                pipe.set(keys.session_record_key(session_id),
                         encode(producer(), self.size_limit), ex=ttl)
            async with asyncio.timeout(self.timeout):
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self.lost += len(batch)
            if not self._failing:
                log.warning("warning: session records: cannot write to Redis: %s; "
                            "%d records lost", exc or "timed out", self.lost)
                self._failing, self.lost = True, 0
            return
        except Exception:  # a bug in a record's producer: say so, keep serving
            log.exception("error: session records: %d not written", len(batch))
            return
        self.written += len(batch)
        if self._failing or self.lost:
            log.warning("warning: session records: written again; %d lost meanwhile",
                        self.lost)
            self._failing, self.lost = False, 0

    async def load(self, session_id: str) -> dict | None:
        """The stored record, or None when there is none (unknown id, or expired)."""
        async with asyncio.timeout(self.timeout):
            raw = await self.redis.get(keys.session_record_key(session_id))
        if raw is None:
            return None
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


def encode(record: dict, size_limit: int) -> bytes:
    """The record as JSON of at most size_limit bytes (see DESCRIPTION)."""
    if all(len(record.get(name) or ()) <= MAX_ENTRIES for name in LISTS):
        data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
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
