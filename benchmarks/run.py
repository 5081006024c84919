"""run - the benchmark harness: start the stack, run the cases, write the figures.

SYNOPSIS
    python -m benchmarks.run [--smoke] [--out DIR]
        [--cases chain,unknown,screening,idle,starttls,big,slow,new,returning,mix,listed,
                 micro]
        [--concurrency 1,10,50] [--messages N] [--latency-sessions N] [--size BYTES]
        [--workers N] [--uvloop on|off] [--aiosmtpd on|off] [--idle N] [--screen-concurrency N]
        [--screen-duration S] [--tls-sessions N] [--greet-wait S]
        [--big-size BYTES] [--big-messages N] [--big-concurrency N]
        [--slow-senders N] [--slow-duration S] [--slow-interval S] [--normal-interval S]
        [--slow-process-limit N] [--mx-concurrency N] [--returning-concurrency N]
        [--mx-window S] [--mix-shares KIND=PCT,...] [--dns-ttl S] [--keep]
    main(argv=None) -> int

DESCRIPTION
    Starts redis-server, dnsmasq, a private Postfix (real queue, discard
    transport; services "direct" smtpd, "postscreen" -> smtpd, and the
    XCLIENT next hop), `smtpgate serve` and the aiosmtpd front end
    (benchmarks.aiosmtpd_front, same environment, same next hop) in front of
    that next hop (benchmarks.stack), warms the screening caches, runs the
    cases in one process on the same machine, and writes bench.json,
    bench.md and bench.png into --out (default benchmarks/results/).

    Case 1 ("chain") is the best case: one client address, every DNS answer
    cached. Targets: "smtpgate" (smtpgate -> Postfix), "aiosmtpd-front" (aiosmtpd
    hooks asking smtpgate's policy, aiosmtplib -> Postfix: the design as
    first sketched), "postscreen" (postscreen -> smtpd, the image's
    settings) and "smtpd" (smtpd directly, same restrictions). The report
    gives, per case, smtpgate's figure over the aiosmtpd front end's, and
    which Python and event loop ran each Python front end. Cases:
      chain      smtp-source at each concurrency (throughput, CPU/msg, Pss,
                 Redis commands/msg), then the Python client at the same
                 concurrency (p50/p99 session latency);
      screening  connections/s rejected by the access list (127.0.2.x) and by
                 a DNSBL listing (127.0.1.x, listed in both zones); a client
                 that gets a 220 says EHLO and counts the reply to it (the
                 aiosmtpd front end can only refuse at the first command);
      idle       N silent connections, memory per connection, and the
                 latency a normal client sees while they are held (at once,
                 in the greet wait; and after the greet wait has ended);
      starttls   Python client sessions with STARTTLS;
      big        smtp-source with --big-size (1 MiB) messages: CPU ms per MiB
                 of DATA of each front end and of Postfix;
      slow       --slow-senders clients (from 127.0.4.x, known to DNS) pass
                 RCPT and trickle DATA one byte every --slow-interval s; all
                 are aborted --slow-duration s after the start. Meanwhile a
                 normal client starts a session every --normal-interval s;
                 its end-to-end session times, and the Postfix smtpd
                 processes (children of the instance's master, busy = with
                 an ESTABLISHED socket) sampled every 0.5 s. Postfix runs
                 with default_process_limit = --slow-process-limit (100,
                 Postfix's default) for this case only (postconf -e and
                 postfix reload, restored after);
      new, returning, mix, listed
                 MX traffic: every session from an address of its own (first
                 contacts; the same clients again; a mix of DNSBL and access
                 list refusals, unknown recipients and accepted clients;
                 DNSBL-listed first contacts only),
                 smtpgate against postscreen -> smtpd only, CPU per session
                 of each chain's parts (benchmarks.mx_cases);
      micro      pytest-benchmark over benchmarks/micro (pure functions).

    Deliveries are counted per message: the messages of each case, target
    and point carry their own marker in the Message-ID (marker(); a new
    run id each run), and "delivered" is the number of those Postfix's
    discard transport took (benchmarks.stack.DeliveryLog), "queued" the
    number of queue files made for them. A delivery of another case that
    lands meanwhile is not counted; it is listed under
    "other_deliveries_meanwhile" (the chain case).

    Every wait and loop is bounded; a case that fails records "error" and
    the run goes on. Exit status 0 when every case ran, 1 otherwise, 2 for a
    bad argument. --smoke runs everything at tiny sizes (CI).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import platform
import resource
import shlex
import ssl
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

from benchmarks import load, mx_cases, mx_plan, procstat, report
from benchmarks.meter import (
    PY_FRONTS,
    TARGETS,
    Meter,
    available_targets,
    front_of,
    marker,
    others_meanwhile,
    port_of,
)
from benchmarks.stack import Settings, Stack, StackError

HERE = Path(__file__).resolve().parent
CASES = ("chain", "unknown", "screening", "idle", "starttls", "big", "slow", "new", "returning",
         "mix", "listed", "micro")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def int_list(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
        if not values or any(v < 1 or v > 1000 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: each value must be 1..1000")
        return values

    def bounded(low: float, high: float, kind=int):
        def parse(text: str):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
            if not low <= value <= high:
                raise argparse.ArgumentTypeError(f"{value} is not in {low:g}..{high:g}")
            return value
        return parse

    def shares(text: str) -> dict[str, int]:
        try:
            return mx_plan.parse_shares(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def case_list(text: str) -> list[str]:
        names = [c.strip() for c in text.split(",") if c.strip()]
        bad = [c for c in names if c not in CASES]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown case {bad}; choose from {', '.join(CASES)}")
        return names

    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--cases", type=case_list, default=list(CASES))
    p.add_argument("--concurrency", type=int_list, default=[1, 10, 40])
    p.add_argument("--messages", type=bounded(1, 100000), default=1000,
                   help="smtp-source messages per point")
    p.add_argument("--latency-sessions", type=bounded(1, 100000), default=300)
    p.add_argument("--size", type=bounded(100, 10_000_000), default=2048,
                   help="message size in bytes")
    p.add_argument("--workers", type=bounded(1, 64), default=os.cpu_count() or 1,
                   help="smtpgate worker processes (SO_REUSEPORT); default one per CPU")
    p.add_argument("--uvloop", choices=("on", "off"), default="on",
                   help="event loop of smtpgate and of the aiosmtpd front end")
    p.add_argument("--aiosmtpd", choices=("on", "off"), default="on",
                   help="measure the aiosmtpd front end too")
    p.add_argument("--idle", type=bounded(1, 18000), default=10000,
                   help="idle connections held (case 3)")
    p.add_argument("--unknown-sessions", type=bounded(1, 100000), default=3000,
                   help="sessions refused at RCPT (unknown recipient case)")
    p.add_argument("--unknown-concurrency", type=bounded(1, 500), default=20)
    p.add_argument("--idle-tls", type=bounded(0, 5000), default=1000,
                   help="idle STARTTLS sessions held for their memory (case 4; 0: none)")
    p.add_argument("--screen-concurrency", type=bounded(1, 1000), default=50)
    p.add_argument("--screen-duration", type=bounded(0.5, 120, float), default=4.0)
    p.add_argument("--tls-sessions", type=bounded(1, 100000), default=300)
    p.add_argument("--tls-concurrency", type=bounded(1, 1000), default=10)
    p.add_argument("--session-timeout", type=bounded(1, 600, float), default=30.0,
                   help="time limit for one Python client session")
    p.add_argument("--greet-wait", type=bounded(0, 60, float), default=6.0)
    p.add_argument("--big-size", type=bounded(1000, 20_000_000), default=1 << 20,
                   help="message size of the big case (bytes)")
    p.add_argument("--big-messages", type=bounded(1, 10000), default=20)
    p.add_argument("--big-concurrency", type=bounded(1, 100), default=2)
    p.add_argument("--slow-senders", type=bounded(1, 1000), default=150)
    p.add_argument("--slow-duration", type=bounded(1, 120, float), default=20.0,
                   help="slow senders are stopped this long after they start")
    p.add_argument("--slow-interval", type=bounded(0.05, 30, float), default=2.0,
                   help="seconds between two bytes of a slow sender's DATA")
    p.add_argument("--normal-interval", type=bounded(0.05, 30, float), default=1.0,
                   help="seconds between two sessions of the normal client (slow case)")
    p.add_argument("--slow-process-limit", type=bounded(1, 1000), default=100,
                   help="Postfix default_process_limit during the slow case")
    p.add_argument("--mx-concurrency", type=bounded(1, 5000), default=1500,
                   help="clients in flight in the new and mix cases (each first contact "
                        "waits the greet wait)")
    p.add_argument("--returning-concurrency", type=bounded(1, 1000), default=40)
    p.add_argument("--mx-window", type=bounded(0.5, 300, float), default=15.0,
                   help="seconds measured in each MX case and target, after the ramp")
    p.add_argument("--mix-shares", type=shares, default=mx_plan.parse_shares(
        mx_plan.DEFAULT_SHARES), help=f"kinds of client in the mix case, in percent "
                                     f"(default {mx_plan.DEFAULT_SHARES})")
    p.add_argument("--dns-ttl", type=bounded(0, 86400), default=300,
                   help="TTL of the DNS answers (the one-address case's names keep 3600)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = p.parse_args(argv)
    args.run_id = uuid.uuid4().hex[:12]
    if args.smoke:
        args.concurrency = [2]
        args.messages, args.latency_sessions, args.size = 20, 10, 1024
        args.idle, args.screen_concurrency, args.screen_duration = 20, 4, 1.0
        args.idle_tls = 10
        args.unknown_sessions = 300  # enough CPU ticks (10 ms each) to be counted
        args.tls_sessions, args.tls_concurrency, args.greet_wait = 5, 2, 1.0
        args.session_timeout = 5.0
        args.big_size, args.big_messages, args.big_concurrency = 256 * 1024, 3, 1
        args.slow_senders, args.slow_duration, args.slow_interval = 6, 3.0, 0.5
        args.normal_interval = 0.5
        args.mx_concurrency, args.returning_concurrency, args.mx_window = 40, 4, 2.0
    return args


# --- the cases -----------------------------------------------------------------------------------


async def warm_up(stack: Stack, args) -> dict:
    """One session per target from the benchmark client, waiting out the greet wait.

    Its messages are waited for too: none is still in the queue when the cases begin."""
    out = {}
    targets = available_targets(stack)
    runs = await asyncio.gather(*(
        load.run_sessions(port_of(stack, t), sessions=1, concurrency=1,
                          body=load.make_body(args.size, stack.world, marker(args, "warmup", t)),
                          world=stack.world, timeout=args.greet_wait + 15,
                          budget=args.greet_wait + 15)
        for t in targets))
    for t, r in zip(targets, runs, strict=True):
        out[t] = r.summary()
        out[t]["delivered"] = await Meter(stack, t).wait_delivered(
            marker(args, "warmup", t), r.queued, 20)
    return out


async def case_chain(stack: Stack, args) -> list[dict]:
    rows = []
    pf = stack.postfix
    for concurrency in args.concurrency:
        for target in available_targets(stack):
            meter = Meter(stack, target)
            port = port_of(stack, target)
            source_mark = marker(args, "chain", target, f"c{concurrency}", "source")
            latency_mark = marker(args, "chain", target, f"c{concurrency}", "latency")
            before = meter.snapshot()
            async with meter.sampler() as peak:
                src = await load.smtp_source(
                    port, concurrency=concurrency, messages=args.messages, size=args.size,
                    world=stack.world, timeout=max(30, args.messages / 20), marker=source_mark)
                delivered = await meter.wait_delivered(source_mark, args.messages, 30)
            after = meter.snapshot()
            msgs = args.messages
            row = {
                "target": target, "concurrency": concurrency, "messages": msgs,
                "size": args.size,
                "elapsed_s": src.elapsed,
                "messages_per_s": msgs / src.elapsed if src.ok else None,
                "sessions_per_s": msgs / src.elapsed if src.ok else None,
                "smtp_source_ok": src.ok,
                "smtp_source_stderr": src.stderr,
                "marker": source_mark,
                "delivered": delivered,
                "queued": pf.queued(source_mark),
                "other_deliveries_meanwhile": others_meanwhile(before, after, source_mark),
                "front_cpu_ms_per_msg": (after["front_cpu"] - before["front_cpu"]) * 1000 / msgs
                if target in PY_FRONTS else None,
                "postfix_cpu_ms_per_msg": (after["postfix_cpu"] - before["postfix_cpu"])
                * 1000 / msgs,
                "front_peak_pss_kb": peak.peak_pss_kb if target in PY_FRONTS else None,
                "postfix_peak_pss_kb": None if target in PY_FRONTS else peak.peak_pss_kb,
                "redis_commands_per_msg": (after["redis"] - before["redis"]) / msgs
                if target in PY_FRONTS else None,
            }
            if target in PY_FRONTS:
                row["redis_by_command_per_msg"] = {
                    k: round((v - before["redis_by_command"].get(k, 0)) / msgs, 2)
                    for k, v in after["redis_by_command"].items()
                    if k != "info" and v != before["redis_by_command"].get(k, 0)}
            row["chain_cpu_ms_per_msg"] = (row["front_cpu_ms_per_msg"] or 0.0) \
                + row["postfix_cpu_ms_per_msg"]
            # Redis serves only the Python front ends here (Postfix reads files)
            row["redis_cpu_ms_per_msg"] = (after["redis_cpu"] - before["redis_cpu"]) * 1000 \
                / msgs if target in PY_FRONTS else None
            row["dns_cpu_ms_per_msg"] = (after["dns_cpu"] - before["dns_cpu"]) * 1000 / msgs
            row["total_cpu_ms_per_msg"] = row["chain_cpu_ms_per_msg"] \
                + (row["redis_cpu_ms_per_msg"] or 0.0) + row["dns_cpu_ms_per_msg"]
            lat = await load.run_sessions(
                port, sessions=args.latency_sessions, concurrency=concurrency,
                body=load.make_body(args.size, stack.world, latency_mark),
                world=stack.world, timeout=args.session_timeout,
                budget=max(10, args.latency_sessions / 20))
            row["latency"] = lat.summary()
            row["latency_marker"] = latency_mark
            row["latency_delivered"] = await meter.wait_delivered(latency_mark, lat.queued, 20)
            rows.append(row)
            print(f"  chain {target:14} c={concurrency:<4} {_fmt(row['messages_per_s'])} msg/s "
                  f"p50 {_fmt(row['latency']['p50_ms'])} ms p99 "
                  f"{_fmt(row['latency']['p99_ms'])} ms", flush=True)
            if not src.ok:
                print(f"    smtp-source failed: {src.stderr.strip()[-300:]}", flush=True)
    for row in rows:  # counted again at the end: a late second copy of a message shows too
        row["delivered"], row["queued"] = pf.delivered(row["marker"]), pf.queued(row["marker"])
        row["latency_delivered"] = pf.delivered(row["latency_marker"])
        row["latency_queued"] = pf.queued(row["latency_marker"])
        # a message lost or delivered twice is an error either way
        row["errors"] = (0 if row["smtp_source_ok"] else 1) + row["latency"]["errors"] \
            + abs(row["messages"] - row["delivered"]) \
            + abs(row["latency"]["queued"] - row["latency_delivered"])
    return rows


async def case_screening(stack: Stack, args) -> list[dict]:
    rows = []
    w = stack.world
    # the DNSBL case must outlast postscreen's greet wait, which it waits out before it rejects
    kinds = {
        "access_list": (w.denied_ips(), args.screen_duration),
        "dnsbl": (w.listed_ips(), max(args.screen_duration, 2.5 * args.greet_wait + 1)),
    }
    ehlo = b"EHLO %s\r\n" % w.client_name.encode()
    for kind, (sources, duration) in kinds.items():
        for target in (t for t in available_targets(stack) if t != "smtpd"):
            meter = Meter(stack, target)
            before = meter.snapshot()
            async with meter.sampler() as peak:
                run = await load.run_screening(
                    port_of(stack, target), sources=sources,
                    concurrency=args.screen_concurrency, duration=duration,
                    timeout=args.greet_wait + 15, hello=ehlo)
            after = meter.snapshot()
            s = run.summary()
            row = {"target": target, "kind": kind, "concurrency": args.screen_concurrency,
                   "duration_s": duration, **s,
                   "front_cpu_ms_per_conn": (after["front_cpu"] - before["front_cpu"]) * 1000
                   / max(1, s["connections"]) if target in PY_FRONTS else None,
                   "postfix_cpu_ms_per_conn": (after["postfix_cpu"] - before["postfix_cpu"])
                   * 1000 / max(1, s["connections"]),
                   "peak_pss_kb": peak.peak_pss_kb}
            rows.append(row)
            print(f"  screening {target:14} {kind:11} {_fmt(s['rejected_per_s'])} rejected/s "
                  f"{s['outcomes']}", flush=True)
            await asyncio.sleep(0.5)  # let the server close what the client aborted
    return rows


async def case_unknown(stack: Stack, args) -> list[dict]:
    """smtp-source to a recipient nobody has: sessions refused at RCPT per second."""
    rows = []
    rcpt = f"nobody@{stack.world.domain}"
    for target in available_targets(stack):
        meter = Meter(stack, target)
        before = meter.snapshot()
        src = await load.smtp_source(
            port_of(stack, target), concurrency=args.unknown_concurrency,
            messages=args.unknown_sessions, size=256, world=stack.world,
            timeout=max(30, args.unknown_sessions / 20), rcpt=rcpt)
        after = meter.snapshot()
        n = args.unknown_sessions
        rows.append({
            "target": target, "concurrency": args.unknown_concurrency, "sessions": n,
            "elapsed_s": src.elapsed, "smtp_source_ok": src.ok,
            "rejected_per_s": n / src.elapsed if src.elapsed else None,
            "front_cpu_ms_per_session": (after["front_cpu"] - before["front_cpu"]) * 1000 / n
            if target in PY_FRONTS else None,
            "postfix_cpu_ms_per_session": (after["postfix_cpu"] - before["postfix_cpu"])
            * 1000 / n,
        })
        print(f"  unknown {target:14} {_fmt(rows[-1]['rejected_per_s'])} refused sessions/s",
              flush=True)
    return rows


async def case_idle(stack: Stack, args) -> list[dict]:
    rows = []
    w = stack.world
    for target in (t for t in available_targets(stack) if t != "smtpd"):
        body = load.make_body(args.size, w, marker(args, "idle", target, "probe"))
        meter = Meter(stack, target)
        pids = meter.front()[1] if target in PY_FRONTS else stack.postfix.pids()
        pss_before = procstat.memory_kb(pids).pss
        port = port_of(stack, target)
        sources = w.idle_ips(args.idle)
        hold = await load.hold_idle(port, sources=sources, count=args.idle,
                                    budget=60)
        try:
            await asyncio.sleep(0.5)  # the server has accepted what the kernel queued
            pids = meter.front()[1] if target in PY_FRONTS else stack.postfix.pids()
            pss_held = procstat.memory_kb(pids).pss
            server_held = procstat.established(port, sources)  # not other cases' stragglers
            probe_during = await load.run_sessions(
                port, sessions=5, concurrency=1, body=body, world=w, timeout=10, budget=15)
            await asyncio.sleep(args.greet_wait + 1)
            probe_after = await load.run_sessions(
                port, sessions=5, concurrency=1, body=body, world=w, timeout=10, budget=15)
            pids = meter.front()[1] if target in PY_FRONTS else stack.postfix.pids()
            pss_after = procstat.memory_kb(pids).pss
        finally:
            held = len(hold.writers)
            hold.close()
        row = {
            "target": target, "requested": args.idle, "held": held,
            "server_held": server_held,
            "open_errors": dict(hold.errors), "open_s": hold.elapsed,
            "pss_before_kb": pss_before, "pss_held_kb": max(pss_held, pss_after),
            "bytes_per_connection": (max(pss_held, pss_after) - pss_before) * 1024
            / server_held if server_held > 0 else None,
            "probe_during": probe_during.summary(), "probe_after": probe_after.summary(),
        }
        rows.append(row)
        print(f"  idle {target:14} held {held} (server {server_held}) "
              f"{_fmt(row['bytes_per_connection'])} B/conn probe p50 "
              f"{_fmt(row['probe_during']['p50_ms'])}/{_fmt(row['probe_after']['p50_ms'])} ms",
              flush=True)
        await asyncio.sleep(1.0)
    return rows


async def case_starttls(stack: Stack, args) -> list[dict]:
    ctx = ssl.create_default_context(cafile=str(stack.ca_pem))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    rows = []
    for target in available_targets(stack):
        meter = Meter(stack, target)
        mark = marker(args, "starttls", target)
        body = load.make_body(args.size, stack.world, mark)
        before = meter.snapshot()
        async with meter.sampler() as peak:
            run = await load.run_sessions(
                port_of(stack, target), sessions=args.tls_sessions,
                concurrency=args.tls_concurrency, body=body, world=stack.world, tls=ctx,
                timeout=args.session_timeout, budget=max(10, args.tls_sessions / 20))
        after = meter.snapshot()
        s = run.summary()
        rows.append({
            "target": target, "concurrency": args.tls_concurrency, **s,
            "front_cpu_ms_per_session": (after["front_cpu"] - before["front_cpu"]) * 1000
            / max(1, s["sessions"]) if target in PY_FRONTS else None,
            "postfix_cpu_ms_per_session": (after["postfix_cpu"] - before["postfix_cpu"]) * 1000
            / max(1, s["sessions"]),
            "front_peak_pss_kb": peak.peak_pss_kb if target in PY_FRONTS else None,
            "marker": mark,
            "delivered": await meter.wait_delivered(mark, run.queued, 20),
        })
        if target in PY_FRONTS and args.idle_tls:
            rows[-1].update(await _idle_tls(stack, meter, target, ctx, args))
        print(f"  starttls {target:14} {_fmt(s['sessions_per_s'])} sessions/s "
              f"p50 {_fmt(s['p50_ms'])} ms errors {s['errors']} idle TLS "
              f"{_fmt(rows[-1].get('idle_tls_bytes_per_session'))} B/session", flush=True)
    return rows


async def _idle_tls(stack: Stack, meter, target: str, ctx: ssl.SSLContext, args) -> dict:
    """Memory per STARTTLS session that sits idle after the handshake."""
    pss_before = procstat.memory_kb(meter.front()[1]).pss
    hold = await load.hold_idle_tls(port_of(stack, target), sources=stack.world.idle_ips(
        args.idle_tls), count=args.idle_tls, world=stack.world, tls=ctx, budget=60)
    try:
        await asyncio.sleep(0.5)
        pss_held = procstat.memory_kb(meter.front()[1]).pss
        held = len(hold.writers)
    finally:
        hold.close()
    await asyncio.sleep(1.0)
    return {"idle_tls_held": held, "idle_tls_errors": dict(hold.errors),
            "idle_tls_bytes_per_session": (pss_held - pss_before) * 1024 / held if held else None}


async def case_big(stack: Stack, args) -> list[dict]:
    """smtp-source with big messages: CPU per MiB of DATA, front end and Postfix."""
    rows = []
    for target in available_targets(stack):
        meter = Meter(stack, target)
        msgs, size = args.big_messages, args.big_size
        mark = marker(args, "big", target)
        before = meter.snapshot()
        async with meter.sampler() as peak:
            src = await load.smtp_source(
                port_of(stack, target), concurrency=args.big_concurrency, messages=msgs,
                size=size, world=stack.world, timeout=max(60, msgs * size / 2e5), marker=mark)
            delivered = await meter.wait_delivered(mark, msgs, 60)
        after = meter.snapshot()
        mib = msgs * size / 2**20
        front = (after["front_cpu"] - before["front_cpu"]) * 1000 / mib \
            if target in PY_FRONTS else None
        postfix = (after["postfix_cpu"] - before["postfix_cpu"]) * 1000 / mib
        row = {
            "target": target, "size": size, "messages": msgs,
            "concurrency": args.big_concurrency, "elapsed_s": src.elapsed,
            "smtp_source_ok": src.ok, "smtp_source_stderr": src.stderr,
            "messages_per_s": msgs / src.elapsed if src.ok else None,
            "mib_per_s": mib / src.elapsed if src.ok else None,
            "front_cpu_ms_per_mib": front, "postfix_cpu_ms_per_mib": postfix,
            "chain_cpu_ms_per_mib": (front or 0.0) + postfix,
            "front_peak_pss_kb": peak.peak_pss_kb if target in PY_FRONTS else None,
            "postfix_peak_pss_kb": None if target in PY_FRONTS else peak.peak_pss_kb,
            "marker": mark, "delivered": delivered, "queued": stack.postfix.queued(mark),
        }
        row["errors"] = (0 if src.ok else 1) + abs(msgs - row["delivered"])
        rows.append(row)
        print(f"  big {target:14} {_fmt(row['mib_per_s'])} MiB/s front "
              f"{_fmt(front)} CPU ms/MiB, Postfix {_fmt(postfix)} CPU ms/MiB", flush=True)
        if not src.ok:
            print(f"    smtp-source failed: {src.stderr.strip()[-300:]}", flush=True)
    return rows


async def case_slow(stack: Stack, args) -> list[dict]:
    """Slow senders trickling DATA next to a normal client, Postfix at its default limit."""
    w = stack.world
    body = load.make_body(args.size, w, marker(args, "slow", "normal"))
    previous = await asyncio.to_thread(stack.set_process_limit, args.slow_process_limit)
    rows = []
    try:
        for target in available_targets(stack):
            port = port_of(stack, target)
            # busy before: smtpgate keeps next_hop_pool connections to Postfix open throughout
            baseline = stack.postfix.smtpd_processes()[1]
            samples: list[tuple[float, int, int]] = []
            start = time.perf_counter()
            until = start + args.slow_duration

            async def sample(samples=samples, start=start) -> None:
                while True:
                    total, busy = stack.postfix.smtpd_processes()
                    samples.append((time.perf_counter() - start, total, busy))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            try:
                slow_task = asyncio.create_task(load.trickle_senders(
                    port, sources=w.slow_ips(), count=args.slow_senders, world=w,
                    interval=args.slow_interval, until=until))
                normal = await load.run_paced(
                    port, interval=args.normal_interval, until=until, body=body, world=w,
                    timeout=args.slow_duration + 15)
                slow = await slow_task
                # the aborted senders leave Postfix: how long until it is back to the baseline
                drain_end = time.perf_counter() + 15
                while time.perf_counter() < drain_end \
                        and stack.postfix.smtpd_processes()[1] > baseline:
                    await asyncio.sleep(0.25)
                drained = time.perf_counter() - until
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            during = [busy for t, _, busy in samples if t <= args.slow_duration]
            lat = normal.summary()
            reached = sorted(t - start for t in slow.reached)
            row = {
                "target": target, "slow_senders": args.slow_senders,
                "duration_s": args.slow_duration, "interval_s": args.slow_interval,
                "process_limit": args.slow_process_limit,
                "slow": slow.summary(),
                "slow_reached_data_p50_s": load.percentile(reached, 50),
                "normal": lat,
                "normal_attempts": lat["sessions"] + lat["errors"],
                "smtpd_busy_before": baseline,
                "smtpd_busy_peak": max(during, default=0),
                "smtpd_busy_mean": sum(during) / len(during) if during else 0.0,
                "smtpd_total_peak": max((n for t, n, _ in samples if t <= args.slow_duration),
                                        default=0),
                "smtpd_busy_samples": [(round(t, 1), busy) for t, _, busy in samples],
                "drain_s": drained,
            }
            rows.append(row)
            print(f"  slow {target:14} normal p50 {_fmt(lat['p50_ms'])} ms max "
                  f"{_fmt(lat['max_ms'])} ms ok {lat['sessions']} errors {lat['errors']}; "
                  f"slow in DATA {slow.summary()['in_data']}/{args.slow_senders}; "
                  f"smtpd busy peak {row['smtpd_busy_peak']}", flush=True)
            await asyncio.sleep(1.0)
    finally:
        await asyncio.to_thread(stack.set_process_limit, previous)
    return rows


def case_micro(args, out_dir: Path) -> dict:
    """pytest-benchmark over benchmarks/micro, in a child process, bounded in time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "micro.json"
    argv = [sys.executable, "-m", "pytest", str(HERE / "micro"), "-q", "-p", "no:cacheprovider",
            f"--benchmark-json={json_path}", "--benchmark-disable-gc",
            f"--rootdir={HERE.parent}"]
    argv += (["--benchmark-min-rounds=3", "--benchmark-max-time=0.01", "--benchmark-warmup=off"]
             if args.smoke else ["--benchmark-max-time=0.3"])
    # Run from a worker of a parallel test run (the benchmark smoke test under pytest-xdist),
    # the child would take itself for one too, and pytest-benchmark then measures nothing.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PYTEST_XDIST_")}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              cwd=HERE.parent, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "pytest-benchmark did not finish in 120 s"}
    result: dict = {"returncode": done.returncode}
    if done.returncode not in (0, 5):
        result["error"] = done.stdout[-1500:] + done.stderr[-500:]
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError):
        result.setdefault("error", "no benchmark JSON written")
        return result
    result["benchmarks"] = {
        b["name"]: {"median_us": b["stats"]["median"] * 1e6, "mean_us": b["stats"]["mean"] * 1e6,
                    "ops": b["stats"]["ops"], "rounds": b["stats"]["rounds"]}
        for b in data.get("benchmarks", [])
    }
    with contextlib.suppress(OSError):
        json_path.unlink()
    return result


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


# --- the run -------------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def meta(args, argv) -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                                  cwd=HERE.parent).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python_version": sys.version, "python_implementation": platform.python_implementation(),
        "command": "python -m benchmarks.run " + shlex.join(argv),
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "postfix": out(["postconf", "-d", "-h", "mail_version"]),
        "commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "workers": args.workers, "uvloop": args.uvloop, "size": args.size,
        "greet_wait": args.greet_wait, "concurrency": args.concurrency,
        "messages": args.messages, "idle": args.idle, "smoke": args.smoke,
        "big_size": args.big_size, "slow_senders": args.slow_senders,
        "slow_duration": args.slow_duration,
        "dns_ttl": args.dns_ttl, "mx_concurrency": args.mx_concurrency,
        "returning_concurrency": args.returning_concurrency, "mx_window": args.mx_window,
        "mix_shares": args.mix_shares,
        "fd_limit": raise_fd_limit(),
    }


def front_runtimes(stack: Stack) -> dict:
    """Which Python and event loop run each front end (Postfix's are C programs)."""
    out = {}
    version = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    for target in TARGETS:
        front = front_of(stack, target)
        if target not in PY_FRONTS:
            out[target] = {"language": "C", "program": f"Postfix {version}",
                           "event_loop": "Postfix's events (epoll)"}
            continue
        if front is None:
            continue
        out[target] = python_runtime(front)
    return out


def python_runtime(front) -> dict:
    """Python version and implementation of the front end's interpreter, and its event loop.

    The aiosmtpd front end says both in its ready line. For smtpgate they are read from
    outside: the interpreter from /proc/PID/exe, uvloop from the workers' memory maps
    (uvloop's extension loaded) and SMTPGATE_UVLOOP (smtpgate's switch)."""
    info: dict = {"language": "Python"}
    exe = ""
    with contextlib.suppress(OSError):
        exe = os.readlink(f"/proc/{front.pid}/exe")
    if exe:
        probe = ("import platform, sys; print(platform.python_implementation()); "
                 "print(sys.version.replace(chr(10), ' '))")
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            lines = subprocess.run([exe, "-c", probe], capture_output=True, text=True,
                                   timeout=20).stdout.splitlines()
            if len(lines) == 2:
                info["implementation"], info["python"] = lines
    info["executable"] = exe
    if front.runtime:  # the aiosmtpd front end's own words
        fields = dict(item.split("=", 1) for item in front.runtime.split() if "=" in item)
        info["event_loop"] = fields.get("loop", "?")
        info["workers"] = int(fields.get("workers", "0") or 0)
        info["aiosmtpd"] = fields.get("aiosmtpd", "?")
        info["aiosmtplib"] = fields.get("aiosmtplib", "?")
        return info
    mapped = False
    for pid in front.pids():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as fh:
            if "/uvloop/loop." in fh.read():
                mapped = True
                break
    switched_off = front.env.get("SMTPGATE_UVLOOP", "yes").lower() in ("no", "0", "off")
    info["event_loop"] = ("uvloop.Loop" if mapped and not switched_off
                          else "asyncio (selector event loop)")
    info["workers"] = int(front.env.get("SMTPGATE_WORKERS", "0") or 0)
    return info


async def run_cases(stack: Stack, args, results: dict) -> None:
    results["meta"]["fronts"] = await asyncio.to_thread(front_runtimes, stack)
    results["warm_up"] = await warm_up(stack, args)
    mx = mx_cases.MxState(stack)
    for name, fn in (("chain", case_chain), ("screening", case_screening),
                     ("unknown", case_unknown), ("idle", case_idle),
                     ("starttls", case_starttls),
                     ("big", case_big), ("slow", case_slow),
                     ("new", functools.partial(mx_cases.case_new, state=mx)),
                     ("returning", functools.partial(mx_cases.case_returning, state=mx)),
                     ("mix", functools.partial(mx_cases.case_mix, state=mx)),
                     ("listed", functools.partial(mx_cases.case_listed, state=mx))):
        if name not in args.cases:
            continue
        print(f"case {name}", flush=True)
        began = time.monotonic()
        try:
            results[name] = await fn(stack, args)
        except Exception as exc:  # one broken case must not lose the others' figures
            results[name] = []
            results.setdefault("errors", {})[name] = "".join(
                traceback.format_exception_only(exc)).strip()
            print(f"  {name} failed: {results['errors'][name]}", flush=True)
        results["meta"].setdefault("case_seconds", {})[name] = round(time.monotonic() - began, 1)


def _new_loop():
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.monotonic()
    results: dict = {"meta": meta(args, argv)}
    settings = Settings(workers=args.workers, uvloop=args.uvloop == "on",
                        greet_wait=args.greet_wait, keep=args.keep, dns_ttl=args.dns_ttl,
                        postscreen_mx_queue_limit=max(1000, 2 * args.mx_concurrency),
                        with_aiosmtpd=args.aiosmtpd == "on")
    stack = Stack(settings)
    try:
        print("starting redis-server, dnsmasq, postfix, smtpgate, aiosmtpd-front", flush=True)
        for _ in range(3):
            try:
                stack.start()
                break
            except StackError as exc:
                text = str(exc)
                if text.startswith("aiosmtpd-front") and stack.settings.with_aiosmtpd:
                    name, stack.settings.with_aiosmtpd = "aiosmtpd-front", False
                elif "smtpgate" in text and stack.settings.with_smtpgate:
                    name, stack.settings.with_smtpgate = "smtpgate", False
                else:
                    raise
                # the other front ends are still worth measuring
                results.setdefault("errors", {})[name] = text[:2000]
                print(f"  {name} did not start: {text[:500]}", flush=True)
        if args.keep:
            print(f"  logs in {stack.workdir}", flush=True)
        loop = _new_loop()
        try:
            loop.run_until_complete(run_cases(stack, args, results))
        finally:
            loop.close()
    except StackError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    if "micro" in args.cases:
        print("case micro", flush=True)
        results["micro"] = case_micro(args, args.out)
    results["meta"]["wall_s"] = time.monotonic() - start
    paths = report.write_all(results, args.out)
    print(report.markdown(results))
    print("smtpgate against the aiosmtpd front end:")
    for line in report.versus_lines(results) or ["(not measured)"]:
        print(f"  {line}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if results.get("errors") or results.get("micro", {}).get("error") else 0


if __name__ == "__main__":
    raise SystemExit(main())
