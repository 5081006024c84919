"""test_local_stack - `make run`'s script still delivers both quick-start examples.

Runs `scripts/local_stack.py --check` as the README's user would (on free
ports, so it does not collide with a `make run` in another terminal): it
starts Redis, DNS, Dovecot, Postfix and smtpgate, sends messages with swaks
on the MX port (to user1, user1+tag and postmaster), on submission
(STARTTLS) and on submissions (implicit TLS), waits for each in the
Maildirs, and stops everything. Then as `make run` itself: the printed log
files exist; the CLI pointed at the printed env file answers for this gate
(its Redis, its empty mynetworks); the printed metrics address answers;
starting opened no session; a client seen before is PASS OLD; and Ctrl-C
stops everything and keeps the directory.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from services.ports import free_port

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local_stack.py"


def test_local_stack_check_delivers_and_cleans_up():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "local_stack: MX: delivered to" in output, output
    for what in ("MX user1+tag", "MX postmaster", "submission", "submissions"):
        assert f"local_stack: {what}: delivered to" in output, output
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


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """proc's output up to and including the chunk holding marker (deadline: timeout).

    Read from the pipe itself, not through proc.stdout's buffer: a readline() that buffered
    the marker's lines behind the one it returned would leave select() waiting for more
    output, which a stack waiting for Ctrl-C never writes (the test once timed out so)."""
    seen = ""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} from local_stack.py:\n{seen}")
            if selector.select(left):
                chunk = os.read(fd, 65536)
                if not chunk:  # it ended without saying it
                    raise AssertionError(f"no {marker!r} from local_stack.py:\n{seen}")
                seen += chunk.decode("utf-8", "replace")
    return seen


def _wait_for(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in (seen := path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in {path}:\n{seen[-3000:]}")
        time.sleep(0.1)
    return seen


def _cli(env_file: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it after `export SMTPGATE_ENV_FILE=...`: nothing else set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SMTPGATE_") and k not in ("REDIS", "HOSTNAME")}
    return subprocess.run([sys.executable, "-m", "smtpgate", *args],
                          env={**env, "SMTPGATE_ENV_FILE": env_file},
                          capture_output=True, text=True, timeout=60)


def test_make_run_passes_its_port_options_through():
    # as a user types it: not as a sub-make of `make test` (CI), whose MAKEFLAGS and
    # MAKELEVEL would add "Entering directory" lines and pass its own flags on
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "-n", "run", "ARGS=--mx-port 3525 --metrics-port 9426"],
                            cwd=SCRIPT.parent.parent, capture_output=True, text=True, timeout=30,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        "bash scripts/setup.sh --run",
        ".venv/bin/python scripts/local_stack.py --mx-port 3525 --metrics-port 9426"]


def test_make_run_logs_to_files_and_keeps_its_directory_after_ctrl_c():
    ports = [str(free_port()) for _ in range(4)]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--mx-port", ports[0], "--submission-port", ports[1],
         "--submissions-port", ports[2], "--metrics-port", ports[3]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = None
    try:
        # five services start first: on a loaded machine that may take minutes (three, once)
        shown = _read_until(proc, "Stop with Ctrl-C", timeout=300)
        logs = re.search(r"^Logs:\n((?:    /\S+\n)+)", shown, re.MULTILINE)
        assert logs, shown
        paths = [Path(line.strip()) for line in logs.group(1).splitlines()]
        assert {p.name for p in paths} >= {"smtpgate.log", "maillog", "dovecot.log"}, paths
        missing = [p for p in paths if not p.is_file()]
        assert not missing, f"printed log paths that do not exist: {missing}\n{shown}"
        # smtpgate's own log reaches its file, not only the terminal
        gate_log = next(p for p in paths if p.name == "smtpgate.log")
        started = gate_log.read_text()
        assert "smtpgate: ready" in started, started
        # finding out that it was ready opened no session
        assert "connect from" not in started and "SSL_accept" not in started, started
        # each worker loads its table cache after the master says ready
        loaded = re.search(r"table cache: loaded (.*)", _wait_for(gate_log, "table cache: loaded"))
        assert loaded and "{" not in loaded.group(1), started

        # the CLI, pointed at the printed file, answers for this gate
        env_file = re.search(r"^    export SMTPGATE_ENV_FILE=(\S+)$", shown, re.MULTILINE)
        assert env_file, shown
        redis_url = re.search(r"^REDIS=(redis://\S+)$", shown, re.MULTILINE)
        assert redis_url and f"REDIS={redis_url.group(1)}\n" in Path(env_file.group(1)).read_text()
        explained = _cli(env_file.group(1), "explain", "--ip", "127.0.0.1")
        assert explained.stderr.startswith(
            f"smtpgate: settings from {env_file.group(1)} (SMTPGATE_ENV_FILE)"), explained.stderr
        assert "access_list" in explained.stdout, explained.stdout + explained.stderr
        assert "ALLOWLISTED" not in explained.stdout, explained.stdout  # mynetworks is empty
        listed = _cli(env_file.group(1), "table", "list", "VDOM")
        assert listed.stdout == "example.com example.com\n", listed.stdout + listed.stderr

        # the metrics it says it serves
        metrics = re.search(r"^Metrics: (http://\S+/metrics)", shown, re.MULTILINE)
        assert metrics, shown
        with urllib.request.urlopen(metrics.group(1), timeout=10) as answer:
            assert answer.status == 200 and b"smtpgate_" in answer.read()

        # the printed first message, twice: the second time the client is known
        swaks = re.search(r"^Send a first message:\n    (swaks .*)$", shown, re.MULTILINE)
        assert swaks, shown
        for _ in range(2):
            sent = subprocess.run([*swaks.group(1).split(), "--timeout", "20"],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        log = _wait_for(gate_log, "PASS OLD [127.0.0.1]")
        assert log.count("PASS NEW [127.0.0.1]") == 1, log
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, shown + rest
        kept = re.search(r"^local_stack: stopped; kept (\S+) ", rest, re.MULTILINE)
        assert kept, rest
        root = Path(kept.group(1))
        assert root.is_dir() and all(p.is_file() for p in paths), rest
        assert str(gate_log).startswith(str(root))
    finally:
        root = _stop(proc) or root
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> Path | None:
    """Stop local_stack.py the way a user does, so it stops Postfix, Dovecot and the rest it
    started (a SIGKILL would leave Postfix's master running); kill it only if that fails.
    The directory it says it kept, if any."""
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate(timeout=30)
    kept = re.search(r"^local_stack: stopped; kept (\S+) ", rest or "", re.MULTILINE)
    return Path(kept.group(1)) if kept else None
