"""metrics - Prometheus figures that add up across the worker processes.

SYNOPSIS
    with metrics_directory(config.metrics_dir, tls=...) as path: ...   serve(), before forking
    worker_gone(pid, path)                                    the master, when a worker dies
    Metrics(path)                                             one per worker (build_gate)
    metrics.notify(event)          a session's event (smtpgate.smtp.events): Refused,
                                   Relayed, Ended and ProtocolTestFailed are
                                   counted
    metrics.session_ended(listener, outcome) ; metrics.rejected(check, stage)
    metrics.protocol_test_failed(test)
    metrics.relayed(result_or_code, seconds=None)
    metrics.refresh(gate, check=False) ; await metrics.run(gate)   the figures kept elsewhere
    metrics.exposition(gate) -> bytes                         /metrics, every worker's sum

DESCRIPTION
    prometheus-client in multiprocess mode: every worker writes its values
    to memory-mapped files in one directory (PROMETHEUS_MULTIPROC_DIR), and
    /metrics, whichever worker the kernel hands the request to, reads them
    all (MultiProcessCollector). Counters add up over the workers, the
    dead ones included, so a killed worker's counts stay and a restarted
    one starts its own file (no count is lost or doubled). Gauges carry
    no pid label: sessions in flight are summed over the live workers
    (livesum), the up-gauges and the certificate expiry take the worst
    live worker (livemin); a dead worker's gauges are dropped by the
    master (worker_gone, prometheus_client's mark_process_dead).

    The directory is the metrics_dir setting, cleared at start, or by
    default a fresh temporary one, removed at exit. The variable must be
    set before prometheus_client is first imported, so this module imports
    it only once the variable is set: metrics_directory() does, in the
    master, before the fork, with cryptography's x509 when TLS is on, so
    the workers share those pages rather than load a copy each (about 9 MB
    a worker).

    Cost on the hot path: one counter increment when a session ends, one
    per policy rejection sent, and a counter and a histogram observation
    per message handed to Postfix; nothing per command. The figures other
    modules already keep (table lookups and round trips, DNSBL answers per
    zone, sessions in flight, Redis and next hop health, the certificate)
    are copied in by refresh(): once a second in every worker (run()), and
    by the answering worker just before it answers /metrics. A worker
    killed with SIGKILL loses at most its last second of those. The
    once-a-second copy only reads: it does not have the next-hop pool
    check its connections (that would hold Postfix processes from the
    start in every worker); the worker answering /metrics does, as
    /healthz does, so a Postfix gone quiet shows at the next scrapes.

    Metrics (all smtpgate_):
      sessions_total{listener,outcome}   at session end; outcome is one of
          refused (at connect), rejected (refused later, nothing queued, then
          quit or left), quit, lost (client left without QUIT),
          timeout, hangup (smtpgate hung up: protocol test, error limit),
          shutdown (closed by the drain), error
      rejections_total{check,stage}      policy refusals sent, by the check
          that decided (Verdict.check; "tempfail" when a lookup failed)
          and the command they answered ("connect" before any)
      protocol_tests_failed_total{test}  pipelining, non_smtp_command,
          bare_newline: once per test and session, whatever the action
      messages_relayed_total{result}     queued, rejected and deferred
          (Postfix's 5xx and 4xx answer), tempfail (Postfix unreachable or
          broken: 451 4.3.0), busy (no free slot: 451 4.3.2)
      relay_seconds                      histogram: from the end of DATA to
          Postfix's answer, for messages Postfix answered
      sessions_in_flight{listener}       livesum
      workers                            live workers (livesum)
      dnsbl_answers_total{zone,kind}     kind: ok listed nxdomain nodata
          tempfail timeout error (smtpgate.lookups.dnsbl)
      dnsbl_zone_up{zone}                0 when the zone's last answer was
          an error or a failure in some worker (livemin)
      table_lookups_total, table_round_trips_total
      greylist_total{result}             greylisting's answers at RCPT: new
          (greylisted, first try), early (retried before the delay, deferred
          again), retried (retried after the delay: passed), passed (the
          network had passed before)
      overrides_in_force{action}         timed overrides (smtpgate allow / deny)
          in force, as the table cache holds them (livemax: every worker
          holds the same ones; 0 while no worker's cache is loaded)
      shadow_disagreements_total{check,direction}   the shadow rules'
          disagreements (smtpgate.policy.shadow): direction refuse, accept
          or reply; no series while shadow rules are off
      redis_up, next_hop_up              livemin; next_hop_up: some hop works
      next_hop_host_up{hop,role}         each next hop, role mx or submission
          (livemin; a hop a reload dropped keeps its last value until the
          workers restart: multiprocess files cannot forget a series)
      tls_certificate_expiry_timestamp_seconds   the certificate's notAfter
          as Unix time (livemin); subtract time() for the seconds left. A
          timestamp rather than a countdown, so two scrapes with nothing
          happening in between are identical.
      tls_dane_state{state}              1 for the state of the certificate
          against the TLSA records (smtpgate.smtp.dane: unknown, no_records,
          match, held, mismatch), 0 for the others (livemax: 1 when some
          worker is in it); all at 0 until the first DANE check. held: a renewed
          certificate matching no TLSA record is held back; mismatch: the
          certificate served matches none, DANE senders cannot deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import shutil
import tempfile
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from smtpgate.lookups.tables import CONNECT_TEMPFAIL, RCPT_TEMPFAIL
from smtpgate.override_record import ACTIONS
from smtpgate.replies import AUTH_FAILED
from smtpgate.service.health import up
from smtpgate.smtp.dane import STATES as DANE_STATES
from smtpgate.smtp.events import Ended, Event, ProtocolTestFailed, Refused, Relayed

log = logging.getLogger("smtpgate.metrics")

ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"
REFRESH_INTERVAL = 1.0
OUTCOMES = ("refused", "rejected", "quit", "lost", "timeout", "hangup", "shutdown", "error")
RELAY_RESULTS = ("queued", "rejected", "deferred", "tempfail", "busy")
GREYLIST_RESULTS = ("new", "early", "retried", "passed")
# a hand-off takes milliseconds; seconds mean Postfix (or its milter) is struggling
RELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# --- the directory, in the master -------------------------------------------------------------


@contextlib.contextmanager
def metrics_directory(configured: str, tls: bool = False) -> Iterator[str]:
    """The workers' shared folder, set in the environment for them; cleared before use.

    A configured folder is created if missing and its stale files removed; the default is a
    fresh temporary folder, removed on the way out. Workers leave with os._exit and never
    run the cleanup. The modules the workers will need are imported here, before the fork.
    """
    created = not configured
    try:
        if created:
            path = tempfile.mkdtemp(prefix="smtpgate-metrics-")
        else:
            path = os.path.abspath(configured)
            os.makedirs(path, exist_ok=True)
            for stale in glob.glob(os.path.join(path, "*.db")):
                os.remove(stale)
    except OSError as exc:
        raise OSError(f"metrics_dir {configured or tempfile.gettempdir()}: "
                      f"{exc.strerror or exc}") from None
    before = os.environ.get(ENVIRONMENT)
    os.environ[ENVIRONMENT] = path
    import prometheus_client.multiprocess  # noqa: F401 - now, in multiprocess mode
    from prometheus_client import values

    value_class_before = values.ValueClass
    if not getattr(values.ValueClass, "_smtpgate_pid", False):
        values.ValueClass = value_class(values)  # before any metric: none is made here

    if tls:
        import cryptography.x509  # noqa: F401 - smtp.certificate's, shared by the workers
    try:
        yield path
    finally:
        # the workers forked inside keep the multiprocess values; this process goes back
        # to what it had, so a metric made here later needs no folder
        values.ValueClass = value_class_before
        if before is None:
            os.environ.pop(ENVIRONMENT, None)
        else:
            os.environ[ENVIRONMENT] = before
        if created:
            shutil.rmtree(path, ignore_errors=True)


def worker_gone(pid: int, path: str) -> None:
    """Drop a dead worker's live gauges; its counters stay in the sums."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, path)


def value_class(values: Any) -> Any:
    """prometheus_client's multiprocess value, told the pid by a cached figure: its own
    os.getpid() is a system call on every increment (glibc caches no pid), four a message.
    The figure is the process's own after a fork (os.register_at_fork), so a worker still
    finds it changed and opens files of its own, as with os.getpid()."""
    cls = values.MultiProcessValue(process_identifier=_own_pid)
    cls._smtpgate_pid = True
    return cls


def _own_pid() -> int:
    return _pid[0]


_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


# --- pure decisions ---------------------------------------------------------------------------


def session_outcome(ended: str, last_command: str, eof: bool, draining: bool,
                    rejected: bool = False) -> str:
    """The outcome label of a session that ended as `ended` says ("closed": no error).
    A client that was refused something, had no message queued and then quit or left is
    "rejected", so that refusals after the banner count in the rejected share too."""
    if ended != "closed":
        return ended
    if last_command == "QUIT":
        return "rejected" if rejected else "quit"
    if draining:
        return "shutdown"
    if eof:
        return "rejected" if rejected else "lost"
    return "hangup"


def rejecting_check(state: Any, reply: Any) -> str | None:
    """The check whose verdict carried this reply (the policy hands the Verdict's own Reply
    object on, also when it answers later, as under smtpd_delay_reject), "tempfail" for a
    lookup that failed, "auth" for a failed AUTH, None for a reply the policy did not give
    (syntax, limits). `state`: the session's ClientState (its record, and its latest
    verdict past the record's cap)."""
    latest = state.latest
    if latest is not None and latest.reply is reply:
        return latest.check
    for verdict in reversed(state.record):
        if verdict.reply is reply:
            return verdict.check
    if reply is CONNECT_TEMPFAIL or reply is RCPT_TEMPFAIL:
        return "tempfail"
    if reply is AUTH_FAILED:  # a password guessed wrong: what a brute-force panel counts
        return "auth"
    return None


def relay_result(code: int) -> str:
    """Postfix's answer to a message as a result label."""
    if code < 400:
        return "queued"
    return "deferred" if code < 500 else "rejected"


def stage_of(last_command: str) -> str:
    if not last_command:
        return "connect"
    return "helo" if last_command == "EHLO" else last_command.lower()


# --- one worker's figures ---------------------------------------------------------------------


class Metrics:
    def __init__(self, path: str | None = None) -> None:
        path = path or os.environ.get(ENVIRONMENT)
        if not path or not os.path.isdir(path):
            raise OSError(f"metrics: no folder for the workers' metric files ({ENVIRONMENT})")
        os.environ[ENVIRONMENT] = path
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
        from prometheus_client.multiprocess import MultiProcessCollector

        if not getattr(values.ValueClass, "_smtpgate_pid", False):
            # imported before the variable was set (in a test process, say): switch now,
            # before the first metric is made
            values.ValueClass = value_class(values)
        self.path = path
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=path)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(f"smtpgate_{name}", doc, labels, registry=None)

        def gauge(name: str, doc: str, mode: str, labels: tuple[str, ...] = ()) -> Any:
            return Gauge(f"smtpgate_{name}", doc, labels, registry=None,
                         multiprocess_mode=mode)

        self.sessions = counter("sessions_total", "Sessions ended, by listener and outcome.",
                                ("listener", "outcome"))
        self.rejections = counter(
            "rejections_total", "Policy refusals sent, by the deciding check and the stage.",
            ("check", "stage"))
        self.protocol_tests_failed = counter(
            "protocol_tests_failed_total", "Deep protocol tests a client failed (once per "
            "test and session), by test.", ("test",))
        self._protocol_tests: dict[str, Any] = {}
        self.relayed_total = counter("messages_relayed_total",
                                     "Messages handed to Postfix, by result.", ("result",))
        self.relay_seconds = Histogram(
            "smtpgate_relay_seconds", "Seconds from the end of DATA to Postfix's answer.",
            buckets=RELAY_BUCKETS, registry=None)
        self.in_flight = gauge("sessions_in_flight", "Sessions in flight.", "livesum",
                               ("listener",))
        self.workers = gauge("workers", "Worker processes running.", "livesum")
        self.dnsbl_answers = counter("dnsbl_answers_total", "DNSBL answers by zone and kind.",
                                     ("zone", "kind"))
        self.dnsbl_up = gauge("dnsbl_zone_up", "Whether the zone's last answer was a "
                              "usable one, in every worker.", "livemin", ("zone",))
        self.table_lookups = counter("table_lookups_total",
                                     "Table lookups (the Redis keys a session asked for).")
        self.table_round_trips = counter("table_round_trips_total",
                                         "Redis round trips made by the tables.")
        self.greylist = counter(
            "greylist_total", "Greylisting's answers at RCPT: new (greylisted), early "
            "(deferred again), retried (passed after the delay), passed (passed before).",
            ("result",))
        for result in GREYLIST_RESULTS:  # at 0 from the start, for rate() and the dashboard
            self.greylist.labels(result)
        self.overrides_in_force = gauge(
            "overrides_in_force", "Timed overrides in force (smtpgate allow / deny), by "
            "action.", "livemax", ("action",))
        for action in ACTIONS:  # every series from the start: scrapes stay alike meanwhile
            self.overrides_in_force.labels(action)
        self.redis_up = gauge("redis_up", "Whether Redis answered the last round trip, "
                              "in every worker.", "livemin")
        self.next_hop_up = gauge("next_hop_up", "Whether some next hop's last connection "
                                 "attempt succeeded, in every worker.", "livemin")
        self.next_hop_host_up = gauge("next_hop_host_up", "Whether each next hop's last "
                                      "connection attempt succeeded, in every worker; role: "
                                      "mx or submission.", "livemin", ("hop", "role"))
        self.records_not_written = counter(
            "session_records_over_budget_total", "Refused sessions' evidence records not "
            "written: session_record_memory was spent.")
        self.handshakes_refused = counter(
            "tls_handshakes_refused_total", "Connections to the submissions port (465) closed "
            "before TLS: too many handshakes in progress from the client or in the worker, "
            "or too many new TLS sessions from the client (limit rate).",
            ("limit",))
        self.spool_refused = counter(
            "spool_budget_refused_total", "Messages refused with 452 4.3.1 after the final dot: "
            "they outgrew what was left of the worker's spool_budget.")
        self.shadow_disagreements = counter(
            "shadow_disagreements_total", "Checks the shadow rules (SMTPGATE_SHADOW_CONFIG) "
            "would have decided otherwise, by check and direction: refuse (the candidate "
            "would refuse), accept (it would accept), reply (refuse with another reply).",
            ("check", "direction"))
        self._gauge = gauge
        self.tls_expiry: Any = None  # made when a certificate is first seen: no 0 before
        self._session_outcomes: dict[tuple[str, str], Any] = {}  # made at the first refresh
        self._relay_results = {r: self.relayed_total.labels(r) for r in RELAY_RESULTS}
        self._rejection_counters: dict[tuple[str, str], Any] = {}
        self._seen: dict[Any, int] = {}  # what refresh() last copied, per source figure
        self._querier: Any = None
        self._certificate: Any = None  # the CertificateInfo last shown
        self.dane_state: Any = None  # made at the first DANE check
        self._dane: Any = None  # the Choice last shown
        self.workers.set(1)

    # --- the hot path: a dict lookup and an increment ---------------------------------------

    def notify(self, event: Event) -> None:
        """The sessions' events (smtpgate.smtp.events) this worker counts."""
        if isinstance(event, Refused):
            if event.reply is not None and event.state is not None:
                self.rejected(rejecting_check(event.state, event.reply),
                              stage_of(event.command))
        elif isinstance(event, Relayed):
            self.relayed(event.result, event.seconds)
        elif isinstance(event, Ended):
            self.session_ended(event.listener, session_outcome(
                event.how, event.last_command, event.eof, event.draining, event.rejected))
        elif isinstance(event, ProtocolTestFailed):
            self.protocol_test_failed(event.test)

    def session_ended(self, listener: str, outcome: str) -> None:
        key = (listener, outcome)
        counter = self._session_outcomes.get(key)
        if counter is None:
            counter = self._session_outcomes[key] = self.sessions.labels(*key)
        counter.inc()

    def protocol_test_failed(self, test: str) -> None:
        counter = self._protocol_tests.get(test)
        if counter is None:
            counter = self._protocol_tests[test] = self.protocol_tests_failed.labels(test)
        counter.inc()

    def rejected(self, check: str | None, stage: str) -> None:
        if check is None:
            return
        key = (check, stage)
        counter = self._rejection_counters.get(key)
        if counter is None:
            counter = self._rejection_counters[key] = self.rejections.labels(*key)
        counter.inc()

    def relayed(self, result: int | str, seconds: float | None = None) -> None:
        """A message's end: Postfix's reply code, or "tempfail" / "busy"."""
        label = result if isinstance(result, str) else relay_result(result)
        self._relay_results[label].inc()
        if seconds is not None:
            self.relay_seconds.observe(seconds)

    # --- the figures kept elsewhere -----------------------------------------------------------

    def refresh(self, gate: Any, check: bool = False) -> None:
        """Copy in what the tables, the DNSBL querier and the gate count themselves; check:
        have the next-hop pool look at its connections first (health.up)."""
        policy = gate.policy
        stats = policy.tables.stats
        self._copy(self.table_lookups, "lookups", stats.lookups)
        self._copy(self.table_round_trips, "round_trips", stats.round_trips)
        for result, count in policy.greylist_counts.items():
            self._copy(self.greylist.labels(result), f"greylist {result}", count)
        overrides = policy.tables.overrides_in_force(time.time())
        for action, count in (overrides or {}).items():
            self.overrides_in_force.labels(action).set(count)
        self._copy(self.records_not_written, "records_over_budget", policy.evidence.over_budget)
        self._copy(self.spool_refused, "spool_refused", gate.spool_budget.refused)
        for limit, refused in gate.handshakes.refused.items():
            self._copy(self.handshakes_refused.labels(limit), ("handshakes", limit), refused)
        shadow = policy.shadow
        if shadow is not None:
            for (check, direction), count in shadow.counts.items():
                self._copy(self.shadow_disagreements.labels(check, direction),
                           f"shadow {check} {direction}", count)
        querier = policy.querier
        if querier is not self._querier:  # a reload made a new one, counting from 0
            self._querier = querier
            self._seen = {k: v for k, v in self._seen.items() if not isinstance(k, tuple)}
        unhealthy = querier.unhealthy
        for zone, counts in querier.health().items():
            for kind, value in counts.items():
                self._copy(self.dnsbl_answers.labels(zone, kind), (zone, kind), value)
            self.dnsbl_up.labels(zone).set(0 if zone in unhealthy else 1)
        counts = Tally(session.listener for session in gate.sessions)
        config = gate.config
        for listener, addresses in (("mx", config.mx_listen),
                                    ("submission", config.submission_listen),
                                    ("submissions", config.submissions_listen)):
            if addresses or counts[listener]:
                self.in_flight.labels(listener).set(counts[listener])
                if (listener, "quit") not in self._session_outcomes:
                    # every outcome of a listener shown from the start, at 0: a rate()
                    # over a series that is not there yet is no series at all
                    for outcome in OUTCOMES:
                        self._session_outcomes[listener, outcome] = \
                            self.sessions.labels(listener, outcome)
        redis_ok, hop_ok, hops, submission = up(gate, check)
        self.redis_up.set(int(redis_ok))
        self.next_hop_up.set(int(hop_ok is not False))
        for role, group in (("mx", hops), ("submission", submission)):
            for hop in group:
                self.next_hop_host_up.labels(str(hop.address), role).set(int(hop.ok is not False))
        self._refresh_certificate(gate.tls)
        self._refresh_dane(gate.tls, gate.config.dane_check)

    def _copy(self, counter: Any, key: Any, value: int) -> None:
        """Add what a running total grew by since the last copy."""
        last = self._seen.get(key, 0)
        if value != last:
            counter.inc(value - last if value > last else value)  # smaller: counting anew
            self._seen[key] = value

    def _refresh_certificate(self, tls: Any) -> None:
        """The certificate in use (smtpgate.smtp.tls reads a renewed one by itself)."""
        info = None if tls is None else tls.info
        if info is None or info is self._certificate:
            return
        if self.tls_expiry is None:
            self.tls_expiry = self._gauge(
                "tls_certificate_expiry_timestamp_seconds",
                "When the TLS certificate expires (notAfter), Unix time; the soonest over "
                "the workers.", "livemin")
        self.tls_expiry.set(info.not_after.timestamp())
        self._certificate = info

    def _refresh_dane(self, tls: Any, checking: bool) -> None:
        """The last DANE decision (smtpgate.service.dane_watch), one series per state."""
        choice = None if tls is None else tls.dane
        if self.dane_state is None and tls is not None and (checking or choice is not None):
            # every series from the worker's first refresh, at 0 until a decision: a family
            # that appeared later in one worker's file than another's would reorder scrapes
            self.dane_state = self._gauge(
                "tls_dane_state", "The certificate against the TLSA records of "
                "_25._tcp.HOSTNAME: 1 for the current state (held: a renewed certificate "
                "matching no record is held back; mismatch: DANE senders cannot deliver).",
                "livemax", ("state",))
            for state in DANE_STATES:
                self.dane_state.labels(state)
        if choice is None or choice is self._dane:
            return
        for state in DANE_STATES:
            self.dane_state.labels(state).set(int(state == choice.state))
        self._dane = choice

    async def run(self, gate: Any, interval: float = REFRESH_INTERVAL) -> None:
        """refresh() every interval seconds until cancelled, so the other workers' figures
        are at most that old when one of them answers /metrics."""
        while True:
            try:
                self.refresh(gate)
            except Exception:  # a figure missing must not stop the worker
                log.exception("error: metrics: refresh failed")
            await asyncio.sleep(interval)

    def exposition(self, gate: Any) -> bytes:
        """The Prometheus text of every worker's figures together."""
        from prometheus_client import generate_latest

        self.refresh(gate, check=True)
        return generate_latest(self.registry)
