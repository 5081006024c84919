"""shadow - `smtpgate shadow report [--since DURATION]`: what the shadow rules would have changed.

SYNOPSIS
    add_parser(subparsers, parents)     the `shadow` command and its `report`
    run(args, config) -> int
    summarise(entries, examples=5) -> list[str]     the report's lines (pure)
    since_seconds(text) -> float                     "1h" -> 3600.0; ValueError with a reason

DESCRIPTION
    The gate's workers add one entry per disagreement of the shadow rules
    to the stream smtpgate:shadowlog (smtpgate.policy.shadow); `report`
    reads the entries of the last DURATION (default 1h; 90s, 30m, 2h, 7d)
    and prints how many there were in how many sessions, the counts by
    check and direction (would refuse: the candidate rules refuse what the
    live ones let through; would accept: the reverse; would reply
    otherwise: both refuse, with other replies), the clients concerned
    most often, and the latest examples with their session ids, for
    `smtpgate explain --session ID`.

    Exit status 0 when printed (none found included), 1 when Redis cannot
    be read, 2 for a bad --since.
"""

from __future__ import annotations

import asyncio
import datetime
import sys
from collections import Counter
from typing import Any

SAID = {"refuse": "would refuse", "accept": "would accept", "reply": "would reply otherwise"}
READ = 1000  # stream entries per round trip


def add_parser(sub: Any, parents: list) -> None:
    shadow = sub.add_parser("shadow", parents=parents,
                            help="what the shadow rules (SMTPGATE_SHADOW_CONFIG) would have "
                                 "done differently")
    inner = shadow.add_subparsers(dest="shadow_command", required=True, metavar="report")
    report = inner.add_parser("report", parents=parents,
                              help="disagreements by check, top clients, examples")
    report.add_argument("--since", default="1h",
                        help="how far back: 90s, 30m, 2h, 7d (default 1h)")


def since_seconds(text: str) -> float:
    from smtpgate.config import seconds

    value = text.strip().lower()
    if not value or value[-1] not in "smhdw":
        raise ValueError(f"{text!r} is not a duration with its unit (90s, 30m, 2h, 7d)")
    return seconds(1)(value)


def run(args: Any, config: Any) -> int:
    try:
        since = since_seconds(args.since)
    except ValueError as exc:
        print(f"smtpgate shadow report: --since {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_report(config, since))


async def _report(config: Any, since: float) -> int:
    from smtpgate.config import mask_secret
    from smtpgate.lookups import keys, redis_client

    client = redis_client.connect(config.redis, config.redis_timeout)
    start = datetime.datetime.now().timestamp() - since
    entries: list[dict] = []
    try:
        async for batch in redis_client.stream_pages(client, keys.SHADOW_LOG,
                                                     f"{int(start * 1000)}-0", READ,
                                                     config.redis_timeout * 5):
            entries += [_text(fields) for _, fields in batch]
    except (*redis_client.ERRORS, TimeoutError) as exc:
        print(f"smtpgate shadow report: Redis at {mask_secret(config.redis)} failed: "
              f"{exc or 'timed out'}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
    shown = datetime.datetime.fromtimestamp(start).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"shadow rules since {shown}:")
    for line in summarise(entries):
        print(line)
    return 0


def _text_of(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(fields: dict) -> dict:
    return {_text_of(k): _text_of(v) for k, v in fields.items()}


def summarise(entries: list[dict], examples: int = 5) -> list[str]:
    if not entries:
        return ["  no disagreements: the candidate rules decided every check as the live ones"]
    sessions = {e.get("session") for e in entries}
    lines = [f"  {len(entries)} disagreement{'s' if len(entries) != 1 else ''} in "
             f"{len(sessions)} session{'s' if len(sessions) != 1 else ''}", "by check:"]
    by_check = Counter((e.get("check", "?"), e.get("direction", "?")) for e in entries)
    for (check, direction), count in sorted(by_check.items(), key=lambda i: (-i[1], i[0])):
        lines.append(f"  {check:<16} {SAID.get(direction, direction):<22} {count}")
    lines.append("top clients:")
    for client, count in Counter(e.get("client", "?") for e in entries).most_common(10):
        lines.append(f"  {client:<39} {count}")
    lines.append("examples (smtpgate explain --session ID):")
    for e in entries[-examples:][::-1]:
        lines.append(f"  session={e.get('session')} {e.get('client')} {e.get('check')} "
                     f"{SAID.get(e.get('direction', ''), e.get('direction'))}: live "
                     f"{e.get('live')}; shadow {e.get('shadow')}")
    return lines
