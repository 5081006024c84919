"""Replay of recorded sessions: a real gate with replay_records on serves a mixed set of real
sessions (accepted; refused at connect by the DNSBL and the access list, at HELO, MAIL and RCPT,
by a protocol test and by FCrDNS), then `smtpgate replay` decides them again from their
records: under the live rules every verdict comes out as recorded; a candidate file and
candidate keys change exactly the expected ones; unreadable records are named. The sampling
under the memory budget is checked against the real Redis too."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest
from services.smtp_talk import Talk, send_marked, untag
from services.waiting import wait_until
from services.world import gate_in_world

from smtpgate.cli.replay import replay
from smtpgate.config import load
from smtpgate.lookups import keys, redis_client
from smtpgate.lookups.evidence import EvidenceStore

pytestmark = pytest.mark.slow

LIVE = {"SMTPGATE_DNSBL_SITES": "bl.test", "SMTPGATE_SMTPD_DELAY_REJECT": "no",
        "SMTPGATE_REPLAY_RECORDS": "yes"}
LISTED, DENIED, PROBE, NAMELESS = "127.0.33.5", "127.0.33.6", "127.0.33.7", "127.0.33.8"
CANDIDATE = ('dnsbl_action = "ignore"\nshow_user_unknown_table_name = false\n'
             'non_smtp_command_action = "ignore"\n')


@pytest.fixture(scope="module")
def gate(start_gate, redis_server, dns_server):
    client = redis_server.client()
    client.delete(keys.REPLAY_LOG)
    client.set(f"PSA:{DENIED}", "reject")
    client.close()
    dns_server.set([("5.33.0.127.bl.test", "A", "127.0.0.2")])
    yield from gate_in_world(start_gate, redis_server, dns_server, **LIVE)


def smtpgate(redis_server, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "REDIS": redis_server.url, "SMTPGATE_MYNETWORKS": "",
               "SMTPGATE_GREET_WAIT": "0", **LIVE, **env}
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], env=environ,
                          capture_output=True, text=True, timeout=60)


def first_reply(gate, ip: str, *lines: str) -> str:
    """The reply to the last of lines (the banner when none), the session then ended."""
    with Talk("127.0.0.1", gate.mx_port, source=ip) as talk:
        code, text = talk.banner()
        for line in lines:
            code, text = talk.cmd(line)
        if code != 521:  # a 521 ended the session; after any other, the client says goodbye
            talk.cmd("QUIT")
    return untag(text)


@pytest.fixture(scope="module")
def recorded(gate, redis_server):
    """The mixed set of sessions, each with its record in the stream."""
    assert send_marked(gate.mx_port, "replayed", source="127.0.0.90")[0] == 250
    replies = {
        "dnsbl": first_reply(gate, LISTED),
        "access list": first_reply(gate, DENIED),
        "helo": first_reply(gate, "127.0.0.91", "EHLO localhost"),
        "mail": first_reply(gate, "127.0.0.92", "EHLO client.example.test",
                            "MAIL FROM:<a@localhost>"),
        "rcpt": first_reply(gate, "127.0.0.93", "EHLO client.example.test",
                            "MAIL FROM:<a@example.net>", "RCPT TO:<nobody@example.com>"),
        "protocol": first_reply(gate, PROBE, "GET / HTTP/1.0"),
        "fcrdns": first_reply(gate, NAMELESS, "EHLO client.example.test",
                              "MAIL FROM:<a@example.net>", "RCPT TO:<user1@example.com>"),
    }
    client = redis_server.client()
    try:
        wait_until(lambda: client.xlen(keys.REPLAY_LOG) >= 8, 10, "eight replay records")
    finally:
        client.close()
    return replies


def test_the_sessions_were_refused_where_expected(recorded):
    assert recorded["dnsbl"].startswith("521 5.7.1 Service unavailable; client [127.0.33.5]")
    assert recorded["access list"] == "521 5.3.2 Service currently unavailable"
    assert recorded["helo"] == ("504 5.5.2 <localhost>: Helo command rejected: need "
                                "fully-qualified hostname")
    assert recorded["mail"].startswith("504 5.5.2 <a@localhost>: Sender address rejected")
    assert recorded["rcpt"].startswith("550 5.1.1 <nobody@example.com>")
    assert recorded["protocol"] == "521 5.7.0 Error: I can break rules, too. Goodbye."
    assert recorded["fcrdns"].startswith("450 4.7.25 Client host rejected")


def test_replay_under_the_live_rules_reproduces_every_verdict(recorded, redis_server):
    result = smtpgate(redis_server, "replay", "--since", "1h")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    sessions, checks = map(int, re.search(r"replayed (\d+) sessions, (\d+) checks", out).groups())
    assert sessions >= 8 and checks >= 30, out
    assert "verdicts changed: 0" in out and "unreadable" not in out, out


def test_a_candidate_changes_the_expected_verdicts(recorded, redis_server, tmp_path):
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(CANDIDATE)
    result = smtpgate(redis_server, "replay", "--config", str(candidate))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    by_check = re.findall(r"(?m)^  (\w+) +(would [\w ]+?) +(\d+)$", out)
    assert sorted(by_check) == [("dnsbl", "would accept", "1"),
                                ("non_smtp_command", "would accept", "1"),
                                ("recipient", "would reply otherwise", "1")], out
    assert "verdicts changed: 3 (would accept 2, would reply otherwise 1) in 3 sessions" in out
    assert re.search(rf"(?m)^  session=\w{{12}} {re.escape(LISTED)} dnsbl would accept: "
                     r"recorded fail 521 5\.7\.1 .*; now pass$", out), out


def test_candidate_keys_change_what_they_name(recorded, redis_server):
    assert smtpgate(redis_server, "table", "set", "--shadow", "PSA", "127.0.0.90",
                    "reject").returncode == 0
    try:
        result = smtpgate(redis_server, "replay", "--shadow")
    finally:
        smtpgate(redis_server, "table", "del", "--shadow", "PSA", "127.0.0.90")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "under the live rules and 1 candidate keys" in result.stdout
    assert re.findall(r"(?m)^  (\w+) +(would [\w ]+?) +(\d+)$", result.stdout) == [
        ("access_list", "would refuse", "1")], result.stdout


def test_an_unreadable_record_is_counted_and_named(recorded, redis_server):
    client = redis_server.client()
    try:
        bad = [client.xadd(keys.REPLAY_LOG, {"r": "not json"}),
               client.xadd(keys.REPLAY_LOG, {"r": json.dumps({"v": 99, "checks": []})}),
               client.xadd(keys.REPLAY_LOG, {"x": "no record field"}),
               client.xadd(keys.REPLAY_LOG, {"r": json.dumps(
                   {"v": 1, "session": "S", "checks": [["dnsbl", {"ip": "1.2.3.4"}, "pass",
                                                        None]]})})]
        result = smtpgate(redis_server, "replay")
    finally:
        client.xdel(keys.REPLAY_LOG, *bad)
        client.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "unreadable records: 4" in out, out
    assert f"  {bad[0]}: JSONDecodeError: " in out
    assert f"  {bad[1]}: ValueError: format version 99; this smtpgate reads 1" in out
    assert f"  {bad[2]}: KeyError: 'r'" in out
    assert f"  {bad[3]}: KeyError: 'zones'" in out


def test_bad_options_are_refused_clearly(redis_server, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("dnsbl_treshold = 2\n")
    for args, words in [(["--since", "soon"], "--since 'soon' is not a duration"),
                        (["--config", str(bad)], "did you mean dnsbl_threshold?"),
                        (["--config", str(tmp_path / "none.toml")], "cannot read")]:
        result = smtpgate(redis_server, "replay", *args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_replay_reads_the_stream_in_pages(recorded, redis_server):
    """More records than one XRANGE page (500): each is decided once."""
    client = redis_server.client()
    added = []
    try:
        before = smtpgate(redis_server, "replay")
        sessions = int(re.search(r"replayed (\d+) sessions", before.stdout).group(1))
        (_, fields), = client.xrange(keys.REPLAY_LOG, count=1)
        with client.pipeline(transaction=False) as pipe:
            for _ in range(1100):
                pipe.xadd(keys.REPLAY_LOG, fields)
            added = pipe.execute()
        result = smtpgate(redis_server, "replay")
    finally:
        if added:
            client.xdel(keys.REPLAY_LOG, *added)
        client.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"replayed {sessions + 1100} sessions" in result.stdout, result.stdout


def test_replay_records_are_sampled_once_the_memory_budget_is_spent(redis_server):
    """A worker's budget of 8 KB: the first records fit, then one in 2, 4, ... is written,
    each saying so, and replay reports the sampling. (Last: it empties the stream.)"""
    async def scenario() -> list:
        client = redis_client.connect(redis_server.url, 2.0, decode=False)
        store = EvidenceStore(client, memory=8192)
        record = {"v": 1, "session": "X", "client": "192.0.2.1", "checks": [
            ["sender", {"sender": "a@example.net", "utf8": False}, "pass", None]],
            "pad": "x" * 600}
        try:
            for n in range(60):
                store.keep_replay(f"S{n}", lambda n=n: {**record, "session": f"S{n}"})
                if n % 10 == 9:
                    await store.flush()
            await store.close()
            entries = await client.xrange(keys.REPLAY_LOG, "-", "+")
            await client.delete(keys.REPLAY_LOG)
            return [store.replay_every, store.replay_sampled_out, entries]
        finally:
            await client.aclose()

    client = redis_server.client()
    client.delete(keys.REPLAY_LOG)
    client.close()
    every, left_out, entries = asyncio.run(scenario())
    assert every >= 2 and left_out > 0
    assert len(entries) + left_out == 60
    samples = [json.loads(fields[b"r"])["sample"] for _, fields in entries]
    assert samples[0] == 1 and samples[-1] > 1
    total = sum(len(fields[b"r"]) + 80 for _, fields in entries)
    assert total <= 8192 + 800  # within the budget, give or take the last record
    result = replay([(i.decode(), {"r": f[b"r"].decode()}) for i, f in entries],
                    load({"HOSTNAME": "mx.example.test"}))
    assert result.changed == 0 and result.sessions == len(entries)
    assert any("sampled:" in line and "one session in" in line for line in result.lines())
