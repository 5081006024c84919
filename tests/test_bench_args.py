"""test_bench_args - the first-contact benchmark's options, and how a container's processes are
found; no service and no container is started here (the smoke test runs the harness)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is no package

from benchmarks import first_contact
from benchmarks.container import pid_namespace_members


def test_no_image_target_unless_asked():
    assert first_contact.parse_args([]).image is None


def test_image_alone_means_build_the_dockerfile():
    args = first_contact.parse_args(["--image", "--rounds", "3"])
    assert args.image == "" and args.rounds == 3


def test_image_names_a_built_one():
    args = first_contact.parse_args(["--image", "smtpgate:latest", "--baseline", "/tmp/base"])
    assert args.image == "smtpgate:latest" and str(args.baseline) == "/tmp/base"


@pytest.mark.parametrize("argv", [["--image=-x"], ["--rounds", "0"], ["--sessions", "0"]])
def test_bad_options_are_refused_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        first_contact.parse_args(argv)
    assert exc.value.code == 2
    assert "benchmarks.first_contact: error:" in capsys.readouterr().err


def test_a_pid_namespace_holds_its_processes_whatever_their_parent():
    """The image target's CPU is that of every process in its PID namespace: here the test's
    own namespace, holding this process and a child it started."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        members = pid_namespace_members(os.getpid())
        assert os.getpid() in members and child.pid in members
    finally:
        child.kill()
        child.wait()
    assert pid_namespace_members(child.pid) == []  # gone: nothing to read
