"""replay - `smtpgate replay`: recorded sessions decided again under candidate rules.

SYNOPSIS
    add_parser(subparsers)
    run(args, config) -> int      `smtpgate replay [--since DURATION] [--config CANDIDATE.toml]
                                                   [--shadow]`
    replay(entries, config, view=None, into=None) -> Replay
                                  pure: (entry id, fields) in, counts out (added to `into`)
    Replay.lines(examples=5) -> list[str] ; Replay.changed

DESCRIPTION
    With replay_records on, every session leaves a record of each check it
    decided, the facts the check decided on and the verdict
    (smtpgate.smtp.evidence.replay_record, in the stream smtpgate:replay).
    replay reads the records of the last DURATION (90s, 30m, 2h, 7d;
    default: all kept, session_record_ttl) and decides every check again
    with smtpgate.policy.decisions, from the recorded facts alone (no DNS
    query, no table lookup), under
    - the live configuration (no option): every verdict must come out as
      recorded; a change means the rules, or smtpgate, changed since;
    - --config FILE: the live settings with the candidate file's in their
      place (the same keys as the live TOML file);
    - --shadow: the shadow rules' candidate table keys as they are now in
      Redis (`smtpgate table set --shadow`), with SMTPGATE_SHADOW_CONFIG's
      settings unless --config names others.
    It prints how many sessions and checks were replayed, how many
    verdicts change and in which direction (would refuse, would accept,
    would reply otherwise), by check, with examples (session ids, for
    `smtpgate explain --session`), the checks that could not be decided
    again (a fact never recorded), the sampling the records were written
    under when session_record_memory was spent, and every record it could
    not read (another format version, not JSON, a field missing), each
    named by its stream entry, never a traceback.

    Exit status 0 when no verdict changes, 1 when some do, 2 when the
    replay could not be made (a bad option or candidate file, Redis
    unreachable).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SAID = {"refuse": "would refuse", "accept": "would accept", "reply": "would reply otherwise"}
READ = 500  # stream entries per round trip


def add_parser(sub: Any) -> None:
    replay = sub.add_parser(
        "replay", help="decide recorded sessions again under candidate rules "
                       "(replay_records); exit 1 when a verdict changes")
    replay.add_argument("--env-file", metavar="FILE",
                        help="the gate's KEY=VALUE settings file (as for the other commands)")
    replay.add_argument("--since", help="how far back: 90s, 30m, 2h, 7d (default: all kept)")
    replay.add_argument("--config", dest="candidate", metavar="CANDIDATE.toml",
                        help="candidate settings, the live TOML file's keys")
    replay.add_argument("--shadow", action="store_true",
                        help="with the shadow rules' candidate keys (table set --shadow)")
    replay.set_defaults(config=None)  # the gate's own TOML file: SMTPGATE_CONFIG


@dataclass
class Replay:
    sessions: int = 0
    checks: int = 0
    undecided: int = 0
    changes: Counter = field(default_factory=Counter)  # (check, direction) -> count
    sessions_changed: int = 0
    examples: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    samples: Counter = field(default_factory=Counter)  # "one in N" -> records

    @property
    def changed(self) -> int:
        return sum(self.changes.values())

    def lines(self, examples: int = 5) -> list[str]:
        out = [f"replayed {self.sessions} session{'s' if self.sessions != 1 else ''}, "
               f"{self.checks} check{'s' if self.checks != 1 else ''}"]
        sampled = {n: c for n, c in self.samples.items() if n > 1}
        if sampled:
            out.append("  sampled: " + ", ".join(
                f"{c} records written when one session in {n} was recorded "
                "(session_record_memory was spent)" for n, c in sorted(sampled.items())))
        directions = Counter()
        for (_, direction), count in self.changes.items():
            directions[direction] += count
        shown = ", ".join(f"{SAID[d]} {directions[d]}" for d in SAID if directions[d])
        out.append(f"verdicts changed: {self.changed}" + (f" ({shown}) in "
                   f"{self.sessions_changed} session{'s' if self.sessions_changed != 1 else ''}"
                   if self.changed else ""))
        if self.changes:
            out.append("by check:")
            for (check, direction), count in sorted(self.changes.items(),
                                                    key=lambda i: (-i[1], i[0])):
                out.append(f"  {check:<16} {SAID[direction]:<22} {count}")
            out.append("examples (smtpgate explain --session ID, where a record was kept):")
            out += [f"  {e}" for e in self.examples[:examples]]
        if self.undecided:
            out.append(f"not decided again: {self.undecided} check"
                       f"{'s' if self.undecided != 1 else ''} (a fact the session never "
                       "fetched)")
        if self.unreadable:
            out.append(f"unreadable records: {len(self.unreadable)}")
            out += [f"  {u}" for u in self.unreadable[:20]]
        return out


def replay(entries: Any, config: Any, view: Any = None, into: Replay | None = None) -> Replay:
    from smtpgate.policy.decisions import FACTS_VERSION, Redecider, disagreement
    from smtpgate.verdict import Outcome, Reply, Verdict

    recorded_reply = Reply(0, "", "as recorded")  # a stand-in: the record's text is compared
    result = into if into is not None else Replay()
    for entry_id, fields in entries:
        try:
            record = json.loads(fields["r"])
            version = record.get("v")
            if version != FACTS_VERSION:
                raise ValueError(f"format version {version!r}; this smtpgate reads "
                                 f"{FACTS_VERSION}")
            session, client = record["session"], record.get("client", "?")
            checks = record["checks"]
            run = Redecider(config, view)
            changed = False
            decided = []
            for check, facts, outcome, reply in checks:
                recorded = Verdict(check, Outcome(outcome), recorded_reply if reply else None)
                decided.append((check, recorded, reply, run.decide(check, facts)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # a record another smtpgate wrote, or a damaged one: named, never a traceback
            result.unreadable.append(f"{entry_id}: {type(exc).__name__}: {exc}")
            continue
        result.sessions += 1
        result.samples[record.get("sample", 1)] += 1
        for check, recorded, reply, other in decided:
            result.checks += 1
            if other is None:
                result.undecided += 1
                continue
            direction = disagreement(recorded, other, reply_text=reply)
            if direction is None:
                continue
            changed = True
            result.changes[(check, direction)] += 1
            if len(result.examples) < 50:
                now = f"{other.outcome} {other.reply}" if other.failed else str(other.outcome)
                result.examples.append(
                    f"session={session} {client} {check} {SAID[direction]}: recorded "
                    f"{recorded.outcome}{' ' + reply if reply and recorded.failed else ''}; "
                    f"now {now}")
        result.sessions_changed += changed
    return result


def run(args: Any, config: Any) -> int:
    from smtpgate.cli.shadow import since_seconds
    from smtpgate.config import ConfigError, candidate

    since = None
    if args.since is not None:
        try:
            since = since_seconds(args.since)
        except ValueError as exc:
            print(f"smtpgate replay: --since {exc}", file=sys.stderr)
            return 2
    rules, named = config, "the live rules"
    if args.shadow and config.shadow is not None:
        rules, named = config.shadow, "the shadow rules' settings (SMTPGATE_SHADOW_CONFIG)"
    if args.candidate:
        try:
            rules, named = candidate(config, args.candidate), args.candidate
        except ConfigError as exc:
            print(f"smtpgate replay: --config {exc}", file=sys.stderr)
            return 2
    return asyncio.run(_replay(config, rules, named, since, args.shadow))


async def _replay(config: Any, rules: Any, named: str, since: float | None,
                  shadow: bool) -> int:
    import time

    from smtpgate.config import mask_secret
    from smtpgate.lookups import keys, redis_client
    from smtpgate.lookups.shadow_tables import load

    client = redis_client.connect(config.redis, config.redis_timeout)
    result = Replay()  # the records are decided as they are read: a day of them is large
    view = None
    try:
        if shadow:
            async with asyncio.timeout(config.redis_timeout * 30):
                view = await load(client)
        low = f"{int((time.time() - since) * 1000)}-0" if since is not None else "-"
        async for batch in redis_client.stream_pages(client, keys.REPLAY_LOG, low, READ,
                                                     config.redis_timeout * 5):
            replay(batch, rules, view, result)
    except (*redis_client.ERRORS, TimeoutError) as exc:
        print(f"smtpgate replay: Redis at {mask_secret(config.redis)} failed: "
              f"{exc or 'timed out'}", file=sys.stderr)
        return 2
    finally:
        await client.aclose()
    keys_said = f" and {len(view)} candidate keys" if view is not None else ""
    print(f"smtpgate replay: under {named}{keys_said}")
    for line in result.lines():
        print(line)
    return 1 if result.changed else 0
