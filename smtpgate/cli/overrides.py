"""overrides - `smtpgate allow|deny ADDRESS|CIDR ...` and `smtpgate overrides`: timed overrides.

SYNOPSIS
    COMMANDS = ("allow", "deny", "overrides")
    add_commands(subparsers, parents)      their argument parsers, on the `smtpgate` parser
    run(args, config, *, now=None, environ=os.environ, stdout=None, stderr=None) -> int
    operator(environ) -> str               who is setting an override

DESCRIPTION
    smtpgate allow ADDRESS|CIDR --for DURATION --reason TEXT
    smtpgate deny ADDRESS|CIDR --for DURATION --reason TEXT [--reply "550 5.7.1 text"]
        store a timed override (smtpgate.override_record) under
        keys.override_key(network), expiring with it; an override already
        set for that very network is replaced (and named on stderr).
    smtpgate overrides [list]
        the overrides in force, most specific network last: network,
        action, who set it, when, the time left, why (and a deny's reply).
    smtpgate overrides remove ADDRESS|CIDR
        end one now.

    Who set it is $SUDO_USER when the command runs under sudo, else the
    Unix user running it. The gates see a change within one invalidation
    message (their table cache), and read none per connection when none is
    set.

    Results go to stdout; refusals and errors to stderr as one sentence.
    Exit status: 0 done, 1 Redis failed or no such override to remove,
    2 bad input (not an address or network, a duration without its unit,
    an empty reason, a reply that is not a 4xx or 5xx one).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from smtpgate.config import mask_secret
from smtpgate.lookups import keys, redis_client
from smtpgate.override_record import (
    ALLOW,
    DENY,
    Override,
    decode,
    parse_duration,
    parse_network,
    parse_reason,
    parse_reply,
    show_left,
    show_time,
)

COMMANDS = ("allow", "deny", "overrides")
USAGE = """usage: smtpgate overrides [list]
       smtpgate overrides remove ADDRESS|CIDR"""


def add_commands(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    for action, what in ((ALLOW, "let a client through (as a PSA permit)"),
                         (DENY, "refuse a client at connect")):
        command = subparsers.add_parser(action, parents=parents,
                                        help=f"{what} for a while: a timed override")
        command.add_argument("target", metavar="ADDRESS|CIDR")
        command.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                             help="how long: 90s, 30m, 2h, 7d (a unit is required)")
        command.add_argument("--reason", required=True, metavar="TEXT",
                             help="why, for whoever reads `smtpgate overrides`")
        if action == DENY:
            command.add_argument("--reply", metavar='"550 5.7.1 TEXT"',
                                 help="the reply in place of the banner (default: 554 5.7.1 "
                                      "... Client host rejected: Access denied)")
    listing = subparsers.add_parser("overrides", parents=parents,
                                    help="list the timed overrides in force, or remove one")
    listing.add_argument("words", nargs="*", metavar="list | remove ADDRESS|CIDR")


def operator(environ: Mapping[str, str]) -> str:
    """$SUDO_USER under sudo (the person, not root), else the Unix user running this."""
    sudo = environ.get("SUDO_USER", "").strip()
    if sudo:
        return sudo
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid with no passwd entry (a container's)
        return f"uid {os.getuid()}"


def run(args: Any, config: Any, *, now: float | None = None,
        environ: Mapping[str, str] = os.environ, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    moment = time.time() if now is None else now
    try:
        act = _plan(args, environ, moment, out, err)
    except ValueError as exc:
        print(f"smtpgate {args.command}: {exc}", file=err)
        return 2
    if act is None:
        print(f"smtpgate overrides: {' '.join(args.words)!r} is not a command here\n{USAGE}",
              file=err)
        return 2
    try:
        client = redis_client.connect_sync(config.redis, config.redis_timeout)
    except redis_client.ERRORS as exc:
        print(f"smtpgate {args.command}: Redis at {mask_secret(config.redis)} failed: {exc}",
              file=err)
        return 1
    try:
        return act(client)
    except redis_client.ERRORS as exc:
        print(f"smtpgate {args.command}: Redis at {mask_secret(config.redis)} failed: {exc}",
              file=err)
        return 1
    finally:
        client.close()


def _plan(args: Any, environ: Mapping[str, str], now: float, out: TextIO,
          err: TextIO) -> Callable[[Any], int] | None:
    """What the command line asks, checked before Redis is reached: a function of the
    client; None for words `overrides` does not know; ValueError for bad input."""
    if args.command != "overrides":
        override = _record(args, environ, now)
        return lambda client: _store(client, override, now, out, err)
    words = list(args.words)
    if words in ([], ["list"]):
        return lambda client: _listing(client, now, out, err)
    if len(words) == 2 and words[0] == "remove":
        network = parse_network(words[1])
        return lambda client: _remove(client, network, now, out, err)
    return None


def _record(args: Any, environ: Mapping[str, str], now: float) -> Override:
    """The override the command line asks for; ValueError naming what is wrong."""
    network = parse_network(args.target)
    seconds = parse_duration(args.duration)
    reason = parse_reason(args.reason)
    reply = parse_reply(args.reply) if getattr(args, "reply", None) is not None else None
    return Override(network, args.command, reason, operator(environ), now, now + seconds, reply)


def _describe(override: Override, now: float) -> str:
    text = (f"{override.action} {override.network} by {override.by}, set "
            f"{show_time(override.set_at)}, {show_left(override.left(now))} left: "
            f"{override.reason}")
    return f"{text}; reply {override.reply}" if override.reply is not None else text


def _store(client: Any, override: Override, now: float, out: TextIO, err: TextIO) -> int:
    milliseconds = max(1, round((override.until - now) * 1000))
    old = client.set(keys.override_key(override.network), override.encode(),
                     px=milliseconds, get=True)
    if old is not None:
        before = decode(old)
        shown = _describe(before, now) if before is not None else "a value it could not read"
        print(f"note: replaces {shown}", file=err)
    print(f"{override.action} {override.network} for {show_left(override.left(now))}, until "
          f"{show_time(override.until)}, by {override.by}: {override.reason}"
          + (f"; reply {override.reply}" if override.reply is not None else ""), file=out)
    return 0


def _remove(client: Any, network: str, now: float, out: TextIO, err: TextIO) -> int:
    old = client.getdel(keys.override_key(network))
    if old is None:
        print(f"smtpgate overrides remove: no override for {network} (`smtpgate overrides` "
              "lists them)", file=err)
        return 1
    before = decode(old)
    print(f"removed {_describe(before, now) if before is not None else network}", file=out)
    return 0


def _listing(client: Any, now: float, out: TextIO, err: TextIO) -> int:
    found = list(client.scan_iter(match=keys.OVERRIDE + ":*", count=500))  # Cluster: all
    rows: list[tuple[Any, str]] = []
    for start in range(0, len(found), 500):
        batch = found[start:start + 500]
        for redis_key, value in zip(batch, redis_client.mget_sync(client, batch), strict=True):
            if value is None:  # expired between SCAN and GET
                continue
            override = decode(value)
            network = keys.override_network(redis_key) or redis_key
            if override is None:
                rows.append((_order(network), f"{network} (a value this version cannot read)"))
            elif override.in_force(now):
                rows.append((_order(network), _describe(override, now)))
    for _, line in sorted(rows):
        print(line, file=out)
    print(f"{len(rows)} override{'' if len(rows) == 1 else 's'} in force", file=err)
    return 0


def _order(network: str) -> tuple:
    """IPv4 before IPv6, by address, the wider network first (the one that decides last)."""
    try:
        net = ipaddress.ip_network(network)
    except ValueError:
        return (9, 0, 0, network)
    return (net.version, int(net.network_address), net.prefixlen, network)
