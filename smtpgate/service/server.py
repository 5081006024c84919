"""server - the listeners, the worker processes, and the shutdown and reload phases.

SYNOPSIS
    await build_gate(config, auth_probe=None) -> Gate   the runtime state every session
                                                 shares (smtpgate.smtp.gate.Gate)
    await start_listeners(gate) -> list[asyncio.Server]
    serve(config) -> int                        run until SIGTERM; the `serve` command
                                                (first smtpgate.service.preflight)
    reload(gate) -> bool                        SIGHUP
    hand_off_wait(config, elapsed) -> float     the drain's wait for hand-offs under way

DESCRIPTION
    One process per worker (SMTPGATE_WORKERS, default one per CPU); every
    worker binds the same ports with SO_REUSEPORT and the kernel spreads
    connections between them. The parent only supervises: it forwards
    SIGTERM and SIGHUP to the workers and restarts one that died. Before
    the first fork it makes the folder the workers' metrics share
    (smtpgate.service.metrics), and it drops a dead worker's live gauges.

    SIGTERM: stop accepting, let sessions in flight finish for up to
    drain_grace seconds (a DATA command that comes meanwhile gets 421),
    then tell the rest 421 and close; a session whose message's final dot
    has come finishes its hand-off first: up to next_hop_data_done_timeout
    more, within stop_grace (the service manager's stop timeout, which
    deploy/, conf/ and compose.yaml give as the default) less STOP_MARGIN
    (hand_off_wait). SIGHUP: read the configuration (SMTPGATE_CONFIG) and
    the certificate again; new sessions get them, running ones keep theirs
    (see reload()).

    Before the workers start, the master looks at the certificate and the
    next hops once (smtpgate.service.preflight): a next hop that refuses
    XCLIENT stops the start; one not reached yet is probed again by each
    worker. Each worker offers its clients only the extensions the next
    hops carry. With submission on, the master also asks Dovecot whether
    it accepts a made-up login, and does not start if it does
    (preflight.auth_preflight); the workers keep what it found.

    "smtpgate: ready" is written to stderr once every listener is bound,
    for scripts and tests that wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
import time
from typing import Any

from smtpgate.config import Config, ConfigError
from smtpgate.config import load as load_config
from smtpgate.lookups.auth_probe import AuthProbe
from smtpgate.relay.hop_timeouts import HopTimeouts
from smtpgate.relay.hops import Hops
from smtpgate.relay.pool import TransactionLimit
from smtpgate.relay.probe import HopProbe
from smtpgate.service.dane_watch import DaneWatch
from smtpgate.service.health import start_health
from smtpgate.service.metrics import Metrics, metrics_directory, worker_gone
from smtpgate.service.preflight import (
    PreflightError,
    auth_preflight,
    carry,
    listener_hops,
    mark_reached,
    preflight,
    start_learning,
    stop_learning,
)
from smtpgate.service.socketmap import start_socketmap
from smtpgate.smtp.gate import Gate
from smtpgate.smtp.handshake_limit import HandshakeLimit
from smtpgate.smtp.implicit_tls import implicit_tls_factory
from smtpgate.smtp.session import MX, SUBMISSION, SUBMISSIONS, protocol_factory
from smtpgate.smtp.spool_budget import SpoolBudget
from smtpgate.smtp.tls import TlsError, load_tls

log = logging.getLogger("smtpgate.master")


async def build_gate(config: Config, auth_probe: AuthProbe | None = None) -> Gate:
    from smtpgate.policy.stages import Policy

    tls = load_tls(config)
    auth = None
    if config.submission_listen or config.submissions_listen:
        from smtpgate.lookups.dovecot_auth import DovecotAuth

        auth = DovecotAuth(config.dovecot, config.dovecot_auth_port, config.dns_timeout * 2)
    policy = await Policy.create(config, auth, auth_probe=auth_probe)
    hops, submission_hops = next_hops(config)
    return Gate(config=config, tls=tls, policy=policy, auth=auth, hops=hops,
                submission_hops=submission_hops, relay_limit=relay_limit(config), metrics=Metrics(),
                spool_budget=SpoolBudget(config.spool_budget),
                handshakes=HandshakeLimit(config.submissions_client_handshake_limit,
                                          config.submissions_handshake_limit))


def next_hops(config: Config) -> tuple[Hops, Hops | None]:
    """The MX next hops (pooled, when there is an MX listener) and the submission ones
    (None without a submission listener)."""
    pool_size = config.next_hop_pool if config.mx_listen else 0
    timeouts = HopTimeouts.from_config(config)
    hops = Hops(config.next_hop, timeouts, config.hostname, pool_size,
                config.next_hop_retry)
    submission = None
    if config.submission_listen or config.submissions_listen:
        submission = Hops(config.submission_hops, timeouts, config.hostname,
                          0, config.next_hop_retry)
    return hops, submission


def relay_limit(config: Config) -> TransactionLimit:
    """This worker's share of next_hop_transaction_limit."""
    workers = config.workers or os.cpu_count() or 1
    share = max(1, config.next_hop_transaction_limit // workers)
    return TransactionLimit(share, config.next_hop_busy_wait)


async def start_listeners(gate: Gate) -> list[asyncio.Server]:
    """Every listener of the configuration, or none: a port that cannot be bound is fatal."""
    config = gate.config
    if config.submissions_listen and gate.tls is None:
        raise OSError("SMTPGATE_SUBMISSIONS_LISTEN needs a TLS certificate")
    plan = [(kind, address, _smtp_starter(gate, kind))
            for kind, addresses in ((MX, config.mx_listen), (SUBMISSION, config.submission_listen),
                                    (SUBMISSIONS, config.submissions_listen))
            for address in addresses]
    plan += [("/healthz, /metrics", a, lambda h, p: start_health(gate, h, p))
             for a in config.metrics_listen]
    plan += [("socketmap", a, lambda h, p: start_socketmap(gate.policy.tables, h, p))
             for a in config.socketmap_listen]
    servers: list[asyncio.Server] = []
    for label, address, start in plan:
        try:
            servers.append(await start(address.host, address.port))
        except OSError as exc:
            for started in servers:
                started.close()
            reason = exc.strerror or exc
            raise OSError(f"cannot listen on {address} ({label}): {reason}") from None
        log.info("listening on %s (%s)", address, label)
    return servers


GC_YOUNG = 10_000  # new objects between two young collections (CPython's default: 700)


def _smtp_starter(gate: Gate, kind: str):
    def start(host: str, port: int):
        # 465 reads a PROXY header before its TLS handshake, so TLS is not the listener's
        factory = (implicit_tls_factory(gate) if kind == SUBMISSIONS
                   else protocol_factory(gate, kind))
        return asyncio.get_running_loop().create_server(
            factory, host, port, reuse_port=True, backlog=1024)

    return start


async def run_worker(config: Config, probes: dict[Any, HopProbe] | None = None,
                     auth_probe: AuthProbe | None = None) -> int:
    gate = await build_gate(config, auth_probe)
    if probes is not None:  # what the master's preflight learned of the next hops
        carry(gate, probes)
        mark_reached(gate, probes)
    try:
        servers = await start_listeners(gate)
    except OSError:
        await gate.policy.close()  # its Redis tasks would keep the loop from ending
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    dane = DaneWatch(gate)
    loop.add_signal_handler(signal.SIGHUP, _reload_and_poke, gate, dane)
    refresher = loop.create_task(gate.metrics.run(gate))
    watcher = loop.create_task(dane.run())
    if probes is not None:
        start_learning(gate, probes)
    # what start-up built (modules, configuration, tables) lives as long as the worker: out
    # of the collector's sight, a full collection walks only what sessions and caches made
    gc.freeze()
    # a session's objects are freed by their reference counts when it ends (it makes no
    # cycle): collected less often, most are gone before the collector would walk them
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
    print("smtpgate: ready", file=sys.stderr, flush=True)
    await stop.wait()
    stop_learning(gate)
    gate.draining = True
    for server in servers:
        server.close()
    log.info("stopping: %d sessions in flight", len(gate.sessions))
    await _drain(gate)
    refresher.cancel()
    watcher.cancel()
    gate.metrics.refresh(gate)  # the last second's figures, kept in the sums after exit
    gate.hops.close()
    await gate.policy.close()
    return 0


# Settings bound to sockets, processes or the Redis connections: read once, at start.
RESTART_ONLY = ("redis", "redis_timeout", "mx_listen", "submission_listen", "submissions_listen",
                "metrics_listen", "metrics_dir", "socketmap_listen", "workers", "ipv6_prefix",
                "log_format")


def _reload_and_poke(gate: Gate, dane: DaneWatch) -> None:
    reload(gate)
    dane.poke()  # the TLSA records again, and a certificate the reload found renewed


def reload(gate: Gate) -> bool:
    """SIGHUP: the configuration and certificate again, for new sessions; none is dropped.

    A bad configuration is logged and the running one kept. Settings in RESTART_ONLY keep
    their running values, with a warning naming each one that changed.
    """
    try:
        config = load_config()
    except ConfigError as exc:
        log.error("error: reload: %s; keeping the running configuration", exc)
        return False
    running = gate.config
    for name in RESTART_ONLY:
        if getattr(config, name) != getattr(running, name):
            log.warning("warning: reload: %s changed; that takes a restart", name)
    shadow = config.shadow
    config = dataclasses.replace(config, **{n: getattr(running, n) for n in RESTART_ONLY})
    object.__setattr__(config, "_shadow_config", shadow)  # replace() leaves it behind
    try:
        tls = load_tls(config)
    except TlsError as exc:
        log.error("error: reload: %s; keeping the running configuration", exc)
        return False
    if gate.tls is not None and tls is not None and tls.cert_path == gate.tls.cert_path:
        gate.tls.reload_if_changed()
        tls = gate.tls
    gate.policy.reconfigure(config)
    gate.spool_budget.limit = config.spool_budget  # spools in flight keep what they took
    gate.handshakes.per_client = config.submissions_client_handshake_limit
    gate.handshakes.per_worker = config.submissions_handshake_limit
    if (config.next_hop_transaction_limit, config.next_hop_busy_wait) != (
            running.next_hop_transaction_limit, running.next_hop_busy_wait):
        gate.relay_limit = relay_limit(config)  # slots in use are returned to the old one
    hop_settings = ("next_hop", "submission_next_hop", "next_hop_pool", "next_hop_timeout",
                    "next_hop_connect_timeout", "next_hop_data_done_timeout",
                    "next_hop_total_timeout", "next_hop_retry", "hostname")
    if any(getattr(config, n) != getattr(running, n) for n in hop_settings):
        gate.hops.close()  # sessions relaying through the old ones finish with them
        gate.hops, gate.submission_hops = next_hops(config)
    gate.config, gate.tls = config, tls
    if (config.next_hop, config.submission_next_hop) != (running.next_hop,
                                                         running.submission_next_hop):
        for kind in listener_hops(config):
            gate.carry(kind, None)  # not known until the new hops are probed
        start_learning(gate, {}, wait_first=False)
    log.info("reloaded configuration")
    return True


STOP_MARGIN = 2.0  # of stop_grace, kept for what follows the drain: closing Redis, the hops


def hand_off_wait(config: Config, elapsed: float) -> float:
    """How long the drain waits, once the 421s are written, for the hand-offs under way: up
    to the next hop's final-reply limit (Postfix may be queueing the message), within what
    the stop grace leaves after `elapsed` seconds of draining."""
    left = config.stop_grace - elapsed - STOP_MARGIN
    return max(0.0, min(config.next_hop_data_done_timeout, left))


async def _drain(gate: Gate) -> None:
    """Let sessions finish for drain_grace seconds, then tell the rest 421 and hang up;
    the sessions whose final dot has come finish their hand-off first (hand_off_wait)."""
    loop = asyncio.get_running_loop()
    started, grace = loop.time(), gate.config.drain_grace
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            while gate.sessions:
                await asyncio.sleep(0.1)
    if not gate.sessions:
        return
    log.info("stopping: closing %d sessions after %.0f s", len(gate.sessions), grace)
    for session in list(gate.sessions):
        session.shut_down()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(hand_off_wait(gate.config, loop.time() - started)):
            while gate.sessions:
                await asyncio.sleep(0.05)
    if gate.sessions:
        log.warning("warning: stopping: %d hand-offs cut at the end of stop_grace",
                    len(gate.sessions))


def serve(config: Config) -> int:
    try:
        probes = preflight(config)
        auth_probe = auth_preflight(config)
    except PreflightError:
        return 1  # logged, with the setting to change
    workers = config.workers or os.cpu_count() or 1
    with metrics_directory(config.metrics_dir, tls=config.tls_paths is not None) as path:
        if workers == 1:
            return _run_loop(config, probes, auth_probe)
        return _supervise(config, workers, path, probes, auth_probe)


def _run_loop(config: Config, probes: dict[Any, HopProbe] | None = None,
              auth_probe: AuthProbe | None = None) -> int:
    worker = run_worker(config, probes, auth_probe)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.run(worker)
    if os.environ.get("SMTPGATE_UVLOOP", "yes").lower() in ("no", "0", "off"):
        return asyncio.run(worker)
    return uvloop.run(worker)


def _supervise(config: Config, workers: int, metrics_path: str,
               probes: dict[Any, HopProbe] | None = None,
               auth_probe: AuthProbe | None = None) -> int:
    children: set[int] = set()
    stopping = False

    started: dict[int, float] = {}

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_loop(config, probes, auth_probe)
            except Exception as exc:
                print(f"smtpgate: fatal: {exc}", file=sys.stderr, flush=True)
            finally:
                logging.shutdown()  # batched log lines, before _exit skips every flush
                os._exit(code)
        children.add(pid)
        started[pid] = time.monotonic()

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for _ in range(workers):
        spawn()
    status = 0
    failed_at_start = False
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        worker_gone(pid, metrics_path)
        if code and not stopping and time.monotonic() - started.pop(pid, 0) < 5:
            log.error("fatal: worker %d failed at start (status %d)", pid, code)
            forward(signal.SIGTERM, None)
            failed_at_start = True  # forward() set stopping: this is no requested stop
        elif code and not stopping:
            log.warning("warning: worker %d exited with status %d; restarting", pid, code)
            status = 1
            spawn()
    return 1 if failed_at_start else 0 if stopping else status
