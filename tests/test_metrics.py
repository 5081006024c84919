"""/metrics adds up across workers (smtpgate.service.metrics), and its pure parts.

With SMTPGATE_WORKERS=2 each scrape reaches one worker at random (SO_REUSEPORT); the figures
must not depend on which: repeated scrapes with nothing happening in between are identical,
the sessions counter equals the sessions sent, and a worker killed with SIGKILL takes none of
its counts with it (its counter file stays in the sum; its replacement counts in a new one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families
from services.smtp_talk import Talk
from services.waiting import wait_until
from test_health import get
from test_workers import START_WINDOW, age, serving_pids

from smtpgate.lookups.tables import CONNECT_TEMPFAIL
from smtpgate.policy.state import Client, ClientState
from smtpgate.replies import AUTH_FAILED
from smtpgate.service.metrics import (
    ENVIRONMENT,
    metrics_directory,
    rejecting_check,
    relay_result,
    session_outcome,
    stage_of,
)
from smtpgate.smtp.certificate import read_certificate
from smtpgate.verdict import Outcome, Reply, Verdict

SCRAPES = 20  # with 2 workers, all 20 reaching the same one is a 2^-19 chance


def scrape(port: int) -> str:
    code, text = get(port, "/metrics")
    assert code == 200, text
    return text


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def quit_sessions(gate, count: int) -> None:
    for _ in range(count):
        with Talk("127.0.0.1", gate.mx_port) as talk:
            assert talk.banner()[0] == 220
            assert talk.cmd("QUIT")[0] == 221


def sessions_until_both_served(gate, workers: set[int], limit: int = 200) -> int:
    """QUIT sessions until each worker has logged a connect; how many were sent."""
    for sent in range(1, limit + 1):
        quit_sessions(gate, 1)
        if workers <= serving_pids(gate):
            return sent
    raise AssertionError(f"not every worker served within {limit} sessions")


def quits(text: str) -> float | None:
    return value(text, "smtpgate_sessions_total", listener="mx", outcome="quit")


@pytest.fixture
def gate(start_gate, world):
    process = start_gate(listeners=("mx", "metrics"), SMTPGATE_WORKERS="2")
    yield process
    process.stop()


@pytest.mark.slow
def test_two_workers_give_one_figure_whichever_answers(gate):
    workers = set(gate.workers())
    assert len(workers) == 2, workers
    port = gate.metrics_port
    # each worker writes its live gauges once, at its first refresh
    wait_until(lambda: value(scrape(port), "smtpgate_workers") == 2.0, 10,
               "both workers' gauges in the files")
    # the start-up TLSA lookup (no records in the test zone) decided in some worker; the
    # other's decision leaves the livemax series as they are
    wait_until(lambda: value(scrape(port), "smtpgate_tls_dane_state", state="no_records") == 1.0,
               10, "the DANE check's first decision")
    first = scrape(port)
    assert "pid=" not in first
    assert value(first, "smtpgate_redis_up") == 1.0
    assert value(first, "smtpgate_sessions_in_flight", listener="mx") == 0.0
    expiry = value(first, "smtpgate_tls_certificate_expiry_timestamp_seconds")
    assert expiry is not None and expiry > datetime.now(UTC).timestamp()
    assert [scrape(port) for _ in range(SCRAPES)] == [first] * SCRAPES

    sent = sessions_until_both_served(gate, workers)
    # counted before the 221 went out, so no wait: every scrape sees all of them at once
    after = [quits(scrape(port)) for _ in range(SCRAPES)]
    assert after == [float(sent)] * SCRAPES, (sent, after)


@pytest.mark.slow
def test_a_killed_workers_counts_are_neither_lost_nor_doubled(gate):
    workers = gate.workers()
    assert len(workers) == 2, workers
    port = gate.metrics_port
    sent = sessions_until_both_served(gate, set(workers))
    victim, survivor = workers
    assert victim in serving_pids(gate)  # it counted some of them
    assert quits(scrape(port)) == sent
    wait_until(lambda: age(victim) > START_WINDOW + 0.5, START_WINDOW + 10,
               "the worker to be past the master's start window")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(gate.workers()) == 2 and victim not in gate.workers(), 15,
               "the master to start a new worker")
    wait_until(lambda: gate.log_text().count("smtpgate: ready") == 3, 15,
               "the new worker to be ready")
    # the dead worker's live gauge is gone (mark_process_dead), the new one's is there
    wait_until(lambda: value(scrape(port), "smtpgate_workers") == 2.0, 10,
               "two live workers in the gauges")
    assert [quits(scrape(port)) for _ in range(SCRAPES)] == [float(sent)] * SCRAPES
    (newcomer,) = set(gate.workers()) - {survivor}
    more = sessions_until_both_served(gate, {newcomer})
    assert [quits(scrape(port)) for _ in range(SCRAPES)] == [float(sent + more)] * SCRAPES


# --- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(("ended", "last", "eof", "draining", "rejected", "outcome"), [
    ("closed", "QUIT", True, False, False, "quit"),
    ("closed", "QUIT", False, True, False, "quit"),
    ("closed", "RCPT", True, False, False, "lost"),
    ("closed", "", False, False, False, "hangup"),  # a protocol test's drop, the error limit
    ("closed", "MAIL", True, True, False, "shutdown"),
    # refused after the banner (an unknown user, a relay attempt), nothing queued
    ("closed", "QUIT", True, False, True, "rejected"),
    ("closed", "RCPT", True, False, True, "rejected"),  # left without QUIT
    ("closed", "RCPT", False, False, True, "hangup"),  # smtpgate hung up: the error limit
    ("closed", "MAIL", True, True, True, "shutdown"),
    ("refused", "", False, False, False, "refused"),
    ("timeout", "EHLO", False, False, True, "timeout"),
    ("error", "DATA", False, False, False, "error"),
])
def test_session_outcome(ended, last, eof, draining, rejected, outcome):
    assert session_outcome(ended, last, eof, draining, rejected) == outcome


def test_the_rejecting_check_is_the_verdict_that_carried_the_reply():
    helo = Reply(450, "4.7.1", "Helo command rejected: Host not found")
    unknown = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
    state = ClientState(Client("192.0.2.7", 40000))
    for verdict in (Verdict("helo", Outcome.FAIL, helo), Verdict("sender", Outcome.PASS),
                    Verdict("recipient", Outcome.FAIL, unknown)):
        state.note(verdict)
    assert rejecting_check(state, unknown) == "recipient"
    # smtpd_delay_reject: the HELO verdict's reply, sent at RCPT, after later verdicts
    assert rejecting_check(state, helo) == "helo"
    # an equal reply made elsewhere (a syntax answer, say) is not the policy's
    assert rejecting_check(state, Reply(450, "4.7.1", helo.text)) is None
    empty = ClientState(Client("192.0.2.7", 40000))
    assert rejecting_check(empty, CONNECT_TEMPFAIL) == "tempfail"
    assert rejecting_check(empty, AUTH_FAILED) == "auth"
    # past the record's cap, the latest verdict still names its check
    for _ in range(ClientState.RECORD_LIMIT):
        state.note(Verdict("sender", Outcome.PASS))
    late = Reply(550, "5.1.1", "late")
    state.note(Verdict("recipient", Outcome.FAIL, late))
    assert rejecting_check(state, late) == "recipient"


def test_relay_results_and_stages():
    assert [relay_result(c) for c in (250, 451, 554)] == ["queued", "deferred", "rejected"]
    assert [stage_of(c) for c in ("", "EHLO", "HELO", "RCPT")] == \
        ["connect", "helo", "helo", "rcpt"]


def test_certificate_expiry_agrees_with_openssl(certificate):
    _, cert_path, key_path = certificate
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert_path)],
                         capture_output=True, text=True, check=True).stdout
    # notAfter=Jan  1 00:00:00 3000 GMT
    stamp = datetime.strptime(" ".join(out.strip().split("=", 1)[1].split()),
                              "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)
    info = read_certificate(str(cert_path), str(key_path))
    assert info.not_after.timestamp() == stamp.timestamp()


def test_a_configured_metrics_dir_is_made_and_cleared_of_stale_files_only(tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_4242.db").write_bytes(b"stale")
    (folder / "README").write_text("not ours")
    with metrics_directory(str(folder)) as path:
        assert os.environ[ENVIRONMENT] == path == str(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["README"]
    assert folder.is_dir() and ENVIRONMENT not in os.environ
    with metrics_directory(str(tmp_path / "new" / "deeper")) as path:
        assert os.path.isdir(path)


def test_the_default_metrics_dir_is_a_fresh_one_removed_at_exit():
    with metrics_directory("") as path:
        assert os.listdir(path) == []
    assert not os.path.exists(path)


def test_the_metrics_dir_leaves_the_process_as_it_found_it(monkeypatch):
    """Only the workers forked inside keep the multiprocess values: afterwards a metric made
    in this process needs no folder (it failed with a TypeError once the class stayed)."""
    from prometheus_client import Counter, values

    monkeypatch.setattr(values, "ValueClass", values.MutexValue)  # as a process starts
    before = values.ValueClass
    with metrics_directory("") as path:
        assert getattr(values.ValueClass, "_smtpgate_pid", False)
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == path
    assert values.ValueClass is before
    Counter("smtpgate_test_after_the_folder", "made after the folder is gone", registry=None).inc()


def test_an_unusable_metrics_dir_stops_serve_with_a_clear_message(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"PATH": os.environ["PATH"], "SMTPGATE_METRICS_DIR": str(blocker / "metrics"),
           "SMTPGATE_TLS_OPTIONAL": "yes"}
    done = subprocess.run([sys.executable, "-m", "smtpgate", "serve"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        f"smtpgate: fatal: metrics_dir {blocker / 'metrics'}: Not a directory"), done.stderr


def test_the_cached_pid_is_the_processs_own_after_a_fork():
    from prometheus_client import values

    from smtpgate.service import metrics

    cls = metrics.value_class(values)
    assert cls._smtpgate_pid and cls._multiprocess
    assert metrics._own_pid() == os.getpid()
    child = os.fork()
    if child == 0:  # the child: its own pid, as os.getpid() would say, or exit 1
        os._exit(0 if metrics._own_pid() == os.getpid() != os.getppid() else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert metrics._own_pid() == os.getpid()
