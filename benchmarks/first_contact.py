"""first_contact - smtpgate's CPU per session when every client is new, and what Redis pays.

SYNOPSIS
    .venv/bin/python -m benchmarks.first_contact [--sessions 300] [--concurrency 20]
        [--greet-wait 1] [--ttl 300] [--rounds 2] [--baseline DIR] [--image [TAG]]
        [--json FILE]
        [--shadow CANDIDATE.toml] [--replay-records]
        [--profile FILE [--profile-phase first|returning|listed]]

DESCRIPTION
    The traffic an internet-facing MX mostly gets: every connection from an
    address smtpgate has never seen (127.20.0.0/16, one address per session),
    each with a forward-confirmed name from dnsmasq's --synth-domain
    (c-127-20-X-Y.fc.bench.test, PTR and A, TTL --ttl), greeting with that
    name and sending one 2 KiB message. Three phases per round:

      first      sessions from new addresses, accepted (greet wait, PTR, A, two DNSBL
                 zones, HELO name, the screening pass recorded)
      returning  the same addresses again (the screening cache says PASS OLD)
      listed     new addresses from 127.21.0.0/16, listed in both DNSBL zones, refused
                 at connect

    For each phase: smtpgate's CPU per session (utime+stime of its processes,
    from /proc), redis-server's (INFO cpu used_cpu_user+used_cpu_sys), the
    Redis commands (INFO commandstats, those run inside scripts too) and
    round trips (INFO stats total_reads_processed) per session, sessions/s,
    and errors. One worker, uvloop.

    --baseline DIR runs the same phases, interleaved round by round, with the
    smtpgate found in DIR (a checkout, e.g. /work/main) as a second target,
    so a change is measured against its baseline in one run on one busy
    machine; the spread between rounds of one target is the noise to read
    the difference against. --image TAG adds, the same way, smtpgate from
    the shipped image (podman, --network=host, the same settings by its
    environment; benchmarks.container), on the image's Python; --image
    alone builds the Dockerfile first and removes it afterwards. Its CPU is
    that of every process in the container (from /proc, as for the host's
    targets); what conmon and the podman client spend besides is printed
    apart (runtime_cpu_ms, below the table). Every target's Python is asked
    of the interpreter in its process and printed above the table.
    --shadow FILE turns on the shadow rules
    (SMTPGATE_SHADOW_CONFIG=FILE) in the main target only: with --baseline
    naming this same checkout, the two differ by the shadow rules alone.
    --replay-records does the same with replay_records (every session's
    replay record), and prints the records' mean size in Redis's stream.
    --profile FILE records the worker with py-spy
    during the first round's "first" phase of the main target (raw collapsed
    stacks; --profile-phase picks another phase; `python -m
    benchmarks.first_contact --summarize FILE` prints the top frames).

    It uses benchmarks.stack for Redis, Postfix (the XCLIENT next hop) and
    the certificate, and runs a dnsmasq of its own for the synthesized names.
    No target listens for socketmap queries (none are made here, and two
    targets, or one in a container under another uid, could not share the
    default port).
    Each phase is measured after the previous one has settled in Redis (the
    release batch and the evidence batch written), so its figures are its
    own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.container import ImageGate, build_image, host_python, start_image_gate
from benchmarks.procstat import cpu_seconds
from benchmarks.stack import (
    Settings,
    Smtpgate,
    Stack,
    StackError,
    free_port,
    redis_command,
    spawn,
    wait_for,
)

ZONE = "fc.bench.test"
DNSBL = ("bl1.fc.bench.test", "bl2.fc.bench.test")
BODY = ("Subject: first contact\r\n\r\n" + ("x" * 76 + "\r\n") * 26).encode()  # ~2 KiB


def name_of(ip: str) -> str:
    return f"c-{ip.replace('.', '-')}.{ZONE}"


def addresses(net: str, start: int, count: int) -> list[str]:
    """count addresses of net (e.g. "127.20") from index start: .0.1, .0.2 ... .0.254, .1.1."""
    return [f"{net}.{i // 254}.{1 + i % 254}" for i in range(start, start + count)]


# --- the services this benchmark adds ------------------------------------------------------


def start_dnsmasq(stack: Stack, ttl: int):
    """dnsmasq with synthesized forward-confirmed names and the two DNSBL zones."""
    port = _free_udp_port()
    lines = [
        "no-resolv", "no-hosts", f"local-ttl={ttl}", f"neg-ttl={ttl}",
        "listen-address=127.0.0.1", "bind-interfaces", f"port={port}", "cache-size=0",
        f"local=/{ZONE}/", "local=/127.in-addr.arpa/",
        f"synth-domain={ZONE},127.20.0.0/16,c-",
        f"synth-domain={ZONE},127.21.0.0/16,c-",
    ]
    for zone in DNSBL:
        lines += [f"local=/{zone}/", f"address=/21.127.{zone}/127.0.0.2"]  # 127.21.x.y listed
    conf = stack.workdir / "dnsmasq-fc.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = spawn("dnsmasq-fc", ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}",
                                "--user=root"], stack.workdir)
    stack.procs.append(proc)
    wait_for("dnsmasq (synth-domain)", lambda: _resolves(port, name_of("127.20.0.1")),
             10, proc.log)
    return port


def _free_udp_port() -> int:
    """A port free for UDP and TCP both: dnsmasq listens on both (a UDP port that some
    other test's TCP listener held made dnsmasq fail to start, "Address already in use")."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise SystemExit("no port free for both UDP and TCP on 127.0.0.1")


def _resolves(port: int, name: str) -> bool:
    import dns.exception
    import dns.message
    import dns.query

    try:
        answer = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", timeout=0.5,
                               port=port)
    except dns.exception.Timeout:
        return False
    return bool(answer.answer)


def gate_env(stack: Stack, source: Path, dns_port: int, greet_wait: float,
             shadow: Path | None = None, replay_records: bool = False) -> dict[str, str]:
    """A target's settings, on a free port (PYTHONPATH: where a host target's code is)."""
    env = stack.smtpgate_env(free_port())
    env.update({
        "PYTHONPATH": str(source),
        "SMTPGATE_SOCKETMAP_LISTEN": "",
        "SMTPGATE_NAMESERVERS": f"127.0.0.1:{dns_port}",
        "SMTPGATE_DNSBL_SITES": " ".join(f"{zone}*2" for zone in DNSBL),
        "SMTPGATE_DNSBL_THRESHOLD": "3",
        "SMTPGATE_GREET_WAIT": f"{greet_wait:g}",
        "SMTPGATE_WORKERS": "1",
        "SMTPGATE_UVLOOP": "yes",
    })
    if shadow is not None:
        env["SMTPGATE_SHADOW_CONFIG"] = str(shadow)
    if replay_records:
        env["SMTPGATE_REPLAY_RECORDS"] = "yes"
    return env


def start_gate(stack: Stack, name: str, env: dict[str, str], command: list[str] | None = None,
               ready_within: float = 30) -> Smtpgate:
    """`smtpgate serve`, or `command` that runs it (under a profiler, say: give it longer to
    be ready), until it says it is ready."""
    port = int(env["SMTPGATE_MX_LISTEN"].rpartition(":")[2])
    proc = spawn(name, command or [sys.executable, "-m", "smtpgate", "serve"], stack.workdir,
                 env)
    stack.procs.append(proc)
    wait_for(name, lambda: b"ready" in proc.log.read_bytes(), ready_within, proc.log)
    return Smtpgate(proc, port, env)


# --- the client ------------------------------------------------------------------------------


class Failed(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = await reader.readline()
        if not line:
            raise Failed("connection closed")
        if line[3:4] != b"-":
            return line.decode(errors="replace").rstrip()


async def _expect(reader, code: str) -> None:
    reply = await _reply(reader)
    if not reply.startswith(code):
        raise Failed(reply)


async def session(port: int, ip: str, listed: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
    try:
        banner = await _reply(reader)
        if listed:
            if not banner.startswith("521"):
                raise Failed(f"not refused: {banner}")
            return
        if not banner.startswith("220"):
            raise Failed(banner)
        for line, code in ((f"EHLO {name_of(ip)}", "250"),
                           (f"MAIL FROM:<sender@{name_of(ip)}>", "250"),
                           ("RCPT TO:<user@bench.test>", "250"), ("DATA", "354")):
            writer.write(line.encode() + b"\r\n")
            await _expect(reader, code)
        writer.write(BODY + b".\r\n")
        await _expect(reader, "250")
        writer.write(b"QUIT\r\n")
        await _expect(reader, "221")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def load(port: int, ips: list[str], concurrency: int, listed: bool) -> dict:
    queue = collections.deque(ips)
    errors: collections.Counter = collections.Counter()

    async def client() -> None:
        while queue:
            ip = queue.popleft()
            try:
                await asyncio.wait_for(session(port, ip, listed), 60)
            except (Failed, OSError, TimeoutError) as exc:
                errors[str(exc)[:60] or type(exc).__name__] += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"seconds": time.monotonic() - started, "errors": dict(errors)}


# --- measuring -------------------------------------------------------------------------------


def redis_figures(port: int) -> dict[str, float]:
    """redis-server's CPU seconds, reads, and commands (less INFO and EXISTS: ours)."""
    figures = {"cpu": 0.0, "reads": 0.0, "commands": 0.0}
    for section in ("cpu", "stats", "commandstats"):  # three reads of our own
        for line in redis_command(port, "INFO", section).decode().splitlines():
            key, _, value = line.partition(":")
            if key in ("used_cpu_sys", "used_cpu_user"):
                figures["cpu"] += float(value)
            elif key == "total_reads_processed":
                figures["reads"] = float(value)
            elif key.startswith("cmdstat_") and key not in ("cmdstat_info", "cmdstat_exists"):
                figures["commands"] += float(value.split(",")[0].partition("=")[2])
    return figures


def settle(redis_port: int, deadline: float = 10.0) -> int:
    """Wait until smtpgate has sent the sessions' ends (the count hashes gone, the evidence
    batch out); returns how many reads of our own that took."""
    end = time.monotonic() + deadline
    polls = 0
    while time.monotonic() < end:
        polls += 1
        found = redis_command(redis_port, "EXISTS", "smtpgate:conns", "smtpgate:sessions")
        if found.strip() == b":0":
            break
        time.sleep(0.05)
    time.sleep(0.3)  # the evidence batch (50 ms) and the release batch (10 ms)
    return polls


def measure(stack: Stack, gate: Smtpgate, ips: list[str], concurrency: int,
            listed: bool) -> dict:
    pids = gate.pids()
    # a container's conmon and podman client: not the front, but what the container adds
    runtime = gate.runtime_pids() if isinstance(gate, ImageGate) else []
    redis_before = redis_figures(stack.redis_port)
    cpu_before = cpu_seconds(gate.pid, pids)
    runtime_before = cpu_seconds(None, runtime)
    result = asyncio.run(load(gate.port, ips, concurrency, listed))
    polls = settle(stack.redis_port)
    cpu = cpu_seconds(gate.pid, gate.pids()) - cpu_before
    runtime_cpu = cpu_seconds(None, runtime) - runtime_before
    redis_after = redis_figures(stack.redis_port)
    n = len(ips)
    # ours between the two reads figures: the commandstats INFO before, the polls, the cpu
    # INFO after, and the stats INFO after, which counts itself
    own_reads = 1 + polls + 2
    extra = {"runtime_cpu_ms": round(runtime_cpu * 1000 / n, 3)} if runtime else {}
    return extra | {
        "sessions": n,
        "errors": result["errors"],
        "sessions_per_s": round(n / result["seconds"], 1),
        "smtpgate_cpu_ms": round(cpu * 1000 / n, 3),
        "redis_cpu_ms": round((redis_after["cpu"] - redis_before["cpu"]) * 1000 / n, 3),
        "redis_commands": round((redis_after["commands"] - redis_before["commands"]) / n, 2),
        "redis_round_trips": round(
            (redis_after["reads"] - redis_before["reads"] - own_reads) / n, 2),
    }


# --- profile summary -------------------------------------------------------------------------


@contextlib.contextmanager
def profiled(gate: Smtpgate, output: Path | None):
    """py-spy recording the worker (raw collapsed stacks) while the block runs."""
    if output is None:
        yield
        return
    worker = max(gate.pids())  # the worker is the master's child
    profiler = subprocess.Popen(
        [_py_spy(), "record", "--pid", str(worker), "--format", "raw", "--rate", "250",
         "--nonblocking", "-o", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        profiler.send_signal(2)  # SIGINT: py-spy writes its file and exits
        profiler.wait(30)


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"  # setup.sh --bench installs it in .venv
    return str(beside) if beside.exists() else "py-spy"


def summarize(path: Path, top: int = 40) -> str:
    """The frames that hold the most samples (inclusive) and the leaves (self)."""
    inclusive: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        leaf[frames[-1]] += n
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in leaf.most_common(top)]
    return "\n".join(out)


# --- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.first_contact")
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--greet-wait", type=float, default=1.0)
    parser.add_argument("--ttl", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--image", nargs="?", const="", metavar="TAG",
                        help="smtpgate from this image as a target too (podman); "
                             "without TAG, the Dockerfile is built")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--profile-phase", choices=("first", "returning", "listed"),
                        default="first")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shadow", type=Path, help="candidate settings for the main target's "
                                                    "shadow rules")
    parser.add_argument("--replay-records", action="store_true",
                        help="replay_records on in the main target")
    parser.add_argument("--summarize", type=Path, help="print a py-spy raw profile's top frames")
    args = parser.parse_args(argv)
    for name in ("sessions", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.image is not None and args.image.startswith("-"):
        parser.error(f"--image: not an image name: {args.image}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    root = Path(__file__).resolve().parent.parent
    targets = {"smtpgate": root}
    if args.baseline:
        targets["baseline"] = args.baseline.resolve()
    next_address = {"127.20": 0, "127.21": 0}

    def fresh(net: str) -> list[str]:
        start = next_address[net]
        next_address[net] += args.sessions
        if next_address[net] > 254 * 256:
            raise SystemExit("more sessions than addresses in a /16: lower --sessions/--rounds")
        return addresses(net, start, args.sessions)

    settings = Settings(with_smtpgate=False, with_aiosmtpd=False)  # its postscreen: unused
    with contextlib.ExitStack() as cleanup:
        image = None if args.image is None else args.image or build_image(cleanup)
        stack = cleanup.enter_context(Stack(settings))
        dns_port = start_dnsmasq(stack, args.ttl)
        gates = {name: start_gate(stack, f"gate-{name}", gate_env(
                     stack, source, dns_port, args.greet_wait,
                     args.shadow.resolve() if args.shadow and name == "smtpgate" else None,
                     args.replay_records and name == "smtpgate"))
                 for name, source in targets.items()}
        pythons = {name: f"{host_python(gate.pid)} (host, {targets[name]})"
                   for name, gate in gates.items()}
        if image is not None:
            gates["image"] = start_image_gate(
                stack, image, gate_env(stack, root, dns_port, args.greet_wait), "gate-image",
                cleanup)
            pythons["image"] = gates["image"].python
        for name, python in pythons.items():
            print(f"{name}: {python}", flush=True)
        results: dict[str, list[dict]] = {name: [] for name in gates}
        warm = addresses("127.20", 254 * 250, 20)  # never used by a phase
        for gate in gates.values():
            measure(stack, gate, warm, args.concurrency, listed=False)
        for round_number in range(args.rounds):
            order = list(gates.items())
            random.shuffle(order)  # neither target always runs on a cooler machine
            for name, gate in order:
                ips = fresh("127.20")
                row: dict = {"round": round_number}
                for phase, phase_ips, listed in (("first", ips, False),
                                                 ("returning", ips, False),
                                                 ("listed", fresh("127.21"), True)):
                    profiling = (args.profile and name == "smtpgate" and round_number == 0
                                 and phase == args.profile_phase)
                    with profiled(gate, args.profile if profiling else None):
                        row[phase] = measure(stack, gate, phase_ips, args.concurrency, listed)
                results[name].append(row)
                print(name, json.dumps(row), flush=True)
        if args.replay_records:
            print("replay records:", replay_record_sizes(stack.redis_port), flush=True)
    report = {"settings": vars(args) | {"baseline": str(args.baseline or ""),
                                        "image": image or "",
                                        "profile": str(args.profile or ""),
                                        "json": str(args.json or ""), "summarize": "",
                                        "shadow": str(args.shadow or "")},
              "cpus": os.cpu_count(), "load_before": os.getloadavg(), "pythons": pythons,
              "results": results}
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def replay_record_sizes(redis_port: int) -> str:
    """How many replay records the stream holds, their mean JSON size, and Redis's
    MEMORY USAGE of the whole stream per record."""
    import redis

    client = redis.Redis(port=redis_port)
    try:
        entries = client.xrange("smtpgate:replay", "-", "+")
        usage = client.memory_usage("smtpgate:replay", samples=0) or 0
    finally:
        client.close()
    if not entries:
        return "none"
    mean = sum(len(fields[b"r"]) for _, fields in entries) / len(entries)
    return (f"{len(entries)} records, {mean:.0f} bytes of JSON each, "
            f"{usage / len(entries):.0f} bytes of Redis memory each (MEMORY USAGE)")


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| target | phase | smtpgate CPU ms/session (each round) | Redis CPU ms | "
             "Redis cmds | Redis round trips | sessions/s | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for phase in ("first", "returning", "listed"):
            cells = [r[phase] for r in rows]
            lines.append(
                f"| {name} | {phase} | {' / '.join(str(c['smtpgate_cpu_ms']) for c in cells)} | "
                f"{' / '.join(str(c['redis_cpu_ms']) for c in cells)} | "
                f"{cells[-1]['redis_commands']} | {cells[-1]['redis_round_trips']} | "
                f"{' / '.join(str(c['sessions_per_s']) for c in cells)} | "
                f"{sum(sum(c['errors'].values()) for c in cells)} |")
    for name, rows in results.items():
        if rows and "runtime_cpu_ms" in rows[0]["first"]:
            each = "; ".join(f"{phase} {' / '.join(str(r[phase]['runtime_cpu_ms']) for r in rows)}"
                             for phase in ("first", "returning", "listed"))
            lines += ["", f"{name}: conmon and the podman client besides, CPU ms/session: {each}"]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StackError as exc:
        print(f"benchmarks.first_contact: {exc}", file=sys.stderr)
        sys.exit(1)
