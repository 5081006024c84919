"""test_setup_script - scripts/setup.sh installs what the README says, and `make run` the least.

The package lists are read from both files as text: setup.sh's bash arrays
and the README's two bullet lists under the quick start. The Makefile is
asked (make -n) which setup each command runs. setup.sh's own refusals are
run for real (no root needed to refuse).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts" / "setup.sh"
README = REPO / "README.md"


def setup_array(name: str) -> list[str]:
    """The words of a bash array `name=( ... )` in setup.sh, comments left out."""
    match = re.search(rf"^{name}=\(\n(.*?)^\)$", SETUP.read_text(), re.MULTILINE | re.DOTALL)
    assert match, f"no {name}=( ... ) in {SETUP}"
    return [word for line in match.group(1).splitlines()
            for word in line.split("#", 1)[0].split()]


def readme_list(command: str) -> list[str]:
    """The backquoted package names of the README's bullet `- `make COMMAND`...: ...`."""
    text = README.read_text()
    match = re.search(rf"^- `make {command}`[^:]*:(.*?)(?=^- |^\n)", text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"no '- `make {command}`...:' list in {README}"
    return re.findall(r"`([a-z0-9][a-z0-9.+-]+)`", match.group(1))


def test_the_readme_lists_what_setup_installs():
    run, test = setup_array("run_packages"), setup_array("test_packages")
    assert run and test
    assert readme_list("run") == run
    assert readme_list("test") == test  # "adds": the run set comes with it


def test_make_run_installs_neither_prometheus_nor_fail2ban_nor_haproxy():
    run = setup_array("run_packages")
    assert not {"prometheus", "fail2ban", "haproxy", "rspamd"} & set(run), run
    commands = subprocess.run(["make", "-n", "run"], cwd=REPO, capture_output=True,
                              text=True, timeout=30).stdout.splitlines()
    assert "bash scripts/setup.sh --run" in commands, commands
    tests = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True,
                           text=True, timeout=30).stdout.splitlines()
    assert "bash scripts/setup.sh" in tests, tests


def test_setup_starts_no_service_while_it_installs():
    """The install runs under a policy-rc.d that denies (exit 101), removed afterwards, and
    the new packages' units are disabled: read from the script, as no test may install a
    Debian package on a shared machine."""
    text = SETUP.read_text()
    install = text.index('apt-get install -y -q "${missing[@]}"')
    denies = text.index("exit 101")
    assert text.index('> "$policy"') < install and denies < install
    assert "trap remove_policy EXIT" in text[:install]
    after = text[install:]
    assert "deb-systemd-helper disable" in after and "remove_policy" in after


def test_setup_refuses_an_unknown_option_with_its_usage():
    result = subprocess.run(["bash", str(SETUP), "--frob"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert result.stderr == ("setup.sh: unknown argument: --frob (usage: scripts/setup.sh "
                             "[--run] [--bench])\n")
