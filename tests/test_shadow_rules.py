"""Shadow rules in a real gate: candidate settings and candidate keys decided beside the live
rules, from the same facts, never changing a reply; the log line, the session's record and
`explain --session`, the metric and `smtpgate shadow report`.

One gate for the module (MX and metrics), with a candidate file that ignores DNSBL listings
and hides the table's name in the unknown-user reply.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
from services.smtp_talk import SESSION_TAG, Talk, send_marked, untag
from services.waiting import wait_until
from services.world import gate_in_world

pytestmark = pytest.mark.slow

LISTED = "127.0.31.5"  # bl.test lists it (below)
CANDIDATE = 'dnsbl_action = "ignore"\nshow_user_unknown_table_name = false\n'


@pytest.fixture(scope="module")
def candidate_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("shadow") / "candidate.toml"
    path.write_text(CANDIDATE)
    return path


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server, candidate_file):
    dns_server.clear()  # the session's DNS server: what earlier modules listed goes
    dns_server.set([("5.31.0.127.bl.test", "A", "127.0.0.2")])
    yield from gate_in_world(start_gate, redis_server, dns_server,
                             listeners=("mx", "metrics"), SMTPGATE_DNSBL_SITES="bl.test",
                             SMTPGATE_SHADOW_CONFIG=str(candidate_file))


def smtpgate(redis_server, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "REDIS": redis_server.url, "SMTPGATE_MYNETWORKS": "",
               "HOSTNAME": "mx.example.test", **env}
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], env=environ,
                          capture_output=True, text=True, timeout=60)


def shadow_line(gate, check: str, said: str, ip: str) -> re.Match:
    return gate.wait_for_log(
        rf"shadow: {check} {said} \S*\[{re.escape(ip)}\]: live (?P<live>.*); shadow "
        rf"(?P<shadow>.*) session=(?P<session>\w+)")


def test_a_listed_client_is_refused_as_before_and_the_shadow_would_accept(gate, redis_server):
    with Talk("127.0.0.1", gate.mx_port, source=LISTED) as talk:
        code, text = talk.reply()
    assert code == 521, text  # the live rules' reply, untouched by the candidate's ignore
    assert untag(text).startswith(f"521 5.7.1 Service unavailable; client [{LISTED}] blocked")
    sid = SESSION_TAG.search(text).group(1)
    line = shadow_line(gate, "dnsbl", "would accept", LISTED)
    assert line["session"] == sid
    assert line["live"].startswith("fail 521 5.7.1") and line["shadow"].startswith("pass")

    def explained():
        result = smtpgate(redis_server, "explain", "--session", sid)
        return result if "shadow rules" in result.stdout else None

    out = wait_until(explained, 10, "the record's shadow section").stdout
    assert re.search(r"(?m)^shadow rules .*\n  dnsbl +would accept: live fail 521 5\.7\.1 .*; "
                     r"shadow pass \(action ignore\) \(DNSBL rank 1 for \[127\.0\.31\.5\]",
                     out), out


def test_a_candidate_key_would_refuse_a_client_the_live_rules_let_deliver(gate, redis_server):
    ip = "127.0.0.84"
    result = smtpgate(redis_server, "table", "set", "--shadow", "PSA", ip, "reject")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"smtpgate:shadow:PSA:{ip} reject"
    assert smtpgate(redis_server, "table", "get", "PSA", ip).returncode == 1  # not live
    listed = smtpgate(redis_server, "table", "list", "--shadow", "PSA")
    assert listed.stdout.strip() == f"{ip} reject", listed

    def disagreed():  # the workers read the candidate keys every few seconds
        with Talk("127.0.0.1", gate.mx_port, source=ip) as talk:
            assert talk.banner()[0] == 220  # live: no PSA key, welcome
            talk.cmd("QUIT")
        return re.search(rf"shadow: access_list would refuse \S*\[{re.escape(ip)}\]: live pass; "
                         rf"shadow fail 521 5\.3\.2 .* session=(\w+)", gate.log_text())

    sid = wait_until(disagreed, 20, "the shadow's access list refusal", interval=0.5).group(1)
    assert send_marked(gate.mx_port, "shadow-psa", source=ip)[0] == 250  # still delivered
    out = wait_until(lambda: smtpgate(redis_server, "explain", "--session", sid).stdout, 10,
                     "the accepted session's record")
    assert "  access_list      would refuse: live pass" in out
    assert "(DENYLISTED [127.0.0.84] (PSA:127.0.0.84 reject))" in out
    assert smtpgate(redis_server, "table", "del", "--shadow", "PSA", ip).returncode == 0


def test_a_candidate_setting_would_change_a_reply(gate):
    ip = "127.0.0.85"
    with Talk("127.0.0.1", gate.mx_port, source=ip) as talk:
        assert talk.banner()[0] == 220
        talk.cmd("EHLO client.example.test")
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        _, text = talk.cmd("RCPT TO:<nobody@example.com>")
        talk.cmd("QUIT")
    assert untag(text) == ("550 5.1.1 <nobody@example.com>: Recipient address rejected: "
                           "User unknown in virtual mailbox table")
    line = shadow_line(gate, "recipient", "would reply otherwise to", ip)
    assert line["shadow"].startswith("fail 550 5.1.1 <nobody@example.com>: Recipient address "
                                     "rejected: User unknown (")


def test_the_candidate_agrees_on_every_check_it_does_not_change(gate):
    """Refusals at each stage that the candidate's two settings do not touch: no shadow line."""
    sessions = [  # (client, HELO, sender, recipient, the RCPT reply's code)
        ("127.0.0.86", "localhost", "a@example.net", "user1@example.com", 504),  # HELO
        ("127.0.0.87", "client.example.test", "a@localhost", "user1@example.com", 504),
        ("127.0.0.88", "client.example.test", "a@example.net", "x@elsewhere.test", 554),
        ("127.0.32.1", "client.example.test", "a@example.net", "user1@example.com", 450),
        ("127.0.0.89", "client.example.test", "a@example.net", "user2@example.com", 250),
    ]
    for ip, name, sender, rcpt, wanted in sessions:
        with Talk("127.0.0.1", gate.mx_port, source=ip) as talk:
            assert talk.banner()[0] == 220
            talk.cmd(f"EHLO {name}")
            assert talk.cmd(f"MAIL FROM:<{sender}>")[0] == 250
            code, text = talk.cmd(f"RCPT TO:<{rcpt}>")
            assert code == wanted, (ip, text)
            talk.cmd("QUIT")
        gate.wait_for_log(rf"disconnect from \S*\[{re.escape(ip)}\]")
        shadow = re.findall(rf"shadow: .*\[{re.escape(ip)}\].*", gate.log_text())
        assert not shadow, shadow


def test_the_report_and_the_metric_count_the_disagreements(gate, redis_server):
    shadow_line(gate, "dnsbl", "would accept", LISTED)  # the earlier tests' sessions
    shadow_line(gate, "recipient", "would reply otherwise to", "127.0.0.85")
    result = smtpgate(redis_server, "shadow", "report", "--since", "1h")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"(?m)^  dnsbl +would accept +[1-9]", out), out
    assert re.search(r"(?m)^  recipient +would reply otherwise +1$", out), out
    assert re.search(rf"(?m)^  {re.escape(LISTED)} +[1-9]", out), out
    assert re.search(r"(?m)^  session=\w{12} 127\.0\.0\.85 recipient would reply otherwise: ", out)
    url = f"http://127.0.0.1:{gate.metrics_port}/metrics"

    def counted():
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return re.search(r'smtpgate_shadow_disagreements_total\{check="dnsbl",'
                         r'direction="accept"\} ([0-9.]+)', text)

    assert float(wait_until(counted, 10, "the shadow metric").group(1)) >= 1
    assert smtpgate(redis_server, "shadow", "report", "--since", "1s").returncode == 0


def test_sighup_reads_the_candidate_file_again(gate, candidate_file):
    """The candidate no longer ignores listings: a listed client is refused by both rules."""
    candidate_file.write_text("show_user_unknown_table_name = false\n")
    reloaded = gate.log_text().count("reloaded configuration")
    gate.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gate.log_text().count("reloaded configuration") >= reloaded
               + len(gate.workers()), 10, "every worker's reload")

    def agreed():
        with Talk("127.0.0.1", gate.mx_port, source=LISTED) as talk:
            code, text = talk.reply()
        assert code == 521, text
        sid = SESSION_TAG.search(text).group(1)
        gate.wait_for_log(rf"disconnect from \S*\[{re.escape(LISTED)}\] .*session={sid}")
        return f"session={sid}" not in "".join(
            line for line in gate.log_text().splitlines() if "shadow:" in line)

    for _ in range(4):  # the workers take turns: each must have the new candidate
        assert wait_until(agreed, 10, "a listed session without a shadow line")
    # and the shadow rules are still on, with the candidate's other setting
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.94") as talk:
        assert talk.banner()[0] == 220
        talk.cmd("EHLO client.example.test")
        talk.cmd("MAIL FROM:<a@example.net>")
        assert talk.cmd("RCPT TO:<nobody@example.com>")[0] == 550
        talk.cmd("QUIT")
    shadow_line(gate, "recipient", "would reply otherwise to", "127.0.0.94")
    candidate_file.write_text(CANDIDATE)  # as the module began, for any test after this one


def test_bad_shadow_input_gets_a_clear_message(redis_server, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('greet_actoin = "drop"\n')
    checked = smtpgate(redis_server, "check-config", SMTPGATE_SHADOW_CONFIG=str(bad))
    assert checked.returncode == 1
    assert f"{bad}: greet_actoin: unknown setting (did you mean greet_action?)" in checked.stderr
    missing = smtpgate(redis_server, "check-config",
                       SMTPGATE_SHADOW_CONFIG=str(tmp_path / "none.toml"))
    assert missing.returncode == 1 and "SMTPGATE_SHADOW_CONFIG: cannot read" in missing.stderr
    for since in ("1", "soon", "-1h"):
        result = smtpgate(redis_server, "shadow", "report", "--since", since)
        assert result.returncode == 2 and "--since" in result.stderr, (since, result.stderr)
        assert "Traceback" not in result.stderr
    refused = smtpgate(redis_server, "table", "set", "--shadow", "PSA", "not-an-ip", "reject")
    assert refused.returncode == 1 and "is not an IP address" in refused.stderr
