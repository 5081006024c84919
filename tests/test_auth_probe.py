"""smtpgate with submission on does not start in front of a Dovecot that lets anyone log in,
and AUTH waits until Dovecot is known to refuse a made-up login; against real Dovecots."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from services.dovecot_server import DovecotServer
from services.ports import start_on_free_ports
from services.smtp_talk import Talk, untag

from smtpgate.lookups.auth_probe import AuthProbe, auth_finding

pytestmark = pytest.mark.slow

LISTENERS = ("mx", "submission")
# the dovecot/dovecot image's own passdb (any user, password "pass"), and one that takes
# any password at all
ACCEPT_ANYONE = {
    "image-default": "driver = static\nargs = password=pass",
    "nopassword": "driver = static\nargs = nopassword=y",
}


@pytest.fixture(params=sorted(ACCEPT_ANYONE))
def open_dovecot(request, service_root):
    server = DovecotServer(service_root / f"dovecot-{request.param}",
                           passdb=ACCEPT_ANYONE[request.param])
    start_on_free_ports(server)
    yield server
    server.stop()


SHIPPED_DOVECOT = Path(__file__).resolve().parent.parent / "conf" / "dovecot" / "dovecot.conf"


def shipped_passdbs() -> list[str]:
    """The bodies of the passdb sections of the compose stack's dovecot.conf."""
    return re.findall(r"^passdb \{\n(.*?)^\}", SHIPPED_DOVECOT.read_text(), re.M | re.S)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_the_gate_refuses_to_start_in_front_of_an_accept_anyone_dovecot(start_gate,
                                                                        open_dovecot):
    with pytest.raises(RuntimeError) as failed:
        start_gate(listeners=LISTENERS, SMTPGATE_DOVECOT_AUTH_PORT=str(open_dovecot.auth_port))
    said = str(failed.value)
    assert "smtpgate exited with 1 at start" in said
    assert re.search(r"fatal: auth service 127\.0\.0\.1:\d+ accepts any login \(the made-up "
                     r"user smtpgate-probe-\w+@probe\.invalid with ", said), said
    assert "submission would relay for anyone" in said and "passwd-file" in said
    assert "ready" not in said


def test_without_submission_the_auth_service_is_not_asked(start_gate, open_dovecot):
    gate = start_gate(listeners=("mx",),
                      SMTPGATE_DOVECOT_AUTH_PORT=str(open_dovecot.auth_port))
    assert "auth service" not in gate.log_text()
    gate.stop()


def test_the_gate_starts_in_front_of_a_user_database(start_gate, dovecot_server, world):
    gate = start_gate(listeners=LISTENERS)
    assert re.search(r"auth service 127\.0\.0\.1:\d+ refuses made-up logins", gate.log_text())
    with Talk("127.0.0.1", gate.submission_port, source="127.0.11.1") as talk:
        talk.banner()
        talk.cmd("EHLO laptop")
        talk.cmd("STARTTLS")
        talk.starttls()
        talk.cmd("EHLO laptop")
        assert talk.cmd("AUTH PLAIN " + plain("user1@example.com", "secret1"))[0] == 235
    gate.stop()


def test_the_compose_stacks_user_database_lets_in_its_users_only(start_gate, world,
                                                                 service_root):
    """conf/dovecot/dovecot.conf's passdb, run by a real Dovecot (its file path moved to the
    test's): the gate starts in front of it, and a user added to the file logs in."""
    [passdb] = shipped_passdbs()
    assert "/etc/dovecot/users/passwd" in passdb
    server = DovecotServer(service_root / "dovecot-shipped",
                           passdb=passdb.replace("/etc/dovecot/users/passwd", "{users}"))
    start_on_free_ports(server)
    try:
        gate = start_gate(listeners=LISTENERS, SMTPGATE_DOVECOT_AUTH_PORT=str(server.auth_port))
        assert "refuses made-up logins" in gate.log_text()
        server.add_user("someone@example.com", "a long secret")
        with Talk("127.0.0.1", gate.submission_port, source="127.0.11.3") as talk:
            talk.banner()
            talk.cmd("EHLO laptop")
            talk.cmd("STARTTLS")
            talk.starttls()
            talk.cmd("EHLO laptop")
            assert talk.cmd("AUTH PLAIN " + plain("someone@example.com", "pass"))[0] == 535
            assert talk.cmd("AUTH PLAIN " + plain("someone@example.com", "a long secret"))[0] \
                == 235
        gate.stop()
    finally:
        server.stop()


def test_an_auth_service_found_later_is_asked_before_the_first_password(
        start_gate, world, service_root):
    """Dovecot not up at start (containers start in any order): a warning, and the first
    AUTH asks it the made-up login first; it takes anyone, so AUTH gets 454, not 235."""
    late = DovecotServer(service_root / "dovecot-late", passdb=ACCEPT_ANYONE["image-default"])
    gate = start_gate(listeners=LISTENERS, SMTPGATE_DOVECOT_AUTH_PORT=str(late.auth_port))
    try:
        assert "cannot be asked yet" in gate.log_text()
        late.start()
        with Talk("127.0.0.1", gate.submission_port, source="127.0.11.2") as talk:
            talk.banner()
            talk.cmd("EHLO laptop")
            talk.cmd("STARTTLS")
            talk.starttls()
            talk.cmd("EHLO laptop")
            assert untag(talk.cmd("AUTH PLAIN " + plain("anyone@example.com", "pass"))) == (
                454, "454 4.7.0 Temporary authentication failure")
        gate.wait_for_log(r"error: auth service 127\.0\.0\.1:\d+ accepts any login")
    finally:
        late.stop()
        gate.stop()


@pytest.mark.parametrize("probe, level, words", [
    (AuthProbe("dovecot:11330", "refused"), "ok", "refuses made-up logins"),
    (AuthProbe("dovecot:11330", "accepted", 'x with the password "pass"'), "error",
     "accepts any login"),
    (AuthProbe("dovecot:11330", "unknown", "Can't connect to authentication server"),
     "warning", "cannot be asked yet"),
])
def test_findings(probe, level, words):
    finding = auth_finding(probe)
    assert (finding.level, words in finding.text) == (level, True)
