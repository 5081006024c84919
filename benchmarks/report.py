"""report - the benchmark's outputs: JSON of every figure, a markdown table, a PNG plot.

SYNOPSIS
    targets(results) -> dict              the issue's goals as ratios, each with met: bool
    write_all(results, out_dir) -> dict[str, Path]    {"json", "markdown", "plot"}
    markdown(results) -> str

DESCRIPTION
    results is the dict built by benchmarks.run: "meta", "chain" (a row per
    target and concurrency), "screening", "idle", "starttls", "micro", and
    "targets" (added here). NaN becomes null in the JSON. The plot shows
    messages/s and p99 session latency against concurrency, one line per
    target (smtpgate, postscreen, smtpd). Goals are reported, not asserted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GOALS = {
    "chain_vs_postscreen_ratio": (">=", 1.0),
    "added_p50_ms": ("<", 2.0),
    "added_p99_ms": ("<", 10.0),
    "idle_10k_mb": ("<", 150.0),
    "redis_round_trips_per_msg": ("<=", 2.0),
}


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _row(rows, target, concurrency):
    for r in rows:
        if r["target"] == target and r["concurrency"] == concurrency:
            return r
    return None


def _moderate(rows) -> int | None:
    levels = sorted({r["concurrency"] for r in rows})
    return levels[len(levels) // 2] if levels else None


def targets(results: dict) -> dict:
    rows = results.get("chain", [])
    out: dict = {}
    top = max((r["concurrency"] for r in rows), default=None)
    mod = _moderate(rows)
    gate, ps, direct = (_row(rows, t, top) for t in ("smtpgate", "postscreen", "smtpd"))
    if gate and ps and ps.get("messages_per_s") and gate.get("messages_per_s"):
        out["chain_vs_postscreen_ratio"] = gate["messages_per_s"] / ps["messages_per_s"]
    if gate and direct and direct.get("messages_per_s"):
        out["chain_vs_smtpd_ratio"] = gate["messages_per_s"] / direct["messages_per_s"]
    out["ratios_at_concurrency"] = top
    gate_m, direct_m = _row(rows, "smtpgate", mod), _row(rows, "smtpd", mod)
    if gate_m and direct_m:
        out["added_p50_ms"] = gate_m["latency"]["p50_ms"] - direct_m["latency"]["p50_ms"]
        out["added_p99_ms"] = gate_m["latency"]["p99_ms"] - direct_m["latency"]["p99_ms"]
        out["added_latency_at_concurrency"] = mod
    for r in results.get("idle", []):
        if r["target"] == "smtpgate" and r.get("bytes_per_connection") is not None:
            out["idle_10k_mb"] = (r["pss_before_kb"] * 1024
                                  + r["bytes_per_connection"] * 10000) / 1e6
    trips = [r["redis_commands_per_msg"] for r in rows
             if r["target"] == "smtpgate" and r.get("redis_commands_per_msg") is not None]
    if trips:
        out["redis_round_trips_per_msg"] = max(trips)
    out["met"] = {}
    for name, (op, bound) in GOALS.items():
        value = out.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out["met"][name] = None
        else:
            out["met"][name] = {"<": value < bound, "<=": value <= bound,
                                ">=": value >= bound}[op]
    out["goals"] = {k: f"{op} {bound:g}" for k, (op, bound) in GOALS.items()}
    return out


def _f(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [
        f"Run {meta.get('date', '')} on {meta.get('cpus', '?')} CPUs, "
        f"smtpgate workers={meta.get('workers')}, uvloop={meta.get('uvloop')}, "
        f"message size {meta.get('size')} bytes, greet wait {meta.get('greet_wait')} s, "
        f"wall time {_f(meta.get('wall_s'))} s.",
        f"Command: `{meta.get('command', '')}`",
        "",
        "### Case 1: smtp-source → front end → Postfix (queue, discard transport)",
        "",
        "| target | conc | msgs/s (smtp-source) | p50 ms | p99 ms | front CPU ms/msg "
        "| chain CPU ms/msg | front peak Pss MB | Redis cmds/msg | delivered | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.get("chain", []):
        lat = r.get("latency", {})
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {_f(r.get('messages_per_s'))} "
            f"| {_f(lat.get('p50_ms'))} | {_f(lat.get('p99_ms'))} "
            f"| {_f(r.get('front_cpu_ms_per_msg'), 2)} | {_f(r.get('chain_cpu_ms_per_msg'), 2)} "
            f"| {_f((r.get('front_peak_pss_kb') or math.nan) / 1024)} "
            f"| {_f(r.get('redis_commands_per_msg'), 2)} | {_f(r.get('delivered'))} "
            f"| {_f(r.get('errors'))} |")
    lines += ["", "### Case 2: screening only (connections rejected before the banner ends)", "",
              "| target | rejected by | conc | rejected/s | p50 ms | p99 ms "
              "| front CPU ms/conn | outcomes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results.get("screening", []):
        lines.append(
            f"| {r['target']} | {r['kind']} | {r['concurrency']} | {_f(r.get('rejected_per_s'))} "
            f"| {_f(r.get('p50_ms'))} | {_f(r.get('p99_ms'))} "
            f"| {_f(r.get('front_cpu_ms_per_conn'), 3)} | {r.get('outcomes')} |")
    lines += ["", "### Case 3: idle connections held in the greet wait", "",
              "| target | held (client/server) | open s | Pss before MB | Pss held MB | bytes/conn "
              "| probe p50 ms (in greet wait) | probe p50 ms (after) | probe errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("idle", []):
        lines.append(
            f"| {r['target']} | {r['held']}/{r.get('server_held')} | {_f(r.get('open_s'))} "
            f"| {_f(r['pss_before_kb'] / 1024)} | {_f(r['pss_held_kb'] / 1024)} "
            f"| {_f(r.get('bytes_per_connection'), 0)} "
            f"| {_f(r['probe_during']['p50_ms'])} | {_f(r['probe_after']['p50_ms'])} "
            f"| {r['probe_during']['errors'] + r['probe_after']['errors']} |")
    lines += ["", "### Case 4: STARTTLS sessions (Python client, ECDSA P-256 certificate)", "",
              "| target | conc | sessions/s | p50 ms | p99 ms | front CPU ms/session "
              "| front peak Pss MB | errors |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results.get("starttls", []):
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {_f(r.get('sessions_per_s'))} "
            f"| {_f(r.get('p50_ms'))} | {_f(r.get('p99_ms'))} "
            f"| {_f(r.get('front_cpu_ms_per_session'), 2)} "
            f"| {_f((r.get('front_peak_pss_kb') or math.nan) / 1024)} | {r.get('errors')} |")
    micro = results.get("micro", {})
    lines += ["", "### Case 5: micro benchmarks (pytest-benchmark)", ""]
    if micro.get("benchmarks"):
        lines += ["| benchmark | median µs | ops/s |", "|---|---|---|"]
        for name, b in sorted(micro["benchmarks"].items()):
            lines.append(f"| {name} | {_f(b['median_us'], 2)} | {_f(b['ops'], 0)} |")
    else:
        lines.append(f"(none: {micro.get('error', 'not run')})")
    t = results.get("targets", {})
    lines += ["", "### Goals (reported, not asserted)", "", "| goal | value | target | met |",
              "|---|---|---|---|"]
    for name, goal in t.get("goals", {}).items():
        met = t["met"].get(name)
        lines.append(f"| {name} | {_f(t.get(name), 2)} | {goal} "
                     f"| {'-' if met is None else 'yes' if met else 'NO'} |")
    if "chain_vs_smtpd_ratio" in t:
        lines.append(f"| chain_vs_smtpd_ratio | {_f(t['chain_vs_smtpd_ratio'], 2)} | (info) | |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path | None:
    rows = results.get("chain", [])
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for target in ("smtpgate", "postscreen", "smtpd"):
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["concurrency"])
        if not mine:
            continue
        xs = [r["concurrency"] for r in mine]
        left.plot(xs, [r.get("messages_per_s") or 0 for r in mine], marker="o", label=target)
        right.plot(xs, [r["latency"].get("p99_ms") or math.nan for r in mine], marker="o",
                   label=target)
    left.set(xlabel="concurrent sessions", ylabel="messages/s (smtp-source)",
             title="throughput")
    right.set(xlabel="concurrent sessions", ylabel="p99 session latency, ms",
              title="latency (Python client)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md"}
    paths["json"].write_text(json.dumps(_clean(results), indent=2, sort_keys=False) + "\n")
    paths["markdown"].write_text(markdown(results))
    png = plot(results, out_dir / "bench.png")
    if png:
        paths["plot"] = png
    return paths
