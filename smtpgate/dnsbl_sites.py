"""dnsbl_sites - the postscreen_dnsbl_sites grammar: zone[=filter][*weight].

SYNOPSIS
    parse_sites(text: str) -> tuple[DnsblSite, ...]
    parse_site(item: str) -> DnsblSite
    DnsblSite(zone, filter, weight)
    DnsblSite.matches(address: str) -> bool
    is_error_answer(address: str) -> bool

DESCRIPTION
    parse_sites() splits its text on commas and white space, as postscreen
    does, and parses each item with parse_site(). A bad item raises
    ValueError whose message quotes the item and says what is wrong, e.g.
    `'zen.spamhaus.org=127.0.0.[2..x]': bad filter: need decimal number
    0..255 at "127.0.0.[2..>x<]"`.

    An item is `zone[=filter][*weight]` (postconf(5), Postfix's
    postscreen_dnsbl.c): the weight is split off at the first `*` and is
    a whole number, possibly negative (an allow list), default 1; the
    filter follows the first `=`. The zone must be a valid host name; it is
    kept lower-case without a trailing dot.

    A filter is Postfix's ip_match pattern (src/global/ip_match.c): four
    fields separated by `.`, each a decimal number 0..255 or a sequence
    inside `[]` of `;`-separated numbers or `a..b` ranges (a <= b); the
    whole pattern may be enclosed in `[]`. Examples: `127.0.0.2`,
    `127.0.0.[2..11]`, `127.0.[0..255].[1;3..5]`.

    DnsblSite.matches() tells whether one A answer (dotted IPv4 text)
    passes the site's filter; a site without a filter matches every IPv4
    answer. It does not judge error answers: callers drop those first
    with is_error_answer().

    is_error_answer() is true for answers that never mean "listed": anything
    outside 127.0.0.0/8, and 127.255.255.0/24 (Spamhaus's 252 "typo in the
    DQS key", 254 "query through a public resolver", 255 "excessive number
    of queries", and the rest of that /24 which Spamhaus reserves for such
    codes). Text that is not an IPv4 address is an error answer too.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field

_SEPARATORS = re.compile(r"[,\s]+")
_WEIGHT = re.compile(r"[+-]?\d+")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")

# One field of a filter: the (low, high) ranges an octet may fall in.
Field = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class DnsblSite:
    zone: str
    filter: str | None = None
    weight: int = 1
    fields: tuple[Field, ...] | None = field(default=None, compare=False, repr=False)

    def matches(self, address: str) -> bool:
        octets = _octets(address)
        if octets is None:
            return False
        if self.fields is None:
            return True
        return all(
            any(low <= octet <= high for low, high in ranges)
            for octet, ranges in zip(octets, self.fields, strict=True)
        )

    def __str__(self) -> str:
        text = self.zone
        if self.filter is not None:
            text += f"={self.filter}"
        if self.weight != 1:
            text += f"*{self.weight}"
        return text


def parse_sites(text: str) -> tuple[DnsblSite, ...]:
    return tuple(parse_site(item) for item in _SEPARATORS.split(text) if item)


def parse_site(item: str) -> DnsblSite:
    rest, star, weight_text = item.partition("*")
    weight = 1
    if star:
        if not _WEIGHT.fullmatch(weight_text):
            raise ValueError(f"{item!r}: bad weight {weight_text!r} (need a whole number)")
        weight = int(weight_text)
    zone, equals, filter_text = rest.partition("=")
    fields = None
    if equals:
        try:
            fields = parse_filter(filter_text)
        except ValueError as exc:
            raise ValueError(f"{item!r}: bad filter: {exc}") from None
    zone = zone.rstrip(".").lower()
    if not valid_zone(zone):
        raise ValueError(f"{item!r}: bad DNSBL domain name {zone!r}")
    return DnsblSite(zone, filter_text if equals else None, weight, fields)


def valid_zone(zone: str) -> bool:
    if not zone or len(zone) > 253:
        return False
    labels = zone.split(".")
    if all(label.isdigit() for label in labels):
        return False  # an address, not a domain
    return all(_LABEL.fullmatch(label) for label in labels)


def parse_filter(pattern: str) -> tuple[Field, ...]:
    """ip_match syntax to per-octet ranges; ValueError pointing at the bad spot."""
    if pattern.startswith("["):
        closed = _outer_brackets(pattern)
        if closed is None:
            raise ValueError('missing "]" character')
        if closed:
            pattern = pattern[1:-1]
    if not pattern:
        raise ValueError("empty address pattern")
    tokens = _tokenize(pattern)
    fields: list[Field] = []
    pos = 0

    def fail(message: str) -> ValueError:
        # point at the token just read, or at the end when the pattern ran out
        start, end = tokens[pos - 1][1] if 0 < pos <= len(tokens) else (len(pattern),) * 2
        return ValueError(f'{message} at "{pattern[:start]}>{pattern[start:end]}<{pattern[end:]}"')

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1][0] if pos <= len(tokens) else ""

    while True:
        token = take()
        if token.isdigit():
            fields.append(((_octet(token, fail),) * 2,))
        elif token == "[":
            ranges = []
            while True:
                token = take()
                if not token.isdigit():
                    raise fail("need decimal number 0..255")
                low = high = _octet(token, fail)
                token = take()
                if token == ".":
                    if take() != "." or not (bound := take()).isdigit():
                        raise fail("numeric range error")
                    high = _octet(bound, fail)
                    if low > high:
                        raise fail("numeric range error")
                    token = take()
                ranges.append((low, high))
                if token == "]":
                    break
                if token != ";":
                    raise fail('need ";" or "]"')
            fields.append(tuple(ranges))
        else:
            raise fail('need decimal number 0..255 or "["')
        if len(fields) == 4:
            if pos < len(tokens):
                take()
                raise fail("garbage after pattern")
            return tuple(fields)
        if take() != ".":
            raise fail('need "."')


def _octet(token: str, fail) -> int:
    if int(token) > 255:
        raise fail("need decimal number 0..255")
    return int(token)


def _tokenize(pattern: str) -> list[tuple[str, tuple[int, int]]]:
    return [(m.group(), m.span()) for m in re.finditer(r"\d+|.", pattern, re.S)]


def _outer_brackets(pattern: str) -> bool | None:
    """Whether the first '[' closes at the very end (enclosing the whole pattern); None: never."""
    level = 0
    for index, char in enumerate(pattern):
        if char == "[":
            level += 1
        elif char == "]":
            level -= 1
            if level == 0:
                return index == len(pattern) - 1
    return None


@functools.lru_cache(maxsize=1024)
def is_error_answer(address: str) -> bool:
    try:
        ip = ipaddress.IPv4Address(address.strip())
    except ValueError:
        return True
    return ip not in _LOOPBACK or ip in _ERROR_NET


@functools.lru_cache(maxsize=1024)
def _octets(address: str) -> bytes | None:
    """A DNSBL answer's four octets (None: not an IPv4 address). Lists answer with a few
    values (127.0.0.2 ...), asked of again and again: each is parsed once."""
    try:
        return ipaddress.IPv4Address(address.strip()).packed
    except ValueError:
        return None
