"""test_bench_smoke - the benchmark harness, run at tiny sizes so that it cannot rot.

DESCRIPTION
    Runs `python -m benchmarks.run --smoke` (real redis-server, dnsmasq,
    Postfix, smtpgate and the aiosmtpd front end; 20 messages, 2 concurrent
    sessions, 20 idle connections, a few STARTTLS sessions, the MX traffic
    cases with 40 clients for 2 s each, the micro benchmarks) and checks
    that bench.json has every figure of every case with a sane value, that
    every message sent was delivered by Postfix exactly once, that every MX
    client got what its kind should get, and that the markdown table and
    the PNG plot were written.

    Deliveries are counted per message marker (each case, target and run
    marks its messages in the Message-ID; benchmarks.stack.DeliveryLog), not
    as all "status=sent" lines of Postfix's log, which once counted 21 for
    20 messages: a delivery of the warm-up, not yet logged when the first
    case took its "before" count, landed in that case's count.

    No figure is held to a target; the checks are that each figure was
    measured (a positive number where work was done) and that derived
    figures agree with the ones they come from.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY_FRONTS = ("smtpgate", "aiosmtpd-front")
MESSAGES, LATENCY_SESSIONS, TLS_SESSIONS, IDLE = 20, 10, 5, 20  # --smoke's sizes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("smtp-source") or Path("/usr/sbin/smtp-source").exists()),
                       reason="smtp-source (postfix) not installed"),
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # the timeout only says "it did not hang"; how long the run takes is not asserted
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    written = out / "bench.json"
    data = json.loads(written.read_text()) if written.exists() else {}
    # the report's tail hides why: the errors bench.json keeps say it
    assert done.returncode == 0, (f"errors: {data.get('errors')}, "
                                  f"micro: {data.get('micro', {}).get('error')}\n"
                                  + done.stdout[-3000:] + done.stderr[-3000:])
    return out, data


def positive(value) -> bool:
    return isinstance(value, int | float) and not math.isnan(value) and value > 0


def targets(data, case: str) -> set[str]:
    return {row["target"] for row in data[case]}


def test_outputs_written(bench):
    out, data = bench
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench.md").read_text()
    for heading in ("Case 1", "Case 2", "Case 3", "Case 4", "Case 5", "Case 8", "Goals"):
        assert heading in table
    assert data["meta"]["smoke"] is True and positive(data["meta"]["wall_s"])
    assert "errors" not in data, data.get("errors")


def test_warm_up_messages_were_delivered_before_the_cases(bench):
    _, data = bench
    assert targets(data, "chain") <= set(data["warm_up"])
    for target, summary in data["warm_up"].items():
        assert summary["sessions"] == summary["queued"] == summary["delivered"] == 1, target


@pytest.mark.parametrize("target", ["smtpgate", "aiosmtpd-front", "postscreen", "smtpd"])
def test_chain_figures(bench, target):
    _, data = bench
    rows = [r for r in data["chain"] if r["target"] == target]
    if not rows and target == "aiosmtpd-front":
        pytest.skip("the run left the aiosmtpd front end out")
    assert len(rows) == 1
    row = rows[0]
    assert row["smtp_source_ok"], row["smtp_source_stderr"]
    assert positive(row["messages_per_s"]) and positive(row["sessions_per_s"])
    # each message of this row, by its marker: queued once, delivered once
    assert row["marker"] != row["latency_marker"]
    assert row["queued"] == row["delivered"] == row["messages"] == MESSAGES
    lat = row["latency"]
    assert lat["sessions"] == LATENCY_SESSIONS and lat["errors"] == 0
    assert lat["queued"] == row["latency_queued"] == row["latency_delivered"] == LATENCY_SESSIONS
    assert row["errors"] == 0
    assert positive(lat["p50_ms"]) and lat["p99_ms"] >= lat["p50_ms"]
    front = row["front_cpu_ms_per_msg"]
    assert row["chain_cpu_ms_per_msg"] == pytest.approx(
        (front or 0.0) + row["postfix_cpu_ms_per_msg"])
    if target in PY_FRONTS:
        assert positive(front)  # a Python process handling 20 sessions, measured
        assert row["front_peak_pss_kb"] > 1000  # a Python process, measured
        assert row["postfix_peak_pss_kb"] is None
        assert positive(row["redis_commands_per_msg"])  # connection counts at least
        by_command = {k: v for k, v in row["redis_by_command_per_msg"].items() if k != "ping"}
        assert sum(by_command.values()) == pytest.approx(  # each rounded to 0.01
            row["redis_commands_per_msg"], abs=0.01 * len(by_command))
    else:
        assert front is None and row["redis_commands_per_msg"] is None
        assert row["postfix_peak_pss_kb"] > 1000


def test_postfix_cpu_is_measured(bench):
    """One row's share can be less than a clock tick; all rows together cannot be nothing."""
    _, data = bench
    assert sum(row["postfix_cpu_ms_per_msg"] for row in data["chain"]) > 0


@pytest.mark.parametrize("kind", ["access_list", "dnsbl"])
def test_screening_figures(bench, kind):
    _, data = bench
    rows = {r["target"]: r for r in data["screening"] if r["kind"] == kind}
    assert {"smtpgate", "postscreen"} <= set(rows) <= {*PY_FRONTS, "postscreen"}
    for target, row in rows.items():
        assert row["connections"] == sum(row["outcomes"].values()) > 0
        assert row["duration_s"] > 0 and positive(row["p50_ms"])
        assert row["rejected"] > 0, (target, row["outcomes"])
        assert row["rejected"] == sum(n for k, n in row["outcomes"].items() if k.startswith("5"))
        assert row["rejected_per_s"] == pytest.approx(row["rejected"] / row["duration_s"],
                                                      rel=0.05)
    if kind == "access_list":
        # both drop exactly these clients: the harness's world is right. (Not asserted for
        # the DNSBL: a verdict that comes after the 1 s greet wait of --smoke lets a listed
        # client pass, as postscreen's log shows now and then: "PASS NEW" before "listed".)
        for target in ("smtpgate", "postscreen"):
            row = rows[target]
            assert row["rejected"] == row["connections"], (target, row["outcomes"])
            assert set(row["outcomes"]) == {"521"}, (target, row["outcomes"])


@pytest.mark.parametrize("target", ["smtpgate", "postscreen"])
def test_idle_figures(bench, target):
    _, data = bench
    (row,) = [r for r in data["idle"] if r["target"] == target]
    assert row["held"] == row["requested"] == IDLE and not row["open_errors"]
    assert row["server_held"] == IDLE  # the server really holds them all
    # Memory is measured, not asserted: 20 idle connections are within the noise of a
    # process's PSS, so only that both readings were taken is checked here.
    assert row["pss_held_kb"] > 0 and row["pss_before_kb"] > 0
    assert row["bytes_per_connection"] == pytest.approx(
        (row["pss_held_kb"] - row["pss_before_kb"]) * 1024 / row["server_held"])
    for probe in (row["probe_during"], row["probe_after"]):
        assert probe["sessions"] == 5 and positive(probe["p50_ms"])


def test_starttls_figures(bench):
    _, data = bench
    rows = {r["target"]: r for r in data["starttls"]}
    assert {"smtpgate", "postscreen", "smtpd"} <= set(rows) <= {*PY_FRONTS, "postscreen", "smtpd"}
    for target, row in rows.items():
        assert row["sessions"] == row["queued"] == row["delivered"] == TLS_SESSIONS, target
        assert positive(row["sessions_per_s"]) and positive(row["p50_ms"])


def test_micro_figures(bench):
    _, data = bench
    micro = data["micro"]
    assert "error" not in micro
    names = set(micro["benchmarks"])
    for expected in ("test_parse_rcpt_arg", "test_rcpt_facts_cache_hit",
                     "test_rcpt_facts_cache_miss", "test_access_list_decide"):
        assert expected in names
    assert all(positive(b["median_us"]) for b in micro["benchmarks"].values())


def test_goals_reported(bench):
    _, data = bench
    goals = data["targets"]
    # every goal of the engine issue is reported with a figure and a verdict
    for name in ("front_cpu_ms_per_msg", "chain_vs_postscreen_ratio",
                 "unknown_rcpt_vs_postscreen_ratio", "access_list_vs_postscreen_ratio",
                 "data_cpu_ms_per_mb", "idle_bytes_per_connection", "idle_tls_bytes_per_session",
                 "added_p50_ms", "slow_senders_normal_max_ms"):
        assert isinstance(goals[name], int | float), name
        assert goals["met"][name] in (True, False), name
    assert positive(goals["chain_vs_postscreen_ratio"]) and positive(goals["front_cpu_ms_per_msg"])
    tls = {r["target"]: r for r in data["starttls"]}
    assert tls["smtpgate"]["idle_tls_held"] == 10  # the smoke size; memory is too small to judge


def test_unknown_recipient_figures(bench):
    _, data = bench
    rows = {r["target"]: r for r in data["unknown"]}
    assert set(rows) >= {"smtpgate", "postscreen", "smtpd"}
    for row in rows.values():
        assert row["smtp_source_ok"], row
        assert positive(row["rejected_per_s"])
    assert positive(rows["smtpgate"]["front_cpu_ms_per_session"])


@pytest.mark.parametrize("case", ["new", "returning", "mix", "listed"])
def test_mx_traffic_figures(bench, case):
    """Every session from its own address got what its kind should get, every message the
    servers took was delivered once, and each chain's CPU was measured."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.mx_plan import EXPECTED

    _, data = bench
    rows = {r["target"]: r for r in data[case]}
    assert set(rows) == {"smtpgate", "postscreen"}
    for target, row in rows.items():
        # postscreen lets a listed client pass when the DNSBL answers come after the greet
        # wait (1 s in --smoke; see test_screening_figures): Postfix's behaviour, counted as
        # an error in the row, tolerated here; smtpgate waits for the answers
        late = row["outcomes"].get("dnsbl", {}).get("250", 0) if target == "postscreen" else 0
        assert row["errors"] == late, (target, row["outcomes"])
        for kind, outcomes in row["outcomes"].items():
            allowed = {EXPECTED[kind], *(["250"] if kind == "dnsbl" and late else [])}
            assert EXPECTED[kind] in outcomes and set(outcomes) <= allowed, (target, kind)
        assert 0 < row["sessions_in_window"] <= row["sessions"]
        assert positive(row["sessions_per_s"]) and positive(row["p50_ms"])
        assert row["p99_ms"] >= row["p50_ms"]
        assert row["queued"] == row["delivered"]
        if case == "listed":
            assert row["queued"] == late
        else:
            assert row["queued"] > 0
        assert not row["addresses_exhausted"]
        # a few dozen refusals at postscreen may take less than one 10 ms clock tick
        assert row["chain_cpu_ms_per_session"] >= 0
        parts = [row[f"{p}_cpu_ms_per_session"] for p in ("front", "postfix", "redis", "dns")]
        assert row["chain_cpu_ms_per_session"] == pytest.approx(sum(p or 0.0 for p in parts))
        assert sum(row["shares"].values()) == pytest.approx(1.0)
    gate, ps = rows["smtpgate"], rows["postscreen"]
    assert positive(gate["front_cpu_ms_per_session"]) and positive(gate["chain_cpu_ms_per_session"])
    assert positive(gate["redis_commands_per_session"])
    assert ps["front_cpu_ms_per_session"] is None and ps["redis_cpu_ms_per_session"] is None
    if case == "new":
        # every first contact is held for the whole greet wait (1 s in --smoke), at both
        for row in rows.values():
            assert row["p50_ms"] >= 1000 * row["greet_wait_s"]
            assert row["greet_wait_bound_per_s"] == row["concurrency"] / row["greet_wait_s"]
    if case == "returning":
        for row in rows.values():
            assert row["returning_addresses"] > 0 and set(row["outcomes"]) == {"returning"}
    if case == "mix":
        for row in rows.values():  # every kind ran, at both (a returning client only once
            # someone was accepted: not asserted, a slow machine may not get that far)
            assert set(EXPECTED) - {"returning"} <= set(row["outcomes"]), row["outcomes"]
    if case == "listed":
        for row in rows.values():
            assert set(row["outcomes"]) == {"dnsbl"}


def test_mx_goals_and_best_case_reported(bench):
    out, data = bench
    goals = data["targets"]
    for name in ("new_client_front_cpu_ms", "returning_client_front_cpu_ms",
                 "listed_first_contact_front_cpu_ms", "mix_sessions_vs_postscreen"):
        assert positive(goals[name]) and goals["met"][name] in (True, False), name
    (postscreen_mix,) = [r for r in data["mix"] if r["target"] == "postscreen"]
    if postscreen_mix["chain_cpu_ms_per_session"] > 0:  # else less than a clock tick: no ratio
        assert positive(goals["mix_chain_cpu_vs_postscreen"])
    best = [r for r in data["chain"] if r["target"] in ("smtpgate", "postscreen")]
    for row in best:  # the one-address case has the same CPU columns as the MX cases
        assert row["total_cpu_ms_per_msg"] >= row["chain_cpu_ms_per_msg"] >= 0
        assert row["dns_cpu_ms_per_msg"] >= 0
    assert "| best case | smtpgate |" in (out / "bench.md").read_text()
