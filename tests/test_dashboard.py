"""conf/grafana/smtpgate.json against a real Prometheus scraping a running smtpgate.

Traffic that makes every series (a relayed message, a rejected recipient, a client a DNSBL
lists), Prometheus (Debian's) scraping the two-worker gate every second, then every panel's
expression, with Grafana's variables given fixed values, must return at least one series:
the dashboard cannot drift from the metric names.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from services.ports import start_on_free_ports
from services.prometheus_server import PrometheusServer
from services.smtp_talk import Talk
from services.waiting import wait_until

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parent.parent / "conf" / "grafana" / "smtpgate.json"
# Grafana's own variables, and the dashboard's: a fixed window, every instance
VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1m", "instance": ".+"}
LISTED = "127.0.1.5"  # in bl.test
SENDER = "127.0.0.77"  # a good client of services.world: FCrDNS passes


def panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every target, rows' folded panels included."""
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            found.extend((panel["title"], target["expr"]) for target in panel.get("targets", []))

    walk(dashboard["panels"])
    return found


def substitute(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown variable ${name} in {expr}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def test_the_dashboard_is_grafana_json_with_prometheus_targets():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = panel_exprs(dashboard)
    assert len(exprs) >= 15
    assert all("$" not in substitute(expr) for _, expr in exprs)
    titles = [title for title, _ in exprs]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for wanted in ("Rejections by check", "Relay latency", "TLS certificate expires in",
                   "DNSBL zones up", "Next hop (Postfix)", "Redis", "Sessions in flight",
                   "Rate-limited events by limit", "Shadow rules: disagreements"):
        assert wanted in titles


def traffic(gate) -> None:
    """One queued message, one recipient refused, one over the recipient rate limit, one
    client refused for a DNSBL listing."""
    with Talk("127.0.0.1", gate.mx_port, source=SENDER, timeout=30) as talk:
        assert talk.banner()[0] == 220
        assert talk.cmd("EHLO client.example.test")[0] == 250
        assert talk.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert talk.cmd("RCPT TO:<nobody@example.com>")[0] == 550
        assert talk.cmd("RCPT TO:<user1@example.com>")[0] == 250
        assert talk.cmd("RCPT TO:<user2@example.com>")[0] == 450  # the third this minute
        assert talk.cmd("DATA")[0] == 354
        talk.send(b"Subject: dashboard\r\n\r\nfor the dashboard test\r\n.\r\n")
        code, text = talk.reply()
        assert code == 250, text
        assert talk.cmd("QUIT")[0] == 221
    with Talk("127.0.0.1", gate.mx_port, source=LISTED) as talk:
        code, text = talk.banner()
        assert code == 521 and "bl.test" in text, text


def test_every_panel_has_data_from_a_real_prometheus(start_gate, world, dns, service_root,
                                                      tmp_path):
    dns.set([(f"{'.'.join(reversed(LISTED.split('.')))}.bl.test", "A", "127.0.0.2")])
    candidate = tmp_path / "candidate.toml"  # shadow rules that would let the listed one in
    candidate.write_text('dnsbl_action = "ignore"\n')
    gate = start_gate(listeners=("mx", "metrics"), SMTPGATE_WORKERS="2",
                      SMTPGATE_DNSBL_SITES="bl.test=127.0.0.2",
                      SMTPGATE_CLIENT_RECIPIENT_RATE_LIMIT="2",
                      SMTPGATE_SHADOW_CONFIG=str(candidate))
    prometheus = PrometheusServer(service_root / "prometheus",
                                  [f"127.0.0.1:{gate.metrics_port}"], interval=1.0)
    try:
        check = subprocess.run(["promtool", "check", "config", str(prometheus.write_config())],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        start_on_free_ports(prometheus)
        prometheus.wait_for_scrape()
        traffic(gate)
        exprs = [(title, substitute(expr)) for title, expr in
                 panel_exprs(json.loads(DASHBOARD.read_text()))]
        exprs.append(("$instance", "smtpgate_workers"))  # the variable's label_values()

        def empty() -> list[tuple[str, str]]:
            return [(title, expr) for title, expr in exprs if not prometheus.query(expr)]

        # rate() needs two scrapes of a series in the window: poll, with a deadline
        try:
            wait_until(lambda: not empty(), 60, "every panel's expression to have data")
        except TimeoutError:
            pytest.fail("panels without data:\n" + "\n".join(f"  {t}: {e}" for t, e in empty()))
        assert prometheus.query('smtpgate_rejections_total{check="recipient",stage="rcpt"}')
        assert prometheus.query('smtpgate_rejections_total{check="dnsbl",stage="connect"}')
        assert prometheus.query(
            'smtpgate_rejections_total{check="recipient_rate_limit",stage="rcpt"}')
        assert prometheus.query('smtpgate_dnsbl_answers_total{zone="bl.test",kind="listed"} > 0')
        assert prometheus.query('smtpgate_messages_relayed_total{result="queued"} == 1')
        assert prometheus.query(
            'smtpgate_shadow_disagreements_total{check="dnsbl",direction="accept"} == 1')
    finally:
        prometheus.stop()  # asserts exit status 0
        gate.stop()
