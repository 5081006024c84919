"""mx_plan - who the MX traffic cases' clients are: new addresses, returning ones, a mix.

SYNOPSIS
    KINDS, EXPECTED[kind] -> outcome
    AddressPool(net16s, part, parts)       .take() -> str | None
    TargetPools(world, part, parts)        the pools of one target: .new, .listed, .denied
    FirstContacts(world, pools)            plan: every client new, every message accepted
    Returning(world, addresses)            plan: the given addresses again, in turn
    Mix(world, pools, shares)              plan: kinds in the given shares
    parse_shares(text) -> dict[str, int]
    interleave(shares) -> list[str]        one cycle of kinds, each spread evenly over it

DESCRIPTION
    A plan answers next() with the next session's load.Client (None when
    its addresses have run out) and hears done(client, outcome) when that
    session has ended. Kinds of client, and the outcome each should get
    (load.client_session's words):

      new        a first contact that passes screening, message accepted: "250"
      returning  an address that passed before (screening cache hit): "250"
      unknown    a first contact whose recipient does not exist: "550@rcpt"
      dnsbl      a first contact listed in both DNSBL zones: "521@banner"
      access     a first contact the access list (PSA reject) refuses: "521@banner"

    Every address is handed out once per run (AddressPool), so no server
    has seen it; each target gets its own slice of each /16 (part of
    parts), so one target's screening cache or DNS cache never helps
    another's. A pool may span several /16s, taken one after the other:
    the DNSBL-listed clients do, since smtpgate refuses them faster than
    half a /16 lasts (a plan that runs out stops starting sessions, and
    the case's row says so). A client's HELO name is its own forward-confirmed name
    (World.pool_name) and its sender is at that name.

    In a Mix, a "returning" client is one whose first contact in the same
    run was accepted earlier; before any has been, the slot goes to a new
    client, so the shares actually run are counted from the sessions, not
    taken from the plan.
"""

from __future__ import annotations

import math
from collections import deque

from benchmarks.load import Client

KINDS = ("new", "returning", "unknown", "dnsbl", "access")
EXPECTED = {"new": "250", "returning": "250", "unknown": "550@rcpt", "dnsbl": "521@banner",
            "access": "521@banner"}
DEFAULT_SHARES = "dnsbl=60,access=10,unknown=10,new=10,returning=10"


class AddressPool:
    """The addresses of one slice of one or more /16s (net16s like "127.20" or ("127.21",
    "127.23")), each handed out once, the /16s one after the other."""

    def __init__(self, net16s: str | tuple[str, ...], part: int = 0, parts: int = 1) -> None:
        if not 0 <= part < parts <= 256:
            raise ValueError(f"part {part} of {parts}")
        self.nets = (net16s,) if isinstance(net16s, str) else tuple(net16s)
        self.thirds = range(part * 256 // parts, (part + 1) * 256 // parts)
        self.per_net = len(self.thirds) * 254
        self.size = self.per_net * len(self.nets)
        self.taken = 0

    def take(self) -> str | None:
        if self.taken >= self.size:
            return None
        net, rest = divmod(self.taken, self.per_net)
        third, fourth = divmod(rest, 254)
        self.taken += 1
        return f"{self.nets[net]}.{self.thirds[third]}.{fourth + 1}"


class TargetPools:
    """One target's addresses: passing first contacts, DNSBL-listed ones, access-list ones."""

    def __init__(self, world, part: int = 0, parts: int = 1) -> None:
        self.new = AddressPool(world.pool_net, part, parts)
        self.listed = AddressPool(world.pool_listed_nets(), part, parts)
        self.denied = AddressPool(world.pool_denied_net, part, parts)


def make_client(world, kind: str, ip: str) -> Client:
    name = world.pool_name(ip)
    return Client(kind=kind, source=ip, helo=name, sender=f"sender@{name}",
                  rcpt=world.unknown_rcpt if kind == "unknown" else world.rcpt)


class FirstContacts:
    """Every session a new client whose message is accepted; remembers who was accepted."""

    def __init__(self, world, pools: TargetPools) -> None:
        self.world, self.pools = world, pools
        self.accepted: list[str] = []

    def next(self) -> Client | None:
        ip = self.pools.new.take()
        return make_client(self.world, "new", ip) if ip else None

    def done(self, client: Client, outcome: str) -> None:
        if outcome == EXPECTED["new"]:
            self.accepted.append(client.source)


class Returning:
    """The given addresses again, in turn (each several times if the case outlasts them)."""

    def __init__(self, world, addresses: list[str]) -> None:
        self.world = world
        self.addresses = deque(addresses)

    def next(self) -> Client | None:
        if not self.addresses:
            return None
        ip = self.addresses.popleft()
        self.addresses.append(ip)
        return make_client(self.world, "returning", ip)

    def done(self, client: Client, outcome: str) -> None:
        pass


class Mix:
    """Kinds in the given shares, interleaved; every address new except the returning ones."""

    def __init__(self, world, pools: TargetPools, shares: dict[str, int]) -> None:
        self.world, self.pools = world, pools
        self.cycle = interleave(shares)
        self.slot = 0
        self.accepted: deque[str] = deque()

    def next(self) -> Client | None:
        kind = self.cycle[self.slot % len(self.cycle)]
        self.slot += 1
        if kind == "returning" and self.accepted:
            ip = self.accepted.popleft()
            self.accepted.append(ip)
            return make_client(self.world, kind, ip)
        if kind == "returning":
            kind = "new"  # nobody accepted yet to come back
        pool = {"dnsbl": self.pools.listed, "access": self.pools.denied}.get(kind,
                                                                            self.pools.new)
        ip = pool.take()
        return make_client(self.world, kind, ip) if ip else None

    def done(self, client: Client, outcome: str) -> None:
        if client.kind == "new" and outcome == EXPECTED["new"]:
            self.accepted.append(client.source)


def parse_shares(text: str) -> dict[str, int]:
    """"dnsbl=60,access=10,..." -> {"dnsbl": 60, ...}; ValueError names what is wrong."""
    shares: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS or kind in shares:
            raise ValueError(f"{item!r}: want KIND=PERCENT, KIND one of {', '.join(KINDS)}, "
                             "each once")
        try:
            shares[kind] = int(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a whole number") from None
        if not 0 <= shares[kind] <= 100:
            raise ValueError(f"{item!r}: a share is 0..100")
    if sum(shares.values()) <= 0:
        raise ValueError("the shares add up to nothing")
    return shares


def interleave(shares: dict[str, int]) -> list[str]:
    """One cycle of kinds in the given proportions, each kind's slots spread evenly.

    Slot by slot, the kind furthest behind its share so far is taken (ties: the order
    given), so {"a": 3, "b": 1} gives a, a, b, a rather than a, a, a, b."""
    whole = math.gcd(*(n for n in shares.values() if n)) or 1
    counts = {k: n // whole for k, n in shares.items() if n}
    total = sum(counts.values())
    given = dict.fromkeys(counts, 0)
    cycle = []
    for i in range(1, total + 1):
        kind = max(counts, key=lambda k: counts[k] * i / total - given[k])
        given[kind] += 1
        cycle.append(kind)
    return cycle
