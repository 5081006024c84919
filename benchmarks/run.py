"""run - the benchmark harness: start the stack, run the cases, write the figures.

SYNOPSIS
    python -m benchmarks.run [--smoke] [--out DIR] [--cases chain,screening,idle,starttls,micro]
        [--concurrency 1,10,50] [--messages N] [--latency-sessions N] [--size BYTES]
        [--workers N] [--uvloop on|off] [--idle N] [--screen-concurrency N]
        [--screen-duration S] [--tls-sessions N] [--greet-wait S] [--keep]
    main(argv=None) -> int

DESCRIPTION
    Starts redis-server, dnsmasq, a private Postfix (real queue, discard
    transport; services "direct" smtpd, "postscreen" -> smtpd, and the
    XCLIENT next hop) and `smtpgate serve` in front of that next hop
    (benchmarks.stack), warms the screening caches, runs the cases in one
    process on the same machine, and writes bench.json, bench.md and
    bench.png into --out (default benchmarks/results/).

    Targets: "smtpgate" (smtpgate -> Postfix), "postscreen" (postscreen ->
    smtpd, the image's settings) and "smtpd" (smtpd directly, same
    restrictions). Cases:
      chain      smtp-source at each concurrency (throughput, CPU/msg, Pss,
                 Redis commands/msg), then the Python client at the same
                 concurrency (p50/p99 session latency);
      screening  connections/s rejected by the access list (127.0.2.x) and by
                 a DNSBL listing (127.0.1.x, listed in both zones);
      idle       N silent connections, memory per connection, and the
                 latency a normal client sees while they are held (at once,
                 in the greet wait; and after the greet wait has ended);
      starttls   Python client sessions with STARTTLS;
      micro      pytest-benchmark over benchmarks/micro (pure functions).

    Every wait and loop is bounded; a case that fails records "error" and
    the run goes on. Exit status 0 when every case ran, 1 otherwise, 2 for a
    bad argument. --smoke runs everything at tiny sizes (CI).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import shlex
import ssl
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benchmarks import load, procstat, report
from benchmarks.stack import Settings, Stack, StackError, redis_info_commands

HERE = Path(__file__).resolve().parent
TARGETS = ("smtpgate", "postscreen", "smtpd")
CASES = ("chain", "screening", "idle", "starttls", "micro")


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
    p.add_argument("--uvloop", choices=("on", "off"), default="on")
    p.add_argument("--idle", type=bounded(1, 18000), default=10000,
                   help="idle connections held (case 3)")
    p.add_argument("--screen-concurrency", type=bounded(1, 1000), default=50)
    p.add_argument("--screen-duration", type=bounded(0.5, 120, float), default=4.0)
    p.add_argument("--tls-sessions", type=bounded(1, 100000), default=300)
    p.add_argument("--tls-concurrency", type=bounded(1, 1000), default=10)
    p.add_argument("--session-timeout", type=bounded(1, 600, float), default=30.0,
                   help="time limit for one Python client session")
    p.add_argument("--greet-wait", type=bounded(0, 60, float), default=6.0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency = [2]
        args.messages, args.latency_sessions, args.size = 20, 10, 1024
        args.idle, args.screen_concurrency, args.screen_duration = 20, 4, 1.0
        args.tls_sessions, args.tls_concurrency, args.greet_wait = 5, 2, 1.0
        args.session_timeout = 5.0
    return args


# --- measuring one target ------------------------------------------------------------------------


class Meter:
    """CPU, memory and Redis counters of the front end and of Postfix around one run."""

    def __init__(self, stack: Stack, target: str) -> None:
        self.stack, self.target = stack, target

    def front(self) -> tuple[int | None, list[int]]:
        gate = self.stack.smtpgate
        if self.target == "smtpgate" and gate:
            return gate.pid, gate.pids()
        return None, []

    def snapshot(self) -> dict:
        root, pids = self.front()
        pf = self.stack.postfix
        redis = redis_info_commands(self.stack.redis_port)
        return {
            "front_cpu": procstat.cpu_seconds(root, pids) if root else 0.0,
            "postfix_cpu": procstat.cpu_seconds(pf.master_pid(), pf.pids()),
            "delivered": pf.delivered(),
            "redis": sum(v for k, v in redis.items() if k not in ("info", "ping")),
            "redis_by_command": redis,
        }

    def sampler(self) -> procstat.PeakSampler:
        if self.target == "smtpgate":
            return procstat.PeakSampler(lambda: self.front()[1])
        return procstat.PeakSampler(self.stack.postfix.pids, interval=0.5)

    async def wait_delivered(self, count: int, deadline: float) -> int:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            got = self.stack.postfix.delivered()
            if got >= count:
                return got
            await asyncio.sleep(0.05)
        return self.stack.postfix.delivered()


def port_of(stack: Stack, target: str) -> int:
    if target == "smtpgate":
        if not stack.smtpgate:
            raise StackError("smtpgate is not running")
        return stack.smtpgate.port
    return stack.postfix.ports["postscreen" if target == "postscreen" else "direct"]


def available_targets(stack: Stack) -> list[str]:
    return [t for t in TARGETS if t != "smtpgate" or stack.smtpgate]


# --- the cases -----------------------------------------------------------------------------------


async def warm_up(stack: Stack, args) -> dict:
    """One session per target from the benchmark client, waiting out the greet wait."""
    body = load.make_body(args.size, stack.world)
    out = {}
    runs = await asyncio.gather(*(
        load.run_sessions(port_of(stack, t), sessions=1, concurrency=1, body=body,
                          world=stack.world, timeout=args.greet_wait + 15,
                          budget=args.greet_wait + 15)
        for t in available_targets(stack)))
    for t, r in zip(available_targets(stack), runs, strict=True):
        out[t] = r.summary()
    return out


async def case_chain(stack: Stack, args) -> list[dict]:
    rows = []
    body = load.make_body(args.size, stack.world)
    for concurrency in args.concurrency:
        for target in available_targets(stack):
            meter = Meter(stack, target)
            port = port_of(stack, target)
            before = meter.snapshot()
            async with meter.sampler() as peak:
                src = await load.smtp_source(
                    port, concurrency=concurrency, messages=args.messages, size=args.size,
                    world=stack.world, timeout=max(30, args.messages / 20))
                delivered = await meter.wait_delivered(before["delivered"] + args.messages, 30)
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
                "delivered": delivered - before["delivered"],
                "front_cpu_ms_per_msg": (after["front_cpu"] - before["front_cpu"]) * 1000 / msgs
                if target == "smtpgate" else None,
                "postfix_cpu_ms_per_msg": (after["postfix_cpu"] - before["postfix_cpu"])
                * 1000 / msgs,
                "front_peak_pss_kb": peak.peak_pss_kb if target == "smtpgate" else None,
                "postfix_peak_pss_kb": None if target == "smtpgate" else peak.peak_pss_kb,
                "redis_commands_per_msg": (after["redis"] - before["redis"]) / msgs
                if target == "smtpgate" else None,
            }
            if target == "smtpgate":
                row["redis_by_command_per_msg"] = {
                    k: round((v - before["redis_by_command"].get(k, 0)) / msgs, 2)
                    for k, v in after["redis_by_command"].items()
                    if k != "info" and v != before["redis_by_command"].get(k, 0)}
            row["chain_cpu_ms_per_msg"] = (row["front_cpu_ms_per_msg"] or 0.0) \
                + row["postfix_cpu_ms_per_msg"]
            lat = await load.run_sessions(
                port, sessions=args.latency_sessions, concurrency=concurrency, body=body,
                world=stack.world, timeout=args.session_timeout,
                budget=max(10, args.latency_sessions / 20))
            row["latency"] = lat.summary()
            row["errors"] = (0 if src.ok else 1) + row["latency"]["errors"] \
                + (msgs - row["delivered"])
            after_lat = before["delivered"] + msgs + lat.ok
            await meter.wait_delivered(after_lat, 20)
            rows.append(row)
            print(f"  chain {target:10} c={concurrency:<4} {_fmt(row['messages_per_s'])} msg/s "
                  f"p50 {_fmt(row['latency']['p50_ms'])} ms p99 "
                  f"{_fmt(row['latency']['p99_ms'])} ms", flush=True)
            if not src.ok:
                print(f"    smtp-source failed: {src.stderr.strip()[-300:]}", flush=True)
    return rows


async def case_screening(stack: Stack, args) -> list[dict]:
    rows = []
    w = stack.world
    # the DNSBL case must outlast postscreen's greet wait, which it waits out before it rejects
    kinds = {
        "access_list": (w.denied_ips(), args.screen_duration),
        "dnsbl": (w.listed_ips(), max(args.screen_duration, 2.5 * args.greet_wait + 1)),
    }
    for kind, (sources, duration) in kinds.items():
        for target in (t for t in available_targets(stack) if t != "smtpd"):
            meter = Meter(stack, target)
            before = meter.snapshot()
            async with meter.sampler() as peak:
                run = await load.run_screening(
                    port_of(stack, target), sources=sources,
                    concurrency=args.screen_concurrency, duration=duration,
                    timeout=args.greet_wait + 15)
            after = meter.snapshot()
            s = run.summary()
            row = {"target": target, "kind": kind, "concurrency": args.screen_concurrency,
                   "duration_s": duration, **s,
                   "front_cpu_ms_per_conn": (after["front_cpu"] - before["front_cpu"]) * 1000
                   / max(1, s["connections"]) if target == "smtpgate" else None,
                   "postfix_cpu_ms_per_conn": (after["postfix_cpu"] - before["postfix_cpu"])
                   * 1000 / max(1, s["connections"]),
                   "peak_pss_kb": peak.peak_pss_kb}
            rows.append(row)
            print(f"  screening {target:10} {kind:11} {_fmt(s['rejected_per_s'])} rejected/s "
                  f"{s['outcomes']}", flush=True)
            await asyncio.sleep(0.5)  # let the server close what the client aborted
    return rows


async def case_idle(stack: Stack, args) -> list[dict]:
    rows = []
    w = stack.world
    body = load.make_body(args.size, w)
    for target in (t for t in available_targets(stack) if t != "smtpd"):
        meter = Meter(stack, target)
        pids = meter.front()[1] if target == "smtpgate" else stack.postfix.pids()
        pss_before = procstat.memory_kb(pids).pss
        port = port_of(stack, target)
        hold = await load.hold_idle(port, sources=w.idle_ips(args.idle), count=args.idle,
                                    budget=60)
        try:
            await asyncio.sleep(0.5)  # the server has accepted what the kernel queued
            pids = meter.front()[1] if target == "smtpgate" else stack.postfix.pids()
            pss_held = procstat.memory_kb(pids).pss
            server_held = procstat.established(port)
            probe_during = await load.run_sessions(
                port, sessions=5, concurrency=1, body=body, world=w, timeout=10, budget=15)
            await asyncio.sleep(args.greet_wait + 1)
            probe_after = await load.run_sessions(
                port, sessions=5, concurrency=1, body=body, world=w, timeout=10, budget=15)
            pids = meter.front()[1] if target == "smtpgate" else stack.postfix.pids()
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
        print(f"  idle {target:10} held {held} (server {server_held}) "
              f"{_fmt(row['bytes_per_connection'])} B/conn probe p50 "
              f"{_fmt(row['probe_during']['p50_ms'])}/{_fmt(row['probe_after']['p50_ms'])} ms",
              flush=True)
        await asyncio.sleep(1.0)
    return rows


async def case_starttls(stack: Stack, args) -> list[dict]:
    ctx = ssl.create_default_context(cafile=str(stack.ca_pem))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    body = load.make_body(args.size, stack.world)
    rows = []
    for target in available_targets(stack):
        meter = Meter(stack, target)
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
            / max(1, s["sessions"]) if target == "smtpgate" else None,
            "postfix_cpu_ms_per_session": (after["postfix_cpu"] - before["postfix_cpu"]) * 1000
            / max(1, s["sessions"]),
            "front_peak_pss_kb": peak.peak_pss_kb if target == "smtpgate" else None,
        })
        print(f"  starttls {target:10} {_fmt(s['sessions_per_s'])} sessions/s "
              f"p50 {_fmt(s['p50_ms'])} ms errors {s['errors']}", flush=True)
        await meter.wait_delivered(before["delivered"] + s["sessions"], 20)
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
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              cwd=HERE.parent)
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
        "command": "python -m benchmarks.run " + shlex.join(argv),
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "postfix": out(["postconf", "-d", "-h", "mail_version"]),
        "commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "workers": args.workers, "uvloop": args.uvloop, "size": args.size,
        "greet_wait": args.greet_wait, "concurrency": args.concurrency,
        "messages": args.messages, "idle": args.idle, "smoke": args.smoke,
        "fd_limit": raise_fd_limit(),
    }


async def run_cases(stack: Stack, args, results: dict) -> None:
    results["warm_up"] = await warm_up(stack, args)
    for name, fn in (("chain", case_chain), ("screening", case_screening),
                     ("idle", case_idle), ("starttls", case_starttls)):
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
                        greet_wait=args.greet_wait, keep=args.keep)
    stack = Stack(settings)
    try:
        print("starting redis-server, dnsmasq, postfix, smtpgate", flush=True)
        try:
            stack.start()
        except StackError as exc:
            if "smtpgate" not in str(exc):
                raise
            # the Postfix baselines are still worth measuring
            results.setdefault("errors", {})["smtpgate"] = str(exc)[:2000]
            print(f"  smtpgate did not start: {str(exc)[:500]}", flush=True)
            stack.settings.with_smtpgate = False
            stack.start()
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
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if results.get("errors") or results.get("micro", {}).get("error") else 0


if __name__ == "__main__":
    raise SystemExit(main())
