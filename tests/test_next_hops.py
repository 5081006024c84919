"""Several next hops: two real Postfix instances, one stopped and started again under mail."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
import uuid

import pytest
from services import procs
from services.ports import free_port, start_on_free_ports
from services.postfix_server import PostfixServer
from services.smtp_talk import Talk, send_marked
from services.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def second_postfix(service_root, dovecot_server, rspamd_server):
    server = PostfixServer(service_root / "postfix-second", lmtp_port=dovecot_server.lmtp_port,
                           milter_port=rspamd_server.milter_port,
                           sasl_port=dovecot_server.auth_port)
    procs.on_exit(server.stop)
    start_on_free_ports(server)
    yield server
    server.stop()


def received_by(postfix: PostfixServer, mark: str, since: int = 0) -> bool:
    return re.search(rf"message-id=<{re.escape(mark)}@example\.net>",
                     postfix.log_text()[since:]) is not None


def health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mail_flows_while_one_hop_is_down_and_the_hop_is_used_again_after_it_returns(
        start_gate, world, postfix_server, second_postfix):
    first, second = postfix_server, second_postfix
    second_hop = f"127.0.0.1:{second.port}"
    gate = start_gate(listeners=("mx", "metrics"),
                      SMTPGATE_NEXT_HOP=f"127.0.0.1:{first.port}, {second_hop}",
                      SMTPGATE_NEXT_HOP_RETRY="1")
    try:
        # both up: they take turns
        marks = [f"hops-{uuid.uuid4().hex}" for _ in range(4)]
        assert all(send_marked(gate.mx_port, mark)[0] == 250 for mark in marks)
        for postfix in (first, second):
            wait_until(lambda p=postfix: any(received_by(p, m) for m in marks), 20,
                       f"a message at {postfix}")

        second.stop()
        since = first.log_mark()
        marks = [f"hops-down-{uuid.uuid4().hex}" for _ in range(4)]
        replies = [send_marked(gate.mx_port, mark) for mark in marks]
        assert [code for code, _ in replies] == [250] * 4, replies  # no 451 while one is up
        for mark in marks:
            wait_until(lambda m=mark: received_by(first, m, since), 20, f"{mark} at {first}")
        gate.wait_for_log(rf"warning: next hop {re.escape(second_hop)} is down \(connect to "
                          rf"{re.escape(second_hop)}: .*\); skipped for 1 s")
        code, body = health(gate.metrics_port)
        assert code == 200, body  # one hop takes mail: this gate is still of use
        by_address = {hop["address"]: hop for hop in body["next_hops"]}
        assert by_address[second_hop]["ok"] is False
        assert by_address[f"127.0.0.1:{first.port}"]["ok"] is True

        second.start()  # on its old ports
        since = second.log_mark()

        def second_used_again() -> bool:
            mark = f"hops-back-{uuid.uuid4().hex}"
            assert send_marked(gate.mx_port, mark)[0] == 250
            wait_until(lambda: received_by(first, mark) or received_by(second, mark, since), 20,
                       f"{mark} at either Postfix")
            return received_by(second, mark, since)

        wait_until(second_used_again, 30, f"a message through {second_hop} again", interval=0.5)
        gate.wait_for_log(rf"next hop {re.escape(second_hop)} is up again")
    finally:
        second.start()
        gate.stop()


def test_with_every_hop_down_the_client_hears_451_and_healthz_is_503(
        start_gate, world, postfix_server, second_postfix):
    hops = f"127.0.0.1:{postfix_server.port},127.0.0.1:{second_postfix.port}"
    gate = start_gate(listeners=("mx", "metrics"), SMTPGATE_NEXT_HOP=hops,
                      SMTPGATE_NEXT_HOP_RETRY="1")
    try:
        postfix_server.stop()
        second_postfix.stop()
        try:
            code, text = send_marked(gate.mx_port, f"hops-none-{uuid.uuid4().hex}")
            assert code == 451 and "4.3.0" in text
            gate.wait_for_log(r"warning: next hop 127\.0\.0\.1:\d+: connect to .*; trying "
                              r"127\.0\.0\.1:\d+ for host77\.clients\.example\.test")
            code, body = health(gate.metrics_port)
            assert code == 503 and body["next_hop"]["ok"] is False, body
            assert [hop["ok"] for hop in body["next_hops"]] == [False, False]
        finally:
            postfix_server.start()
            second_postfix.start()
    finally:
        gate.stop()


def submit(port: int) -> int:
    """One authenticated message from user1 over STARTTLS; the final reply's code."""
    with Talk("127.0.0.1", port, source="127.0.0.1") as talk:
        assert talk.banner()[0] == 220
        talk.cmd("EHLO laptop")
        assert talk.cmd("STARTTLS")[0] == 220
        talk.starttls()
        talk.cmd("EHLO laptop")
        auth = base64.b64encode(b"\0user1@example.com\0secret1").decode()
        assert talk.cmd("AUTH PLAIN " + auth)[0] == 235
        assert talk.cmd("MAIL FROM:<user1@example.com>")[0] == 250
        assert talk.cmd("RCPT TO:<user2@example.com>")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        talk.send(b"Subject: submission hops\r\n\r\nhops\r\n.\r\n")
        code = talk.reply()[0]
        talk.cmd("QUIT")
    return code


def test_submission_next_hop_may_list_several_too(start_gate, world, postfix_server):
    world.set("LOGMAP:user1@example.com", "user1@example.com")
    dead = f"127.0.0.1:{free_port()}"  # handed out as "nobody listens here"
    hops = f"{dead},127.0.0.1:{postfix_server.submission_port}"
    gate = start_gate(listeners=("mx", "submission", "metrics"),
                      SMTPGATE_SUBMISSION_NEXT_HOP=hops)
    try:
        since = postfix_server.log_mark()
        for _ in range(2):  # in turn: one of the two starts at the dead hop and moves on
            assert submit(gate.submission_port) == 250
        gate.wait_for_log(rf"warning: next hop {re.escape(dead)} is down \(connect to ")
        code, body = health(gate.metrics_port)  # one submission hop takes mail: enough
        assert code == 200 and [h["ok"] for h in body["submission_next_hops"]] == [False, True]
        wait_until(lambda: postfix_server.log_text()[since:].count(
            "sasl_username=user1@example.com") >= 2, 20, "both messages at Postfix's submission")
    finally:
        gate.stop()


def test_health_and_metrics_show_a_submission_next_hop_that_is_down(start_gate, world,
                                                                    postfix_server):
    world.set("LOGMAP:user1@example.com", "user1@example.com")
    dead = f"127.0.0.1:{free_port()}"
    gate = start_gate(listeners=("mx", "submission", "metrics"),
                      SMTPGATE_SUBMISSION_NEXT_HOP=dead)
    try:
        assert submit(gate.submission_port) == 451
        code, body = health(gate.metrics_port)
        assert code == 503 and body["next_hop"]["ok"] is False, body
        assert [h["ok"] for h in body["submission_next_hops"]] == [False]
        assert body["next_hops"][0]["ok"] is not False  # the MX hop is fine
        with urllib.request.urlopen(f"http://127.0.0.1:{gate.metrics_port}/metrics",
                                    timeout=10) as response:
            metrics = response.read().decode()
        assert f'smtpgate_next_hop_host_up{{hop="{dead}",role="submission"}} 0.0' in metrics
    finally:
        gate.stop()
