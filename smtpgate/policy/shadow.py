"""shadow - candidate rules decided beside the live ones, in every session, changing no reply.

SYNOPSIS
    Shadow(candidate: Config, redis, every=5.0)
        await shadow.start() ; await shadow.stop()
        shadow.weigh(state, live: Verdict, facts) -> None
        shadow.counts      {(check, direction): disagreements}, this worker, since start
        shadow.take_log() -> list[dict]         stream entries not yet written
    describe(verdict) -> str                    "fail 521 5.7.1 ..." or "pass"
    DIRECTIONS

DESCRIPTION
    With SMTPGATE_SHADOW_CONFIG naming a TOML file of candidate settings
    (smtpgate.config: Config.shadow), the policy hands each check's
    verdict and the facts it was decided on to weigh(), which decides the
    check again under the candidate settings and the candidate table keys
    (smtpgate.lookups.shadow_tables: in memory, no round trip) with
    smtpgate.policy.decisions, from the same facts: no DNS or Redis
    lookup is made for the shadow. The live verdict is what the client
    gets; the shadow one is only compared.

    A disagreement (decisions.disagreement: the candidate would refuse,
    would accept, or would refuse with another reply) is
    - one log line: `shadow: CHECK would refuse name[ip]: live pass ...;
      shadow fail 550 ... (reason) session=ID`,
    - counted by check and direction (shadow.counts, the metric
      smtpgate_shadow_disagreements_total{check,direction}),
    - kept in the session's state (at most MAX_KEPT per session), so the
      session's evidence record has a "shadow" section for `smtpgate
      explain --session` (the engine keeps a record of every session with
      a disagreement, refused or not),
    - an entry of the stream smtpgate:shadowlog (keys.SHADOW_LOG), written
      with the evidence records' batch, read by `smtpgate shadow report`.

    A check the shadow cannot decide (a fact the live session never
    fetched) is not compared. A bug in the shadow's decision is logged
    once and never reaches the client. With shadow rules off, the policy
    holds no Shadow and builds no facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from smtpgate import session_id
from smtpgate.lookups.shadow_tables import ShadowRefresher
from smtpgate.policy.decisions import Redecider, disagreement
from smtpgate.verdict import Verdict

log = logging.getLogger("smtpgate.shadow")

DIRECTIONS = ("refuse", "accept", "reply")
_SAID = {"refuse": "would refuse", "accept": "would accept", "reply": "would reply otherwise to"}
MAX_KEPT = 20  # disagreements kept per session for its record
MAX_LOG = 10000  # stream entries waiting for a batch; more are dropped (Redis gone)


def describe(verdict: Verdict) -> str:
    if verdict.reply is not None and verdict.failed:
        return f"{verdict.outcome} {verdict.reply}"
    return str(verdict.outcome) + (" (action ignore)" if verdict.ignored else "")


class Shadow:
    def __init__(self, candidate: Any, redis: Any, every: float = 5.0) -> None:
        self.config = candidate
        self.refresher = ShadowRefresher(redis, every, candidate.redis_timeout)
        self.counts: dict[tuple[str, str], int] = {}
        self._log: list[dict] = []
        self._task: asyncio.Task | None = None
        self._broken = False

    async def start(self) -> None:
        await self.refresher.refresh()  # the keys are there for the first session
        self._task = asyncio.get_running_loop().create_task(self._refresh_later())

    async def _refresh_later(self) -> None:
        await asyncio.sleep(self.refresher.every)
        await self.refresher.run()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def weigh(self, state: Any, live: Verdict, facts: dict) -> None:
        redecider = state.shadow
        if redecider is None:
            redecider = state.shadow = Redecider(self.config, self.refresher.tables)
        try:
            other = redecider.decide(live.check, facts)
        except Exception:  # a bug here must cost the shadow, never the session
            if not self._broken:
                log.exception("error: shadow rules: %s not decided", live.check)
                self._broken = True
            return
        if other is None:
            return
        direction = disagreement(live, other)
        if direction is None:
            return
        key = (live.check, direction)
        self.counts[key] = self.counts.get(key, 0) + 1
        sid = session_id.current.get() or ""
        entry = {"check": live.check, "direction": direction, "live": describe(live),
                 "shadow": describe(other), "reason": other.logged}
        if state.disagreements is None:
            state.disagreements = []
        if len(state.disagreements) < MAX_KEPT:
            state.disagreements.append(entry)
        log.info("shadow: %s %s %s: live %s; shadow %s (%s) session=%s", live.check,
                 _SAID[direction], state.label, entry["live"], entry["shadow"],
                 entry["reason"], sid)
        if len(self._log) < MAX_LOG:
            self._log.append({"time": f"{time.time():.3f}", "session": sid,
                              "client": state.client.ip, **entry})

    def take_log(self) -> list[dict]:
        entries, self._log = self._log, []
        return entries
