"""redis_url - the grammar of REDIS: one server, a Sentinel set or a Cluster.

SYNOPSIS
    parse(value) -> RedisTarget               ValueError with the reason if refused
    RedisTarget(kind, url, nodes, service, db, username, password, sentinel_password)
        .kind        "single" | "sentinel" | "cluster"
        .url         the normalized URL (what Config.redis holds)
    mask(url) -> str                           passwords replaced by ***

DESCRIPTION
    REDIS takes the image's forms and two more (design.md):

        host | host:port                       redis://host:port/0
        redis://[[user]:password@]host[:port][/db]   rediss:// for TLS
        unix://[[user]:password@]/path[?db=N]
        redis+sentinel://[[user]:password@]h1:26379,h2:26379/mastername[/db]
                                               [?sentinel_password=...]
        redis+cluster://[[user]:password@]h1:7000,h2:7001[/]

    In the Sentinel form the password (and user) are those of the master
    and its replicas; the sentinels' own password, if they have one, is
    the query parameter sentinel_password. A port left out is 26379 for a
    sentinel, 6379 for a cluster node. A Cluster has only database 0, so
    its path is empty, "/" or "/0". Hosts may be IPv6 in brackets.

    Pure: nothing here connects; smtpgate.lookups.redis_client builds the
    clients from a RedisTarget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

SENTINEL = "redis+sentinel"
CLUSTER = "redis+cluster"
SINGLE_SCHEMES = ("redis", "rediss", "unix")
SCHEMES = (*SINGLE_SCHEMES, SENTINEL, CLUSTER)
_DEFAULT_PORT = {SENTINEL: 26379, CLUSTER: 6379}
_QUERY = {SENTINEL: ("sentinel_password",), CLUSTER: ()}


@dataclass(frozen=True)
class RedisTarget:
    kind: str
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse(value: object) -> RedisTarget:
    raw = str(value).strip()
    if not raw:
        raise ValueError("is empty")
    if "://" not in raw:
        return RedisTarget("single", f"redis://{_hostport(raw, 6379, raw)}/0")
    scheme, _, rest = raw.partition("://")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{mask(raw)!r}: scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if not rest:
        raise ValueError(f"{mask(raw)!r} names no server")
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", raw)
    return _multi(scheme, rest, raw)


def _multi(scheme: str, rest: str, raw: str) -> RedisTarget:
    shown = mask(raw)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    # with credentials in the URL a bad "server" may be a piece of the password: not shown
    nodes = tuple(_hostport(h, _DEFAULT_PORT[scheme], shown, reveal="@" not in raw)
                  for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError(f"{shown!r} names no server")
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(params) - set(_QUERY[scheme]))
    if unknown:
        raise ValueError(f"{shown!r}: unknown parameter {unknown[0]!r}")
    parts = [p for p in path.split("/") if p]
    kind = "sentinel" if scheme == SENTINEL else "cluster"
    service, db = "", 0
    if kind == "sentinel":
        if not parts or len(parts) > 2:
            raise ValueError(f"{shown!r}: the path must be /mastername or /mastername/db")
        service = unquote(parts[0])
        db = _db(parts[1], shown) if len(parts) == 2 else 0
    elif parts not in ([], ["0"]):
        raise ValueError(f"{shown!r}: a Redis Cluster has only database 0")
    return RedisTarget(
        kind, raw, tuple((h, int(p)) for h, p in (_split(n) for n in nodes)), service, db,
        username, password, params.get("sentinel_password"))


def _db(text: str, shown: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{shown!r}: database {text!r} is not a number")
    return int(text)


_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]/\s]+)(?::(\d{1,5}))?$")


def _hostport(text: str, default_port: int, shown: str, reveal: bool = True) -> str:
    """host[:port] with the default port filled in; IPv6 in brackets."""
    m = _HOSTPORT.match(text.strip())
    if not m or not 0 < int(m.group(2) or default_port) < 65536:
        if not reveal:
            raise ValueError(f"{shown!r}: a server is not host:port (in a password, write "
                             f"'/', '?', '#' and '@' percent-encoded: %2F %3F %23 %40)")
        raise ValueError(f"{shown!r}: {text!r} is not host:port")
    return f"{m.group(1)}:{int(m.group(2) or default_port)}"


def _split(hostport: str) -> tuple[str, str]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), port


def mask(url: str) -> str:
    """Hide every password in a REDIS URL: redis://:secret@host -> redis://:***@host.

    The credentials end at the last "@", whatever they contain ("/", "?", "#" are common in
    generated passwords, and a URL parser would cut them short): when an "@" is in a query
    value instead, more is hidden than needed, never less.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    creds, at, rest = rest.rpartition("@")
    rest, q, query = rest.partition("?")
    if query:
        query = "&".join(
            f"{k}=***" if "password" in k.lower() else f"{k}={v}" if e else k
            for k, e, v in (item.partition("=") for item in query.split("&")))
    if at:
        user, colon, _ = creds.partition(":")
        user = user if "/" not in user and "?" not in user else ""
        creds = f"{user}:***" if colon or not user else user
    return f"{scheme}://{creds}{at}{rest}{q}{query}"
