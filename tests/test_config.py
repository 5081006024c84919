"""test_config - the configuration layer: defaults, TOML then environment, one clear error.

Also guards conf/smtpgate.toml (every setting listed, at its true default)
and runs `smtpgate check-config` as a process, as a user would.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smtpgate.config import Config, ConfigError, HostPort, env_name, load, mask_secret

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "conf" / "smtpgate.toml"
KEY_LINE = re.compile(r"^# (\w+) = (.*)$")
BASE = {"HOSTNAME": "mx.example.test"}  # keeps socket.getfqdn() out of the comparisons


def load_with(env: dict[str, str]) -> Config:
    return load({**BASE, **env})


def write(tmp_path: Path, text: str | bytes, name: str = "smtpgate.toml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


# --- conf/smtpgate.toml --------------------------------------------------------------------


def example_keys() -> dict[str, str]:
    keys = {}
    for line in EXAMPLE.read_text().splitlines():
        match = KEY_LINE.match(line)
        if match:
            keys[match.group(1)] = match.group(2)
    return keys


def test_example_lists_every_setting_of_config():
    listed = example_keys()
    missing = [f for f in dataclasses.fields(Config) if f.name not in listed]
    hint = "\n".join(
        f"# {f.metadata['doc']} ({env_name(f.name, f.metadata['env'])})\n# {f.name} = ..."
        for f in missing)
    assert not missing, f"conf/smtpgate.toml lacks these settings; add:\n{hint}"
    unknown = set(listed) - {f.name for f in dataclasses.fields(Config)}
    assert not unknown, f"conf/smtpgate.toml lists settings Config does not have: {unknown}"


def test_example_has_only_comments_and_every_key_once():
    lines = EXAMPLE.read_text().splitlines()
    assert all(not line.strip() or line.startswith("#") for line in lines), \
        "every line of conf/smtpgate.toml is a comment: the defaults apply until one is edited"
    names = [m.group(1) for m in map(KEY_LINE.match, lines) if m]
    assert len(names) == len(set(names))


def test_example_uncommented_gives_exactly_the_defaults(tmp_path):
    # The shown defaults are the real ones: the file, uncommented, changes nothing.
    text = "\n".join(f"{key} = {value}" for key, value in example_keys().items()
                     if key not in ("hostname", "domain"))
    path = write(tmp_path, text)
    from_file = load_with({"SMTPGATE_CONFIG": path})
    assert dataclasses.asdict(from_file) == dataclasses.asdict(load_with({}))
    assert {source for _, _, source in from_file.describe()} >= {path}


def test_example_keys_name_their_environment_variable():
    text = EXAMPLE.read_text()
    for f in dataclasses.fields(Config):
        var = env_name(f.name, f.metadata["env"])
        assert f"({var})\n# {f.name} = " in text, f"{f.name}: comment should name {var}"


# --- defaults and precedence ----------------------------------------------------------------


def test_defaults():
    config = load_with({})
    assert config.redis == "redis://127.0.0.1:6379/0"
    assert config.next_hop == (HostPort("127.0.0.1", 10025),)
    assert config.submission_next_hop == ()
    assert config.submission_hops == (HostPort("127.0.0.1", 10587),)  # submission.cf
    assert config.mx_listen == (HostPort("0.0.0.0", 25),)
    assert config.submission_listen == (HostPort("0.0.0.0", 587),)
    assert config.submissions_listen == ()
    assert config.greet_wait == 6.0
    assert config.mynetworks == (ipaddress.ip_network("127.0.0.0/8"),
                                 ipaddress.ip_network("::1/128"))
    assert config.message_size_limit == 26214400
    assert config.domain == "mx.example.test"  # DOMAIN defaults to HOSTNAME
    assert config.tls_paths is None
    assert all(source == "default" for name, _, source in config.describe()
               if name not in ("hostname",))


def test_next_hop_may_list_several_postfix_instances():
    config = load_with({"SMTPGATE_NEXT_HOP": "10.0.0.5:10025, [2001:db8::5]:10025,postfix",
                        "SMTPGATE_SUBMISSION_NEXT_HOP": "10.0.0.5:10587,10.0.0.6:10587"})
    assert config.next_hop == (HostPort("10.0.0.5", 10025), HostPort("2001:db8::5", 10025),
                               HostPort("postfix", 10025))
    assert config.submission_next_hop == (HostPort("10.0.0.5", 10587),
                                          HostPort("10.0.0.6", 10587))


def test_toml_overrides_defaults_and_environment_overrides_toml(tmp_path):
    path = write(tmp_path, """
[listeners]
next_hop = "10.0.0.5:10026"
workers = 3
[postscreen]
greet_wait = "2s"
""")
    config = load_with({"SMTPGATE_CONFIG": path, "SMTPGATE_WORKERS": "2"})
    assert config.next_hop == (HostPort("10.0.0.5", 10026),)  # from the file
    assert config.greet_wait == 2.0                         # from the file, Postfix's units
    assert config.workers == 2                              # the environment wins
    sources = {name: source for name, _, source in config.describe()}
    assert sources["next_hop"] == path
    assert sources["workers"] == "environment"
    assert sources["message_size_limit"] == "default"


def test_image_variables_keep_their_names():
    config = load({"REDIS": "redis:6380", "HOSTNAME": "mx.example.com", "DOMAIN": "example.com",
                   "LETSENCRYPT": "mx.example.com", "DOVECOT": "dovecot"})
    assert config.redis == "redis://redis:6380/0"
    assert (config.hostname, config.domain, config.dovecot) == (
        "mx.example.com", "example.com", "dovecot")
    assert config.tls_paths == ("/etc/letsencrypt/live/mx.example.com/fullchain.pem",
                                "/etc/letsencrypt/live/mx.example.com/privkey.pem")


def test_empty_listener_turns_it_off_and_lists_take_ipv6_in_brackets():
    config = load_with({"SMTPGATE_SUBMISSION_LISTEN": "",
                        "SMTPGATE_MX_LISTEN": "0.0.0.0:25,[::]:25"})
    assert config.submission_listen == ()
    assert config.mx_listen == (HostPort("0.0.0.0", 25), HostPort("::", 25))


def test_empty_mynetworks_trusts_none():
    assert load_with({"SMTPGATE_MYNETWORKS": ""}).mynetworks == ()


@pytest.mark.parametrize(("value", "spared"), [
    pytest.param(None, "10.0.0.0/8", id="default-is-mynetworks"),
    pytest.param("", "", id="empty-spares-none"),
    pytest.param("$mynetworks, 192.0.2.0/24", "10.0.0.0/8 192.0.2.0/24", id="mynetworks-and"),
    pytest.param("[2001:db8::]/32", "2001:db8::/32", id="only-its-own"),
])
def test_event_limit_exceptions_write_out_mynetworks(value, spared):
    environ = {"SMTPGATE_MYNETWORKS": "10.0.0.0/8"}
    if value is not None:
        environ["SMTPGATE_CLIENT_EVENT_LIMIT_EXCEPTIONS"] = value
    config = load_with(environ)
    assert config.event_limit_exceptions == tuple(map(ipaddress.ip_network, spared.split()))


# --- one clear message per bad value ---------------------------------------------------------


BAD_ENVIRONMENT = [
    pytest.param({"SMTPGATE_CLIENT_EVENT_LIMIT_EXCEPTIONS": "$mynetworks 10.0.0.300/8"},
                 "SMTPGATE_CLIENT_EVENT_LIMIT_EXCEPTIONS: '10.0.0.300/8' is not an IP network",
                 id="event-limit-exception-not-a-network"),
    pytest.param({"SMTPGATE_CLIENT_MESSAGE_RATE_LIMIT": "-1"},
                 "SMTPGATE_CLIENT_MESSAGE_RATE_LIMIT: -1 is out of range (at least 0)",
                 id="negative-rate-limit"),
    pytest.param({"SMTPGATE_NEXT_HOP": "x:y"},
                 "SMTPGATE_NEXT_HOP: 'x:y' is not host:port", id="next-hop-not-host-port"),
    pytest.param({"SMTPGATE_NEXT_HOP": "127.0.0.1:70000"},
                 "SMTPGATE_NEXT_HOP: '127.0.0.1:70000' is not host:port", id="port-too-big"),
    pytest.param({"SMTPGATE_NEXT_HOP": ""}, "SMTPGATE_NEXT_HOP: is empty", id="no-next-hop"),
    pytest.param({"SMTPGATE_NEXT_HOP": "10.0.0.5:10025, 10.0.0.5:10025"},
                 "SMTPGATE_NEXT_HOP: '10.0.0.5:10025, 10.0.0.5:10025' names a host twice",
                 id="next-hop-twice"),
    pytest.param({"SMTPGATE_SUBMISSION_NEXT_HOP": "10.0.0.5:10587,10.0.0.5:10587"},
                 "SMTPGATE_SUBMISSION_NEXT_HOP: '10.0.0.5:10587, 10.0.0.5:10587' names a host "
                 "twice", id="submission-next-hop-twice"),
    pytest.param({"SMTPGATE_NEXT_HOP": "10.0.0.5:10025,x:y"},
                 "SMTPGATE_NEXT_HOP: 'x:y' is not host:port", id="next-hop-list-item"),
    pytest.param({"SMTPGATE_MX_LISTEN": "0.0.0.0:0"},
                 "SMTPGATE_MX_LISTEN: '0.0.0.0:0' is not host:port", id="port-zero"),
    pytest.param({"SMTPGATE_MX_LISTEN": "::1:25"},
                 "SMTPGATE_MX_LISTEN: '::1:25' is not host:port (write IPv6 as [addr]:port)",
                 id="ipv6-listen-without-brackets"),
    pytest.param({"SMTPGATE_MX_LISTEN": "[zz::1]:25"},
                 "SMTPGATE_MX_LISTEN: '[zz::1]:25': 'zz::1' is not an IPv6 address",
                 id="ipv6-listen-bad-address"),
    pytest.param({"SMTPGATE_SUBMISSION_LISTEN": "[::1:587"},
                 "SMTPGATE_SUBMISSION_LISTEN: '[::1:587' has no closing ']'",
                 id="ipv6-listen-unclosed"),
    pytest.param({"SMTPGATE_GREET_WAIT": "abc"},
                 "SMTPGATE_GREET_WAIT: 'abc' is not a duration (seconds, or 6s, 5m, 1h, 1d)",
                 id="greet-wait-not-a-duration"),
    pytest.param({"SMTPGATE_GREET_WAIT": "-1"},
                 "SMTPGATE_GREET_WAIT: '-1' is out of range (0 to 60 seconds)",
                 id="greet-wait-negative"),
    pytest.param({"SMTPGATE_WORKERS": "-1"},
                 "SMTPGATE_WORKERS: -1 is out of range (from 0 to 256)", id="workers-negative"),
    pytest.param({"SMTPGATE_WORKERS": "two"},
                 "SMTPGATE_WORKERS: 'two' is not a whole number", id="workers-not-a-number"),
    pytest.param({"SMTPGATE_GREET_ACTION": "block"},
                 "SMTPGATE_GREET_ACTION: 'block' is not one of ignore, enforce, drop",
                 id="bad-action"),
    pytest.param({"SMTPGATE_MYNETWORKS": "10.0.0.0/8 300.1.1.1/32"},
                 "SMTPGATE_MYNETWORKS: '300.1.1.1/32' is not an IP network", id="bad-network"),
    pytest.param({"REDIS": "http://redis:6379"},
                 "REDIS: 'http://redis:6379': scheme 'http' is not one of redis, rediss, unix, "
                 "redis+sentinel, redis+cluster", id="redis-bad-scheme"),
    pytest.param({"REDIS": "redis+sentinel://:secret@s1:26379,s2"},
                 "REDIS: 'redis+sentinel://:***@s1:26379,s2': the path must be /mastername",
                 id="sentinel-without-master-name"),
    pytest.param({"REDIS": "redis+cluster://c1:7000,c2:7001/2"},
                 "REDIS: 'redis+cluster://c1:7000,c2:7001/2': a Redis Cluster has only database 0",
                 id="cluster-with-database"),
    pytest.param({"REDIS": "redis+cluster://c1:7000,c2:70001/"},
                 "REDIS: 'redis+cluster://c1:7000,c2:70001/': 'c2:70001' is not host:port",
                 id="cluster-bad-port"),
    pytest.param({"REDIS": ""}, "REDIS: is empty", id="redis-empty"),
    pytest.param({"SMTPGATE_DNSBL_SITES": "zen.spamhaus.org=127.0.0.[2..x]"},
                 "SMTPGATE_DNSBL_SITES: 'zen.spamhaus.org=127.0.0.[2..x]': bad filter",
                 id="dnsbl-bad-filter"),
    pytest.param({"SMTPGATE_GREYLIST": "some"},
                 "SMTPGATE_GREYLIST: 'some' is not one of off, selective, all",
                 id="greylist-mode"),
    pytest.param({"SMTPGATE_GREYLIST_SIGNALS": "no_fcrdns, dnsbl"},
                 "SMTPGATE_GREYLIST_SIGNALS: 'dnsbl' is not one of no_fcrdns, dnsbl_low, "
                 "dynamic_name, protocol_failed", id="greylist-signal"),
    pytest.param({"SMTPGATE_GREYLIST_DYNAMIC_PATTERN": "(dsl"},
                 "SMTPGATE_GREYLIST_DYNAMIC_PATTERN: '(dsl' is not a regular expression: "
                 "missing ), unterminated subpattern at position 0", id="greylist-pattern"),
    pytest.param({"SMTPGATE_TLS_OPTIONAL": "maybe"},
                 "SMTPGATE_TLS_OPTIONAL: 'maybe' is not yes or no", id="bad-boolean"),
    pytest.param({"SMTPGATE_DNSBL_REPLY_MAP": "zen"},
                 "SMTPGATE_DNSBL_REPLY_MAP: 'zen' is not zone=shown-name", id="bad-reply-map"),
    pytest.param({"SMTPGATE_TLS_CERT": "/etc/ssl/cert.pem"},
                 "SMTPGATE_TLS_KEY: must be set together with its pair (cert and key)",
                 id="tls-cert-without-key"),
    pytest.param({"SMTPGATE_TLS_KEY": "/etc/ssl/key.pem"},
                 "SMTPGATE_TLS_CERT: must be set together with its pair (cert and key)",
                 id="tls-key-without-cert"),
    pytest.param({"SMTPGATE_CONFIG": "/nonexistent/smtpgate.toml"},
                 "SMTPGATE_CONFIG: cannot read /nonexistent/smtpgate.toml: "
                 "No such file or directory", id="config-file-missing"),
    pytest.param({"SMTPGATE_CONFIG": "/"},
                 "SMTPGATE_CONFIG: cannot read /: Is a directory", id="config-file-a-directory"),
]


def test_a_next_hop_without_a_port_is_the_shipped_postfix_service():
    config = load_with({"SMTPGATE_NEXT_HOP": "postfix", "SMTPGATE_SUBMISSION_NEXT_HOP": "postfix"})
    assert config.next_hop == (HostPort("postfix", 10025),)  # master.cf's, never port 25
    assert config.submission_next_hop == (HostPort("postfix", 10587),)  # submission.cf's


BAD_ENVIRONMENT += [
    pytest.param({"SMTPGATE_MYNETWORK": "10.0.0.0/8"},
                 "SMTPGATE_MYNETWORK: unknown setting (did you mean SMTPGATE_MYNETWORKS?)",
                 id="misspelt-variable"),
    pytest.param({"SMTPGATE_NEXTHOP": "10.0.0.5"},
                 "SMTPGATE_NEXTHOP: unknown setting (did you mean SMTPGATE_NEXT_HOP?)",
                 id="misspelt-variable-no-underscore"),
    pytest.param({"SMTPGATE_COLOUR": "blue"}, "SMTPGATE_COLOUR: unknown setting",
                 id="unknown-variable"),
]


def test_variables_that_are_not_settings_are_not_misspellings(tmp_path):
    load_with({"SMTPGATE_UVLOOP": "no", "SMTPGATE_TEST_KEEP": "1",
               "SMTPGATE_ENV_FILE": "", "SMTPGATE_CONFIG": write(tmp_path, "")})


@pytest.mark.parametrize(("env", "message"), BAD_ENVIRONMENT)
def test_bad_environment_value_is_named(env, message):
    with pytest.raises(ConfigError) as caught:
        load_with(env)
    assert str(caught.value).startswith(message)
    assert caught.value.setting == message.split(":", 1)[0]


BAD_TOML = [
    pytest.param('gret_wait = "2s"\n',
                 "{path}: gret_wait: unknown setting (did you mean greet_wait?)",
                 id="unknown-key"),
    pytest.param('[postscreen]\ngret_wait = 1\n', "{path}: gret_wait: unknown setting",
                 id="unknown-key-in-a-section"),
    pytest.param("workers = true\n", "{path}: workers: True is not a whole number",
                 id="wrong-type"),
    pytest.param('next_hop = "x:y"\n', "{path}: next_hop: 'x:y' is not host:port",
                 id="bad-value-names-the-key"),
    pytest.param("greet_wait = \n", "SMTPGATE_CONFIG: {path} is not valid TOML: Invalid value",
                 id="invalid-toml"),
    pytest.param(b'hostname = "\xff"\n', "SMTPGATE_CONFIG: {path} is not valid TOML: 'utf-8'",
                 id="not-utf-8"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TOML)
def test_bad_toml_is_named(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_with({"SMTPGATE_CONFIG": path})
    assert str(caught.value).startswith(message.format(path=path))


def test_a_bad_value_in_the_file_is_reported_even_if_the_environment_sets_it(tmp_path):
    # Nothing is half-loaded: the file must be right on its own.
    path = write(tmp_path, 'workers = "many"\n')
    with pytest.raises(ConfigError, match=r"workers: 'many' is not a whole number"):
        load_with({"SMTPGATE_CONFIG": path, "SMTPGATE_WORKERS": "2"})


# --- smtpgate check-config, as a process ---------------------------------------------------


def check_config(env: dict[str, str], command: str = "check-config", *args: str,
                 timeout: float = 30) -> subprocess.CompletedProcess:
    """The command with env, nothing else (no settings file either); without a certificate
    in env, SMTPGATE_TLS_OPTIONAL=yes, so that the check passes."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SMTPGATE_")
             and k not in ("REDIS", "HOSTNAME", "DOMAIN", "LETSENCRYPT", "DOVECOT", "TIMEZONE")}
    tls = {} if {"SMTPGATE_TLS_CERT", "LETSENCRYPT", "SMTPGATE_TLS_OPTIONAL"} & set(env) \
        else {"SMTPGATE_TLS_OPTIONAL": "yes"}
    return subprocess.run(
        [sys.executable, "-m", "smtpgate", command, *args],
        env={**clean, **BASE, "SMTPGATE_ENV_FILE": "", **tls, **env},
        capture_output=True, text=True, timeout=timeout)


def settings_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines()
            if not re.match(r"(ok|warning|error): ", line)]


def test_check_config_prints_the_effective_configuration(tmp_path):
    path = write(tmp_path, "message_size_limit = 10240000\n")
    result = check_config({"SMTPGATE_CONFIG": path, "SMTPGATE_NEXT_HOP": "10.0.0.5:10026"})
    assert result.returncode == 0, result.stderr
    lines = settings_lines(result)
    assert len(lines) == len(dataclasses.fields(Config))
    assert any(re.fullmatch(r"next_hop +=  ?10\.0\.0\.5:10026 +# environment", line)
               for line in lines), result.stdout
    assert any(re.fullmatch(rf"message_size_limit += 10240000 +# {re.escape(path)}", line)
               for line in lines), result.stdout
    assert any(re.fullmatch(r"greet_wait += 6\.0", line) for line in lines), result.stdout


def test_check_config_refuses_what_serve_refuses_a_missing_certificate():
    # serve stops before it listens: the listeners below are never bound
    env = {"SMTPGATE_MX_LISTEN": "127.0.0.1:1", "SMTPGATE_SUBMISSION_LISTEN": "",
           "SMTPGATE_METRICS_LISTEN": "", "SMTPGATE_SOCKETMAP_LISTEN": "",
           "SMTPGATE_TLS_OPTIONAL": "no"}
    served = check_config(env, command="serve", timeout=60)
    assert served.returncode == 1 and "no TLS certificate" in served.stderr, served.stderr
    result = check_config(env)
    assert result.returncode == 1, result.stdout
    assert ("error: no TLS certificate configured (LETSENCRYPT, or SMTPGATE_TLS_CERT and "
            "SMTPGATE_TLS_KEY): `smtpgate serve` refuses to start (set SMTPGATE_TLS_OPTIONAL="
            "yes to run without STARTTLS)") in result.stdout.splitlines(), result.stdout
    # --live names the same problem, not what follows from it (no STARTTLS offered)
    live = check_config({**env, "REDIS": "127.0.0.1:1", "SMTPGATE_NEXT_HOP": "127.0.0.1:1",
                         "SMTPGATE_REDIS_TIMEOUT": "0.5"}, "check-config", "--live")
    assert live.returncode == 1
    certificate = [line for line in live.stdout.splitlines() if "certificate" in line]
    assert certificate == [line for line in result.stdout.splitlines()
                           if line.startswith("error: no TLS certificate")], live.stdout
    optional = check_config({**env, "SMTPGATE_TLS_OPTIONAL": "yes"})
    assert optional.returncode == 0, optional.stdout
    assert "warning: no TLS certificate configured" in optional.stdout


def test_check_config_refuses_a_certificate_it_cannot_read(tmp_path):
    result = check_config({"SMTPGATE_TLS_CERT": str(tmp_path / "none.pem"),
                           "SMTPGATE_TLS_KEY": str(tmp_path / "none.key")})
    assert result.returncode == 1, result.stdout
    assert any(line.startswith("error: ") and "none.pem" in line
               and "`smtpgate serve` refuses to start" in line
               for line in result.stdout.splitlines()), result.stdout


def test_check_config_warns_of_a_hostname_that_is_not_fully_qualified():
    result = check_config({"HOSTNAME": "localhost"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("warning: HOSTNAME 'localhost' is not a fully qualified domain name: set HOSTNAME "
            "to the name in the MX record") in result.stdout.splitlines(), result.stdout
    assert "not a fully qualified" not in check_config({}).stdout  # BASE's mx.example.test


def test_check_config_names_a_misspelt_variable():
    result = check_config({"SMTPGATE_GRET_WAIT": "0"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "smtpgate: SMTPGATE_GRET_WAIT: unknown setting (did you mean SMTPGATE_GREET_WAIT?)")


def test_check_config_fails_with_one_line_naming_the_setting():
    result = check_config({"SMTPGATE_NEXT_HOP": "x:y"})
    assert result.returncode == 1
    assert result.stdout == ""
    # the line that says where settings came from, then the one error
    assert result.stderr.splitlines() == [
        "smtpgate: settings from the environment only (SMTPGATE_ENV_FILE is empty)",
        "smtpgate: SMTPGATE_NEXT_HOP: 'x:y' is not host:port"]


def test_check_config_bad_file_is_one_line_not_a_traceback(tmp_path):
    path = write(tmp_path, b"hostname = \"\xff\"\n")
    result = check_config({"SMTPGATE_CONFIG": path})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 2
    assert result.stderr.splitlines()[1].startswith(
        f"smtpgate: SMTPGATE_CONFIG: {path} is not valid TOML")


@pytest.mark.parametrize("url", [
    pytest.param("redis://:secret@redis.example.test:6379/0", id="password-only"),
    pytest.param("redis://default:secret@redis.example.test:6379/0", id="user-and-password"),
    pytest.param("rediss://default:secret@redis.example.test:6380/0", id="tls"),
    pytest.param("unix://:secret@/run/redis/redis.sock?db=0", id="unix"),
    pytest.param("redis+sentinel://:secret@s1.example.test:26379,[2001:db8::1]:26380/mx/0",
                 id="sentinel"),
    pytest.param("redis+sentinel://app:secret@s1.example.test,s2.example.test/mx/1"
                 "?sentinel_password=secret", id="sentinel-own-password"),
    pytest.param("redis+cluster://app:secret@c1.example.test:7000,c2.example.test:7001/",
                 id="cluster"),
])
def test_check_config_masks_the_redis_password(url):
    result = check_config({"REDIS": url})
    assert result.returncode == 0, result.stderr
    assert "secret" not in result.stdout + result.stderr
    shown = mask_secret(url)  # what the user should see: the URL with the password starred
    assert shown == url.replace(":secret@", ":***@").replace("=secret", "=***")
    assert re.search(rf"^redis += {re.escape(shown)}  ", result.stdout, re.MULTILINE), \
        result.stdout


def test_the_readmes_rate_limit_settings_load_as_written():
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Rate limits"):text.index("## Moving from")]
    environ = {m.group(1): m.group(2).strip("'") for m in
               re.finditer(r"^(SMTPGATE_\w+)=('[^']*'|\S+)", section, re.M)}
    assert len(environ) == 11
    config = load_with(environ)
    assert config.client_message_rate_limit == 100
    assert config.login_rate_time_unit == 3600.0
    assert ipaddress.ip_network("192.0.2.0/24") in config.event_limit_exceptions
