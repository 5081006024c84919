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
ROWS = {"connect (port 25)": "connect", "HELO": "helo", "MAIL": "mail", "RCPT": "rcpt",
        "DATA": "data"}


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


def test_each_stage_runs_the_checks_of_its_row_and_no_other():
    """The table is what runs: a check added to STAGES without its step, or a step the table
    does not name, fails here before it could be skipped or run out of order."""
    assert STAGES["connect"] == stages._BEFORE_GREET_WAIT + stages._AFTER_GREET_WAIT
    assert (*stages._CONNECT_STEPS, *stages._SCREENING_STEPS) == STAGES["connect"]
    assert tuple(stages._HELO_STEPS) == STAGES["helo"]
    assert tuple(stages._MAIL_STEPS) == STAGES["mail"]
    assert tuple(stages._RCPT_STEPS) == STAGES["rcpt"]


async def test_connect_stops_at_the_first_check_that_answers(monkeypatch):
    """The connect row in its order: a drop by the access list is answered before the
    connection is counted (nothing after it runs)."""
    ran = []

    def step(name, answer):
        async def run(self, state):
            ran.append(name)
            return answer
        return run

    drop = Reply(554, "5.7.1", "Service unavailable; client [192.0.2.7] blocked")
    monkeypatch.setitem(stages._CONNECT_STEPS, "access_list", step("access_list", drop))
    monkeypatch.setitem(stages._CONNECT_STEPS, "limits", step("limits", None))
    p = policy()
    p._mynetworks = lambda client: ()
    state = ClientState(Client("192.0.2.7", 40000))
    assert await p.connect(state) is drop
    assert ran == ["access_list"]


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
