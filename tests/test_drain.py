"""SIGTERM: stop accepting, let messages in flight finish, 421 for new DATA and idle clients.

The final dot's commitment against the drain's cut is tested in memory (test_dialogue.py).
"""

from __future__ import annotations

import signal
import socket
import time
import uuid

import pytest
from services.smtp_talk import Talk

pytestmark = pytest.mark.slow


def refused(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            pass  # caught by a listener as it closed (each worker closes its own): ask again
        time.sleep(0.05)
    return False


def test_drain_finishes_messages_refuses_new_ones_and_says_421_to_idle_clients(
        start_gate, world, dovecot_server):
    gate = start_gate(SMTPGATE_DRAIN_GRACE="3")
    mark = f"drain-{uuid.uuid4().hex}"
    with Talk("127.0.0.1", gate.mx_port, source="127.0.0.87", timeout=20) as busy, \
            Talk("127.0.0.1", gate.mx_port, source="127.0.0.89", timeout=20) as late:
        for talk in (busy, late):
            talk.banner()
            talk.cmd("EHLO client.example.test")
            talk.cmd("MAIL FROM:<a@example.net>")
            assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert busy.cmd("DATA")[0] == 354
        with Talk("127.0.0.1", gate.mx_port, source="127.0.0.88", timeout=20) as idle:
            idle.banner()
            gate.proc.send_signal(signal.SIGTERM)
            assert refused(gate.mx_port)  # no new sessions
            code, text = late.cmd("DATA")  # a message begun now might outlast the grace
            assert code == 421 and "4.3.2" in text
            busy.send(f"Subject: {mark}\r\n\r\nfinished while draining\r\n.\r\n".encode())
            assert busy.reply()[0] == 250
            dovecot_server.wait_for_message("user1@example.com", lambda raw: mark.encode() in raw)
            code, text = idle.reply()  # after the grace period
            assert code == 421 and "4.3.2" in text
            assert idle.closed()
    assert gate.proc.wait(15) == 0  # drained within the grace period, and ended cleanly
    gate.stop()  # checks that too, and that no worker is left
