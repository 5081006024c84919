"""/healthz and /metrics of a running smtpgate."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_health_follows_redis_and_metrics_are_prometheus_text(start_gate, world, redis_server):
    gate = start_gate(listeners=("mx", "metrics"))
    port = gate.metrics_port
    try:
        code, body = get(port, "/healthz")
        assert code == 200 and json.loads(body)["redis"]["ok"] is True
        code, text = get(port, "/metrics")
        assert code == 200
        assert "# TYPE smtpgate_sessions_in_flight gauge" in text
        assert "\nsmtpgate_redis_up 1.0\n" in text  # no pid label: one figure for all workers
        assert get(port, "/nothing")[0] == 404
        redis_server.stop()
        try:
            # the next table round trip fails; health reports it
            import socket

            with socket.create_connection(("127.0.0.1", gate.mx_port), timeout=10) as sock:
                sock.recv(1024)
            code, body = get(port, "/healthz")
            assert code == 503, body
            assert json.loads(body)["status"] == "unavailable"
        finally:
            redis_server.start()
    finally:
        gate.stop()


@pytest.mark.slow
def test_health_follows_the_next_hop(start_gate, world, postfix_server):
    gate = start_gate(listeners=("mx", "metrics"))
    port = gate.metrics_port
    try:
        assert wait_for_health(port, lambda body: body["next_hop"]["ok"] is True)[0] == 200
        postfix_server.stop()
        try:
            code, body = wait_for_health(port, lambda body: body["next_hop"]["ok"] is False)
            assert code == 503 and body["status"] == "unavailable"
            assert body["next_hop"]["address"] == f"127.0.0.1:{postfix_server.port}"
            assert "\nsmtpgate_next_hop_up 0.0\n" in get(port, "/metrics")[1]
        finally:
            postfix_server.start()
        # back: the checks themselves reconnect, with no mail needed to notice
        assert wait_for_health(port, lambda body: body["next_hop"]["ok"] is True)[0] == 200
    finally:
        gate.stop()


def wait_for_health(port: int, wanted, timeout: float = 20.0) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        code, text = get(port, "/healthz")
        body = json.loads(text)
        if wanted(body) or time.monotonic() > deadline:
            return code, body
        time.sleep(0.1)


@pytest.mark.slow
def test_a_hop_the_start_up_probe_reached_is_up_before_any_mail(start_gate, world, postfix_server):
    """Without a pool nothing connects to the hop until a message comes; the probe that let
    smtpgate start already showed it takes mail, so /healthz must not say "not tried"."""
    gate = start_gate(listeners=("mx", "metrics"), SMTPGATE_NEXT_HOP_POOL="0")
    try:
        code, text = get(gate.metrics_port, "/healthz")
        body = json.loads(text)
        assert code == 200, body
        assert body["next_hop"]["ok"] is True
        assert [hop["ok"] for hop in body["next_hops"]] == [True]
    finally:
        gate.stop()
