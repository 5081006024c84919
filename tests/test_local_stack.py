"""test_local_stack - `make run`'s script still delivers both quick-start examples.

Runs `scripts/local_stack.py --check` as the README's user would (on free
ports, so it does not collide with a `make run` in another terminal): it
starts Redis, DNS, Dovecot, Postfix and smtpgate, sends one message on the
MX port and one on submission with swaks, waits for both in the Maildirs,
and stops everything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local_stack.py"


def test_local_stack_check_delivers_and_cleans_up():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "local_stack: MX: delivered to" in output, output
    assert "local_stack: submission: delivered to" in output, output
    assert "local_stack: OK" in output, output
    root = next(line.split("removed ", 1)[1] for line in output.splitlines()
                if line.startswith("local_stack: stopped; removed "))
    assert not Path(root).exists(), f"{root} left behind"


def test_local_stack_refuses_a_bad_port():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--mx-port", "70000"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--mx-port: 70000 is not a port number" in result.stderr
    assert "Traceback" not in result.stderr
