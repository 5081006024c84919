"""The Postfix settings shipped in conf/postfix/ parse with the real Postfix, and the
MX next-hop service they define takes XCLIENT from smtpgate."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import uuid
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


@pytest.mark.slow
def test_next_hop_service_does_not_look_up_smtpgates_name(postfix_server):
    """smtpd_peername_lookup=no: the hand-off's own peer is logged as unknown (no PTR and A
    lookup of smtpgate's address per hand-off), and XCLIENT still names the client."""
    since = postfix_server.log_mark()
    with smtplib.SMTP("127.0.0.1", postfix_server.port, timeout=20) as smtp:
        smtp.ehlo("mx.example.test")
        code, _ = smtp.docmd("XCLIENT", "ADDR=127.0.0.78 NAME=named.example.test HELO=x.example")
        assert code == 220
        smtp.ehlo("x.example")
    postfix_server.wait_for_log(
        r"postfix/smtpgate/smtpd\[\d+\]: connect from unknown\[127\.0\.0\.1\]", since=since)
    postfix_server.wait_for_log(
        r"postfix/smtpgate/smtpd\[\d+\]: disconnect from named\.example\.test\[127\.0\.0\.78\]",
        since=since)


# --- the complete files: conf/postfix/main.cf and master.cf ----------------------------------


def _service_block(text: str) -> str:
    """A fragment's master.cf lines, without its leading comment."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    return "\n".join(lines[start:]) + "\n"


@pytest.mark.parametrize("fragment", ["next-hop.cf", "submission.cf"])
def test_complete_master_cf_holds_the_fragments_verbatim(fragment):
    """Who appends a fragment to their own master.cf gets what the compose stack and the
    tests run."""
    assert _service_block((CONF / fragment).read_text()) in (CONF / "master.cf").read_text()


def test_complete_master_cf_has_nothing_on_the_public_ports():
    """smtpgate owns 25, 587 and 465: every inet service of master.cf is on loopback."""
    inet = [line.split()[0] for line in (CONF / "master.cf").read_text().splitlines()
            if line and not line[0].isspace() and not line.startswith("#")
            and line.split()[1] == "inet"]
    assert inet == ["127.0.0.1:10025", "127.0.0.1:10587"]
    assert "postscreen" not in [line.split()[-1] for line in
                                (CONF / "master.cf").read_text().splitlines()
                                if line and not line[0].isspace() and not line.startswith("#")]


def test_test_instance_changes_only_local_settings():
    """The tests' Postfix is the shipped configuration: the settings that make it behave as
    smtpgate's next hop are not among those the harness changes."""
    from services.postfix_server import LOCAL_KEYS, read_main_cf

    shipped = read_main_cf(CONF / "main.cf")
    assert not LOCAL_KEYS & {"smtpd_authorized_xclient_hosts", "mynetworks",
                             "recipient_delimiter", "inet_protocols", "inet_interfaces",
                             "milter_default_action", "smtpd_sasl_type", "message_size_limit"}
    assert shipped["inet_protocols"] == "all"
    assert shipped["recipient_delimiter"] == "+"
    assert shipped["smtpd_authorized_xclient_hosts"] == "127.0.0.1"
    added = LOCAL_KEYS - shipped.keys()
    assert added <= {"queue_directory", "data_directory", "maillog_file_prefixes",
                     "maillog_file", "default_transport", "relay_transport",
                     "delay_warning_time", "queue_run_delay"}


def test_postfix_check_and_postconf_accept_the_complete_files(postfix_server, tmp_path):
    """`postfix check` and `postconf -n` on the running instance's files (the shipped main.cf
    and master.cf) say nothing: no unknown or unused parameter, no bad service line."""
    checked = subprocess.run(["postfix", "-c", str(postfix_server.config_dir), "check"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
    shown = postconf(postfix_server.config_dir, "-n")
    assert shown.returncode == 0 and not shown.stderr.strip(), shown.stderr
    assert "recipient_delimiter = +" in shown.stdout.splitlines()
    services = postconf(postfix_server.config_dir, "-M")
    assert services.returncode == 0 and not services.stderr.strip(), services.stderr


def test_postfix_check_fails_on_a_broken_main_cf(postfix_server, tmp_path):
    """The check above can fail: a misspelt parameter is reported."""
    config_dir = tmp_path / "etc"
    shutil.copytree(postfix_server.config_dir, config_dir)
    (config_dir / "main.cf").write_text((config_dir / "main.cf").read_text()
                                        + "recipient_delimeter = +\n")
    shown = postconf(config_dir, "-n")
    assert "recipient_delimeter" in shown.stderr, shown.stderr


@pytest.mark.slow
def test_complete_files_relay_an_ipv6_client_to_dovecot(postfix_server, dovecot_server):
    """smtpgate's hand-off to the shipped configuration, for real: XCLIENT with an IPv6
    client (inet_protocols = all), a +tag recipient (recipient_delimiter = +), through the
    rspamd milter, delivered over LMTP into user1's Maildir."""
    token = f"complete-files-{uuid.uuid4().hex}"
    with smtplib.SMTP(postfix_server.host, postfix_server.port, timeout=30) as smtp:
        smtp.ehlo("mx.example.test")
        code, text = smtp.docmd(
            "XCLIENT", "ADDR=IPV6:2001:db8::25 NAME=v6.clients.example.test HELO=v6.example")
        assert code == 220, text
        smtp.ehlo("v6.example")
        smtp.mail("someone@example.net")
        code, text = smtp.rcpt("user1+tag@example.com")
        assert code == 250, text
        code, text = smtp.data(f"Subject: {token}\r\nFrom: someone@example.net\r\n"
                               f"To: user1+tag@example.com\r\n\r\nhello\r\n".encode())
        assert code == 250, text
    raw = dovecot_server.wait_for_message("user1@example.com", lambda m: token.encode() in m,
                                          timeout=30)
    # Postfix's Received line names the client XCLIENT gave it, not smtpgate
    assert b"2001:db8::25" in raw
    assert b"user1+tag@example.com" in raw


# --- main.cf copied to a host as it is ------------------------------------------------------------


def host_copy(workdir: Path, *extra: str) -> Path:
    """The shipped main.cf and master.cf as a host would have them in /etc/postfix, with a
    private queue and free ports, so that this machine's own Postfix stays out of it."""
    from services.ports import free_port
    from services.postfix_server import SHIPPED_MX_SERVICE, SHIPPED_SUBMISSION_SERVICE

    config_dir = workdir / "etc"
    config_dir.mkdir(parents=True)
    for sub in ("queue", "data"):
        (workdir / sub).mkdir()
    shutil.chown(workdir / "data", "postfix", "postfix")
    master = (CONF / "master.cf").read_text()
    for service in (SHIPPED_MX_SERVICE, SHIPPED_SUBMISSION_SERVICE):
        master = master.replace(f"\n{service} ", f"\n127.0.0.1:{free_port()} ")
    (config_dir / "master.cf").write_text(master)
    shutil.copy(CONF / "submission_header_cleanup", config_dir)
    (config_dir / "main.cf").write_text(
        (CONF / "main.cf").read_text() + f"queue_directory = {workdir / 'queue'}\n"
        f"data_directory = {workdir / 'data'}\n" + "".join(f"{line}\n" for line in extra))
    return config_dir


DAEMON_STARTED = re.compile(r"postfix/master\[\d+\]: daemon started -- version")


@pytest.mark.slow
def test_a_host_postfix_started_like_debians_service_logs_to_syslog(service_root):
    """Debian's postfix.service runs `postfix start`: with the shipped main.cf the log goes
    to syslog (journald), not to a standard output nobody reads."""
    from services.host_syslog import postfix_start_syslog

    config_dir = host_copy(service_root / "host-postfix")
    assert postconf(config_dir, "-h", "maillog_file").stdout.strip() == ""
    lines = postfix_start_syslog(config_dir, service_root / "host-postfix")
    assert any(DAEMON_STARTED.search(line) for line in lines), lines


@pytest.mark.slow
def test_maillog_file_stdout_loses_a_host_postfixs_log(service_root):
    """What the shipped main.cf had: maillog_file = /dev/stdout, which only `postfix
    start-fg` (the container's entrypoint) gives a reader; started as a service, nothing of
    the master's reaches syslog."""
    from services.host_syslog import postfix_start_syslog

    config_dir = host_copy(service_root / "host-postfix-stdout", "maillog_file = /dev/stdout")
    lines = postfix_start_syslog(config_dir, service_root / "host-postfix-stdout", wait=0)
    assert not [line for line in lines if "postfix/master" in line], lines
