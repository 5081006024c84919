"""Session ids, refused sessions' evidence, `explain --session`, the JSON log and fail2ban.

A real gate refuses real clients (unknown user, access list, DNSBL, pregreet, failed AUTH);
each refusal must end with its session id, leave its record in Redis, be explained by
`smtpgate explain --session`, and Debian's fail2ban must find the offenders, and only
them, in the log the gate wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services.smtp_talk import SESSION_TAG, Talk, untag
from services.waiting import wait_until

from smtpgate.lookups import keys

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FILTER = REPO / "conf" / "fail2ban" / "filter.d" / "smtpgate.conf"
JAIL = REPO / "conf" / "fail2ban" / "jail.d" / "smtpgate.conf"
ID = r"[0-9A-HJKMNP-TV-Z]{12}"


@pytest.fixture(scope="module")
def gate(start_gate):
    process = start_gate(listeners=("mx", "submission"), SMTPGATE_GREET_WAIT="1",
                         SMTPGATE_GREET_ACTION="drop", SMTPGATE_DNSBL_SITES="bl.test",
                         SMTPGATE_AUTH_FAILURE_LIMIT="5")
    yield process
    process.stop()


def session_of(text: str) -> str:
    match = SESSION_TAG.search(text)
    assert match, f"no session id at the end of {text!r}"
    return match.group(1)


def explain(redis_server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REDIS": redis_server.url, "SMTPGATE_MYNETWORKS": "",
           "HOSTNAME": "mx.example.test"}
    return subprocess.run([sys.executable, "-m", "smtpgate", "explain", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def unknown_user(gate, source: str, rcpt: str = "nobody@example.com") -> str:
    """A good client (FCrDNS passes) asks for a user that does not exist: the reply."""
    with Talk("127.0.0.1", gate.mx_port, source=source) as talk:
        assert talk.reply()[0] == 220  # after the greet wait (teaser, then the banner)
        assert talk.cmd("EHLO client.example.test")[0] == 250
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        code, text = talk.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 550, text
        talk.cmd("QUIT")
    return text


def refused_at_connect(gate, source: str, *, say: bytes = b"", timeout: float = 5.0) -> str:
    """The 521 a client gets before the banner, retried while a key just written reaches
    the gate's table cache (Redis tells it asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        with Talk("127.0.0.1", gate.mx_port, source=source) as talk:
            if say:
                talk.send(say)
            _, text = talk.reply()
            last = text.splitlines()[-1]
        if last.startswith("521") or time.monotonic() > deadline:
            return last


def test_a_refusal_ends_with_its_id_and_explain_shows_the_evidence(gate, world, redis,
                                                                    redis_server):
    text = unknown_user(gate, "127.0.0.81")
    assert untag(text) == ("550 5.1.1 <nobody@example.com>: Recipient address rejected: "
                           "User unknown in virtual mailbox table")
    sid = session_of(text)
    # the log lines of that session carry the same id
    gate.wait_for_log(rf"connect from \S+\[127\.0\.0\.81\] to \S+ session={sid}")
    gate.wait_for_log(rf"NOQUEUE: reject: RCPT from \S+\[127\.0\.0\.81\]: 550 5\.1\.1 .*"
                      rf"; session={sid}; from=<a@example\.net> to=<nobody@example\.com>")
    gate.wait_for_log(rf"disconnect from \S+\[127\.0\.0\.81\] .*quit=1 .*session={sid}")
    # the record, written after the reply and again when the session ended
    key = keys.session_record_key(sid)
    wait_until(lambda: '"ended":null' not in (redis.get(key) or '"ended":null'), 5,
               "the session's final record")
    assert 86400 < redis.ttl(key) <= 172800
    record = json.loads(redis.get(key))
    assert record["client"] == "127.0.0.81" and record["helo"] == "client.example.test"
    assert [r["command"] for r in record["replies"]] == ["RCPT TO:<nobody@example.com>"]
    assert "rcpt=0/1" in record["commands"]

    result = explain(redis_server, "--session", sid.lower())  # as typed by a person
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith(f"session {sid}: mx client host81.clients.example.test[127.0.0.81]")
    assert re.search(r"(?m)^connect\n  access_list +pass", out), out
    assert re.search(r"(?m)^RCPT\n(  .*\n)*  recipient +fail +reject_unlisted_recipient", out), out
    assert f"  reply: {text}    (RCPT TO:<nobody@example.com>, " in out


def test_explain_session_says_clearly_what_is_wrong(redis_server):
    missing = explain(redis_server, "--session", "0000000000ZZ")
    assert missing.returncode == 1
    assert "no record of session 0000000000ZZ" in missing.stderr
    for args, words in [(["--session", "nope"], "is not a session id"),
                        ([], "give --ip IP"),
                        (["--session", "0000000000ZZ", "--ip", "127.0.0.1"], "--session shows")]:
        result = explain(redis_server, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr


def test_fail2ban_finds_the_offenders_and_only_them(gate, world, dns, tmp_path):
    mark = len(gate.log_text())  # this test's lines only
    offenders = {}
    offenders["unknown user"] = ("127.0.0.82", untag(unknown_user(gate, "127.0.0.82")))
    world.set("PSA:127.0.26.1", "reject")
    offenders["access list"] = ("127.0.26.1", untag(refused_at_connect(gate, "127.0.26.1")))
    dns.set([("1.27.0.127.bl.test", "A", "127.0.0.2")])
    offenders["dnsbl"] = ("127.0.27.1", untag(refused_at_connect(gate, "127.0.27.1")))
    offenders["pregreet"] = ("127.0.28.1", untag(
        refused_at_connect(gate, "127.0.28.1", say=b"EHLO eager.example.test\r\n")))
    assert offenders["access list"][1] == "521 5.3.2 Service currently unavailable"
    assert offenders["dnsbl"][1].startswith("521 5.7.1 Service unavailable; client [127.0.27.1]")
    assert offenders["pregreet"][1] == "521 5.5.1 Protocol error"
    with Talk("127.0.0.1", gate.submission_port, source="127.0.29.1") as talk:
        assert talk.reply()[0] == 220
        talk.cmd("EHLO laptop")
        assert talk.cmd("STARTTLS")[0] == 220
        talk.starttls()
        talk.cmd("EHLO laptop")
        code, text = talk.cmd("AUTH PLAIN AHVzZXIxQGV4YW1wbGUuY29tAHdyb25n")  # user1, "wrong"
        assert code == 535 and session_of(text)
    offenders["auth"] = ("127.0.29.1", text)
    # a good client delivers, and is seen doing so
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.83") as talk:
        assert talk.reply()[0] == 220
        talk.cmd("EHLO client.example.test")
        talk.cmd("MAIL FROM:<a@example.net>")
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        code, text = talk.cmd(b"Subject: fine\r\n\r\nhello\r\n.")
        assert code == 250, text
        talk.cmd("QUIT")
    gate.wait_for_log(rf": client=host83\.clients\.example\.test\[127\.0\.0\.83\], .*"
                      rf"session={ID}")
    gate.wait_for_log(r"SASL PLAIN authentication failed: .*\n")
    for ip in ("127.0.26.1", "127.0.27.1", "127.0.28.1"):
        gate.wait_for_log(rf"NOQUEUE: reject: CONNECT from \S+\[{re.escape(ip)}\]: 521 .*"
                          rf"; session={ID}; proto=SMTP")
    gate.wait_for_log(r"disconnect from \S+\[127\.0\.0\.83\]")
    log = tmp_path / "smtpgate.log"
    log.write_text(gate.log_text()[mark:])

    matched = fail2ban_ips(log, str(FILTER))
    assert matched == {ip for ip, _ in offenders.values()}, (matched, offenders)
    # and a running fail2ban with the shipped jail bans exactly them
    assert banned_by_a_running_fail2ban(log, tmp_path, len(matched)) == matched

    # Debian's own postfix filter, told smtpgate's tag, still reads smtpgate's refusals
    # (the session id at the end is no obstacle) and the failed AUTH
    postfix = fail2ban_ips(log, r'postfix[_daemon="smtpgate/\w+", mode=aggressive]')
    assert {"127.0.0.82", "127.0.29.1"} <= postfix and "127.0.0.83" not in postfix, postfix


def fail2ban_ips(log: Path, filter_spec: str) -> set[str]:
    result = subprocess.run(["fail2ban-regex", "-o", "ip", str(log), filter_spec],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return set(result.stdout.split())


def fail2ban_config(tmp_path: Path, jail: str) -> Path:
    """A copy of Debian's fail2ban configuration with our filter and `jail` added."""
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    (conf / "jail.d" / "defaults-debian.conf").unlink(missing_ok=True)  # its sshd log is absent
    shutil.copy(FILTER, conf / "filter.d" / "smtpgate.conf")
    (conf / "jail.d" / "smtpgate.conf").write_text(jail)
    return conf


def as_the_jail_says_for_a_log_file(jail: str, log: Path) -> str:
    """The jail changed as its own comment tells a reader whose log goes to a file."""
    assert "backend  = systemd\n" in jail
    assert "#     backend = auto\n#     logpath = /var/log/smtpgate.log\n" in jail
    return jail.replace("backend  = systemd\n", f"backend = auto\nlogpath = {log}\n")


def jail_dump(conf: Path) -> list[str]:
    test = subprocess.run(["fail2ban-client", "-c", str(conf), "-t"], capture_output=True,
                          text=True, timeout=60)
    assert test.returncode == 0 and "OK" in test.stdout, test.stdout + test.stderr
    dump = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"], capture_output=True,
                          text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    return [line for line in dump.stdout.splitlines() if "'smtpgate'" in line]


def test_the_shipped_jail_reads_the_units_journal(tmp_path):
    """As shipped, the jail needs no log file (smtpgate writes none): it reads the journal
    entries of the systemd unit, and watches 25, 465 and 587."""
    jail = jail_dump(fail2ban_config(tmp_path, JAIL.read_text()))
    assert "['add', 'smtpgate', 'systemd']" in jail
    assert any("addjournalmatch" in line and "_SYSTEMD_UNIT=smtpgate.service" in line
               for line in jail)
    assert not any("addlogpath" in line for line in jail)
    assert any("addfailregex" in line and "SASL" in line and "NOQUEUE" in line for line in jail)
    assert any("--dports smtp,465,submission" in line for line in jail)


def test_the_jail_on_a_log_file_loads_with_the_filter(tmp_path):
    log = tmp_path / "smtpgate.log"
    log.write_text("")
    jail = jail_dump(fail2ban_config(
        tmp_path, as_the_jail_says_for_a_log_file(JAIL.read_text(), log)))
    assert "['add', 'smtpgate', 'auto']" in jail
    assert any(f"'addlogpath', '{log}'" in line for line in jail)


def banned_by_a_running_fail2ban(log: Path, tmp_path: Path, count: int) -> set[str]:
    """Start Debian's fail2ban with the shipped jail on `log` (as its comment says for a
    file; one failure enough and a ban that touches no firewall), and read whom it banned
    once `count` are."""
    jail = as_the_jail_says_for_a_log_file(JAIL.read_text(), log)
    jail = jail.replace("maxretry = 5\n", "maxretry = 1\nbanaction = dummy\n"
                        "banaction_allports = dummy\n")
    conf = fail2ban_config(tmp_path, jail)
    (conf / "fail2ban.local").write_text(
        f"[Definition]\ndbfile = :memory:\nlogtarget = {tmp_path / 'fail2ban.log'}\n")
    sock, pid = tmp_path / "fail2ban.sock", tmp_path / "fail2ban.pid"
    client = ["fail2ban-client", "-c", str(conf), "-s", str(sock), "-p", str(pid)]
    server = subprocess.Popen([*client, "-x", "-f", "start"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        def status() -> str:
            result = subprocess.run([*client, "status", "smtpgate"], capture_output=True,
                                    text=True, timeout=30)
            return result.stdout if result.returncode == 0 else ""

        def banned() -> set[str]:
            match = re.search(r"Banned IP list:\s*(.*)", status())
            return set(match.group(1).split()) if match else set()

        wait_until(lambda: len(banned()) >= count, timeout=30,
                   what=f"fail2ban to ban {count} clients")
        return banned()
    finally:
        subprocess.run([*client, "stop"], capture_output=True, timeout=30)
        assert server.wait(timeout=30) == 0


def test_json_log_lines_carry_the_session(start_gate, world):
    gate = start_gate(SMTPGATE_LOG_FORMAT="json")
    try:
        with Talk("127.0.0.1", gate.mx_port, source="127.0.0.84") as talk:
            assert talk.reply()[0] == 220
            talk.cmd("EHLO client.example.test")
            talk.cmd("MAIL FROM:<a@example.net>")
            code, text = talk.cmd("RCPT TO:<nobody@example.com>")
            assert code == 550, text
            talk.cmd("QUIT")
        sid = session_of(text)
        gate.wait_for_log(r'"message": "disconnect from ')
    finally:
        gate.stop()
    entries = [json.loads(line) for line in gate.log_text().splitlines()
               if line.startswith("{")]
    mine = [e for e in entries if e.get("session") == sid]
    assert {e["component"] for e in mine} >= {"smtpd", "policy"}  # the policy's lines too
    reject = next(e for e in mine if e["message"].startswith("NOQUEUE: reject: RCPT"))
    assert set(reject) == {"time", "level", "component", "pid", "session", "message"}
    assert reject["level"] == "info" and reject["pid"] in gate_pids(entries)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", reject["time"])
    # lines logged outside any session have no session field
    assert any("session" not in e and e["message"].startswith("listening on") for e in entries)


def gate_pids(entries: list[dict]) -> set[int]:
    return {e["pid"] for e in entries if e["message"].startswith("listening on")}


def test_a_client_refused_again_leaves_an_alias_that_explain_follows(gate, world, redis,
                                                                     redis_server):
    world.set("PSA:127.0.26.9", "reject")
    first = session_of(refused_at_connect(gate, "127.0.26.9"))
    key = keys.session_record_key(first)
    wait_until(lambda: '"ended":null' not in (redis.get(key) or '"ended":null'), 5,
               "the first session's record")
    again = session_of(refused_at_connect(gate, "127.0.26.9"))
    assert again != first
    alias_key = keys.session_alias_key(again)
    alias = wait_until(lambda: redis.hget(alias_key, again), 5, "the second session's alias")
    assert alias == f"{first} 127.0.26.9", alias
    assert redis.get(keys.session_record_key(again)) is None
    assert redis.ttl(alias_key) > 0

    result = explain(redis_server, "--session", again)
    assert result.returncode == 0, result.stdout + result.stderr
    head, rest = result.stdout.split("\n", 1)
    assert f"was refused as session {first} was" in head
    assert rest.startswith(f"session {first}: mx client ")
    assert re.search(r"(?m)^connect\n  access_list +fail", rest), rest


def test_an_alias_stands_only_for_a_session_explain_would_show_alike(gate, world, redis,
                                                                     redis_server):
    """The same client refused by the same check with the same code, but for another
    recipient, is another story: its own record, not the first one's."""
    def final_record(sid: str) -> None:
        wait_until(lambda: '"ended":null' not in (redis.get(keys.session_record_key(sid))
                                                  or '"ended":null'), 5, f"{sid}'s record")

    first = session_of(unknown_user(gate, "127.0.0.82", "nobody1@example.com"))
    final_record(first)
    other = session_of(unknown_user(gate, "127.0.0.82", "nobody2@example.com"))
    final_record(other)  # a record of its own, no alias of the first
    assert redis.hget(keys.session_alias_key(other), other) is None
    # copied from the log line or the reply as it stands: "session=ID;"
    result = explain(redis_server, "--session", f"session={other};")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"session {other}: mx client "), result.stdout
    assert "nobody2@example.com" in result.stdout and "nobody1" not in result.stdout

    # the same again, to the letter but for the port and time: that one is an alias
    again = session_of(unknown_user(gate, "127.0.0.82", "nobody2@example.com"))
    alias = wait_until(lambda: redis.hget(keys.session_alias_key(again), again), 5,
                       "the repeat's alias")
    assert alias == f"{other} 127.0.0.82"
    result = explain(redis_server, "--session", again)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"was refused as session {other} was" in result.stdout
    assert "nobody2@example.com" in result.stdout and "nobody1" not in result.stdout
