"""Session ids, the bound on an evidence record, the store against a real (and a dead) Redis,
and explain's rendering of a record."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time

import redis.asyncio as aioredis
from services.ports import free_port

from smtpgate import session_id
from smtpgate.cli.explain import print_record
from smtpgate.lookups import keys, redis_client
from smtpgate.lookups.evidence import KEY_COST, MAX_ENTRIES, MAX_TEXT, EvidenceStore, encode


def test_ids_are_unique_well_formed_and_say_when_they_were_made():
    before = time.time()
    ids = [session_id.new() for _ in range(20000)]
    after = time.time()
    assert len(set(ids)) == len(ids)
    assert all(session_id.valid(i) for i in ids)
    assert all(before - 0.002 <= session_id.time_of(i) <= after + 0.002 for i in (ids[0], ids[-1]))
    # neighbours do not look alike: the last four characters differ
    assert ids[0][-4:] != ids[1][-4:]


def test_an_id_as_a_person_types_it():
    made = session_id.new()
    assert session_id.normal(f"  {made.lower()} ") == made
    assert session_id.normal("1r45oil0w1mb") == "1R45011" + "0W1MB"
    # copied from a log line or a reply, with what surrounds it there
    for copied in (f"session={made}", f"session={made};", f"; session={made}",
                   f"Session={made.lower()},"):
        assert session_id.normal(copied) == made, copied
    for bad in ("", "1R45", "1R452JA0W1MBX", "1R452JA0W1M!", "1R452JA0W1MU"):
        assert not session_id.valid(bad), bad


def record(verdicts: int = 3, replies: int = 1, reason: str = "why") -> dict:
    return {
        "session": "1R452JA0W1MB", "listener": "mx", "client": "192.0.2.7", "port": 4242,
        "name": "unknown", "local": "[127.0.0.1]:25", "started": 1764400000.0,
        "ended": 1764400002.5, "helo": "h.example", "login": None, "sender": "a@example.net",
        "recipients": [], "commands": "ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4",
        "verdicts": [{"check": "recipient", "outcome": "fail", "reason": f"{reason} {n}",
                      "reply": "550 5.1.1 x"} for n in range(verdicts)],
        "replies": [{"time": 1764400001.0 + n, "command": "RCPT TO:<x@example.com>",
                     "reply": f"550 5.1.1 no {n}; session=1R452JA0W1MB", "verdicts": 3}
                    for n in range(replies)],
    }


def test_a_small_record_is_kept_whole():
    data = encode(record(), 8192)
    assert json.loads(data) == record()


def test_a_record_is_stored_as_json_dumps_writes_it():
    """The bytes in Redis are json.dumps' compact form, non-ASCII text as UTF-8 (not \\u
    escapes), whatever encoder makes them."""
    made = record(reason="fünf \u2028 \"quoted\"")
    made["helo"] = "héllo.example"
    made["shadow"] = [{"check": "dnsbl", "direction": "refuse"}]
    assert encode(made, 8192) == json.dumps(
        made, separators=(",", ":"), ensure_ascii=False).encode()
    assert "héllo".encode() in encode(made, 8192)


def test_an_ids_time_is_read_the_same_by_its_two_ways():
    """time_of reads an id's base32 digits with int(..., 32); what is not an id still
    fails as before (ValueError), and an id's time is what its characters say."""
    def number_of(text: str) -> int:
        number = 0
        for char in text:
            number = number << 5 | session_id.ALPHABET.index(char)
        return number

    for made in [session_id.new() for _ in range(200)] + ["000000000000", "ZZZZZZZZZZZZ",
                                                          "1R452JA0W1MB", "0", ""]:
        assert session_id.time_of(made) == \
            ((number_of(made) >> 20) + session_id.EPOCH_MS) / 1000, made
    for made in (session_id.new() for _ in range(200)):  # an id is its 60 bits, 5 a character
        number = number_of(made)
        assert "".join(session_id.ALPHABET[number >> shift & 31]
                       for shift in range(55, -1, -5)) == made
    for bad in ("1r452ja0w1mb", "1R452JA0W1MU", "1R45-JA0W1MB", "1R452JA0W1M\u0661"):
        try:
            session_id.time_of(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} read as an id")


def test_a_long_session_keeps_its_first_and_last_entries():
    decoded = json.loads(encode(record(verdicts=1000, replies=200), 1 << 20))
    assert len(decoded["verdicts"]) == MAX_ENTRIES
    assert decoded["verdicts"][0]["reason"] == "why 0"
    assert decoded["verdicts"][-1]["reason"] == "why 999"
    assert decoded["omitted"] == {"verdicts": 1000 - MAX_ENTRIES, "verdicts_at": MAX_ENTRIES // 2,
                                  "replies": 200 - MAX_ENTRIES, "replies_at": MAX_ENTRIES // 2}


def test_the_byte_limit_holds_and_long_texts_are_cut():
    data = encode(record(verdicts=60, replies=60, reason="x" * 5000), 4096)
    assert len(data) <= 4096
    decoded = json.loads(data)
    assert decoded["omitted"]["verdicts"] > 0
    assert all(len(v["reason"]) <= MAX_TEXT + 3 for v in decoded["verdicts"])
    # nothing but the session's names fits: still valid JSON that says so
    bare = json.loads(encode(record(verdicts=1, reason="x") | {"helo": "h" * 400}, 300))
    assert bare["omitted"] == {"everything": True} and bare["session"] == "1R452JA0W1MB"


def test_explain_prints_a_record_in_the_dry_runs_shape():
    rec = record(verdicts=0, replies=0)
    rec["verdicts"] = [
        {"check": "access_list", "outcome": "pass", "reason": "[192.0.2.7] no match",
         "reply": None},
        {"check": "helo", "outcome": "pass", "reason": "h.example resolves", "reply": None},
        {"check": "recipient", "outcome": "fail", "reason": "not in VALI or VBOX",
         "reply": "550 5.1.1 x"},
        {"check": "recipient", "outcome": "fail", "reason": "not in VALI or VBOX",
         "reply": "550 5.1.1 x"},
    ]
    rec["replies"] = [
        {"time": 1764400001.0, "command": "RCPT TO:<x@example.com>", "reply": "550 one",
         "verdicts": 3},
        {"time": 1764400002.0, "command": "RCPT TO:<y@example.com>", "reply": "550 two",
         "verdicts": 4},
    ]
    out = io.StringIO()
    print_record(rec, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "session 1R452JA0W1MB: mx client unknown[192.0.2.7]:4242 to [127.0.0.1]:25"
    body = [line.split("    (")[0].rstrip() for line in lines[4:]]
    assert body == [
        "connect",
        "  access_list      pass    [192.0.2.7] no match",
        "HELO",
        "  helo             pass    h.example resolves",
        "RCPT",
        "  recipient        fail    not in VALI or VBOX",
        "  reply: 550 one",
        "RCPT",
        "  recipient        fail    not in VALI or VBOX",
        "  reply: 550 two",
    ], lines


def test_explain_says_what_the_size_limit_left_out():
    out = io.StringIO()
    print_record(json.loads(encode(record(verdicts=100, replies=1), 1 << 20)), out)
    assert f"({100 - MAX_ENTRIES} more verdicts left out: the record's size limit)" \
        in out.getvalue()


async def test_records_are_written_after_the_fact_in_one_batch(redis, redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    store = EvidenceStore(client, ttl=86400, size_limit=8192)
    built = []

    def producer(n):
        def build():
            built.append(n)
            return record() | {"session": f"{n}"}
        return build

    try:
        await client.delete(*(keys.session_record_key(f"T{n}") for n in range(3)))
        for n in range(3):
            store.keep(f"T{n}", producer(n))
        store.keep("T0", producer(0))  # noted twice within a batch: written once
        assert built == []  # nothing is built on the caller's time
        await store.close()
        assert sorted(built) == [0, 1, 2] and store.written == 3
        loaded = await store.load("T1")
        assert loaded["session"] == "1"
        assert 0 < await client.ttl(keys.session_record_key("T1")) <= 86400
        assert await store.load("NOSUCHSESSION") is None
    finally:
        await client.aclose()


async def test_a_dead_redis_costs_one_warning_and_no_error(caplog):
    port = free_port()  # nothing listens there
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    store = EvidenceStore(client, ttl=86400, size_limit=8192, timeout=1.0)
    caplog.set_level(logging.WARNING, logger="smtpgate.evidence")
    try:
        store.keep("A", lambda: record())
        await store.flush()
        store.keep("B", lambda: record())
        await store.flush()  # still down: no second warning
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "cannot write to Redis" in warnings[0], warnings
    finally:
        await store.close()
        await client.aclose()


def explain_session(redis_server, sid: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "REDIS": redis_server.url, "SMTPGATE_MYNETWORKS": "",
               "HOSTNAME": "mx.example.test", **env}
    return subprocess.run([sys.executable, "-m", "smtpgate", "explain", "--session", sid],
                          env=environ, capture_output=True, text=True, timeout=60)


def refused_at_connect(sid: str, ip: str = "192.0.2.7"):
    """A record of a session turned away at connect, and its repeat signature."""
    rec = record(verdicts=1, replies=1) | {"session": sid, "client": ip}
    return (lambda: rec), (lambda: (ip, ("access_list", "521")))


async def test_a_repeat_is_an_alias_and_explain_follows_it(redis, redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    store = EvidenceStore(client, ttl=86400, size_limit=8192)
    first, again, later, other = (session_id.new() for _ in range(4))
    try:
        store.keep(first, *refused_at_connect(first))
        await store.flush()
        store.keep(again, *refused_at_connect(again))
        store.keep(other, *refused_at_connect(other, ip="192.0.2.8"))  # another client
        await store.flush()
        store.keep(later, *refused_at_connect(later))
        await store.close()
        assert store.written == 4 and store.aliases == 2
        assert await client.get(keys.session_record_key(again)) is None  # no key of its own
        field = await client.hget(keys.session_alias_key(again), again)
        assert field.decode() == f"{first} 192.0.2.7"  # a field of the minute's hash
        alias = await store.load(again)
        assert alias["same_as"] == first and alias["ip"] == "192.0.2.7"
        assert (await store.load(later))["same_as"] == first  # not an alias of an alias
        assert (await store.load(other))["client"] == "192.0.2.8"  # a full record
        # the minute's hash goes a minute after the records of that minute
        assert 0 < await client.ttl(keys.session_alias_key(again)) <= 86400 + 60
    finally:
        await client.aclose()

    shown = explain_session(redis_server, again)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"session {again}: client [192.0.2.7] at ")
    assert f"was refused as session {first} was (same client, listener, HELO, sender, " \
           "recipients, commands, verdicts and replies; another port, time and connection " \
           "count)" in lines[0]
    assert lines[1].startswith(f"session {first}: mx client unknown[192.0.2.7]")

    redis.delete(keys.session_record_key(first))  # as if expired
    gone = explain_session(redis_server, again)
    assert gone.returncode == 1 and f"no record of session {first}: expired" in gone.stderr


async def test_over_the_budget_nothing_is_written_and_explain_says_why(redis, redis_server,
                                                                       caplog):
    client = aioredis.Redis.from_url(redis_server.url)
    size = len(encode(refused_at_connect("1R452JA0W1MB")[0](), 8192)) + KEY_COST
    store = EvidenceStore(client, ttl=86400, size_limit=8192, memory=3 * size)
    caplog.set_level(logging.WARNING, logger="smtpgate.evidence")
    ids = [session_id.new() for _ in range(6)]
    try:
        for n, sid in enumerate(ids):  # distinct clients: full records, no aliases
            store.keep(sid, *refused_at_connect(sid, ip=f"192.0.2.{n + 10}"))
            await store.flush()
        assert store.written == 3 and store.over_budget == 3
        stored = [await client.exists(keys.session_record_key(sid)) for sid in ids]
        assert stored == [1, 1, 1, 0, 0, 0]
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1, warnings  # at most one a minute
        assert "over session_record_memory" in warnings[0] and "1 records not" in warnings[0]
        # the same client again: no alias either
        store.keep(session_id.new(), *refused_at_connect("X", ip="192.0.2.10"))
        await store.flush()
        assert store.aliases == 0 and store.over_budget == 4
    finally:
        await store.close()
        await client.aclose()
    shown = explain_session(redis_server, ids[4])
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert "not recorded (over session_record_memory)" in shown.stderr


async def test_an_unreachable_cluster_costs_a_warning_not_a_traceback(caplog):
    url = f"redis+cluster://127.0.0.1:{free_port()}/"  # nothing listens there
    client = redis_client.connect(url, 0.5)
    store = EvidenceStore(client, ttl=86400, size_limit=8192, timeout=2.0)
    caplog.set_level(logging.WARNING, logger="smtpgate.evidence")
    try:
        store.keep("A", lambda: record())
        await store.flush()
        messages = [(r.levelno, r.getMessage()) for r in caplog.records]
        assert [level for level, _ in messages] == [logging.WARNING], messages
        assert "cannot write to Redis" in messages[0][1]
        assert not any(r.exc_info for r in caplog.records)
    finally:
        await store.close()
        await client.aclose()


def test_explain_on_an_unreachable_cluster_says_so(redis_server):
    shown = explain_session(redis_server, "0000000000ZZ",
                            REDIS=f"redis+cluster://127.0.0.1:{free_port()}/",
                            SMTPGATE_REDIS_TIMEOUT="0.5")
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert "Traceback" not in shown.stderr and "failed" in shown.stderr, shown.stderr


class _Ended:
    """What refused_alike() reads of an ended session (smtpgate.smtp.session.Session)."""

    def __init__(self, sid: str, port: int, rcpt: str = "nobody@example.com",
                 listener: str = "mx", sender: str = "a@example.net", rate: int = 1) -> None:
        from smtpgate.policy.state import Client, ClientState
        from smtpgate.smtp.evidence import Refusal
        from smtpgate.verdict import Outcome, Reply, Verdict

        self.id, self.ended = sid, time.time()
        self.client = Client("192.0.2.7", port, "127.0.0.1", 25, listener)
        self.state = ClientState(self.client)
        self.state.client_name = "host.example.net"
        reply = Reply(550, "5.1.1", f"<{rcpt}>: Recipient address rejected: User unknown")
        self.state.record = [
            Verdict("limits", Outcome.PASS, reason=f"[192.0.2.7] 1 sessions, {rate}/60s"),
            Verdict("pipelining", Outcome.PASS, reason=f"PASS pipelining [192.0.2.7]:{port}"),
            Verdict("recipient", Outcome.FAIL, reason="reject_unlisted_recipient", reply=reply)]
        self.helo, self.login, self.envelope = "h.example", None, (sender, ())
        self.refusals = [Refusal(self.ended, f"RCPT TO:<{rcpt}>", f"{reply}; session={sid}", 3)]

    def command_counts(self) -> str:
        return "ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4"


def test_a_repeat_is_the_same_in_all_that_explain_shows():
    from smtpgate.smtp.evidence import refused_alike

    first = refused_alike(_Ended(session_id.new(), 40001))
    assert first[0] == "192.0.2.7"  # the store reads the client from the signature's head
    # another id, port, time and connection rate: the same story
    assert refused_alike(_Ended(session_id.new(), 40002, rate=7)) == first
    # the same client, check and code, told of another recipient, sender or listener: not
    for other in (_Ended(session_id.new(), 40003, rcpt="other@example.com"),
                  _Ended(session_id.new(), 40004, sender="b@example.net"),
                  _Ended(session_id.new(), 40005, listener="submission")):
        assert refused_alike(other) != first


def test_the_rows_made_for_the_signature_serve_the_record_until_a_verdict_comes():
    """The store asks for the signature and then the record in one go: the verdicts are read
    once for both, and again once the session has taken another verdict."""
    from types import SimpleNamespace

    from smtpgate.smtp.dialogue import Dialogue
    from smtpgate.smtp.evidence import SessionEvidence
    from smtpgate.verdict import Outcome, Verdict

    ended = _Ended(session_id.new(), 40001)
    session = SimpleNamespace(id=ended.id, client=ended.client, state=ended.state,
                              dialogue=Dialogue("mx"))
    evidence = SessionEvidence(session, store=None)
    evidence.refusals, evidence.ended = ended.refusals, ended.ended
    rows = evidence.rows()
    assert evidence.rows() is rows  # made once
    assert [v["check"] for v in evidence.record()["verdicts"]] == [
        "limits", "pipelining", "recipient"]
    assert evidence.repeat()[10] == tuple(  # the port out of the reasons, as ever
        (c, o, "" if c == "limits" else r.replace(":40001", ""), p) for c, o, r, p in rows)
    ended.state.note(Verdict("greylist", Outcome.PASS, reason="seen before"))
    assert evidence.rows() is not rows
    assert [v["check"] for v in evidence.record()["verdicts"]][-1] == "greylist"
