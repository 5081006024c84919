"""test_env_file - the CLI reads the gate's settings file, and answers for that gate.

The file's syntax and which file is chosen are pure functions, tested as
such; then a real `smtpgate serve` is started with its settings in an env
file (as the systemd unit and `make run` do) and `smtpgate explain --ip
127.0.0.1` is run against it with that file and nothing else.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys

import pytest

from smtpgate.config import ConfigError, load
from smtpgate.env_file import gate_environment, read


def test_read_takes_systemd_environment_file_lines(tmp_path):
    path = tmp_path / "smtpgate.env"
    path.write_text("# a comment\n; another\n\nREDIS=redis://127.0.0.1:6380/0\n"
                    "export HOSTNAME=mx.example.test\nSMTPGATE_MYNETWORKS=\"\"\n"
                    "SMTPGATE_DNSBL_SITES='zen.spamhaus.org*2  bl.example.test'\n"
                    'DOMAIN = "ex\\"ample.test"\n')
    assert read(str(path)) == {
        "REDIS": "redis://127.0.0.1:6380/0", "HOSTNAME": "mx.example.test",
        "SMTPGATE_MYNETWORKS": "", "SMTPGATE_DNSBL_SITES": "zen.spamhaus.org*2  bl.example.test",
        "DOMAIN": 'ex"ample.test'}


@pytest.mark.parametrize(("text", "message"), [
    ("REDIS\n", "{path}:1: 'REDIS' is not NAME=VALUE"),
    ("OK=1\n2X=y\n", "{path}:2: '2X=y' is not NAME=VALUE"),
])
def test_read_names_a_bad_line(tmp_path, text, message):
    path = tmp_path / "smtpgate.env"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read(str(path))
    assert str(caught.value) == message.format(path=path)


def test_an_unreadable_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        gate_environment(str(tmp_path / "none.env"), None, {})
    assert str(caught.value) == f"--env-file: cannot read {tmp_path}/none.env: " \
                                "No such file or directory"


def test_which_file_and_what_wins(tmp_path):
    unit = tmp_path / "unit.env"
    unit_toml = tmp_path / "unit.toml"
    mine = tmp_path / "mine.env"
    unit.write_text("REDIS=unit-redis\nSMTPGATE_MYNETWORKS=\n")
    mine.write_text("REDIS=my-redis\n")
    choose = lambda env_file, environ, config=None: gate_environment(  # noqa: E731
        env_file, config, environ, unit_env_file=str(unit), unit_config=str(unit_toml))

    # the unit's file, when nothing else is named; the caller's variables win one by one
    gate = choose(None, {"REDIS": "shell-redis"})
    assert gate.environ == {"REDIS": "shell-redis", "SMTPGATE_MYNETWORKS": ""}
    assert gate.origins == {"SMTPGATE_MYNETWORKS": str(unit)}
    assert gate.said == f"settings from {unit} (the systemd unit's), then the environment"
    # the unit's TOML file too, as the unit sets SMTPGATE_CONFIG
    unit_toml.write_text("")
    gate = choose(None, {})
    assert gate.environ["SMTPGATE_CONFIG"] == str(unit_toml)
    assert gate.said.endswith(f"; {unit_toml}")
    # SMTPGATE_ENV_FILE (make run prints it), and --env-file before it
    assert choose(None, {"SMTPGATE_ENV_FILE": str(mine)}).environ["REDIS"] == "my-redis"
    assert choose(str(mine), {"SMTPGATE_ENV_FILE": str(unit)}).environ["REDIS"] == "my-redis"
    # an empty SMTPGATE_ENV_FILE reads no file at all
    gate = choose(None, {"SMTPGATE_ENV_FILE": ""})
    assert "REDIS" not in gate.environ
    assert gate.said == "settings from the environment only (SMTPGATE_ENV_FILE is empty)"
    # --config names the TOML file whatever the files say
    gate = choose(None, {}, config="/x.toml")
    assert gate.environ["SMTPGATE_CONFIG"] == "/x.toml"
    # check-config shows the file as the setting's source
    unit.write_text("HOSTNAME=mx.example.test\nSMTPGATE_GREET_WAIT=3\n")
    gate = choose(None, {"SMTPGATE_ENV_FILE": str(unit)})
    sources = {name: source for name, _, source in load(gate.environ, gate.origins).describe()}
    assert sources["greet_wait"] == str(unit)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SMTPGATE_")
             and k not in ("REDIS", "HOSTNAME", "DOMAIN", "LETSENCRYPT", "DOVECOT", "TIMEZONE")}
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_explain_agrees_with_a_gate_whose_settings_live_in_an_env_file(start_gate, tmp_path):
    gate = start_gate()  # mynetworks empty: 127.0.0.1 is a stranger to the gate
    env_file = tmp_path / "smtpgate.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in gate.env.items()
                                if name != "PATH"))
    assert gate.env["SMTPGATE_MYNETWORKS"] == ""
    with smtplib.SMTP("127.0.0.1", gate.mx_port, source_address=("127.0.0.1", 0),
                      timeout=30) as client:
        client.ehlo("client.example.test")
    gate.wait_for_log(r"disconnect from \S+\[127\.0\.0\.1\]")
    assert "ALLOWLISTED [127.0.0.1]" not in gate.log_text()

    for how in (("--env-file", str(env_file)), ()):
        extra = {} if how else {"SMTPGATE_ENV_FILE": str(env_file)}
        result = _cli("explain", *how, "--ip", "127.0.0.1", **extra)
        assert result.stderr.startswith(f"smtpgate: settings from {env_file} "), result.stderr
        assert "access_list" in result.stdout, result.stdout + result.stderr
        assert "ALLOWLISTED" not in result.stdout, result.stdout  # as the gate saw it
    # the caller's environment alone is another gate: the default mynetworks trusts 127.0.0.1
    alone = _cli("explain", "--ip", "127.0.0.1", SMTPGATE_ENV_FILE="",
                 REDIS=gate.env["REDIS"], HOSTNAME="mx.example.test")
    assert "ALLOWLISTED [127.0.0.1] (mynetworks 127.0.0.0/8)" in alone.stdout, alone.stdout
    gate.stop()
