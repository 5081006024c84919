"""table - `smtpgate table get|set|del|list PREFIX [KEY [VALUE]]`.

SYNOPSIS
    run(args, config, *, stdout=sys.stdout, stderr=sys.stderr) -> int
    USAGE

DESCRIPTION
    Manages the image's Redis keys with validation. args are the words after
    `table` (a leading "table" is also accepted). PREFIX is one of PSA REV
    HLO VDOM VALI VBOX RECIP LOGMAP, in any case.

    get PREFIX KEY          print the value that decides for KEY: PREFIX:KEY,
                            or the key smtpgate's lookup finds first in its
                            place (keys.lookup_keys: a network holding an IP,
                            an address without its +extension, the domain),
                            named on stderr ("PSA:192.0.2.0/24 decides ...")
    set PREFIX KEY VALUE..  store it; the words of VALUE are joined by spaces
    del PREFIX KEY          delete it
    list PREFIX [PATTERN]   print "KEY VALUE" lines for PREFIX:PATTERN (glob,
                            default *), read with SCAN so Redis is never blocked
                            (on a Cluster, SCAN on every primary)
    list                    every prefix's keys, as "PREFIX:KEY VALUE" lines

    Keys are stored the way smtpgate looks them up (keys.normalize_key):
    networks canonical (`192.168.0.0/24`), names and addresses lower-cased;
    a key with host bits (`10.0.0.1/8`) or of the wrong kind for the prefix
    (a domain in PSA, a word in VDOM, not an address in VALI) is refused,
    and so is a value smtpgate would not honour (keys.check_value: unknown
    access action, an alias target that is not an address).

    --shadow (anywhere among the words) does the same with the candidate
    keys of the shadow rules (keys.shadow_key: smtpgate:shadow:PSA:...),
    which decide only what the shadow rules would have done
    (smtpgate.policy.shadow) and never a reply; get --shadow prints the
    candidate key itself, without the live keys' fall-backs.

    Results go to stdout; refusals and errors to stderr as one sentence.
    Exit status: 0 done, 1 refused, not found or Redis unreachable, 2 usage.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from smtpgate.config import mask_secret
from smtpgate.lookups import keys, redis_client

USAGE = """usage: smtpgate table get PREFIX KEY
       smtpgate table set PREFIX KEY VALUE...
       smtpgate table del PREFIX KEY
       smtpgate table list [PREFIX [PATTERN]]
       --shadow with any of them: the shadow rules' candidate keys
PREFIX: """ + " ".join(keys.PREFIXES)

_ARITY = {"get": (2, 2), "set": (3, None), "del": (2, 2), "list": (0, 2)}


class _Refused(Exception):
    pass


def run(args: list[str], config: Any, *, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    words = list(args)
    if words and words[0] == "table":
        words = words[1:]
    shadow = "--shadow" in words
    words = [w for w in words if w != "--shadow"]
    if not words or words[0] in ("-h", "--help", "help"):
        print(USAGE, file=err if not words else out)
        return 2 if not words else 0
    command, rest = words[0], words[1:]
    if command not in _ARITY:
        print(f"smtpgate table: unknown command {command!r}\n{USAGE}", file=err)
        return 2
    low, high = _ARITY[command]
    if len(rest) < low or (high is not None and len(rest) > high):
        print(f"smtpgate table {command}: wrong number of arguments\n{USAGE}", file=err)
        return 2
    prefix = rest[0].upper().rstrip(":") if rest else ""
    if rest and prefix not in keys.PREFIXES:
        print(f"smtpgate table: unknown prefix {rest[0]!r} (one of {' '.join(keys.PREFIXES)})",
              file=err)
        return 2
    try:
        client = redis_client.connect_sync(config.redis, config.redis_timeout)
    except redis_client.ERRORS as exc:
        print(f"smtpgate table: Redis at {mask_secret(config.redis)} failed: {exc}", file=err)
        return 1
    try:
        return _COMMANDS[command](_Keys(shadow), client, prefix, rest[1:], out, err)
    except _Refused as exc:
        print(f"smtpgate table {command}: {exc}", file=err)
        return 1
    except redis_client.ERRORS as exc:
        print(f"smtpgate table: Redis at {mask_secret(config.redis)} failed: {exc}", file=err)
        return 1
    finally:
        client.close()


class _Keys:
    """The Redis keys of the live tables, or of the shadow rules' candidates."""

    def __init__(self, shadow: bool) -> None:
        self.front = keys.SHADOW_TABLES if shadow else ""

    def key(self, prefix: str, name: str) -> str:
        return self.front + keys.key(prefix, name)

    def canonical(self, prefix: str, name: str) -> str:
        try:
            return self.key(prefix, keys.normalize_key(prefix, name))
        except ValueError as exc:
            raise _Refused(str(exc)) from None

    def shown(self, redis_key: str) -> str:
        return redis_key[len(self.front):]


def _get(names: _Keys, client: Any, prefix: str, rest: list[str], out: TextIO,
         err: TextIO) -> int:
    redis_key = names.canonical(prefix, rest[0])
    tried = [redis_key]
    if not names.front:
        tried += [k for k in keys.lookup_keys(prefix, rest[0]) if k != redis_key]
    values = redis_client.mget_sync(client, tried)
    found = next(((k, v) for k, v in zip(tried, values, strict=True) if v is not None), None)
    if found is None:
        covering = " nor any key that covers it" if len(tried) > 1 else ""
        raise _Refused(f"no key {redis_key}{covering}")
    decider, value = found
    if decider != redis_key:
        print(f"{decider} decides for {rest[0]} (no {redis_key})", file=err)
    print(value, file=out)
    return 0


def _set(names: _Keys, client: Any, prefix: str, rest: list[str], out: TextIO,
         err: TextIO) -> int:
    redis_key = names.canonical(prefix, rest[0])
    try:
        value = keys.check_value(prefix, " ".join(rest[1:]))
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    client.set(redis_key, value)
    if redis_key != names.key(prefix, rest[0]):
        print(f"note: stored as {redis_key} (the form smtpgate looks up)", file=err)
    print(f"{redis_key} {value}", file=out)
    return 0


def _del(names: _Keys, client: Any, prefix: str, rest: list[str], out: TextIO,
         err: TextIO) -> int:
    redis_key = names.canonical(prefix, rest[0])
    # A key stored before validation may differ from the canonical form: delete as written too.
    removed = client.delete(*dict.fromkeys([redis_key, names.key(prefix, rest[0])]))
    if not removed:
        raise _Refused(f"no key {redis_key}")
    print(f"deleted {redis_key}", file=out)
    return 0


def _list(names: _Keys, client: Any, prefix: str, rest: list[str], out: TextIO,
          err: TextIO) -> int:
    patterns = [names.key(prefix, rest[0] if rest else "*")] if prefix else \
        [names.key(p, "*") for p in keys.PREFIXES]
    rows = []
    for pattern in patterns:
        found = list(client.scan_iter(match=pattern, count=500))  # a Cluster: every primary
        for start in range(0, len(found), 500):
            batch = found[start:start + 500]
            values = redis_client.mget_sync(client, batch)
            rows += [(names.shown(k), v) for k, v in zip(batch, values, strict=True)
                     if v is not None]
    for redis_key, value in sorted(rows, key=_table_order):
        print(f"{redis_key.partition(':')[2] if prefix else redis_key} {value}", file=out)
    print(f"{len(rows)} key{'s' if len(rows) != 1 else ''} under {' '.join(patterns)}", file=err)
    return 0


def _table_order(row: tuple[str, str]) -> tuple[int, str]:
    table, _, name = row[0].partition(":")
    return keys.PREFIXES.index(table) if table in keys.PREFIXES else len(keys.PREFIXES), name


_COMMANDS = {"get": _get, "set": _set, "del": _del, "list": _list}
