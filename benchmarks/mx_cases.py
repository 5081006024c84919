"""mx_cases - benchmark cases that look like an MX's traffic: clients never seen before.

SYNOPSIS
    MX_TARGETS
    MxState(stack)                            address pools per target, who was accepted
    await case_new(stack, args, state) -> list[dict]
    await case_returning(stack, args, state) -> list[dict]
    await case_mix(stack, args, state) -> list[dict]
    await case_listed(stack, args, state) -> list[dict]
    await measure(stack, args, target, plan, *, case, concurrency, ramp, window) -> dict

DESCRIPTION
    Each session is a client of its own: it binds its own source address,
    says EHLO with its own forward-confirmed name and sends from that name
    (benchmarks.mx_plan), through greet wait, EHLO, MAIL, RCPT, DATA and
    QUIT (load.client_session). Targets: smtpgate (-> Postfix next hop) and
    postscreen -> smtpd doing the same work (the "postscreen_mx" service:
    same DNSBL zones, threshold and access list; smtpd with the image's
    client, HELO and recipient checks; both ask the same dnsmasq).

      new        every session a first contact, accepted; the greet wait as
                 configured, --mx-concurrency clients in flight so that the
                 greet wait does not bound the rate (the row says the bound,
                 concurrency / greet wait);
      returning  the addresses the new case accepted, again (screening cache
                 hit; DNS answers still within their TTL), --returning-
                 concurrency clients (they are not held in the greet wait),
                 measured for each target right after its new case, so that
                 they come back within a minute (see _returning); without a
                 new case in the run, a first pass makes them;
      mix        --mix-shares of first contacts refused by the DNSBL, by the
                 access list, refused at RCPT (unknown recipient), accepted,
                 and returning clients accepted (mx_plan.Mix);
      listed     every session a DNSBL-listed first contact (refused at
                 connect): what the mix's largest share costs on its own.

    measure() keeps `concurrency` sessions in flight for ramp + window
    seconds and measures the window only: CPU of the front end, Postfix
    (all its processes, the exited ones through the master's cutime and
    cstime), redis-server and dnsmasq from /proc, Redis calls, and the
    sessions that ended in it; so the start (nobody past the greet wait
    yet) and the end (sessions still in flight) are left out, and CPU per
    session is steady-state work over sessions ended. The load client's own
    CPU is reported apart (client_cpu_ms_per_session), never in the chain's
    total. Every message a case's server accepted must be delivered once
    (counted by marker); a session that ends otherwise than its kind
    expects (mx_plan.EXPECTED) is an error.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections import Counter

from benchmarks import load
from benchmarks.meter import PY_FRONTS, Meter, available_targets, marker, port_of
from benchmarks.mx_plan import EXPECTED, FirstContacts, Mix, Returning, TargetPools

MX_TARGETS = ("smtpgate", "postscreen")


class MxState:
    """Across the MX cases of one run: each target's address pools, and its accepted clients."""

    def __init__(self, stack) -> None:
        self.pools = {t: TargetPools(stack.world, i, len(MX_TARGETS))
                      for i, t in enumerate(MX_TARGETS)}
        self.accepted: dict[str, list[str]] = {}
        self.returning: list[dict] = []  # rows measured by case_new, reported by case_returning


def targets(stack) -> list[str]:
    return [t for t in MX_TARGETS if t in available_targets(stack)]


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per(value: float, n: int) -> float | None:
    return value * 1000 / n if n else None


async def measure(stack, args, target: str, plan, *, case: str, concurrency: int,
                  ramp: float, window: float, stagger: float = 0.0) -> dict:
    """One target's run of one plan; figures of the sessions that ended in the window."""
    meter = Meter(stack, target)
    mark = marker(args, case, target)
    body = load.make_body(args.size, stack.world, mark)
    start = time.perf_counter()
    edges: dict = {}

    async def window_edges() -> None:
        await asyncio.sleep(ramp)
        edges["before"], edges["client0"] = meter.snapshot(), _client_cpu()
        edges["t0"] = time.perf_counter()
        await asyncio.sleep(max(0.0, start + ramp + window - time.perf_counter()))
        edges["after"], edges["client1"] = meter.snapshot(), _client_cpu()
        edges["t1"] = time.perf_counter()

    edge_task = asyncio.create_task(window_edges())
    run = await load.run_clients(
        port_of(stack, target, mx=True), plan=plan, concurrency=concurrency,
        until=start + ramp + window, body=body, timeout=args.greet_wait + args.session_timeout,
        stagger=stagger)
    await edge_task
    before, after = edges["before"], edges["after"]
    ended = run.ended_between(edges["t0"], edges["t1"])
    n, span = len(ended), edges["t1"] - edges["t0"]
    python_front = target in PY_FRONTS
    cpu = {part: _per(after[f"{part}_cpu"] - before[f"{part}_cpu"], n)
           for part in ("front", "postfix", "redis", "dns")}
    if not python_front:
        cpu["front"] = None
        cpu["redis"] = None  # Postfix reads its tables from files here, never from Redis
    latencies = [(end - begin) * 1000 for begin, end, _, _ in ended]
    kinds = Counter(kind for _, _, kind, _ in ended)
    outcomes: dict[str, Counter] = {}
    for _, _, kind, outcome in run.sessions:
        outcomes.setdefault(kind, Counter())[outcome] += 1
    errors = sum(n_ for kind, c in outcomes.items() for o, n_ in c.items()
                 if o != EXPECTED[kind])
    delivered = await meter.wait_delivered(mark, run.queued, 60)
    chain = sum(v for v in cpu.values() if v is not None) if n else None
    row = {
        "case": case, "target": target, "concurrency": concurrency,
        "greet_wait_s": args.greet_wait, "ramp_s": ramp, "window_s": span,
        "sessions": len(run.sessions), "sessions_in_window": n,
        "sessions_per_s": n / span if span > 0 else None,
        "greet_wait_bound_per_s": concurrency / args.greet_wait
        if case != "returning" and args.greet_wait > 0 else None,
        "p50_ms": load.percentile(latencies, 50), "p99_ms": load.percentile(latencies, 99),
        "p50_ms_by_kind": {k: load.percentile(
            [(e - b) * 1000 for b, e, kind, _ in ended if kind == k], 50) for k in kinds},
        "front_cpu_ms_per_session": cpu["front"],
        "postfix_cpu_ms_per_session": cpu["postfix"],
        "redis_cpu_ms_per_session": cpu["redis"],
        "dns_cpu_ms_per_session": cpu["dns"],
        "chain_cpu_ms_per_session": chain,
        # the share of the machine's CPUs the servers used in the window: well below 1 and
        # p50 near the greet wait would mean the greet wait, not the servers, set the rate
        "server_cpu_share": chain * n / 1000 / span / (os.cpu_count() or 1)
        if chain is not None and span > 0 else None,
        "client_cpu_ms_per_session": _per(edges["client1"] - edges["client0"], n),
        "redis_commands_per_session": (after["redis"] - before["redis"]) / n
        if python_front and n else None,
        "shares": {k: kinds[k] / n for k in sorted(kinds)} if n else {},
        "outcomes": {k: dict(c) for k, c in outcomes.items()},
        "errors": errors + abs(run.queued - delivered),
        "addresses_exhausted": run.exhausted,
        "marker": mark, "queued": run.queued, "delivered": delivered,
    }
    print(f"  {case} {target:11} {_fmt(row['sessions_per_s'])} sessions/s p50 "
          f"{_fmt(row['p50_ms'])} p99 {_fmt(row['p99_ms'])} ms; CPU ms/session front "
          f"{_fmt(cpu['front'], 2)} Postfix {_fmt(cpu['postfix'], 2)} Redis "
          f"{_fmt(cpu['redis'], 2)} DNS {_fmt(cpu['dns'], 2)} chain {_fmt(chain, 2)}; "
          f"errors {row['errors']}", flush=True)
    if errors:
        print(f"    outcomes: {row['outcomes']}", flush=True)
    if run.exhausted:
        print("    the plan ran out of addresses before the window ended: figures not usable",
              flush=True)
    await asyncio.sleep(1.0)  # let the servers close what the clients aborted
    return row


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _first_contact_ramp(args) -> float:
    # the clients start over one greet wait and nobody ends before the greet wait: steady
    # from two greet waits on, a little more for the first ones' DNS answers to be cached
    return 2 * args.greet_wait + (1.0 if args.smoke else 2.0)


async def case_new(stack, args, state: MxState) -> list[dict]:
    """First contacts; with the returning case in the run, each target's right after."""
    rows = []
    for target in targets(stack):
        plan = FirstContacts(stack.world, state.pools[target])
        rows.append(await measure(stack, args, target, plan, case="new",
                                  concurrency=args.mx_concurrency,
                                  ramp=_first_contact_ramp(args), window=args.mx_window,
                                  stagger=args.greet_wait))
        state.accepted[target] = plan.accepted
        if "returning" in args.cases:
            state.returning.append(await _returning(stack, args, state, target))
    return rows


async def _first_pass(stack, args, state: MxState, target: str) -> list[str]:
    """Accepted first contacts made for the returning case when the new case did not run."""
    plan = FirstContacts(stack.world, state.pools[target])
    body = load.make_body(args.size, stack.world, marker(args, "first-pass", target))
    await load.run_clients(
        port_of(stack, target, mx=True), plan=plan, concurrency=args.mx_concurrency,
        until=time.perf_counter() + _first_contact_ramp(args), body=body,
        timeout=args.greet_wait + args.session_timeout, stagger=args.greet_wait)
    return plan.accepted


async def _returning(stack, args, state: MxState, target: str) -> dict:
    # the most recent first contacts first: a DNSBL pass is cached for the answer's TTL,
    # at least 60 s, and the test zones' negative answers carry none (no SOA)
    addresses = state.accepted.get(target) or await _first_pass(stack, args, state, target)
    if not addresses:
        raise RuntimeError(f"no client was accepted by {target} to come back")
    row = await measure(stack, args, target, Returning(stack.world, addresses[::-1]),
                        case="returning", concurrency=args.returning_concurrency,
                        ramp=1.0 if args.smoke else 2.0, window=args.mx_window)
    row["returning_addresses"] = len(addresses)
    return row


async def case_returning(stack, args, state: MxState) -> list[dict]:
    """The rows the new case measured right after each target's first contacts, else new."""
    if state.returning:
        return state.returning
    return [await _returning(stack, args, state, target) for target in targets(stack)]


async def case_mix(stack, args, state: MxState) -> list[dict]:
    rows = []
    for target in targets(stack):
        plan = Mix(stack.world, state.pools[target], args.mix_shares)
        rows.append(await measure(stack, args, target, plan, case="mix",
                                  concurrency=args.mx_concurrency,
                                  ramp=_first_contact_ramp(args), window=args.mx_window,
                                  stagger=args.greet_wait))
        rows[-1]["planned_shares"] = dict(args.mix_shares)
    return rows


async def case_listed(stack, args, state: MxState) -> list[dict]:
    rows = []
    for target in targets(stack):
        plan = Mix(stack.world, state.pools[target], {"dnsbl": 1})
        rows.append(await measure(stack, args, target, plan, case="listed",
                                  concurrency=args.mx_concurrency,
                                  ramp=_first_contact_ramp(args), window=args.mx_window,
                                  stagger=args.greet_wait))
    return rows
