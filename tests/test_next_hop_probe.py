"""The next-hop probe against a real Postfix 3.7, what `serve` does with it, check-config --live.

A Postfix of its own (services.postfix_server, the shipped conf/postfix files), so its
settings can change without touching the one the other tests relay to:
`configure(xclient_hosts="127.0.0.1", **settings)` sets smtpd_authorized_xclient_hosts on both
smtpd services (the shipped master.cf names it with -o) and the main.cf settings, then
reloads; each test starts from the shipped values (inet_protocols = all, smtputf8_enable =
yes, no smtpd_discard_ehlo_keywords).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import pytest
import trustme
from services import procs
from services.gate_process import GateProcess
from services.ports import free_port, start_on_free_ports
from services.postfix_server import PostfixServer
from services.redis_ha import RedisSentinelSet
from services.smtp_talk import Talk
from services.waiting import wait_until

from smtpgate.config import HostPort
from smtpgate.relay.probe import HopProbe, carried_extensions, hop_findings, probe_next_hop

DEFAULTS = {"inet_protocols": "all", "smtputf8_enable": "yes", "smtpd_discard_ehlo_keywords": ""}
ALL_ATTRIBUTES = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN"})
EVERYTHING = frozenset({"PIPELINING", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"})


@pytest.fixture(scope="module")
def hop_server(service_root):
    server = PostfixServer(service_root / "probe-postfix", lmtp_port=free_port())
    procs.on_exit(server.stop)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def configure(hop_server):
    def apply(xclient_hosts: str = "127.0.0.1", **settings: str) -> HostPort:
        procs.run(["postconf", "-c", str(hop_server.config_dir), "-P", *(
            f"{hop_server.host}:{port}/inet/smtpd_authorized_xclient_hosts={xclient_hosts}"
            for port in (hop_server.port, hop_server.submission_port))])
        hop_server.postconf(**{**DEFAULTS, **settings})  # writes main.cf and reloads
        hop = HostPort(hop_server.host, hop_server.port)
        # an smtpd of the old configuration may still take a connection after the reload:
        # wait until the XCLIENT answer is the new one's
        trusted = "127.0.0.1" in xclient_hosts.replace(",", " ").split()
        wait_until(lambda: probe(hop).authorized == trusted, 10, "Postfix's reload")
        return hop

    return apply


def probe(hop: HostPort) -> HopProbe:
    return asyncio.run(probe_next_hop(hop, "mx.example.test", 10))


def levels(findings) -> list[str]:
    return [f.level for f in findings]


# --- the findings, from probes as they come back ------------------------------------------------

HOP = HostPort("127.0.0.1", 10025)
GOOD = HopProbe(HOP, source="127.0.0.1", xclient=ALL_ATTRIBUTES,
                xclient_reply="220 next-hop ESMTP Postfix", extensions=EVERYTHING,
                ipv6_reply="220 next-hop ESMTP Postfix")


def ehlo_keywords(port: int) -> set[str]:
    """The extensions a gate offers in its EHLO reply."""
    with Talk("127.0.0.1", port) as talk:
        talk.banner()
        _, ehlo = talk.cmd("EHLO client.example.test")
        talk.cmd("QUIT")
    return {line[4:].split()[0] for line in ehlo.splitlines()[1:]}


@pytest.mark.parametrize(("probe_", "ipv6", "expected", "says"), [
    (GOOD, "listener", ["ok"], "XCLIENT authorized for 127.0.0.1"),
    (HopProbe(HOP, error="Connect call failed"), "", ["error"], "cannot be reached"),
    (HopProbe(HOP, source="127.0.0.1", xclient=None,
              xclient_reply="550 5.7.0 Error: insufficient authorization"), "", ["error"],
     "add 127.0.0.1 to smtpd_authorized_xclient_hosts"),
    (HopProbe(HOP, source="127.0.0.1", xclient=None,
              xclient_reply="502 5.5.2 Error: command not recognized"), "", ["error"],
     "does not support XCLIENT"),
    (HopProbe(HOP, source="127.0.0.1", xclient=ALL_ATTRIBUTES, xclient_reply="220 ok",
              extensions=EVERYTHING, ipv6_reply="501 5.5.4 Bad ADDR syntax: IPV6:2001:db8::1"),
     "listener", ["error", "ok"], "smtpgate listens on IPv6: every message from one would get 451; "
                                  "set inet_protocols = all"),
    (HopProbe(HOP, source="127.0.0.1", xclient=ALL_ATTRIBUTES, xclient_reply="220 ok",
              extensions=EVERYTHING, ipv6_reply="501 5.5.4 Bad ADDR syntax: IPV6:2001:db8::1"),
     "proxy", ["warning", "ok"], "the PROXY balancer may pass on IPv6 clients"),
    (HopProbe(HOP, source="127.0.0.1", xclient=ALL_ATTRIBUTES, xclient_reply="220 ok",
              extensions=EVERYTHING, ipv6_reply="501 5.5.4 Bad ADDR syntax: IPV6:2001:db8::1"),
     "", ["ok"], "IPv6 client addresses refused (smtpgate has no IPv6 listener)"),
    (HopProbe(HOP, source="127.0.0.1", xclient=ALL_ATTRIBUTES, xclient_reply="220 ok",
              extensions=EVERYTHING - {"SMTPUTF8", "DSN"}, ipv6_reply="220 ok"),
     "listener", ["warning", "warning", "ok"], "smtputf8_enable = yes"),
    (HopProbe(HOP, source="127.0.0.1", xclient=ALL_ATTRIBUTES, xclient_reply="220 ok",
              extensions=EVERYTHING - {"CHUNKING"}, ipv6_reply="220 ok"),
     "listener", ["ok"], "without CHUNKING (the relay does without)"),
], ids=["good", "unreachable", "not-authorized", "no-xclient-at-all", "ipv6-refused-and-needed",
        "ipv6-refused-behind-proxy", "ipv6-refused-not-needed", "no-smtputf8-no-dsn",
        "no-chunking"])

def test_findings(probe_, ipv6, expected, says):
    found = hop_findings(probe_, ipv6)
    assert levels(found) == expected
    assert any(says in f.text for f in found), found


def test_carried_extensions():
    assert carried_extensions(GOOD) == {"8BITMIME", "DSN", "SMTPUTF8"}
    assert carried_extensions(HopProbe(HOP, error="down")) is None  # not known: offer all
    partial = HopProbe(HOP, xclient=ALL_ATTRIBUTES, xclient_reply="220 ok",
                       extensions=frozenset({"DSN"}))
    assert carried_extensions(partial) == {"DSN"}


def test_a_listener_offers_what_all_its_next_hops_carry():
    from smtpgate.config import load
    from smtpgate.service.preflight import carry

    config = load({"HOSTNAME": "mx.example.test", "SMTPGATE_NEXT_HOP": "10.0.0.1:25,10.0.0.2:25",
                   "SMTPGATE_SUBMISSION_NEXT_HOP": "10.0.0.3:587",
                   "SMTPGATE_SUBMISSION_LISTEN": "127.0.0.1:587"})
    first, second, submission = (*config.next_hop, *config.submission_next_hop)
    carried: dict[str, frozenset[str] | None] = {}

    class Gate:  # what carry() uses of smtp.gate.Gate
        def __init__(self):
            self.config = config
            self.hops = self.submission_hops = None  # no Hops to tell what was probed

        def carry(self, listener, extensions):
            carried[listener] = extensions

    def good(hop, extensions):
        return HopProbe(hop, xclient=ALL_ATTRIBUTES, xclient_reply="220 ok",
                        extensions=frozenset(extensions))

    carry(Gate(), {first: good(first, {"DSN", "SMTPUTF8"}), second: good(second, {"DSN"}),
                   submission: HopProbe(submission, error="down")})
    assert carried == {"mx": {"DSN"}, "submission": None}  # None: not known, all offered
    carry(Gate(), {first: good(first, {"DSN", "SMTPUTF8"}),
                   second: HopProbe(second, error="down")})
    assert carried["mx"] == {"DSN", "SMTPUTF8"}  # what the hops that answered carry


# --- probing a real Postfix ---------------------------------------------------------------------


def test_authorized_with_ipv4_only(configure):
    found = probe(configure(inet_protocols="ipv4"))
    assert found.reached and found.authorized and found.source == "127.0.0.1"
    assert found.xclient >= ALL_ATTRIBUTES
    assert found.extensions >= EVERYTHING
    # what Postfix 3.7 with inet_protocols = ipv4 says to an IPv6 client address
    assert found.ipv6_reply == "501 5.5.4 Bad ADDR syntax: IPV6:2001:db8::1"
    assert levels(hop_findings(found, ipv6_clients="")) == ["ok"]
    (error,) = [f for f in hop_findings(found, "listener") if f.level == "error"]
    assert "inet_protocols = all" in error.text and "501 5.5.4 Bad ADDR syntax" in error.text


def test_ipv6_addresses_accepted_with_inet_protocols_all(configure):
    found = probe(configure())
    assert found.ipv6_accepted, found.ipv6_reply
    assert levels(hop_findings(found, "listener")) == ["ok"]


def test_not_authorized(configure, hop_server):
    hop = configure(xclient_hosts="192.0.2.7")
    found = probe(hop)
    assert found.reached and not found.authorized
    assert found.xclient is None  # Postfix does not list XCLIENT to a stranger
    assert found.xclient_reply == "550 5.7.0 Error: insufficient authorization"
    assert found.ipv6_reply == ""  # no point asking
    assert carried_extensions(found) is None
    (error,) = hop_findings(found)
    assert error.level == "error"
    assert "add 127.0.0.1 to smtpd_authorized_xclient_hosts" in error.text


def test_extensions_are_read_after_xclient(configure):
    found = probe(configure(smtputf8_enable="no", smtpd_discard_ehlo_keywords="dsn, chunking"))
    assert found.authorized
    assert not {"SMTPUTF8", "DSN", "CHUNKING"} & found.extensions
    assert carried_extensions(found) == {"8BITMIME"}
    texts = [f.text for f in hop_findings(found) if f.level == "warning"]
    assert len(texts) == 2
    assert "does not offer DSN" in texts[0] and "dsn out of smtpd_discard_ehlo_keywords" in texts[0]
    assert "does not offer SMTPUTF8" in texts[1] and "smtputf8_enable = yes" in texts[1]


def test_unreachable_is_a_finding_not_an_exception():
    found = probe(HostPort("127.0.0.1", free_port()))
    assert not found.reached and "Connect call failed" in found.error


# --- smtpgate serve with the probe ---------------------------------------------------------------


def test_gate_offers_only_what_the_next_hop_carries(configure, start_gate, redis):
    hop = configure(smtputf8_enable="no", smtpd_discard_ehlo_keywords="dsn")
    gate = start_gate(SMTPGATE_NEXT_HOP=str(hop))
    try:
        gate.wait_for_log(rf"warning: next hop {hop} does not offer SMTPUTF8, so smtpgate does "
                          r"not offer it to clients; in Postfix: smtputf8_enable = yes")
        with Talk("127.0.0.1", gate.mx_port) as talk:
            talk.banner()
            code, ehlo = talk.cmd("EHLO client.example.test")
            assert code == 250
            keywords = {line[4:].split()[0] for line in ehlo.splitlines()[1:]}
            assert "8BITMIME" in keywords and "PIPELINING" in keywords
            assert not {"SMTPUTF8", "DSN"} & keywords, ehlo
            # and what is not offered cannot be used: Postfix's own refusals
            # (a rejection reply ends with "; session=ID")
            assert talk.cmd("MAIL FROM:<a@example.net> SMTPUTF8")[1].startswith(
                "555 5.5.4 Unsupported option: SMTPUTF8")
            assert talk.cmd("MAIL FROM:<a@example.net> RET=HDRS")[1].startswith(
                "501 5.7.1 DSN support is disabled")
            assert talk.cmd("MAIL FROM:<a@example.net> BODY=8BITMIME")[0] == 250
            assert talk.cmd("RCPT TO:<user1@example.com> NOTIFY=NEVER")[1].startswith(
                "501 5.7.1 DSN support is disabled")
            talk.cmd("QUIT")
    finally:
        gate.stop()


def test_gate_offers_everything_to_a_full_next_hop(configure, start_gate, redis):
    hop = configure()
    gate = start_gate(SMTPGATE_NEXT_HOP=str(hop))
    try:
        gate.wait_for_log(rf"next hop {hop}: XCLIENT authorized for 127\.0\.0\.1")
        with Talk("127.0.0.1", gate.mx_port) as talk:
            talk.banner()
            _, ehlo = talk.cmd("EHLO client.example.test")
            assert {"8BITMIME", "DSN", "SMTPUTF8"} <= {
                line[4:].split()[0] for line in ehlo.splitlines()[1:]}
            assert talk.cmd("MAIL FROM:<a@example.net> SMTPUTF8 RET=HDRS")[0] == 250
            talk.cmd("QUIT")
    finally:
        gate.stop()


def test_serve_stops_when_xclient_is_refused(configure, start_gate):
    hop = configure(xclient_hosts="192.0.2.7")
    with pytest.raises(RuntimeError) as failed:
        start_gate(SMTPGATE_NEXT_HOP=str(hop))
    text = str(failed.value)
    assert "smtpgate exited with 1 at start" in text
    assert re.search(rf"fatal: next hop {re.escape(str(hop))} does not let 127\.0\.0\.1 use "
                     r"XCLIENT \(XCLIENT ADDR=192\.0\.2\.1: 550 5\.7\.0 Error: insufficient "
                     r"authorization\): every message would get 451; add 127\.0\.0\.1 to "
                     r"smtpd_authorized_xclient_hosts", text), text
    assert "smtpgate: ready" not in text and "Traceback" not in text


@pytest.mark.parametrize("inet_protocols", ["ipv4", "all"])
def test_ipv6_listener_needs_a_next_hop_that_takes_ipv6(configure, start_gate, redis,
                                                        inet_protocols):
    hop = configure(inet_protocols=inet_protocols)
    port = free_port()
    env = {"SMTPGATE_NEXT_HOP": str(hop), "SMTPGATE_MX_LISTEN": f"[::1]:{port}"}
    if inet_protocols == "ipv4":
        with pytest.raises(RuntimeError) as failed:
            start_gate(**env)
        assert re.search(r"fatal: next hop .* refuses IPv6 client addresses .* smtpgate listens "
                         r"on IPv6: .* set inet_protocols = all in Postfix's main.cf",
                         str(failed.value)), failed.value
        return
    gate = start_gate(**env)
    try:
        with Talk("::1", port, source="::1") as talk:
            assert talk.banner()[0] == 220
            talk.cmd("QUIT")
    finally:
        gate.stop()


def test_behind_a_proxy_an_ipv4_only_next_hop_is_a_warning(configure, start_gate, redis):
    # the balancer may well speak IPv4 only: smtpgate cannot know, so it says so and runs
    hop = configure(inet_protocols="ipv4")
    gate = start_gate(SMTPGATE_NEXT_HOP=str(hop), SMTPGATE_PROXY_PROTOCOL="auto",
                      SMTPGATE_PROXY_TRUSTED="127.0.0.1/32")
    try:
        gate.wait_for_log(r"warning: next hop .* refuses IPv6 client addresses .* the PROXY "
                          r"balancer may pass on IPv6 clients")
    finally:
        gate.stop()


def test_next_hop_that_comes_up_later_is_learned(service_root, start_gate, redis):
    later = PostfixServer(service_root / "late-postfix", lmtp_port=free_port(),
                          main_cf={"smtputf8_enable": "no"})
    procs.on_exit(later.stop)
    hop = HostPort(later.host, later.port)
    gate = start_gate(SMTPGATE_NEXT_HOP=str(hop), SMTPGATE_NEXT_HOP_PROBE_INTERVAL="1")
    try:
        gate.wait_for_log(rf"warning: next hop {hop} cannot be reached .*; clients are offered "
                          r"every extension until it can, and it is tried again every 1 s")

        assert "SMTPUTF8" in ehlo_keywords(gate.mx_port)  # nothing known yet: everything offered
        later.start()
        gate.wait_for_log(rf"warning: next hop {hop} does not offer SMTPUTF8", timeout=15)
        wait_until(lambda: "SMTPUTF8" not in ehlo_keywords(gate.mx_port), 5,
                   "smtpgate to stop offering SMTPUTF8")
    finally:
        gate.stop()
        later.stop()


def test_reload_to_another_next_hop_probes_it(configure, redis_server, dns_server, redis,
                                              service_root, tmp_path):
    hop = configure()
    other_server = PostfixServer(service_root / "reload-postfix", lmtp_port=free_port(),
                                 main_cf={"smtputf8_enable": "no"})
    procs.on_exit(other_server.stop)
    other_server.start()
    other = HostPort(other_server.host, other_server.port)
    toml = tmp_path / "smtpgate.toml"
    toml.write_text(f'next_hop = "{hop}"\nnext_hop_pool = 0\n')
    # not start_gate: its SMTPGATE_NEXT_HOP would override the file's next_hop
    gate = GateProcess(service_root / "gate-reload-hop", {
        "REDIS": redis_server.url, "SMTPGATE_NAMESERVERS": dns_server.nameserver,
        "SMTPGATE_CONFIG": str(toml), "SMTPGATE_GREET_WAIT": "0", "SMTPGATE_MYNETWORKS": ""})
    procs.on_exit(gate.stop)
    gate.start()
    try:
        assert "SMTPUTF8" in ehlo_keywords(gate.mx_port)
        toml.write_text(f'next_hop = "{other}"\nnext_hop_pool = 0\n')
        gate.proc.send_signal(signal.SIGHUP)
        gate.wait_for_log(rf"warning: next hop {other} does not offer SMTPUTF8")
        assert "SMTPUTF8" not in ehlo_keywords(gate.mx_port)
    finally:
        gate.stop()
        other_server.stop()


# --- smtpgate check-config --live --------------------------------------------------------------


def check_config(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SMTPGATE_")
             and k not in ("REDIS", "HOSTNAME", "DOMAIN", "LETSENCRYPT", "DOVECOT", "TIMEZONE")}
    return subprocess.run(
        [sys.executable, "-m", "smtpgate", "check-config", *args],
        env={**clean, "HOSTNAME": "mx.example.test", "SMTPGATE_SUBMISSION_LISTEN": "",
             "SMTPGATE_MX_LISTEN": "127.0.0.1:25", **env},
        capture_output=True, text=True, timeout=60)


def findings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines()
            if re.match(r"(ok|warning|error): ", line)]


def test_check_config_live_all_good(configure, redis_server, certificate):
    hop = configure()
    _, cert, key = certificate
    result = check_config("--live", REDIS=redis_server.url, SMTPGATE_NEXT_HOP=str(hop),
                          SMTPGATE_TLS_CERT=str(cert), SMTPGATE_TLS_KEY=str(key))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = findings(result)
    assert len(lines) == 4, lines
    assert re.fullmatch(rf"ok: TLS certificate {re.escape(str(cert))} \(key "
                        rf"{re.escape(str(key))}\): mx\.example\.test; valid until .* "
                        r"\(\d+ days left\)", lines[0]), lines
    assert lines[1] == f"ok: Redis at {redis_server.url} answers PING"
    assert lines[2].startswith(f"ok: next hop {hop}: XCLIENT authorized for 127.0.0.1 (")
    assert "IPv6 client addresses accepted" in lines[2]
    assert "offers 8BITMIME CHUNKING DSN PIPELINING SMTPUTF8" in lines[2]
    assert lines[3] == "ok: no TLSA record at _25._tcp.mx.example.test: DANE is not in use"


def test_check_config_live_failures(configure, tmp_path):
    hop = configure(xclient_hosts="192.0.2.7")
    redis_port = free_port()  # nobody listens there
    ca = trustme.CA()
    leaf = ca.issue_cert("other.example.test")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    result = check_config("--live", REDIS=f"redis://:secret@127.0.0.1:{redis_port}/0",
                          SMTPGATE_NEXT_HOP=str(hop), SMTPGATE_TLS_CERT=str(cert),
                          SMTPGATE_TLS_KEY=str(key))
    assert result.returncode == 1
    assert "secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = findings(result)
    assert lines[0] == (f"warning: HOSTNAME mx.example.test is not among the names of the TLS "
                        f"certificate {cert}: other.example.test")
    assert any(line.startswith(f"error: Redis at redis://:***@127.0.0.1:{redis_port}/0 does "
                               "not answer PING: ") for line in lines), lines
    assert any(line.startswith(f"error: next hop {hop} does not let 127.0.0.1 use XCLIENT")
               and "smtpd_authorized_xclient_hosts" in line for line in lines), lines


def test_check_config_live_asks_a_sentinel_sets_master(service_root):
    servers = RedisSentinelSet(service_root / "probe-sentinel")
    procs.on_exit(servers.stop)
    start_on_free_ports(servers)
    try:
        result = check_config("--live", REDIS=servers.url, SMTPGATE_TLS_OPTIONAL="yes",
                              SMTPGATE_NEXT_HOP=f"127.0.0.1:{free_port()}")
        assert f"ok: Redis at {servers.url} answers PING" in findings(result), result.stdout
        servers.master.stop()  # and the replica, so that no failover can find a new master
        servers.replica.stop()
        result = check_config("--live", REDIS=servers.url, SMTPGATE_TLS_OPTIONAL="yes",
                              SMTPGATE_NEXT_HOP=f"127.0.0.1:{free_port()}")
        assert any(line.startswith(f"error: Redis at {servers.url} does not answer PING: ")
                   for line in findings(result)), result.stdout
    finally:
        servers.stop()


def test_check_config_live_next_hop_down(redis_server):
    hop = HostPort("127.0.0.1", free_port())
    result = check_config("--live", REDIS=redis_server.url, SMTPGATE_NEXT_HOP=str(hop),
                          SMTPGATE_TLS_OPTIONAL="yes")
    assert result.returncode == 1
    lines = findings(result)
    assert lines[0].startswith("warning: no TLS certificate configured")
    assert lines[-1].startswith(f"error: next hop {hop} cannot be reached: ")


def test_check_config_without_live_names_a_mismatched_key(tmp_path):
    ca = trustme.CA()
    first, second = ca.issue_cert("mx.example.test"), ca.issue_cert("mx.example.test")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in first.cert_chain_pems))
    second.private_key_pem.write_to_path(str(key))
    result = check_config(SMTPGATE_TLS_CERT=str(cert), SMTPGATE_TLS_KEY=str(key),
                          SMTPGATE_NEXT_HOP=f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert findings(result) == [f"error: TLS key {key} does not match the certificate {cert}"]


# --- a submission next hop must relay for an authenticated login ------------------------------


def relay_probe(hop: HostPort) -> HopProbe:
    return asyncio.run(probe_next_hop(hop, "mx.example.test", 10, relay=True))


def test_the_submission_service_relays_for_a_login(postfix_server):
    """The harness's Postfix (the shipped files, with its Dovecot for SASL)."""
    found = relay_probe(HostPort(postfix_server.host, postfix_server.submission_port))
    assert found.relay_reply.startswith("250"), found.relay_reply
    assert levels(hop_findings(found)) == ["ok"]
    assert "relays for an authenticated login" in hop_findings(found)[0].text


def test_the_mx_service_is_no_submission_next_hop(configure):
    """What the old default (submission to next_hop) did: Postfix refuses the relay, and a
    user would hear it only after sending the whole message. The probe finds it at start."""
    found = relay_probe(configure())
    assert found.relay_reply == ("554 5.7.1 <postmaster@[192.0.2.2]>: Relay access denied"), \
        found.relay_reply
    (error,) = [f for f in hop_findings(found) if f.level == "error"]
    assert "does not relay for an authenticated login" in error.text
    assert "SMTPGATE_SUBMISSION_NEXT_HOP" in error.text and "10587" in error.text
    assert relay_probe(configure()).relay_reply == found.relay_reply  # nothing was queued


def test_serve_stops_when_the_submission_next_hop_does_not_relay(configure, start_gate):
    hop = configure()
    with pytest.raises(RuntimeError) as failed:
        start_gate(listeners=("mx", "submission"), SMTPGATE_NEXT_HOP=str(hop),
                   SMTPGATE_SUBMISSION_NEXT_HOP=str(hop))
    text = str(failed.value)
    assert "smtpgate exited with 1 at start" in text
    assert re.search(rf"fatal: submission next hop {re.escape(str(hop))} does not relay for an "
                     r"authenticated login \(XCLIENT LOGIN=smtpgate-probe, MAIL FROM:<>, RCPT "
                     r"TO:<postmaster@\[192\.0\.2\.2\]>: 554 5\.7\.1 .*Relay access denied\)",
                     text), text


@pytest.mark.parametrize("reply, expected", [
    ("250 2.1.5 Ok", ["ok"]),
    ("554 5.7.1 <postmaster@[192.0.2.2]>: Relay access denied", ["error", "ok"]),
    ("451 4.3.0 <postmaster@[192.0.2.2]>: Temporary lookup failure", ["ok", "ok"]),
    ("XCLIENT LOGIN: 501 5.5.4 Bad LOGIN syntax", ["error", "ok"]),
], ids=["relays", "refuses", "tables-not-up-yet", "login-refused"])
def test_relay_findings(reply, expected):
    import dataclasses

    assert levels(hop_findings(dataclasses.replace(GOOD, relay_reply=reply))) == expected
