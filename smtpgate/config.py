"""config - the effective configuration: defaults, then a TOML file, then the environment.

SYNOPSIS
    load(environ=os.environ, origins=None) -> Config   origins: variable -> the file it came from
    candidate(live: Config, path) -> Config            live settings, the file's in their place
    config.shadow -> Config | None                     the candidate of SMTPGATE_SHADOW_CONFIG
    Config.describe() -> list[tuple[str, str, str]]     (key, value shown, source)
    ConfigError(setting, message)

DESCRIPTION
    Every setting has one name used three ways: the TOML key (`greet_wait`),
    the environment variable (`SMTPGATE_GREET_WAIT`), and the field of
    `Config`. The seed image's variables keep their own names (REDIS,
    HOSTNAME, DOMAIN, LETSENCRYPT, DOVECOT, TIMEZONE, RSPAMD).

    Precedence: the defaults below, then the TOML file named by
    SMTPGATE_CONFIG, then the environment. A bad value raises ConfigError
    naming the setting the way the user wrote it (the variable or the key)
    and what is wrong with it; nothing is half-loaded. An unknown key in the
    file, or an SMTPGATE_ variable that names no setting (NOT_SETTINGS
    apart), is an error too, with the closest known name as a suggestion.

    A next hop named without a port is the shipped Postfix service:
    next_hop port 10025, submission_next_hop port 10587.

    SMTPGATE_SHADOW_CONFIG names a TOML file of candidate settings for the
    shadow rules (smtpgate.policy.shadow), with the same keys as the live
    file: the candidate is the live configuration with the file's settings
    in their place (an empty file: the live settings, for trying candidate
    table keys alone). It is read and checked with the live one, so a bad
    candidate setting is a ConfigError too, named with its file.

    Settings named after Postfix keep Postfix's meaning and default
    (greet_wait ~ postscreen_greet_wait, message_size_limit, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from smtpgate import redis_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting has a value smtpgate cannot use."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


# --- value parsers: text (or a TOML value) in, typed value out, ValueError with a reason --------


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(value: Any, default_port: int | None = None) -> HostPort:
    text = str(value).strip()
    if not text:
        raise ValueError("is empty")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r} has no closing ']'")
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not host:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            raise ValueError(f"{text!r} is not host:port (write IPv6 as [addr]:port)")
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r} is not host:port")
        return HostPort(_check_host(host, text), default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return HostPort(_check_host(host, text), int(port_text))


def _check_host(host: str, text: str) -> str:
    if not host or any(c.isspace() or c in "/@," for c in host):
        raise ValueError(f"{text!r} is not host:port")
    return host


def parse_listen(value: Any, default_port: int) -> tuple[HostPort, ...]:
    """Comma-separated listen addresses; an empty value turns the listener off."""
    items = value if isinstance(value, list) else str(value).split(",")
    return tuple(parse_hostport(i, default_port) for i in (str(i).strip() for i in items) if i)


def parse_hostport_list(value: Any, default_port: int) -> tuple[HostPort, ...]:
    return parse_listen(value, default_port)


def parse_next_hops(value: Any, default_port: int, empty_ok: bool = False) -> tuple[HostPort, ...]:
    hops = parse_hostport_list(value, default_port)
    if not hops and not empty_ok:
        raise ValueError("is empty")
    if len(set(hops)) != len(hops):
        raise ValueError(f"{_show(hops)!r} names a host twice")
    return hops


def parse_networks(value: Any) -> tuple[IPNetwork, ...]:
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    nets = []
    for item in items:
        text = str(item).strip()
        if text.startswith("["):  # Postfix writes [::1]/128
            text = text[1:].replace("]", "", 1)
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network") from None
    return tuple(nets)


MYNETWORKS = "$mynetworks"


def parse_limit_exceptions(value: Any) -> tuple[IPNetwork | str, ...]:
    """Networks, and `$mynetworks` standing for that setting's, as Postfix writes it."""
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    mine = tuple(MYNETWORKS for item in items if str(item).strip() == MYNETWORKS)
    return mine[:1] + parse_networks([i for i in items if str(i).strip() != MYNETWORKS])


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "yes", "true", "on"):
        return True
    if text in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{value!r} is not yes or no")


def int_between(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a whole number")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if number < low or (high is not None and number > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"{number} is out of range ({bound})")
        return number

    return parse


def seconds(low: float = 0.0, high: float | None = None) -> Callable[[Any], float]:
    """Seconds, with Postfix's unit letters allowed: 6s, 5m, 1h, 1d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

    def parse(value: Any) -> float:
        text = str(value).strip().lower()
        scale = 1
        if text and text[-1] in units:
            text, scale = text[:-1], units[text[-1]]
        try:
            number = float(text) * scale
        except ValueError:
            raise ValueError(f"{value!r} is not a duration (seconds, or 6s, 5m, 1h, 1d)") from None
        if number < low or (high is not None and number > high):
            raise ValueError(f"{value!r} is out of range ({low} to {high} seconds)")
        return number

    return parse


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text

    return parse


def text(value: Any) -> str:
    return str(value).strip()


def optional_path(value: Any) -> str:
    return str(value).strip()


def parse_redis_url(value: Any) -> str:
    """REDIS: host, host:port, a redis://, rediss://, unix:// URL, a Sentinel set
    (redis+sentinel://h1:26379,h2:26379/mastername/0) or a Cluster
    (redis+cluster://h1:7000,h2:7001/); returned as a URL (smtpgate.redis_url)."""
    return redis_url.parse(value).url


def parse_dnsbl_sites(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    sites = tuple(str(i).strip() for i in items if str(i).strip())
    from smtpgate.dnsbl_sites import parse_sites  # the grammar lives with the DNSBL check

    parse_sites(" ".join(sites))
    return sites


def parse_reply_map(value: Any) -> tuple[tuple[str, str], ...]:
    """DNSBL zone names as shown in replies: `key.zen.dq.spamhaus.net=zen.spamhaus.org`."""
    if isinstance(value, dict):
        return tuple((str(k), str(v)) for k, v in value.items())
    result = {}
    for item in str(value).replace(",", " ").split():
        zone, sep, shown = item.partition("=")
        if not sep or not zone or not shown:
            raise ValueError(f"{item!r} is not zone=shown-name")
        result[zone] = shown
    return tuple(result.items())


def _record_ttl(value: Any) -> float:
    ttl = seconds(0)(value)
    if 0 < ttl < 86400:
        raise ValueError(f"{value!r} is less than a day (0 keeps no records)")
    return ttl


def words_of(choices: tuple[str, ...]) -> Callable[[Any], tuple[str, ...]]:
    """Words from a fixed set, space- or comma-separated (a TOML list too); none is allowed."""
    def parse(value: Any) -> tuple[str, ...]:
        items = value if isinstance(value, list) else str(value).replace(",", " ").split()
        words = tuple(dict.fromkeys(str(i).strip().lower() for i in items if str(i).strip()))
        unknown = [w for w in words if w not in choices]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not one of {', '.join(choices)}")
        return words

    return parse


def regex(value: Any) -> str:
    text = str(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a regular expression: {exc}") from None
    return text


# --- the settings ------------------------------------------------------------------------------

_ACTIONS = ("ignore", "enforce", "drop")
# the shipped Postfix services (conf/postfix/master.cf, submission.cf): a next hop named
# without a port is one of them, never Postfix's public port 25
NEXT_HOP_PORT = 10025
SUBMISSION_NEXT_HOP_PORT = 10587


def setting(default: Any, parse: Callable[[Any], Any], doc: str, env: str | None = None) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc, "env": env})


SECRET_FIELDS = frozenset({"redis"})

# greylisting's vocabulary (smtpgate.checks.greylist implements each signal)
GREYLIST_MODES = ("off", "selective", "all")
GREYLIST_SIGNALS = ("no_fcrdns", "dnsbl_low", "dynamic_name", "protocol_failed")
# what residential and dial-up reverse names are made of (ISPs' own words), searched in the
# name without its last two labels
GREYLIST_DYNAMIC_PATTERN = (
    r"(^|[.-])(dyn|dynamic|dhcp|dial|dialup|dsl|adsl|vdsl|xdsl|ppp|pppoe|pool|cable|"
    r"broadband|cpe|customer|cust|res|residential|home|user|client)[0-9]*([.-]|$)")

# SMTPGATE_ variables that are not settings of Config: the files settings come from, and
# switches read elsewhere (the event loop, the test harness, the Postfix image)
NOT_SETTINGS = ("SMTPGATE_CONFIG", "SMTPGATE_ENV_FILE", "SMTPGATE_SHADOW_CONFIG",
                "SMTPGATE_UVLOOP", "SMTPGATE_TEST_KEEP", "SMTPGATE_POSTFIX_CONF")


@dataclass(frozen=True)
class Config:
    # the seed image's environment
    redis: str = setting(
        "redis://127.0.0.1:6379/0", parse_redis_url,
        "Redis: host, host:port, a redis://, rediss:// (TLS), unix:// URL, a Sentinel set "
        "redis+sentinel://h1:26379,h2:26379/mastername/0 or a Cluster "
        "redis+cluster://h1:7000,h2:7001/", env="REDIS")
    hostname: str = setting(
        "", text, "name in the banner and EHLO reply (default: this host's FQDN)", env="HOSTNAME")
    domain: str = setting("", text, "the mail domain (default: hostname)", env="DOMAIN")
    letsencrypt: str = setting(
        "", text, "folder under /etc/letsencrypt/live holding fullchain.pem and privkey.pem",
        env="LETSENCRYPT")
    dovecot: str = setting("127.0.0.1", text, "host of Dovecot's auth service", env="DOVECOT")
    dovecot_auth_port: int = setting(11330, int_between(1, 65535), "port of Dovecot's auth service")
    timezone: str = setting("", text, "time zone for log time stamps", env="TIMEZONE")

    # listeners and the next hop
    next_hop: tuple[HostPort, ...] = setting(
        (HostPort("127.0.0.1", 10025),), lambda v: parse_next_hops(v, NEXT_HOP_PORT),
        "Postfix smtpd that receives accepted mail with XCLIENT, host[:port] (port 10025 when "
        "left out); a comma list names several, taken in turn, and one that is down is "
        "skipped and retried later")
    mx_listen: tuple[HostPort, ...] = setting(
        (HostPort("0.0.0.0", 25),), lambda v: parse_listen(v, 25),
        "MX listeners, comma-separated host:port; empty turns it off")
    submission_listen: tuple[HostPort, ...] = setting(
        (HostPort("0.0.0.0", 587),), lambda v: parse_listen(v, 587),
        "submission listeners (STARTTLS required before AUTH); empty turns it off")
    submissions_listen: tuple[HostPort, ...] = setting(
        (), lambda v: parse_listen(v, 465),
        "implicit-TLS submission listeners (465); off by default")
    submission_next_hop: tuple[HostPort, ...] = setting(
        (), lambda v: parse_next_hops(v, SUBMISSION_NEXT_HOP_PORT, empty_ok=True),
        "Postfix service for authenticated submission, host[:port] (port 10587 when left "
        "out) or a comma list like next_hop (default: each next_hop host on port 10587, the "
        "submission service of conf/postfix/submission.cf); it must relay for an XCLIENT "
        "LOGIN, which the start checks")
    socketmap_listen: tuple[HostPort, ...] = setting(
        (HostPort("127.0.0.1", 10027),), lambda v: parse_listen(v, 10027),
        "Postfix socketmap service over the Redis tables; empty turns it off")
    metrics_listen: tuple[HostPort, ...] = setting(
        (HostPort("127.0.0.1", 9425),), lambda v: parse_listen(v, 9425),
        "HTTP listener for /metrics and /healthz; empty turns it off")
    metrics_dir: str = setting(
        "", optional_path,
        "folder for the workers' shared metric files (prometheus-client multiprocess mode), "
        "cleared at start; empty: a fresh temporary folder, removed at exit")
    drain_grace: float = setting(
        30.0, seconds(0, 3600), "on SIGTERM, how long sessions in flight may finish before 421")
    stop_grace: float = setting(
        45.0, seconds(1, 3600),
        "how long the service manager waits after SIGTERM before it kills smtpgate (systemd's "
        "TimeoutStopSec, Kubernetes' terminationGracePeriodSeconds, compose's "
        "stop_grace_period): a hand-off under way at the end of drain_grace may finish within it")
    workers: int = setting(0, int_between(0, 256), "worker processes; 0 means one per CPU")
    proxy_protocol: str = setting(
        "off", one_of("off", "v1", "v2", "auto"), "PROXY protocol on the listeners")
    proxy_trusted: tuple[IPNetwork, ...] = setting(
        (), parse_networks, "networks allowed to send a PROXY header")

    # TLS
    tls_cert: str = setting("", optional_path, "PEM certificate chain (overrides LETSENCRYPT)")
    tls_key: str = setting("", optional_path, "PEM private key (overrides LETSENCRYPT)")
    tls_optional: bool = setting(
        False, parse_bool,
        "start without STARTTLS (with a warning) when no certificate is readable")

    # DANE: the certificate against the TLSA records of _25._tcp.HOSTNAME (smtpgate.smtp.dane)
    dane_check: bool = setting(
        True, parse_bool,
        "look up the TLSA records of _25._tcp.HOSTNAME at start, on reload and when the "
        "certificate files change, and hold back a renewed certificate that matches none "
        "while the one it replaces does")
    dane_hold_time: float = setting(
        604800.0, seconds(0, 90 * 86400),
        "a renewed certificate matching no TLSA record is held back while the previous one "
        "has more than this left (then served, with an error in the log)")
    dane_recheck_time: float = setting(
        3600.0, seconds(1, 86400),
        "at most this long between TLSA lookups (sooner when the records' TTL is shorter)")

    # lookups
    nameservers: tuple[HostPort, ...] = setting(
        (), lambda v: parse_hostport_list(v, 53), "DNS resolvers host[:port]; empty: the system's")
    dns_timeout: float = setting(5.0, seconds(0.1, 60), "time limit for one DNS lookup")
    redis_timeout: float = setting(2.0, seconds(0.05, 60), "time limit for one Redis round trip")

    # postscreen's knobs
    mynetworks: tuple[IPNetwork, ...] = setting(
        tuple(parse_networks("127.0.0.0/8 [::1]/128")), parse_networks,
        "networks trusted like Postfix's mynetworks (permit at every stage)")
    greet_wait: float = setting(6.0, seconds(0, 60), "postscreen_greet_wait: pregreet window")
    greet_wait_under_stress: float = setting(
        2.0, seconds(0, 60),
        "the greet wait when sessions in flight pass 80% of connection_limit (postscreen: 2s)")
    greet_action: str = setting("enforce", one_of(*_ACTIONS), "postscreen_greet_action")
    greet_ttl: float = setting(
        86400.0, seconds(0), "postscreen_greet_ttl: a pass is cached this long")
    access_reject_action: str = setting(
        "drop", one_of(*_ACTIONS), "postscreen_denylist_action for PSA reject and static denies")
    dnsbl_sites: tuple[str, ...] = setting(
        (), parse_dnsbl_sites, "postscreen_dnsbl_sites: zone=filter*weight, space-separated")
    dnsbl_threshold: int = setting(1, int_between(1), "postscreen_dnsbl_threshold")
    dnsbl_allowlist_threshold: int = setting(
        0, int_between(-1000, 0), "postscreen_dnsbl_allowlist_threshold (negative; 0 is off)")
    dnsbl_action: str = setting("drop", one_of(*_ACTIONS), "postscreen_dnsbl_action")
    dnsbl_timeout: float = setting(10.0, seconds(0.1, 60), "postscreen_dnsbl_timeout")
    dnsbl_reply_map: tuple[tuple[str, str], ...] = setting(
        (), parse_reply_map, "zone names to show in replies instead of the queried ones")
    pipelining_action: str = setting("enforce", one_of(*_ACTIONS), "postscreen_pipelining_action")
    non_smtp_command_action: str = setting(
        "drop", one_of(*_ACTIONS), "postscreen_non_smtp_command_action")
    bare_newline_action: str = setting(
        "ignore", one_of(*_ACTIONS), "postscreen_bare_newline_action")
    client_connection_count_limit: int = setting(
        50, int_between(0), "concurrent sessions per client (0: no limit)")
    client_connection_rate_limit: int = setting(
        0, int_between(0), "new sessions per client per minute (0: no limit)")
    connection_limit: int = setting(
        10000, int_between(1), "sessions in flight across all processes, then 421 4.3.2")
    anvil_rate_time_unit: float = setting(
        60.0, seconds(1, 86400),
        "anvil_rate_time_unit: the window of the per-client rate limits (connections, "
        "messages, recipients, new TLS sessions, AUTH commands)")
    client_message_rate_limit: int = setting(
        0, int_between(0), "smtpd_client_message_rate_limit: MAIL FROM commands per client "
                           "per anvil_rate_time_unit, then 450 4.7.1 (0: no limit)")
    client_recipient_rate_limit: int = setting(
        0, int_between(0), "smtpd_client_recipient_rate_limit: RCPT TO commands per client "
                           "per anvil_rate_time_unit, then 450 4.7.1 (0: no limit)")
    client_new_tls_session_rate_limit: int = setting(
        0, int_between(0),
        "smtpd_client_new_tls_session_rate_limit: new (not resumed) TLS sessions per client "
        "per anvil_rate_time_unit, then 454 4.7.0 at STARTTLS (0: no limit)")
    client_auth_rate_limit: int = setting(
        0, int_between(0), "smtpd_client_auth_rate_limit: AUTH commands per client per "
                           "anvil_rate_time_unit, then 450 4.7.1 (0: no limit)")
    client_event_limit_exceptions: tuple[IPNetwork | str, ...] = setting(
        (MYNETWORKS,), parse_limit_exceptions,
        "smtpd_client_event_limit_exceptions: networks the per-client connection, message, "
        "recipient, TLS and AUTH limits spare ($mynetworks: those of mynetworks)")
    login_message_rate_limit: int = setting(
        0, int_between(0), "messages (MAIL FROM) per SASL login per login_rate_time_unit on "
                           "submission, all clients and hosts together (0: no limit)")
    login_recipient_rate_limit: int = setting(
        0, int_between(0), "recipients (RCPT TO) per SASL login per login_rate_time_unit on "
                           "submission, all clients and hosts together (0: no limit)")
    login_rate_time_unit: float = setting(
        3600.0, seconds(1, 7 * 86400), "the window of the per-login rate limits")
    ipv6_prefix: int = setting(64, int_between(1, 128), "IPv6 clients are counted per this prefix")

    # smtpd's restrictions
    smtpd_delay_reject: bool = setting(True, parse_bool, "report client and HELO rejects at RCPT")
    unknown_client_reject_code: int = setting(
        450, int_between(400, 599), "reject_unknown_client_hostname code")
    unknown_helo_reject_code: int = setting(
        450, int_between(400, 599), "reject_unknown_helo_hostname code")
    allow_trusted_routing: bool = setting(
        False, parse_bool, "let trusted clients use user%host and source-routed recipients")
    sender_login_check: bool = setting(
        True, parse_bool, "reject_sender_login_mismatch on submission")
    show_user_unknown_table_name: bool = setting(
        True, parse_bool,
        "show_user_unknown_table_name: name the table in the unknown-user reply (\"User unknown "
        "in virtual mailbox table\"); no: \"User unknown\", as the docker-postfix-redis image")

    # greylisting (postgrey's delays, for doubtful clients only under "selective")
    greylist: str = setting(
        "off", one_of(*GREYLIST_MODES),
        "greylisting at RCPT on port 25: off, selective (only clients showing one of "
        "greylist_signals) or all (every client not allowlisted)")
    greylist_delay: float = setting(
        300.0, seconds(0, 86400),
        "how long a greylisted client waits before its retry passes (postgrey --delay)")
    greylist_retry_window: float = setting(
        172800.0, seconds(60),
        "how long after the first try a retry still passes; later it starts over "
        "(postgrey --retry-window, 2 days)")
    greylist_pass_ttl: float = setting(
        3024000.0, seconds(60),
        "how long a client network that passed is not greylisted again, on any node "
        "(postgrey --max-age, 35 days)")
    greylist_recipient: bool = setting(
        False, parse_bool,
        "key on the recipient too: client /24 or /64, sender domain and recipient (no: "
        "network and sender domain)")
    greylist_signals: tuple[str, ...] = setting(
        GREYLIST_SIGNALS, words_of(GREYLIST_SIGNALS),
        "what makes a client doubtful under selective: no_fcrdns (no forward-confirmed "
        "name), dnsbl_low (a DNSBL score above 0 under the threshold), dynamic_name (a "
        "reverse name like a home line's), protocol_failed (a screening test failed under "
        "ignore)")
    greylist_dynamic_pattern: str = setting(
        GREYLIST_DYNAMIC_PATTERN, regex,
        "regular expression (Python) for a dynamic-looking reverse name, searched in the "
        "lower-cased name without its last two labels (a name with three of the client's "
        "IPv4 numbers looks dynamic too); empty: that part only")

    # protocol limits (Postfix's names and defaults)
    message_size_limit: int = setting(
        26214400, int_between(0), "largest message in bytes (0: none)")
    smtpd_timeout: float = setting(300.0, seconds(1, 3600), "idle time limit per command")
    smtpd_recipient_limit: int = setting(1000, int_between(1), "recipients per message")
    smtpd_recipient_overshoot_limit: int = setting(
        1000, int_between(0), "recipients past smtpd_recipient_limit answered 452 before each "
        "one counts as an error")
    smtpd_hard_error_limit: int = setting(20, int_between(1), "errors before 421 and close")
    smtpd_junk_command_limit: int = setting(
        100, int_between(1), "HELO, EHLO, RSET, NOOP and VRFY commands before each one counts "
        "as an error (until a message is queued)")
    line_length_limit: int = setting(2048, int_between(512), "longest command line in bytes")
    next_hop_pool: int = setting(
        4, int_between(0, 64),
        "connections to each next hop kept greeted ahead of need, per worker (0: none)")
    next_hop_connect_timeout: float = setting(
        30.0, seconds(1, 600), "time limit for connecting to the next hop (Postfix's "
                               "smtp_connect_timeout)")
    next_hop_timeout: float = setting(
        100.0, seconds(1, 600),
        "time limit for each reply of the next hop before the message's (banner, XCLIENT, EHLO, "
        "MAIL, RCPT, DATA) and for each write of the message (Postfix's smtpd_proxy_timeout)")
    next_hop_data_done_timeout: float = setting(
        330.0, seconds(1, 600),
        "time limit for the next hop's reply to the end of the message; above Postfix's "
        "milter_content_timeout (300 s), so its milters get their full time")
    next_hop_total_timeout: float = setting(
        540.0, seconds(1, 590),
        "time limit for the whole hand-off of one message, under the 10 minutes a client "
        "waits for its reply to the final dot")
    next_hop_retry: float = setting(
        10.0, seconds(1, 3600),
        "how long a next hop that failed is skipped before a message tries it again; "
        "each failed retry doubles it, up to eight times as long")
    next_hop_transaction_limit: int = setting(
        80, int_between(1, 10000),
        "messages handed to the next hop at once, all workers together (Postfix's default "
        "process limit is 100)")
    next_hop_busy_wait: float = setting(
        2.0, seconds(0, 60), "how long a complete message may wait for a free next-hop slot "
                             "before the client hears 451 4.3.2")
    next_hop_probe_interval: float = setting(
        10.0, seconds(1, 3600), "how often a next hop not reached at start is probed again")
    spool_memory_limit: int = setting(
        262144, int_between(0), "bytes of a message held in memory; the rest goes to a "
                                "temporary file")
    spool_budget: int = setting(
        268435456, int_between(0),
        "bytes of received messages (memory and temporary files) one worker holds at once; "
        "past it, 452 4.3.1 Insufficient system storage at MAIL (SIZE=) and DATA (0: no bound)")
    submissions_handshake_limit: int = setting(
        200, int_between(0),
        "TLS handshakes in progress on the submissions port (465) per worker; past it, a new "
        "connection is closed before TLS (0: no bound)")
    submissions_client_handshake_limit: int = setting(
        10, int_between(0),
        "TLS handshakes in progress on the submissions port (465) per client address and "
        "worker; past it, the client's new connection is closed before TLS (0: no bound)")
    auth_failure_limit: int = setting(
        5, int_between(1), "failed AUTH attempts per client or login per 10 minutes before 421")

    # operations
    log_format: str = setting(
        "postfix", one_of("postfix", "json"),
        "log lines as Postfix writes them, or one JSON object per line (time, level, "
        "component, pid, session, message)")
    session_record_ttl: float = setting(
        172800.0, _record_ttl,
        "how long a refused session's evidence stays in Redis for `smtpgate explain "
        "--session` (at least 1d; 0 keeps none)")
    session_record_size_limit: int = setting(
        8192, int_between(1024, 1048576),
        "bytes of one session's evidence record; past it, the middle of its verdicts and "
        "replies is left out")
    session_record_memory: int = setting(
        268435456, int_between(0),
        "bytes of Redis memory the session records of one node may take (divided among its "
        "workers, counted as written over session_record_ttl); past it, records are not "
        "written until older ones expire (0: no bound)")
    replay_records: bool = setting(
        False, parse_bool,
        "every session leaves a compact record of the facts each check decided on, for "
        "`smtpgate replay` (kept session_record_ttl, within session_record_memory: sampled "
        "when over it)")

    def describe(self) -> list[tuple[str, str, str]]:
        """(setting, value as shown, where it came from) for check-config; secrets masked."""
        rows = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = _show(value)
            if f.name in SECRET_FIELDS:
                shown = mask_secret(shown)
            rows.append((f.name, shown, self._sources.get(f.name, "default")))
        return rows

    @property
    def shadow(self) -> Config | None:
        return getattr(self, "_shadow_config", None)

    @property
    def _sources(self) -> dict[str, str]:
        return getattr(self, "_source_map", {})

    @property
    def submission_hops(self) -> tuple[HostPort, ...]:
        """Where authenticated mail goes: submission_next_hop, else Postfix's submission
        service (conf/postfix/submission.cf) on each next_hop host."""
        if self.submission_next_hop:
            return self.submission_next_hop
        hosts = dict.fromkeys(hop.host for hop in self.next_hop)
        return tuple(HostPort(host, SUBMISSION_NEXT_HOP_PORT) for host in hosts)

    @property
    def event_limit_exceptions(self) -> tuple[IPNetwork, ...]:
        """client_event_limit_exceptions with $mynetworks written out."""
        found: list[IPNetwork] = []
        for item in self.client_event_limit_exceptions:
            found.extend(self.mynetworks if item == MYNETWORKS else (item,))
        return tuple(found)

    @property
    def tls_paths(self) -> tuple[str, str] | None:
        if self.tls_cert or self.tls_key:
            return self.tls_cert, self.tls_key
        if self.letsencrypt:
            base = f"/etc/letsencrypt/live/{self.letsencrypt}"
            return f"{base}/fullchain.pem", f"{base}/privkey.pem"
        return None


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join("=".join(v) if isinstance(v, tuple) else str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


def mask_secret(url: str) -> str:
    """Hide the passwords in a URL: redis://:secret@host -> redis://:***@host."""
    return redis_url.mask(url)


def env_name(f_name: str, f_env: str | None) -> str:
    return f_env or f"SMTPGATE_{f_name.upper()}"


def load(environ: Mapping[str, str] | None = None,
         origins: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    origins = origins or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    specs = {f.name: f for f in fields(Config)}

    path = environ.get("SMTPGATE_CONFIG", "").strip()
    if path:
        for key, raw in _read_toml(path).items():
            if key not in specs:
                raise ConfigError(f"{path}: {key}", "unknown setting" + _close_match(key, specs))
            values[key] = _parse(specs[key], raw, f"{path}: {key}")
            sources[key] = path

    known = set(NOT_SETTINGS)
    for name, spec in specs.items():
        var = env_name(name, spec.metadata["env"])
        known.add(var)
        if var in environ:
            values[name] = _parse(spec, environ[var], var)
            sources[name] = origins.get(var, "environment")
    _check_unknown_variables(environ, known)

    if not values.get("hostname"):
        values["hostname"] = socket.getfqdn()
    if not values.get("domain"):
        values["domain"] = values["hostname"]
    _check_tls_pair(values)
    _check_hop_timeouts({name: values.get(name, spec.default) for name, spec in specs.items()})
    _check_stop_grace({name: values.get(name, specs[name].default)
                       for name in ("drain_grace", "stop_grace")})
    config = Config(**values)
    object.__setattr__(config, "_source_map", sources)
    shadow_path = environ.get("SMTPGATE_SHADOW_CONFIG", "").strip()
    if shadow_path:
        object.__setattr__(config, "_shadow_config", candidate(config, shadow_path))
    return config


def candidate(live: Config, path: str) -> Config:
    """The shadow rules' configuration: live, with the settings of the TOML file at path."""
    specs = {f.name: f for f in fields(Config)}
    values: dict[str, Any] = {}
    for key, raw in _read_toml(path, "SMTPGATE_SHADOW_CONFIG").items():
        if key not in specs:
            raise ConfigError(f"{path}: {key}", "unknown setting" + _close_match(key, specs))
        values[key] = _parse(specs[key], raw, f"{path}: {key}")
    shadow = dataclasses.replace(live, **values)
    _check_hop_timeouts({name: getattr(shadow, name) for name in specs})
    return shadow


def _check_unknown_variables(environ: Mapping[str, str], known: set[str]) -> None:
    """A misspelt SMTPGATE_ variable is an error, as a misspelt key in the TOML file is:
    ignored, it would leave the setting at its default without a word."""
    for var in sorted(environ):
        if var.startswith("SMTPGATE_") and var not in known:
            raise ConfigError(var, "unknown setting" + _close_match(var, known))


def _close_match(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _parse(spec: Any, raw: Any, label: str) -> Any:
    try:
        return spec.metadata["parse"](raw)
    except ValueError as exc:
        raise ConfigError(label, str(exc)) from None


def _read_toml(path: str, variable: str = "SMTPGATE_CONFIG") -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(variable, f"{path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "dnsbl_reply_map":
            flat.update(value)  # sections are for readability only
        else:
            flat[key] = value
    return flat


def _check_hop_timeouts(values: dict[str, Any]) -> None:
    # the total must leave each step its full time, or the step's own limit means nothing
    total = values["next_hop_total_timeout"]
    for name in ("next_hop_data_done_timeout", "next_hop_connect_timeout", "next_hop_timeout"):
        if values[name] >= total:
            raise ConfigError(env_name("next_hop_total_timeout", None),
                              f"must be more than {env_name(name, None)}")


def _check_stop_grace(values: dict[str, Any]) -> None:
    # the drain's grace, and closing after it, must end before the service manager kills
    if values["drain_grace"] >= values["stop_grace"]:
        raise ConfigError(env_name("stop_grace", None),
                          f"must be more than {env_name('drain_grace', None)}")


def _check_tls_pair(values: dict[str, Any]) -> None:
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        missing = "SMTPGATE_TLS_KEY" if values.get("tls_cert") else "SMTPGATE_TLS_CERT"
        raise ConfigError(missing, "must be set together with its pair (cert and key)")
