"""The policy's stage table: README's table says the same, and RCPT runs it in Postfix's order.

In memory: the findings of earlier stages are set on a ClientState as the policy leaves them,
so no lookup runs (the stages' lookups are the end-to-end tests').
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smtpgate import config
from smtpgate.address import parse_path
from smtpgate.policy import stages
from smtpgate.policy.stages import STAGES, Policy
from smtpgate.policy.state import SUBMISSION, Client, ClientState
from smtpgate.replies import AUTH_REQUIRED
from smtpgate.verdict import Outcome, Reply, Verdict

README = Path(__file__).resolve().parent.parent / "README.md"
ROWS = {"connect (port 25)": "connect", "HELO": "helo", "STARTTLS": "starttls", "AUTH": "auth",
        "MAIL": "mail", "RCPT": "rcpt", "DATA": "data"}


def test_the_readme_lists_each_stages_checks_in_the_order_the_policy_runs_them():
    table = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ROWS:
            table[ROWS[cells[0]]] = tuple(re.findall(r"`([a-z_]+)`", cells[1]))
    assert table == STAGES


CLIENT = Reply(450, "4.7.25", "Client host rejected: cannot find your hostname")
HELO = Reply(450, "4.7.1", "Helo command rejected: Host not found")
SENDER = Reply(504, "5.5.2", "Sender address rejected: need fully-qualified address")
ENFORCED = Reply(550, "5.5.1", "Protocol error")


def policy(**environ) -> Policy:
    p = Policy.__new__(Policy)  # no Redis, no resolver: the findings below are all it reads
    p.config = config.load({"HOSTNAME": "mx.gate.test", **environ})
    p.watching = False  # no shadow rules, no replay records
    return p


@pytest.mark.parametrize(("found", "first"), [
    pytest.param({"enforced": ENFORCED, "client": CLIENT, "helo": HELO, "sender": SENDER},
                 ENFORCED, id="screening-first"),
    pytest.param({"client": CLIENT, "helo": HELO, "sender": SENDER}, CLIENT, id="client"),
    pytest.param({"helo": HELO, "sender": SENDER}, HELO, id="helo-before-sender"),
    pytest.param({"sender": SENDER}, SENDER, id="sender"),
])
async def test_rcpt_reports_delayed_findings_in_postfix_order(found, first):
    state = ClientState(Client("192.0.2.7", 40000))
    state.enforced = found.get("enforced")
    if "client" in found:
        state.client_verdict = Verdict("client_fcrdns", Outcome.FAIL, found["client"])
    state.helo_reject, state.sender_reject = found.get("helo"), found.get("sender")
    path = parse_path("<u@gate.test>", False, mail=False)
    assert await policy().rcpt(state, path, None, False) is first


async def test_submission_mail_needs_auth_first():
    state = ClientState(Client("192.0.2.7", 40000, listener=SUBMISSION))
    path = parse_path("<a@gate.test>", False, mail=True)
    assert await policy().mail(state, path, None) is AUTH_REQUIRED


class Untouchable:
    """Any use of it fails the test: the counters a stage must not ask."""

    def __getattr__(self, name):
        raise AssertionError(f"event counters asked ({name}) with every limit at 0")


async def test_with_the_rate_limits_off_no_stage_asks_the_counters():
    p = policy()
    p.event_rates = Untouchable()  # the defaults: every event limit 0
    state = ClientState(Client("192.0.2.7", 40000, listener=SUBMISSION))
    assert await p.starttls(state) is None
    assert await p.tls_started(state, resumed=False) is None
    assert await p._count_event(state, "auth") is None
    assert await p._count_event(state, "message", "user1@gate.test") is None
    assert await p._count_event(state, "recipient", "user1@gate.test") is None


async def test_an_exempt_client_is_not_counted_but_its_login_is():
    p = policy()
    p.config = config.load({"HOSTNAME": "mx.gate.test", "SMTPGATE_MYNETWORKS": "192.0.2.0/24",
                            "SMTPGATE_CLIENT_MESSAGE_RATE_LIMIT": "1",
                            "SMTPGATE_LOGIN_MESSAGE_RATE_LIMIT": "5"})
    state = ClientState(Client("192.0.2.7", 40000, listener=SUBMISSION))
    state.rate_exempt = p._spared(state.client)
    counted = p._rate_limits_of(state, "message", "User1@Gate.test")
    assert [(c.event, c.limit, c.key) for c in counted] == [
        ("login_message", 5, "user1@gate.test")]
    stranger = ClientState(Client("198.51.100.7", 40000, listener=SUBMISSION))
    assert [c.key for c in p._rate_limits_of(stranger, "message", None)] == ["198.51.100.7"]


@pytest.mark.parametrize(("client", "spared"), [
    pytest.param(Client("127.0.0.5", 40000), True, id="loopback"),
    pytest.param(Client("127.0.0.5", 40000, proxied=True), False,
                 id="loopback-named-by-a-proxy-header"),
    pytest.param(Client("192.0.2.7", 40000, proxied=True), True, id="proxied-listed"),
])
def test_event_limit_exceptions_take_mynetworks_caution_about_a_proxied_loopback(client, spared):
    p = policy()
    p.config = config.load({"HOSTNAME": "mx.gate.test", "SMTPGATE_MYNETWORKS": "127.0.0.0/8",
                            "SMTPGATE_CLIENT_EVENT_LIMIT_EXCEPTIONS": "$mynetworks 192.0.2.0/24"})
    assert p._spared(client) is spared


def test_each_stage_runs_the_checks_of_its_row_and_no_other():
    """The table is what runs: a check added to STAGES without its step, or a step the table
    does not name, fails here before it could be skipped or run out of order."""
    assert STAGES["connect"] == stages._BEFORE_GREET_WAIT + stages._AFTER_GREET_WAIT
    assert (*stages._CONNECT_STEPS, *stages._SCREENING_STEPS) == STAGES["connect"]
    assert tuple(stages._HELO_STEPS) == STAGES["helo"]
    assert tuple(stages._AUTH_STEPS) == STAGES["auth"]
    assert tuple(stages._MAIL_STEPS) == STAGES["mail"]
    assert tuple(stages._RCPT_STEPS) == STAGES["rcpt"]


async def test_connect_stops_at_the_first_check_that_answers(monkeypatch):
    """The connect row in its order: a drop by the access list is answered before the
    connection is counted (nothing after it runs; the overrides before it had no answer)."""
    ran = []

    def step(name, answer):
        async def run(self, state):
            ran.append(name)
            return answer
        return run

    drop = Reply(554, "5.7.1", "Service unavailable; client [192.0.2.7] blocked")
    monkeypatch.setitem(stages._CONNECT_STEPS, "override", step("override", stages._GO_ON))
    monkeypatch.setitem(stages._CONNECT_STEPS, "access_list", step("access_list", drop))
    monkeypatch.setitem(stages._CONNECT_STEPS, "limits", step("limits", None))
    p = policy()
    p._mynetworks = lambda client: ()
    state = ClientState(Client("192.0.2.7", 40000))
    assert await p.connect(state) is drop
    assert ran == ["override", "access_list"]


async def test_screening_decides_pregreet_before_dnsbl():
    """After the greet wait: pregreet's verdict first, then the DNSBL's (none here: not
    queried), each kept in the session's record in the table's order."""
    p = policy(SMTPGATE_GREET_ACTION="drop")
    state = ClientState(Client("192.0.2.7", 40000))
    state.greet_tested = True
    p.sites = ()
    reply = await p.screened(state, b"EHLO early\r\n", 0.5)
    assert reply is not None and reply.code == 521
    assert [v.check for v in state.record] == ["pregreet"]
    assert "pregreet" in state.screening_failed


async def test_a_dnsbl_still_pending_after_the_greet_wait_is_read_again_at_rcpt():
    """A zone that answers after the greet wait: screening went on without it, but the
    session asked, so greylisting reads the score as it stands at RCPT (not "not asked")."""
    import asyncio

    class Querier:
        pending = None

        def settling(self, ip):
            self.pending = asyncio.get_running_loop().create_future()
            return self.pending

        def snapshot(self, ip):
            return None  # no zone has answered yet

    p = policy(SMTPGATE_GREET_WAIT="6")
    p.sites, p.querier = ("bl.test",), Querier()
    state = ClientState(Client("192.0.2.7", 40000))
    wait = await p._connect_screening_cache(state)
    assert wait.seconds == 6 and p.querier.pending is not None
    assert p._dnsbl_score_now(state) == 0  # asked, nothing listed so far; None = not asked
    p.querier.pending.cancel()
