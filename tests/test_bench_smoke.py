"""test_bench_smoke - the benchmark harness, run at tiny sizes so that it cannot rot.

DESCRIPTION
    Runs `python -m benchmarks.run --smoke` (real redis-server, dnsmasq,
    Postfix and smtpgate; 20 messages, 2 concurrent sessions, 20 idle
    connections, a few STARTTLS sessions, the micro benchmarks) and checks
    that bench.json has every figure of every case with a sane value, that
    every message smtp-source sent was really delivered by Postfix, and that
    the markdown table and the PNG plot were written.
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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("smtp-source") or Path("/usr/sbin/smtp-source").exists()),
                       reason="smtp-source (postfix) not installed"),
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "bench.json").read_text())


def positive(value) -> bool:
    return isinstance(value, int | float) and not math.isnan(value) and value > 0


def test_outputs_written(bench):
    out, data = bench
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench.md").read_text()
    for heading in ("Case 1", "Case 2", "Case 3", "Case 4", "Case 5", "Goals"):
        assert heading in table
    assert data["meta"]["smoke"] is True and data["meta"]["wall_s"] < 100


@pytest.mark.parametrize("target", ["smtpgate", "aiosmtpd-front", "postscreen", "smtpd"])
def test_chain_figures(bench, target):
    _, data = bench
    rows = [r for r in data["chain"] if r["target"] == target]
    assert len(rows) == 1
    row = rows[0]
    assert row["smtp_source_ok"], row["smtp_source_stderr"]
    assert positive(row["messages_per_s"]) and positive(row["sessions_per_s"])
    assert row["delivered"] == row["messages"] == 20  # Postfix's discard transport took them all
    lat = row["latency"]
    assert lat["sessions"] == 10 and lat["errors"] == 0
    assert positive(lat["p50_ms"]) and lat["p99_ms"] >= lat["p50_ms"]
    assert row["postfix_cpu_ms_per_msg"] >= 0 and row["chain_cpu_ms_per_msg"] >= 0
    if target in ("smtpgate", "aiosmtpd-front"):
        assert row["front_cpu_ms_per_msg"] >= 0
        assert row["front_peak_pss_kb"] > 1000  # a Python process, measured
        assert row["redis_commands_per_msg"] >= 0
    else:
        assert row["postfix_peak_pss_kb"] > 1000


@pytest.mark.parametrize("kind", ["access_list", "dnsbl"])
def test_screening_figures(bench, kind):
    _, data = bench
    rows = {r["target"]: r for r in data["screening"] if r["kind"] == kind}
    assert set(rows) == {"smtpgate", "aiosmtpd-front", "postscreen"}
    for row in rows.values():
        assert row["connections"] > 0 and row["duration_s"] > 0
        assert row["rejected_per_s"] >= 0 and positive(row["p50_ms"])
    # postscreen is configured to drop exactly these clients: the harness's world is right
    ps = rows["postscreen"]
    assert ps["rejected"] == ps["connections"] and set(ps["outcomes"]) == {"521"}


@pytest.mark.parametrize("target", ["smtpgate", "postscreen"])
def test_idle_figures(bench, target):
    _, data = bench
    (row,) = [r for r in data["idle"] if r["target"] == target]
    assert row["held"] == row["requested"] == 20 and not row["open_errors"]
    assert row["server_held"] == 20  # the server really holds them all
    assert row["pss_held_kb"] >= row["pss_before_kb"] > 0
    assert row["bytes_per_connection"] is not None and row["bytes_per_connection"] >= 0
    for probe in (row["probe_during"], row["probe_after"]):
        assert probe["sessions"] == 5 and positive(probe["p50_ms"])


def test_starttls_figures(bench):
    _, data = bench
    rows = {r["target"]: r for r in data["starttls"]}
    assert set(rows) == {"smtpgate", "aiosmtpd-front", "postscreen", "smtpd"}
    for row in rows.values():
        assert row["sessions"] > 0 and positive(row["sessions_per_s"]) and positive(row["p50_ms"])


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
    for name in ("chain_vs_postscreen_ratio", "added_p50_ms", "added_p99_ms", "idle_10k_mb",
                 "redis_round_trips_per_msg"):
        assert isinstance(goals[name], int | float), name
        assert goals["met"][name] in (True, False)
    assert positive(goals["chain_vs_postscreen_ratio"]) and positive(goals["idle_10k_mb"])


def test_big_and_slow_figures(bench):
    _, data = bench
    targets = {"smtpgate", "aiosmtpd-front", "postscreen", "smtpd"}
    big = {r["target"]: r for r in data["big"]}
    assert set(big) == targets
    for row in big.values():
        assert row["smtp_source_ok"] and row["delivered"] == row["messages"]
        assert row["postfix_cpu_ms_per_mib"] >= 0
    assert big["aiosmtpd-front"]["front_cpu_ms_per_mib"] >= 0
    slow = {r["target"]: r for r in data["slow"]}
    assert set(slow) == targets
    for row in slow.values():
        assert row["slow"]["sessions"] == row["slow_senders"]
        assert row["normal"]["sessions"] > 0 and positive(row["normal"]["p50_ms"])
        assert row["smtpd_busy_peak"] >= 0


def test_versus_aiosmtpd_reported(bench):
    out, data = bench
    cases = {r["case"] for r in data["versus_aiosmtpd"]}
    assert {"chain", "screening", "starttls", "big", "slow"} <= cases
    assert "smtpgate against the aiosmtpd front end" in (out / "bench.md").read_text()
    fronts = data["meta"]["fronts"]
    assert fronts["aiosmtpd-front"]["event_loop"] and fronts["smtpgate"]["python"]
