"""The Postfix settings shipped in conf/postfix/ parse with the real Postfix, and the
MX next-hop service they define takes XCLIENT from smtpgate."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

CONF = Path(__file__).parent.parent / "conf" / "postfix"


def postconf(config_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["postconf", "-c", str(config_dir), *args], capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("fragment", ["next-hop.cf", "submission.cf"])
def test_master_cf_fragment_parses(postfix_server, tmp_path, fragment):
    config_dir = tmp_path / "etc"
    shutil.copytree(postfix_server.config_dir, config_dir)
    shutil.copy(CONF / "submission_header_cleanup", config_dir)
    master = config_dir / "master.cf"
    master.write_text(master.read_text() + "\n" + (CONF / fragment).read_text())
    result = postconf(config_dir, "-M")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    assert "127.0.0.1:10" in result.stdout


def test_socketmap_settings_parse(postfix_server, tmp_path):
    config_dir = tmp_path / "etc"
    shutil.copytree(postfix_server.config_dir, config_dir)
    settings = [line for line in (CONF / "socketmap.cf").read_text().splitlines()
                if " = " in line and not line.startswith("#")]
    result = postconf(config_dir, "-e", *settings)
    assert result.returncode == 0, result.stderr
    shown = postconf(config_dir, "-h", "virtual_alias_maps").stdout
    assert shown.strip() == "socketmap:inet:127.0.0.1:10027:vali"


@pytest.mark.slow
def test_next_hop_service_accepts_xclient_from_smtpgate(postfix_server):
    """The harness's next hop is configured like next-hop.cf: XCLIENT, then a real client."""
    with smtplib.SMTP("127.0.0.1", postfix_server.port, timeout=20) as smtp:
        smtp.ehlo("mx.example.test")
        assert "xclient" in smtp.esmtp_features
        code, _ = smtp.docmd("XCLIENT", "ADDR=127.0.0.77 NAME=[UNAVAILABLE] HELO=x.example")
        assert code == 220
        smtp.ehlo("x.example")
        smtp.mail("a@example.net")
        code, _ = smtp.rcpt("someone@elsewhere.example")
        assert code == 554  # reject_unauth_destination judges the real client
