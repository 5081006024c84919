"""keys - every Redis key format of smtpgate, in one place.

SYNOPSIS
    PSA, REV, HLO, VDOM, VALI, VBOX, RECIP, LOGMAP      the image's prefixes (str)
    PREFIXES                                           all of them, in that order
    RECIPIENT_DELIMITER = "+"

    key(prefix, name) -> str                           "PSA" + "1.2.3.4" -> "PSA:1.2.3.4"
    split_key(redis_key) -> tuple[str, str] | None     the inverse, None for foreign keys
    parse_network(name) -> IPv4Network | IPv6Network | None
    network_keys(prefix, ip) -> list[str]              exact IP, then every network, longest first
                                                       (ip as address.client_address sees it)
    split_address(address) -> tuple[str, str]          (local, domain), domain lower-cased
    address_keys(prefix, address) -> list[str]         full, without +ext, @domain (VALI, VBOX)
    recip_keys(address) -> list[str]                   full address, then domain (RECIP)
    logmap_keys(sender) -> list[str]                   sender, then @domain (LOGMAP)
    split_targets(value) -> tuple[str, ...]            "a@x, b@x c@x" -> ("a@x", "b@x", "c@x")
    lookup_keys(prefix, name) -> list[str]             the keys smtpgate tries for name, in order

    normalize_key(prefix, name) -> str                 canonical key name, ValueError why not
    check_value(prefix, value) -> str                  the value to store, ValueError why not

    smtpgate's own keys (the section at the end: "smtpgate:" ...), among them
    OVERRIDE, override_key(network), override_network(redis_key) -> str | None

DESCRIPTION
    The image's keys are the users' data and are read exactly as stored:
    `<PREFIX>:<name>` -> string value. The lookup order of each table is
    defined here so that the lookup layer, the socketmap and the CLI agree:

    PSA, REV   client IP exactly, then CIDR networks (`PSA:192.168.0.0/24`),
               most specific first; REV also by client hostname.
    HLO        the HELO name, case-insensitively.
    VDOM       the domain, case-insensitively.
    VALI, VBOX the address, then the address without its +extension, then
               `@domain` (the virtual(5) order). Addresses are looked up
               lower-cased, as Postfix folds table keys.
    RECIP      the address, then the domain (access(5) order, no parents).
    LOGMAP     the sender, then `@domain`.

    network_keys() writes networks the way ipaddress prints them
    (`10.0.0.0/8`, `2001:db8::/32`); the CLI stores them that way.

    normalize_key() and check_value() are the CLI's validation: an IP or
    CIDR (or a hostname for REV) for PSA/REV, a domain for VDOM, addresses
    for VALI/VBOX/RECIP/LOGMAP, known access(5) actions for PSA, REV, HLO
    and RECIP. Their ValueError text is a complete sentence for the user.
"""

from __future__ import annotations

import difflib
import ipaddress
import re

from smtpgate.address import AddressError, IPAddress, client_address, is_fqdn, parse_path
from smtpgate.checks import access_value
from smtpgate.session_id import time_of as session_time

PSA = "PSA"
REV = "REV"
HLO = "HLO"
VDOM = "VDOM"
VALI = "VALI"
VBOX = "VBOX"
RECIP = "RECIP"
LOGMAP = "LOGMAP"
PREFIXES = (PSA, REV, HLO, VDOM, VALI, VBOX, RECIP, LOGMAP)

# Tables whose values are access(5) actions; PSA is postscreen's access list.
ACCESS_TABLES = frozenset({PSA, REV, HLO, RECIP})
_Kind = access_value.Kind
PSA_ACTIONS = frozenset({_Kind.OK, _Kind.REJECT, _Kind.DUNNO})

RECIPIENT_DELIMITER = "+"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def key(prefix: str, name: str) -> str:
    return f"{prefix}:{name}"


def split_key(redis_key: str) -> tuple[str, str] | None:
    prefix, sep, name = redis_key.partition(":")
    if not sep or prefix not in PREFIXES:
        return None
    return prefix, name


# --- addresses and networks --------------------------------------------------------------------


def parse_network(name: str) -> IPNetwork | None:
    """An IP (as a host network) or a CIDR network, host bits allowed; None if neither."""
    text = name.strip()
    if text.startswith("["):  # Postfix's [::1]/128 style
        text = text[1:].replace("]", "", 1)
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None \
            and net.prefixlen >= 96:
        return ipaddress.ip_network(
            f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}", strict=False)
    return net


def network_keys(prefix: str, ip: str | IPAddress) -> list[str]:
    """Keys to try for a client IP when no index is loaded: exact, then /32 (/128) down to /0."""
    addr = client_address(ip)
    keys = [key(prefix, str(addr))]
    for length in range(addr.max_prefixlen, -1, -1):
        net = ipaddress.ip_network(f"{addr}/{length}", strict=False)
        keys.append(key(prefix, str(net)))
    return keys


def split_address(address: str) -> tuple[str, str]:
    """(local part, domain) of an address; the domain lower-cased, '' when there is none."""
    text = address.strip().removeprefix("<").removesuffix(">")
    local, sep, domain = text.rpartition("@")
    if not sep:
        return text, ""
    return local, domain.lower().rstrip(".")


def _strip_extension(local: str) -> str:
    base, sep, _ = local.partition(RECIPIENT_DELIMITER)
    return base if sep and base else local


def address_keys(prefix: str, address: str) -> list[str]:
    """virtual(5) order: user+ext@domain, user@domain, @domain (lower-cased, no duplicates)."""
    local, domain = split_address(address)
    local = local.lower()
    names = [f"{local}@{domain}" if domain else local]
    base = _strip_extension(local)
    if base != local:
        names.append(f"{base}@{domain}" if domain else base)
    if domain:
        names.append(f"@{domain}")
    return [key(prefix, n) for n in names]


def recip_keys(address: str) -> list[str]:
    local, domain = split_address(address)
    names = [f"{local.lower()}@{domain}" if domain else local.lower()]
    if domain:
        names.append(domain)
    return [key(RECIP, n) for n in names]


def logmap_keys(sender: str) -> list[str]:
    local, domain = split_address(sender)
    names = [f"{local.lower()}@{domain}" if domain else local.lower()]
    if domain:
        names.append(f"@{domain}")
    return [key(LOGMAP, n) for n in names]


def split_targets(value: str) -> tuple[str, ...]:
    """Multi-target values (VALI aliases, LOGMAP logins): spaces and commas both separate."""
    return tuple(t for t in re.split(r"[\s,]+", value.strip()) if t)


def lookup_keys(prefix: str, name: str) -> list[str]:
    """The keys a lookup of name tries, in the order above, the first found deciding: a
    client IP in PSA or REV meets its networks, an address its +extension-less form and
    domain. Anything else (a network, a hostname, a domain) is looked up as it is."""
    text = name.strip()
    if prefix in (PSA, REV):
        try:
            return network_keys(prefix, text)
        except ValueError:
            return [key(prefix, text)]
    if prefix in (VALI, VBOX) and not text.startswith("@") and "@" in text:
        return list(dict.fromkeys(address_keys(prefix, text)))
    if prefix == RECIP and "@" in text:
        return recip_keys(text)
    if prefix == LOGMAP and not text.startswith("@") and "@" in text:
        return logmap_keys(text)
    return [key(prefix, text)]


# --- validation for the CLI ---------------------------------------------------------------------

# One grammar for addresses and domains: the SMTP parser's (smtpgate.address), with
# SMTPUTF8, so that the CLI takes a key for every address a client can give in RCPT TO.


def is_domain(name: str) -> bool:
    """A fully qualified domain as the SMTP side reads one (address.is_fqdn, UTF-8 allowed)."""
    return is_fqdn(name, smtputf8=True)


def _address_key(text: str) -> str | None:
    """The key for an address in internal form (quotes removed, as looked up), if the SMTP
    parser takes a recipient with that internal form: as it is, or with its local part
    quoted. None if it does not."""
    local, sep, domain = text.rpartition("@")
    if not sep or not local or not domain:
        return None
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    for written in (local, quoted):
        try:
            path = parse_path(f"<{written}@{domain}>", smtputf8=True)
        except AddressError:
            continue
        if not path.route and path.domain and path.local == local:
            return f"{path.local}@{path.domain}".lower()
    return None


def is_address(text: str) -> bool:
    return _address_key(text) is not None


def _normalize_network(prefix: str, name: str) -> str:
    net = parse_network(name)
    if net is None:
        raise ValueError(f"{prefix} key {name!r} is not an IP address or CIDR network")
    try:
        ipaddress.ip_network(name.strip().lstrip("[").replace("]", "", 1), strict=True)
    except ValueError:
        raise ValueError(f"{prefix} key {name!r} has host bits set; did you mean {net}?") from None
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def normalize_key(prefix: str, name: str) -> str:
    """The canonical key name to store under PREFIX; ValueError with the reason if refused."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown prefix {prefix!r} (one of {', '.join(PREFIXES)})")
    text = name.strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"{prefix} key {name!r} is empty or contains white space")
    if prefix == PSA:
        return _normalize_network(prefix, text)
    if prefix == REV:
        if parse_network(text) is not None:
            return _normalize_network(prefix, text)
        if is_domain(text.lower().rstrip(".")):
            return text.lower().rstrip(".")
        raise ValueError(f"REV key {name!r} is not an IP address, CIDR network or hostname")
    if prefix == HLO:
        return text.lower()
    if prefix == VDOM:
        if not is_domain(text.lower().rstrip(".")):
            raise ValueError(f"VDOM key {name!r} is not a domain name")
        return text.lower().rstrip(".")
    if prefix == RECIP:
        if is_domain(text.lower()):
            return text.lower()
        if (address := _address_key(text)) is not None:
            return address
        raise ValueError(f"RECIP key {name!r} is not an address or a domain")
    # VALI, VBOX, LOGMAP: an address, or @domain (catch-all)
    if text.startswith("@") and is_domain(text[1:].lower()):
        return text.lower()
    if (address := _address_key(text)) is not None:
        return address
    raise ValueError(f"{prefix} key {name!r} is not an address or @domain")


# What each access table takes, for the CLI's refusals (PSA is postscreen's access list).
_PSA_WORDS = "permit, reject or dunno"
_ACCESS_WORDS = ("OK, REJECT [text], DEFER [text], DEFER_IF_PERMIT [text], DEFER_IF_REJECT "
                 "[text], 4NN text, 5NN text or DUNNO")
_KEYWORDS = {PSA: ("permit", "reject", "dunno", "ok"),
             "": ("ok", "reject", "defer", "defer_if_permit", "defer_if_reject", "dunno")}


def _action_hint(prefix: str, text: str) -> str:
    """'(did you mean reject?); valid: ...' for a value whose action is misspelt."""
    word = text.split(None, 1)[0]
    close = difflib.get_close_matches(word.lower(), _KEYWORDS.get(prefix, _KEYWORDS[""]), n=1,
                                      cutoff=0.6)
    if close:
        shown = close[0] if prefix == PSA or word.islower() else close[0].upper()
        hint = f" (did you mean {shown}?)"
    else:
        hint = ""
    return f"{hint}; {prefix} takes {_PSA_WORDS if prefix == PSA else _ACCESS_WORDS}"


def check_value(prefix: str, value: str) -> str:
    """The value to store under PREFIX (stripped; aliases comma-free); ValueError if refused."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown prefix {prefix!r} (one of {', '.join(PREFIXES)})")
    text = value.strip()
    if not text:
        raise ValueError(f"{prefix} value is empty")
    if prefix in ACCESS_TABLES:
        action = access_value.parse(text)
        if action.kind is access_value.Kind.INVALID:
            raise ValueError(f"{prefix} value {value!r}: {action.reason}"
                             f"{_action_hint(prefix, text)}")
        if text.isdigit():
            raise ValueError(
                f"{prefix} value {value!r}: an all-numerical value means OK in access(5); "
                f"write '{text} text' or REJECT to refuse")
        if prefix == PSA and action.kind not in PSA_ACTIONS:
            raise ValueError(f"PSA value {value!r} is not {_PSA_WORDS}")
        return text
    if prefix == VALI:
        targets = split_targets(text)
        bad = [t for t in targets if not is_address(t)]
        if bad:
            raise ValueError(f"VALI value: {', '.join(bad)} is not an address (user@domain)")
        return " ".join(targets)
    if prefix == LOGMAP:
        return " ".join(split_targets(text))
    if prefix == VBOX and any(c.isspace() for c in text):
        raise ValueError(f"VBOX value {value!r} contains white space (a mailbox path)")
    return text


# --- smtpgate's own keys -------------------------------------------------------------------------
# Everything smtpgate itself writes lives under "smtpgate:" so it never collides with the
# image's tables. Add new formats below, one constant or function per key, with a comment
# saying what the value is and who expires it.

OWN_PREFIX = "smtpgate:"

# ---- screening (owned by the screening engineer; add here) ----

# Screening cache: a hash per client IP; field = test name (pregreet, dnsbl, pipelining,
# non_smtp_command, bare_newline), value = Unix time the pass expires, "0" = failed.
# The key's own EXPIRE is the longest expiry in it (smtpgate.lookups.screening_cache sets it), so
# Redis removes whole entries and nothing ever scans the cache.
SCREENING = OWN_PREFIX + "psc:"
# Sessions in flight: a hash per client (client_key: IPv4, or IPv6 /64) and one for all hosts
# together, one field per smtpgate process: "<its sessions> <deadline, ms of Redis TIME>".
# Each process writes only its own field and renews it; a field past its deadline is dropped
# by the next connect, and the key expires a lease after its last write.
# (These replaced sorted sets under "smtpgate:sessions", hence the new names.)
COUNT = OWN_PREFIX + "conns:"
COUNT_ALL = OWN_PREFIX + "conns"
# Connection rate: a counter per client INCR'd by every connect, expiring 60 s after the
# connect that created it (anvil's per-client interval).
RATE = OWN_PREFIX + "connrate:"
# A client's count and rate keys meet in one Lua script, so the client is their Redis
# Cluster hash tag ({...}: only it picks the slot); the other keys stand alone, each in
# its own command, and may live on any node.


def screening_key(ip: str) -> str:
    return SCREENING + ip


def count_key(client: str) -> str:
    return f"{COUNT}{{{client}}}"


def rate_key(client: str) -> str:
    return f"{RATE}{{{client}}}"


# ---- event rates (smtpgate.lookups.event_rates) ----
# anvil's other per-client rates and the per-login ones: one counter per event and client
# (client_key) or login (lower-cased), INCR'd by each event, expiring a window after the
# event that created it (anvil_rate_time_unit; login_rate_time_unit for logins). The event
# is one of smtpgate.checks.rate_limits.EVENTS; the client or login is the hash tag.
EVENT_RATE = OWN_PREFIX + "rate:"


def event_rate_key(event: str, whose: str) -> str:
    return f"{EVENT_RATE}{event}:{{{whose}}}"


# ---- failed AUTH counters (auth_limits) ----
# Value: the number of failed logins; INCR'd by auth_limits.record_failure(), which sets the
# expiry (10 minutes, restarted by each failure); record_success() deletes the login's key.
AUTHFAIL_IP = OWN_PREFIX + "authfail:ip:"  # + client IPv4 address, or IPv6 /64 network
AUTHFAIL_LOGIN = OWN_PREFIX + "authfail:login:"  # + the login name, lower-cased


# ---- session evidence (lookups.evidence) ----
# A session that was refused something: one JSON string per session (smtpgate.lookups.evidence),
# SET with EX session_record_ttl by the worker that ran the session, overwritten as the session
# goes on, read by `smtpgate explain --session`. The id is smtpgate.session_id's.
SESSION_RECORD = OWN_PREFIX + "session:"


def session_record_key(session_id: str) -> str:
    return SESSION_RECORD + session_id


# A repeat's alias (a session refused as an earlier one was): one field in a hash per minute
# of the session's start (its id says when), "FIRST_ID IP", so a batch of aliases is one HSET
# rather than a SET each. The hash expires with the records.
SESSION_ALIASES = OWN_PREFIX + "aliases:"


def session_alias_key(session_id: str) -> str:
    return f"{SESSION_ALIASES}{int(session_time(session_id) // 60)}"


# ---- timed overrides (smtpgate allow / deny; smtpgate.override_record) ----
# One string per IP or network, named as PSA names them (`smtpgate:override:192.0.2.0/24`):
# the override as JSON, SET by the CLI with EX its duration, so Redis removes it by itself.
# The table cache holds them all, indexed like PSA; the fallback MGET reads
# network_keys(OVERRIDE, ip) with the PSA and REV keys.
OVERRIDE = OWN_PREFIX + "override"


def override_key(network: str) -> str:
    return key(OVERRIDE, network)


def override_network(redis_key: str) -> str | None:
    """The network an override key names; None for another key."""
    marker = OVERRIDE + ":"
    return redis_key[len(marker):] if redis_key.startswith(marker) else None


# ---- greylisting (lookups.greylist_store) ----
# A triplet first seen: the Unix time in ms of its first try, SET with PX greylist_retry_window
# (postgrey's window for the retry), deleted when it passes. A network that passed: the time
# of the pass, SET with PX greylist_pass_ttl. Both keys of one client network meet in one
# script, so the network is their Redis Cluster hash tag.
GREYLIST = OWN_PREFIX + "grey:"
GREYLIST_PASS = OWN_PREFIX + "greypass:"


def greylist_key(network: str, tail: str) -> str:
    """network: the client's /24 or /64; tail: "sender-domain" or "sender-domain/rcpt"."""
    return f"{GREYLIST}{{{network}}}:{tail}"


def greylist_pass_key(network: str) -> str:
    return f"{GREYLIST_PASS}{{{network}}}"


# ---- shadow rules (lookups.shadow_tables, policy.shadow) ----
# Candidate table keys: the image's key with this in front (smtpgate:shadow:PSA:192.0.2.7),
# the same value grammar; written by `smtpgate table set --shadow`, never expired, read whole
# (SCAN) by every worker now and then. They decide only the shadow verdicts.
SHADOW_TABLES = OWN_PREFIX + "shadow:"
# What the shadow rules would have done differently: a stream, one entry per disagreement
# (time, session, client, check, direction, live and shadow verdicts), XADD with an approximate
# MAXLEN of SHADOW_LOG_LENGTH; read by `smtpgate shadow report`.
SHADOW_LOG = OWN_PREFIX + "shadowlog"
SHADOW_LOG_LENGTH = 100000


def shadow_key(redis_key: str) -> str:
    return SHADOW_TABLES + redis_key


# ---- replay records (lookups.evidence, cli.replay) ----
# With replay_records on, every session's checks and the facts they decided on: a stream, one
# entry per session ({"r": the record's JSON}), written with the evidence records' batch and
# trimmed (XADD MINID ~) to session_record_ttl; read by `smtpgate replay --since`.
REPLAY_LOG = OWN_PREFIX + "replay"
