"""SIGHUP: new settings for new sessions, no session dropped, a bad file keeps the old ones."""

from __future__ import annotations

import signal

import pytest
from services.smtp_talk import Talk

pytestmark = pytest.mark.slow


def ehlo_size(port: int) -> str:
    with Talk("127.0.0.1", port, source="127.0.0.89") as talk:
        talk.banner()
        features = talk.cmd("EHLO client.example.test")[1]
    return next(line for line in features.splitlines() if "SIZE" in line)[4:]


def test_sighup_reloads_the_toml_file(start_gate, world, tmp_path):
    config = tmp_path / "smtpgate.toml"
    config.write_text("message_size_limit = 2000\n")
    gate = start_gate(SMTPGATE_CONFIG=str(config))
    try:
        assert ehlo_size(gate.mx_port) == "SIZE 2000"
        with Talk("127.0.0.1", gate.mx_port, source="127.0.0.89") as before:
            before.banner()
            config.write_text("message_size_limit = 3000\nipv6_prefix = 56\n")
            gate.proc.send_signal(signal.SIGHUP)
            gate.wait_for_log("reloaded configuration")
            assert "ipv6_prefix changed; that takes a restart" in gate.log_text()
            assert ehlo_size(gate.mx_port) == "SIZE 3000"
            assert before.cmd("NOOP")[0] == 250  # the session from before is still there
        config.write_text("message_size_limit = 'lots'\n")
        gate.proc.send_signal(signal.SIGHUP)
        gate.wait_for_log(r"error: reload: .*message_size_limit.*keeping the running")
        assert ehlo_size(gate.mx_port) == "SIZE 3000"
    finally:
        gate.stop()
