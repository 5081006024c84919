"""address - strict RFC 5321 envelope address parser.

SYNOPSIS
    parse_path(text: str, smtputf8: bool = False, *, mail: bool = False) -> Path
    parse_mail_arg(arg: str, smtputf8: bool | None = None) -> Path
    parse_rcpt_arg(arg: str, smtputf8: bool = False) -> Path
    split(address: str) -> tuple[str, str]
    is_fqdn(domain: str, smtputf8: bool = False) -> bool
    is_valid_hostname(name: str) -> bool
    is_address_literal(domain: str) -> bool
    valid_address_literal(domain: str) -> bool
    client_address(ip: str | IPAddress) -> IPv4Address | IPv6Address
    plain_ip(ip: str) -> str
    BLANKS                          the characters that separate ESMTP parameters
    split_words(text: str) -> list[str]
    declares_smtputf8(words) -> bool

    class AddressError(ValueError): .reply: Reply
    class Path: address, local, domain, params, words, route, quoted, raw, null, routed

DESCRIPTION
    parse_path() takes what follows "MAIL FROM:" or "RCPT TO:" (leading
    blanks allowed): a path in angle brackets, then ESMTP parameters
    separated by blanks as Postfix separates them (BLANKS:
    SP, HT, LF, VT, FF, CR; not \x1c-\x1f, not NBSP). Angle brackets are required, as with Postfix's
    strict_rfc821_envelopes = yes. The path must be a RFC 5321 Mailbox (a
    dot-string or quoted-string local part, "@", a domain or an address
    literal), optionally preceded by a source route "@a,@b:" which is
    accepted and dropped as Postfix does, but recorded in Path.route so that
    relay decisions can refuse it. A bare local part ("<postmaster>") is
    accepted here, like Postfix; reject_non_fqdn_* decide about it later.
    "<>" is the null sender, accepted only when mail=True.

    Path.address is the internal form used for lookups and replies: quotes
    and quoted-pairs removed, route dropped ("" for the null sender).
    Path.words are the parameters as they came, in order, for
    smtpgate.smtp.params to check as Postfix does; Path.params maps their
    upper-cased keywords to their value (None when the word has no
    "=value"; a repeated keyword: the last). Without smtputf8, a non-ASCII
    address is refused: in the domain as Postfix refuses it (Bad ...
    address syntax), in the local part with Postfix's strict_smtputf8
    reply. parse_mail_arg() takes smtputf8 from the parameters when it is
    not given: a word SMTPUTF8 of its own, nothing else in the line.
    Path.routed is true for a source route, or a local part that carries
    another address ("%", "!" or "@" in it): such a recipient must
    never relay.

    Every failure raises AddressError whose .reply is what Postfix says:
    "501 5.1.7 Bad sender address syntax" (mail=True), "501 5.1.3 Bad
    recipient address syntax" (mail=False), "553 5.6.7 Must declare SMTPUTF8
    to send unicode address" for a non-ASCII local part without SMTPUTF8.
    Parameters are not checked here. Nothing else is raised for any str.

    parse_mail_arg() and parse_rcpt_arg() take the whole argument of the
    command and first require "FROM:" / "TO:" (any case), else
    "501 5.5.4 Syntax: MAIL FROM:<address>" / "501 5.5.4 Syntax: RCPT TO:<address>".

    split() cuts an internal-form address at its last "@" (domain "" when
    there is none). is_fqdn() says whether a domain is a valid host name with
    at least one dot, after dropping one trailing dot (Postfix's
    reject_non_fqdn_* test; non-ASCII labels only with smtputf8).
    is_valid_hostname() is Postfix's valid_hostname(): letters, digits,
    hyphens inside labels, underscores, labels of 1..63, at most 255, not
    all-numeric. valid_address_literal() checks "[1.2.3.4]" and
    "[IPv6:...]" forms (Postfix's valid_mailhost_addr()).

    client_address() is the one home of a client address's canonical form:
    an IPv4-mapped IPv6 address (::ffff:a.b.c.d, a dual-stack socket's view
    of an IPv4 client) is the IPv4 address it carries; brackets, blanks and
    an "IPv6:" tag are accepted. plain_ip() is the same as text, and leaves
    what is not an address as it is.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field

from smtpgate.replies import MAIL_SYNTAX, RCPT_SYNTAX
from smtpgate.verdict import Reply

# the characters Postfix's smtpd_token() separates words at (ISSPACE in the C locale):
# nothing else, so \x1c-\x1f, NBSP and other Unicode spaces stay inside a word
BLANKS = " \t\n\v\f\r"
_SPLIT = re.compile(r"[ \t\n\v\f\r]+")


def split_words(text: str) -> list[str]:
    """The words of `text` as Postfix's smtpd_token() separates them."""
    return [word for word in _SPLIT.split(text) if word]


def declares_smtputf8(words: list[str] | tuple[str, ...]) -> bool:
    return any(word.upper() == "SMTPUTF8" for word in words)

__all__ = [
    "AddressError",
    "Path",
    "client_address",
    "is_address_literal",
    "is_fqdn",
    "is_valid_hostname",
    "parse_mail_arg",
    "parse_path",
    "parse_rcpt_arg",
    "plain_ip",
    "split",
    "valid_address_literal",
]

BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")

# RFC 5321 caps a local part at 64 octets, but SRS, VERP and BATV bounce
# addresses exceed that in real traffic and Postfix does not enforce it;
# keep a bound only against abuse.
MAX_LOCAL = 256
MAX_DOMAIN = 255
MAX_LABEL = 63

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
# Non-ASCII allowed by SMTPUTF8, minus C1 controls and lone surrogates.
_U = r"\xa0-\ud7ff\ue000-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}{_U}]+(?:\.[{_ATEXT}{_U}]+)*\Z")
_QUOTED = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"\Z')
_QUOTED_UTF8 = re.compile(rf'"((?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*)"\Z')
_QUOTED_PAIR = re.compile(r"\\(.)")
# Underscores are not RFC 5321, but Postfix's valid_hostname() takes them.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_LABEL_UTF8 = rf"[A-Za-z0-9_{_U}](?:[A-Za-z0-9_{_U}-]*[A-Za-z0-9_{_U}])?"
_DOMAIN_UTF8 = re.compile(rf"{_LABEL_UTF8}(?:\.{_LABEL_UTF8})*\Z")
_NUMERIC = re.compile(r"[0-9.]*\Z")
_ROUTING = frozenset("%!@")


class AddressError(ValueError):
    """A malformed MAIL FROM / RCPT TO argument; .reply is the SMTP answer."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(f"{reply}" + (f" ({detail})" if detail else ""))
        self.reply = reply
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Path:
    address: str
    local: str = ""
    domain: str = ""
    params: dict[str, str | None] = field(default_factory=dict)
    route: tuple[str, ...] = ()
    quoted: bool = False
    raw: str = ""
    words: tuple[str, ...] = ()

    @property
    def null(self) -> bool:
        return not self.address

    @property
    def routed(self) -> bool:
        return bool(self.route) or not _ROUTING.isdisjoint(self.local)


def parse_mail_arg(arg: str, smtputf8: bool | None = None) -> Path:
    if arg[:5].upper() != "FROM:":
        raise AddressError(MAIL_SYNTAX)
    return parse_path(arg[5:], smtputf8, mail=True)


def parse_rcpt_arg(arg: str, smtputf8: bool = False) -> Path:
    if arg[:3].upper() != "TO:":
        raise AddressError(RCPT_SYNTAX)
    return parse_path(arg[3:], smtputf8, mail=False)


def parse_path(text: str, smtputf8: bool | None = False, *, mail: bool = False) -> Path:
    """smtputf8=None: as the parameters declare it (MAIL)."""
    bad = BAD_SENDER if mail else BAD_RECIPIENT
    text = text.lstrip(BLANKS)
    if not text.startswith("<"):
        raise AddressError(bad, "missing <")
    end = _closing_bracket(text)
    if end < 0:
        raise AddressError(bad, "missing >")
    raw = text[1:end]
    rest = text[end + 1:]
    if rest and rest[0] not in BLANKS:
        raise AddressError(bad, "junk after >")
    words = tuple(split_words(rest))
    if smtputf8 is None:
        smtputf8 = declares_smtputf8(words)
    if not smtputf8 and not raw.isascii():
        # Postfix refuses a non-ASCII domain as bad syntax, a local part with strict_smtputf8
        raise AddressError(bad if not split(raw)[1].isascii() else NEED_SMTPUTF8)
    params = _params(words)
    if not raw:
        if not mail:
            raise AddressError(bad, "null recipient")
        return Path("", params=params, words=words)
    route: tuple[str, ...] = ()
    mailbox = raw
    if raw[0] == "@":
        colon = raw.find(":")
        if colon < 0:
            raise AddressError(bad, "route without ':'")
        route = tuple(_route_domains(raw[:colon], bad, smtputf8))
        mailbox = raw[colon + 1:]
    local, domain, quoted = _parse_mailbox(mailbox, bad, smtputf8)
    address = f"{local}@{domain}" if domain else local
    return Path(address, local, domain, params, route, quoted, raw, words)


def split(address: str) -> tuple[str, str]:
    at = address.rfind("@")
    if at < 0:
        return address, ""
    return address[:at], address[at + 1:]


def is_address_literal(domain: str) -> bool:
    return domain.startswith("[") and domain.endswith("]")


def valid_address_literal(domain: str) -> bool:
    if not is_address_literal(domain) or len(domain) < 3:
        return False
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        return _valid_ip(inner[5:], 6)
    return _valid_ip(inner, 4)


@functools.lru_cache(maxsize=4096)  # a session checks its HELO and client names several times
def is_valid_hostname(name: str) -> bool:
    if not name or len(name) > MAX_DOMAIN or not name.isascii():
        return False
    if not _DOMAIN.match(name) or _NUMERIC.match(name):
        return False
    return all(len(label) <= MAX_LABEL for label in name.split("."))


def is_fqdn(domain: str, smtputf8: bool = False) -> bool:
    # Postfix drops one trailing dot ("a.example.") but not two.
    if len(domain) > 1 and domain.endswith(".") and not domain.endswith(".."):
        domain = domain[:-1]
    if "." not in domain:
        return False
    if domain.isascii():
        return is_valid_hostname(domain)
    if not smtputf8 or len(domain) > MAX_DOMAIN or not _DOMAIN_UTF8.match(domain):
        return False
    return all(len(label) <= MAX_LABEL for label in domain.split("."))


# --- internals --------------------------------------------------------------------------------


def _closing_bracket(text: str) -> int:
    if '"' not in text:
        return text.find(">")
    quoted = escaped = False
    for i in range(1, len(text)):
        ch = text[i]
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def _params(words: tuple[str, ...]) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in words:
        keyword, eq, value = word.partition("=")
        params[keyword.upper()] = value if eq else None
    return params


def _route_domains(route: str, bad: Reply, smtputf8: bool) -> list[str]:
    domains = []
    for hop in route.split(","):
        if not hop.startswith("@") or not _valid_domain(hop[1:], smtputf8):
            raise AddressError(bad, "bad source route")
        domains.append(hop[1:])
    return domains


def _parse_mailbox(mailbox: str, bad: Reply, smtputf8: bool) -> tuple[str, str, bool]:
    if mailbox.startswith('"'):
        at = _closing_quote(mailbox)
        if at < 0:
            raise AddressError(bad, "unterminated quoted string")
        local_text, rest = mailbox[:at + 1], mailbox[at + 1:]
        if rest and rest[0] != "@":
            raise AddressError(bad, "junk after quoted local part")
        domain = rest[1:] if rest else None
        m = (_QUOTED_UTF8 if smtputf8 else _QUOTED).match(local_text)
        if not m:
            raise AddressError(bad, "bad quoted local part")
        local = _QUOTED_PAIR.sub(r"\1", m.group(1))
        if not local:
            raise AddressError(bad, "empty local part")
        quoted = True
    else:
        at = mailbox.rfind("@")
        local_text, domain = (mailbox, None) if at < 0 else (mailbox[:at], mailbox[at + 1:])
        if not (_DOT_STRING_UTF8 if smtputf8 else _DOT_STRING).match(local_text):
            raise AddressError(bad, "bad local part")
        local = local_text
        quoted = False
    if len(local) > MAX_LOCAL:
        raise AddressError(bad, "local part too long")
    if domain is None:
        return local, "", quoted
    if len(domain) > 1 and domain.endswith(".") and not domain.endswith(".."):
        domain = domain[:-1]
    if is_address_literal(domain):
        if not valid_address_literal(domain):
            raise AddressError(bad, "bad address literal")
    elif not _valid_domain(domain, smtputf8):
        raise AddressError(bad, "bad domain")
    return local, domain, quoted


def _closing_quote(text: str) -> int:
    escaped = False
    for i in range(1, len(text)):
        ch = text[i]
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return i
    return -1


def _valid_domain(domain: str, smtputf8: bool) -> bool:
    if not domain or len(domain) > MAX_DOMAIN:
        return False
    pattern = _DOMAIN if domain.isascii() else _DOMAIN_UTF8 if smtputf8 else None
    if pattern is None or not pattern.match(domain):
        return False
    return all(len(label) <= MAX_LABEL for label in domain.split("."))


def _valid_ip(text: str, version: int) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return ip.version == version and "%" not in text


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def client_address(ip: str | IPAddress) -> IPAddress:
    """The address a client really has: an IPv4-mapped IPv6 address is its IPv4 address.

    The one home of that unwrapping: lookups keys, DNS, DNSBL, limits and the access list all
    see an IPv4 client on a dual-stack socket as IPv4. The written forms an address comes in
    are accepted: blanks around it, an address literal's brackets and its "IPv6:" tag (any
    case, so XCLIENT's "IPV6:" too). ValueError for anything but an address.
    """
    if type(ip) is str:  # the usual case, asked several times per session: the cached parse
        return _parsed(ip)
    if isinstance(ip, _ADDRESS_TYPES):
        return _unmapped(ip)
    return _parsed(str(ip))


@functools.lru_cache(maxsize=4096)
def _parsed(ip: str) -> IPAddress:
    """client_address() of a text: one session asks it of its client's address several
    times (access list, limits, DNSBL, keys), so the parse is done once."""
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r}") from None


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def client_text(ip: str) -> str:
    """str(client_address(ip)) of a text, made once: a session asks it of its client's
    address several times (its own, the limits' key, the DNSBL's), and ipaddress writes an
    address out in Python. ValueError for anything but an address."""
    text = str(client_address(ip))
    return ip if text == ip else text  # the first caller's string: no copy per session


def plain_ip(ip: str) -> str:
    """client_address() as text; what is not an address is returned as it is (and one
    already in that form is the same string: a session keeps it, not a copy)."""
    try:
        return client_text(ip)
    except (ValueError, TypeError):  # TypeError: unhashable, not an address either
        return ip
