"""test_aiosmtpd_front - the benchmark's aiosmtpd front end against real Redis and Postfix.

DESCRIPTION
    Starts `python -m benchmarks.aiosmtpd_front` (one worker) with the
    environment smtpgate gets from the test harness (Redis, the test DNS,
    the harness's Postfix as next hop, no greet wait), and checks that a
    good client's message is queued by Postfix with the client's identity
    (XCLIENT) and the queue id in the 250, that a PSA reject is refused at
    the first command and the connection closed, that an unknown recipient
    is refused at RCPT by the policy, and that SIGTERM ends it with status 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import procs
from services.ports import free_port
from services.smtp_talk import Talk

ROOT = Path(__file__).resolve().parent.parent
GOOD = "127.0.0.77"  # services.world: PTR host77.clients.example.test, A back

pytestmark = pytest.mark.slow


class Front:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = workdir / "aiosmtpd-front.log"
        workdir.mkdir(parents=True, exist_ok=True)
        full = {**os.environ, **env, "SMTPGATE_MX_LISTEN": f"127.0.0.1:{self.port}",
                "PYTHONPATH": str(ROOT)}
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.aiosmtpd_front"], env=full, cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=procs.die_with_parent)
        procs.on_exit(self.kill)
        deadline = time.monotonic() + 30
        while b"aiosmtpd-front: ready" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("the aiosmtpd front end did not start:\n" + self.text())
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("no exit within 15 s of SIGTERM:\n" + self.text()) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def front(service_root, world, redis_server, dns_server, postfix_server):
    started = Front(service_root / f"aiosmtpd-front-{free_port()}", {
        "REDIS": redis_server.url,
        "HOSTNAME": "mx.example.test",
        "SMTPGATE_NAMESERVERS": dns_server.nameserver,
        "SMTPGATE_NEXT_HOP": f"127.0.0.1:{postfix_server.port}",
        "SMTPGATE_MYNETWORKS": "",
        "SMTPGATE_GREET_WAIT": "0",
        "SMTPGATE_DNS_TIMEOUT": "2",
        "SMTPGATE_WORKERS": "1",
    })
    yield started
    started.kill()


def test_message_is_queued_by_postfix_with_the_clients_identity(front, postfix_server):
    mark = postfix_server.log_mark()
    with Talk("127.0.0.1", front.port, source=GOOD) as talk:
        assert talk.banner()[0] == 220
        assert talk.cmd("EHLO client.example.test")[0] == 250
        assert talk.cmd("MAIL FROM:<sender@client.example.test>")[0] == 250
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert talk.cmd("DATA")[0] == 354
        code, text = talk.cmd(b"Subject: aiosmtpd front\r\n\r\nhello\r\n.")
        assert code == 250, text
        queue_id = re.search(r"queued as ([0-9A-Za-z]+)", text).group(1)
        assert talk.cmd("QUIT")[0] == 221
    # Postfix took it from the impersonated client (XCLIENT), not from the front end's address
    postfix_server.wait_for_log(
        rf"{queue_id}: client=host77\.clients\.example\.test\[127\.0\.0\.77\]", since=mark)
    assert front.stop() == 0


def test_psa_reject_is_refused_at_the_first_command(front, redis):
    redis.set("PSA:127.0.0.66", "reject")
    # the table cache learns of the new key from Redis a moment later: try until it has
    deadline = time.monotonic() + 5
    while True:
        with Talk("127.0.0.1", front.port, source="127.0.0.66") as talk:
            assert talk.banner()[0] == 220  # aiosmtpd greets before any hook runs
            code, text = talk.cmd("EHLO client.example.test")
            if code == 521 or time.monotonic() > deadline:
                assert code == 521, text
                assert talk.closed()
                return


def test_unknown_recipient_is_refused_by_the_policy(front):
    with Talk("127.0.0.1", front.port, source=GOOD) as talk:
        talk.banner()
        assert talk.cmd("EHLO client.example.test")[0] == 250
        assert talk.cmd("MAIL FROM:<sender@client.example.test>")[0] == 250
        code, text = talk.cmd("RCPT TO:<nobody@example.com>")
        assert code == 550 and "5.1.1" in text, text
        assert talk.cmd("QUIT")[0] == 221
