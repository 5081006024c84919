"""override_record - a timed override as an operator gives it and as Redis keeps it.

SYNOPSIS
    ALLOW, DENY                           the two actions
    Override(network, action, reason, by, set_at, until, reply=None)
        .left(now) -> float               seconds until it ends (<= 0: ended)
        .in_force(now) -> bool
        .encode() -> str                  the stored value (JSON, versioned)
    decode(text) -> Override | None       None for a value this version cannot read
    parse_network(text) -> str            canonical network; ValueError with the reason
    parse_duration(text) -> float         "90s", "30m", "2h", "7d", "1h30m"; ValueError
    parse_reason(text) -> str             one non-empty line; ValueError
    parse_reply(text) -> Reply            "550 5.7.1 text" (4xx or 5xx); ValueError
    default_deny_reply(ip) -> Reply
    show_left(seconds) -> str             "1h59m", "6d23h", "42s"
    show_time(stamp) -> str               "2026-12-02 08:40:12 UTC"
    MAX_DURATION                          365 days

DESCRIPTION
    An override says, for an IP address or CIDR network, `allow` (the
    client skips the access list, the DNSBL and the protocol tests, as a
    PSA permit does) or `deny` (the client hears `reply` instead of the
    banner and is hung up on), with who set it, when, why, and when it
    ends. The CLI writes it (smtpgate.cli.overrides) under
    keys.override_key(network) with the same expiry, so Redis removes it
    by itself; the gate also compares `until` with its clock, so an
    override never outlives its time while Redis has not yet removed it.

    The parsers are the CLI's validation; each ValueError text is a
    complete sentence for the operator. A duration needs its unit (a bare
    `90` is refused rather than guessed), and is at most MAX_DURATION: a
    permanent rule belongs in the PSA table. A deny's reply is a 4xx or 5xx
    code, optionally an enhanced status of the same class (`5.7.1` with a
    5xx), and a text, on one line; without an enhanced status it gets X.7.1.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from dataclasses import dataclass

from smtpgate.verdict import Reply, printable_text

ALLOW, DENY = "allow", "deny"
ACTIONS = (ALLOW, DENY)
FORMAT = 1  # the stored value's version
MAX_DURATION = 365 * 86400.0
MAX_REASON = 500

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(?:\d+[smhdw])+")
_PART = re.compile(r"(\d+)([smhdw])")
_REPLY = re.compile(r"([45])(\d\d)(?: ([45])\.(\d{1,3})\.(\d{1,3}))?(?: (.*))?")


@dataclass(frozen=True, slots=True)
class Override:
    network: str
    action: str
    reason: str
    by: str
    set_at: float
    until: float
    reply: Reply | None = None

    def left(self, now: float) -> float:
        return self.until - now

    def in_force(self, now: float) -> bool:
        return self.until > now

    def encode(self) -> str:
        value = {"v": FORMAT, "network": self.network, "action": self.action,
                 "reason": self.reason, "by": self.by, "set": round(self.set_at, 3),
                 "until": round(self.until, 3)}
        if self.reply is not None:
            value["reply"] = str(self.reply)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def decode(text: str | bytes) -> Override | None:
    """The override in a stored value; None for one this version cannot read (never raises)."""
    try:
        value = json.loads(text)
        if value.get("v") != FORMAT or value["action"] not in ACTIONS:
            return None
        reply = parse_reply(value["reply"]) if value.get("reply") else None
        return Override(str(value["network"]), value["action"], str(value["reason"]),
                        str(value["by"]), float(value["set"]), float(value["until"]), reply)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def parse_network(text: str) -> str:
    """An IP address or CIDR network as the keys spell it (`192.0.2.7`, `192.0.2.0/24`)."""
    name = text.strip()
    bare = name[1:].replace("]", "", 1) if name.startswith("[") else name
    try:
        net = ipaddress.ip_network(bare, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None
    try:
        ipaddress.ip_network(bare)
    except ValueError:
        raise ValueError(f"{text!r} has host bits set; did you mean {net}?") from None
    mapped = getattr(net.network_address, "ipv4_mapped", None)
    if mapped is not None and net.prefixlen >= 96:  # ::ffff:192.0.2.7 is the IPv4 client
        net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def parse_duration(text: str) -> float:
    word = text.strip().lower()
    if word.isdigit():
        raise ValueError(f"duration {text!r} has no unit: write {word}s, {word}m, {word}h "
                         f"or {word}d")
    if not _DURATION.fullmatch(word):
        raise ValueError(f"{text!r} is not a duration (a number and a unit: 90s, 30m, 2h, "
                         "7d, or 1h30m)")
    seconds = float(sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(word)))
    if seconds <= 0:
        raise ValueError(f"duration {text!r} is zero")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {text!r} is longer than 365d (a permanent rule belongs "
                         "in the PSA table: smtpgate table set PSA ...)")
    return seconds


def parse_reason(text: str) -> str:
    reason = text.strip()
    if not reason:
        raise ValueError("the reason is empty: say why, for whoever reads `smtpgate overrides`")
    if printable_text(reason) != reason:
        raise ValueError("the reason must be one line without control characters")
    if len(reason) > MAX_REASON:
        raise ValueError(f"the reason is longer than {MAX_REASON} characters")
    return reason


def parse_reply(text: str) -> Reply:
    line = text.strip()
    if printable_text(line) != line:
        raise ValueError(f"reply {text!r} must be one line without control characters")
    match = _REPLY.fullmatch(line)
    if match is None:
        raise ValueError(f"reply {text!r} does not start with a 4xx or 5xx code "
                         "(write it as \"550 5.7.1 text\")")
    klass, rest, status_class, subject, detail, words = match.groups()
    if status_class is not None and status_class != klass:
        raise ValueError(f"reply {text!r}: the enhanced status {status_class}.{subject}."
                         f"{detail} is not of the code's class {klass}xx")
    words = (words or "").strip()
    if not words:
        raise ValueError(f"reply {text!r} has no text after its code")
    status = f"{status_class}.{subject}.{detail}" if status_class else f"{klass}.7.1"
    return Reply(int(klass + rest), status, words)


def default_deny_reply(ip: str) -> Reply:
    """smtpd's words for a client access REJECT (its name is not known yet at connect)."""
    return Reply(554, "5.7.1", f"<unknown[{ip}]>: Client host rejected: Access denied")


def show_left(seconds: float) -> str:
    left = max(0, int(seconds + 0.999))
    days, rest = divmod(left, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def show_time(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))
