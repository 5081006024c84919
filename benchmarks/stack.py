"""stack - the real services a benchmark run talks to, started in a temporary directory.

SYNOPSIS
    World(base) -> the names, addresses and keys every service agrees on
    Stack(settings).start() / .stop()          (also a context manager)
    Stack.redis_port, .dns_addr, .service_pid("redis"|"dnsmasq")
    Stack.postfix.ports["direct"|"postscreen"|"postscreen_mx"|"next_hop"]
    Stack.smtpgate: Smtpgate | None            .pid, .port, .pids()
    Stack.aiosmtpd: Smtpgate | None            the aiosmtpd front end, same shape (.runtime)
    Stack.postfix.pids(), .master_pid(), .smtpd_processes()
    Stack.postfix.delivered(marker), .queued(marker), .delivered_by_marker()
    Stack.set_process_limit(n)                 default_process_limit, then postfix reload
    free_port(host="127.0.0.1") -> int

DESCRIPTION
    One run starts, on loopback only and on free ports:

    - redis-server (no persistence), loaded with the image's keys (PSA, VDOM,
      VALI, VBOX) for the test world below;
    - dnsmasq on port 53 of a random 127.83.x.y address: the client's PTR and
      A records, the HELO name, and two DNSBL zones (bl1, bl2) listing the
      clients in 127.0.1.0/24; answers with a TTL of Settings.dns_ttl (300 s)
      except the one-address case's names (3600 s, as always). For the MX
      traffic cases, synth-domain gives every address of 127.20.0.0/16,
      127.21-25.0.0/16 a forward-confirmed name
      (c-127-20-1-2.pool.bench.test), both DNSBL zones list all of
      127.21.0.0/16 and 127.23-25.0.0/16, and PSA rejects 127.22.0.0/16
      (Redis and postscreen);
    - one private Postfix instance (postfix -c DIR) with a real queue and the
      discard transport, offering three services: "direct" (smtpd with the
      image's restrictions), "postscreen" (postscreen configured like the
      image in front of smtpd), "postscreen_mx" (the same postscreen with a
      pre-queue limit above the MX cases' concurrency and a cache of its
      own), and "next_hop" (smtpd trusting XCLIENT from
      127.0.0.1, what smtpgate relays to). Postfix reads its resolver from
      /etc/resolv.conf and cannot be given a port, so the instance runs in
      its own mount namespace (unshare -m) with a resolv.conf naming the
      dnsmasq address and an empty hosts file bound over /etc;
    - smtpgate serve, configured through its environment, once the rest is
      up and only when asked (start_smtpgate);
    - the aiosmtpd front end (benchmarks.aiosmtpd_front) with the same
      environment on its own port, relaying to the same next hop, when asked
      (start_aiosmtpd_front).

    Every wait has a deadline; failure raises StackError with the service's
    log tail. stop() stops what start() started, in reverse order, by pid.

    Deliveries are counted per message, never as all "status=sent" lines of
    the log: every benchmark message carries a marker in its Message-ID
    (<MARKER@client.bench.test>, benchmarks.load), and Postfix.delivered(marker)
    counts the discard transport's status=sent lines of the queue files that
    cleanup logged with that Message-ID (DeliveryLog). A message of an earlier
    case still in the queue cannot land in another case's count, and a message
    queued twice shows as queued(marker) above the number sent.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    """A service did not start or answer in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port from the test harness's allocator (tests/services/ports.py): from a block of
    ports this process has claimed, outside the kernel's ephemeral range, never handed out
    twice. A port bound to 0 and closed again can be taken by any outgoing connection
    before the service binds it."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.append(str(ROOT / "tests"))
    from services.ports import free_port as allocate

    return allocate(host)


def wait_for(what: str, probe, deadline: float, log: Path | None = None) -> None:
    """Call probe() until it returns true or the deadline (seconds from now) passes."""
    end = time.monotonic() + deadline
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            if probe():
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    tail = ""
    if log and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise StackError(f"{what} not ready after {deadline:.0f}s ({last}){tail}")


def smtp_banner(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """True once something on port greets with 220 (postscreen's "220-" teaser counts)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        data = b""
        while b"\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return False
            data += chunk
        if _final_line(data):
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
                s.recv(512)
        return data.startswith(b"220")


def _final_line(data: bytes) -> bool:
    lines = data.split(b"\r\n")
    return any(len(line) >= 4 and line[3:4] == b" " for line in lines)


@dataclass(frozen=True)
class World:
    """Names, addresses and keys shared by DNS, Redis, Postfix and the clients."""

    domain: str = "bench.test"
    mx_name: str = "mx.bench.test"
    client_name: str = "client.bench.test"
    client_ip: str = "127.0.0.1"
    rcpt: str = "user@bench.test"
    sender: str = "sender@client.bench.test"
    dnsbl_zones: tuple[str, ...] = ("bl1.bench.test", "bl2.bench.test")
    listed_net: str = "127.0.1"  # 127.0.1.1 .. .listed_count: in both DNSBL zones
    listed_count: int = 60
    denied_net: str = "127.0.2"  # 127.0.2.0/24: PSA reject (access list)
    idle_net: str = "127.1"  # 127.1.x.y: idle clients, unknown to DNS
    slow_net: str = "127.0.4"  # 127.0.4.1 .. .slow_count: slowN.bench.test, PTR and A
    slow_count: int = 8
    # The MX traffic cases: clients never seen before, each /16 with a forward-confirmed name
    # per address (dnsmasq's synth-domain: c-127-20-1-2.pool.bench.test <-> 127.20.1.2)
    pool_domain: str = "pool.bench.test"
    pool_net: str = "127.20"  # first contacts that pass screening (accepted, unknown recipient)
    pool_listed_net: str = "127.21"  # listed in both DNSBL zones
    # and these /16s too: smtpgate refuses a listed client in a millisecond or two, so the
    # listed and mix cases together take more addresses than half of one /16 holds (32,512)
    pool_listed_more: tuple[str, ...] = ("127.23", "127.24", "127.25")
    pool_denied_net: str = "127.22"  # PSA reject (access list)
    unknown_rcpt: str = "nobody@bench.test"

    def pool_listed_nets(self) -> tuple[str, ...]:
        return (self.pool_listed_net, *self.pool_listed_more)

    def pool_nets(self) -> tuple[str, ...]:
        return (self.pool_net, *self.pool_listed_nets(), self.pool_denied_net)

    def pool_name(self, ip: str) -> str:
        """The name dnsmasq's synth-domain gives a pool address (PTR and A agree)."""
        return f"c-{ip.replace('.', '-')}.{self.pool_domain}"

    def listed_ips(self) -> list[str]:
        return [f"{self.listed_net}.{i}" for i in range(1, self.listed_count + 1)]

    def denied_ips(self) -> list[str]:
        return [f"{self.denied_net}.{i}" for i in range(1, self.listed_count + 1)]

    def idle_ips(self, n: int) -> list[str]:
        """Enough addresses that no one client exceeds 40 connections (postscreen allows 50)."""
        count = max(1, (n + 39) // 40)
        return [f"{self.idle_net}.{1 + i // 250}.{1 + i % 250}" for i in range(count)]

    def slow_ips(self) -> list[str]:
        """Known clients (FCrDNS passes): 150 slow senders stay under 50 per address."""
        return [f"{self.slow_net}.{i}" for i in range(1, self.slow_count + 1)]

    @property
    def dnsbl_sites(self) -> str:
        # the image: ix.dnsbl.manitu.net*2 zen.spamhaus.org*2, threshold 3
        return " ".join(f"{z}*2" for z in self.dnsbl_zones)

    dnsbl_threshold: int = 3


@dataclass
class Settings:
    workers: int = 1
    uvloop: bool = True
    greet_wait: float = 6.0
    dns_ttl: int = 300  # TTL of dnsmasq's answers, except the one-address case's names (3600)
    postscreen_mx_queue_limit: int = 5000  # postscreen_pre_queue_limit of the MX cases' service
    with_smtpgate: bool = True
    with_aiosmtpd: bool = True  # the aiosmtpd front end (benchmarks.aiosmtpd_front)
    keep: bool = False  # keep the temporary directory (logs) after stop
    smtpgate_cmd: tuple[str, ...] = (sys.executable, "-m", "smtpgate", "serve")
    aiosmtpd_cmd: tuple[str, ...] = (sys.executable, "-m", "benchmarks.aiosmtpd_front")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: only its own group
            self.popen.wait(5)


def spawn(name: str, argv: list[str], workdir: Path, env: dict | None = None) -> Proc:
    log = workdir / f"{name}.log"
    fh = open(log, "wb")  # noqa: SIM115 - handed to the child, closed when it ends
    try:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, cwd=workdir,
        )
    except OSError as exc:
        raise StackError(f"cannot start {name} ({argv[0]}): {exc}") from None
    finally:
        fh.close()
    return Proc(name, popen, log)


# --- redis ---------------------------------------------------------------------------------------


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One RESP command, raw reply bytes (enough for PING, SET, INFO)."""
    payload = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        payload += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = s.recv(65536)
        if data.startswith(b"$"):
            size = int(data[1:data.index(b"\r\n")])
            need = data.index(b"\r\n") + 2 + size + 2
            while len(data) < need:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data


def redis_info_commands(port: int) -> dict[str, int]:
    """Calls per command since start, from INFO commandstats."""
    raw = redis_command(port, "INFO", "commandstats").decode(errors="replace")
    calls = {}
    for line in raw.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            for item in rest.split(","):
                if item.startswith("calls="):
                    calls[name[8:]] = int(item[6:])
    return calls


# --- the stack -----------------------------------------------------------------------------------


@dataclass
class Postfix:
    config_dir: Path
    ports: dict[str, int]
    log: Path
    mount_ns: Proc | None = None

    def master_pid(self) -> int | None:
        try:
            return int((self.config_dir / "queue/pid/master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        from benchmarks.procstat import descendants

        master = self.master_pid()
        return [master, *descendants(master)] if master else []

    def smtpd_processes(self) -> tuple[int, int]:
        """(smtpd processes of this instance, those serving a client): children of the master
        whose command line names smtpd, busy when one holds an ESTABLISHED TCP socket."""
        from benchmarks.procstat import smtpd_processes

        master = self.master_pid()
        return smtpd_processes(master) if master else (0, 0)

    deliveries: DeliveryLog | None = None

    def delivered(self, marker: str) -> int:
        """Deliveries (status=sent) of the messages whose Message-ID is <marker@...>."""
        return self._log().sent.get(marker, 0)

    def queued(self, marker: str) -> int:
        """Queue files (cleanup's message-id= lines) made for messages marked `marker`."""
        return self._log().queued.get(marker, 0)

    def delivered_by_marker(self) -> dict[str, int]:
        """Every marker's deliveries so far (a copy), to see which landed in a window."""
        return dict(self._log().sent)

    def _log(self) -> DeliveryLog:
        if self.deliveries is None:
            self.deliveries = DeliveryLog(self.log)
        self.deliveries.read()
        return self.deliveries


class DeliveryLog:
    """Postfix's log, read on from where it was left: deliveries counted per message marker.

    cleanup logs "QUEUEID: message-id=<ID>" for every message it queues, and the discard
    transport "QUEUEID: to=<...>, ..., status=sent (...)" for every recipient it takes; the
    marker of a message is the part of its Message-ID before "@". Only messages whose
    queue file was seen being made count (a queue ID may be reused later: the newest
    message-id line wins, as the log is read in order).
    """

    QUEUED = re.compile(rb"\]: ([0-9A-Za-z]+): message-id=<([^>@\s]*)@")
    SENT = re.compile(rb"\]: ([0-9A-Za-z]+): to=<[^>]*>, .*\bstatus=sent\b")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.marker_of: dict[bytes, str] = {}
        self.queued: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()

    def read(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # a line not written whole yet
        for line in lines:
            if match := self.QUEUED.search(line):
                marker = match.group(2).decode(errors="replace")
                self.marker_of[match.group(1)] = marker
                self.queued[marker] += 1
            elif (match := self.SENT.search(line)) and match.group(1) in self.marker_of:
                self.sent[self.marker_of[match.group(1)]] += 1


@dataclass
class Smtpgate:
    proc: Proc
    port: int
    env: dict[str, str]
    runtime: str = ""  # what the aiosmtpd front end says it runs (its ready line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        from benchmarks.procstat import descendants

        return [self.pid, *descendants(self.pid)] if self.proc.popen.poll() is None else []


@dataclass
class Stack:
    settings: Settings = field(default_factory=Settings)
    world: World = field(default_factory=World)
    workdir: Path | None = None
    redis_port: int = 0
    dns_addr: str = ""
    postfix: Postfix | None = None
    smtpgate: Smtpgate | None = None
    aiosmtpd: Smtpgate | None = None
    procs: list[Proc] = field(default_factory=list)
    cert: tuple[Path, Path] | None = None
    ca_pem: Path | None = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def service_pid(self, name: str) -> int | None:
        """The pid of a service started here ("redis", "dnsmasq"), None if it is not running."""
        for proc in self.procs:
            if proc.name == name and proc.popen.poll() is None:
                return proc.pid
        return None

    def __exit__(self, *exc) -> None:
        self.stop()

    # start and stop

    def start(self) -> None:
        for tool in ("redis-server", "dnsmasq", "postfix", "smtp-source", "unshare"):
            if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
                raise StackError(f"{tool} is not installed (apt-get install -y it)")
        # /var/tmp: Postfix only writes its log file below /var (maillog_file_prefixes)
        self.workdir = Path(tempfile.mkdtemp(prefix="smtpgate-bench-", dir="/var/tmp"))
        os.chmod(self.workdir, 0o755)
        try:
            self._make_cert()
            self._start_redis()
            self._start_dns()
            self._start_postfix()
            if self.settings.with_smtpgate:
                self.start_smtpgate()
            if self.settings.with_aiosmtpd:
                self.start_aiosmtpd_front()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.aiosmtpd:
            self.aiosmtpd.proc.stop()
            self.aiosmtpd = None
        if self.smtpgate:
            self.smtpgate.proc.stop()
            self.smtpgate = None
        if self.postfix:
            self._stop_postfix()
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self.workdir and not self.settings.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _make_cert(self) -> None:
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert(self.world.mx_name)
        cert, key = self.workdir / "cert.pem", self.workdir / "key.pem"
        leaf.private_key_pem.write_to_path(str(key))
        with open(cert, "wb") as fh:
            for blob in leaf.cert_chain_pems:
                fh.write(blob.bytes())
        os.chmod(key, 0o644)  # Postfix's smtpd reads it after dropping privileges? it reads as root
        self.ca_pem = self.workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_pem))
        self.cert = (cert, key)

    def _start_redis(self) -> None:
        self.redis_port = free_port()
        proc = spawn("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self.workdir), "--maxclients", "20000",
        ], self.workdir)
        self.procs.append(proc)
        wait_for("redis-server", lambda: redis_command(self.redis_port, "PING") == b"+PONG\r\n",
                 10, proc.log)
        w = self.world
        keys = {
            f"VDOM:{w.domain}": "1",
            f"VALI:{w.rcpt}": w.rcpt,
            f"VBOX:{w.rcpt}": f"{w.domain}/user/",
            f"PSA:{w.denied_net}.0/24": "reject",
            f"PSA:{w.pool_denied_net}.0.0/16": "reject",
        }
        for k, v in keys.items():
            if redis_command(self.redis_port, "SET", k, v) != b"+OK\r\n":
                raise StackError(f"redis SET {k} failed")

    def _start_dns(self) -> None:
        # port 53 because Postfix's resolver cannot be told another; a random 127.83.x.y
        # address so that two runs (or a test suite) do not collide
        for _ in range(20):
            addr = f"127.83.{random.randint(0, 255)}.{random.randint(1, 254)}"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind((addr, 53))
                except OSError:
                    continue
            break
        else:
            raise StackError("no free 127.83.x.y:53 for dnsmasq")
        self.dns_addr = addr
        w = self.world
        lines = [
            "no-resolv", "no-hosts", "no-negcache", f"local-ttl={self.settings.dns_ttl}",
            f"listen-address={addr}", "bind-interfaces", "port=53", "cache-size=10000",
            f"local=/{w.domain}/", "local=/127.in-addr.arpa/",
            # the one-address (best) case's names keep the hour-long TTL they always had
            f"host-record={w.client_name},{w.client_ip},3600",
            f"host-record={w.mx_name},127.0.0.1,3600",
            f"mx-host={w.domain},{w.mx_name},10",
        ]
        lines += [f"host-record=slow{ip.rsplit('.', 1)[1]}.{w.domain},{ip},3600"
                  for ip in w.slow_ips()]
        lines += [f"synth-domain={w.pool_domain},{net}.0.0/16,c-" for net in w.pool_nets()]
        for zone in w.dnsbl_zones:
            lines.append(f"local=/{zone}/")
            for ip in w.listed_ips():
                rev = ".".join(reversed(ip.split(".")))
                lines.append(f"address=/{rev}.{zone}/127.0.0.2")
            # each listed /16 at once: its query names all end in e.g. 21.127.<zone>
            for net in w.pool_listed_nets():
                rev16 = ".".join(reversed(net.split(".")))
                lines.append(f"address=/{rev16}.{zone}/127.0.0.2")
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join(lines) + "\n")
        proc = spawn("dnsmasq", [
            "dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--user=root",
        ], self.workdir)
        self.procs.append(proc)
        wait_for("dnsmasq", lambda: self._dns_answers(w.client_name) == w.client_ip, 10, proc.log)

    def _dns_answers(self, name: str) -> str | None:
        import dns.exception
        import dns.message
        import dns.query
        import dns.rdatatype

        q = dns.message.make_query(name, dns.rdatatype.A)
        try:
            r = dns.query.udp(q, self.dns_addr, timeout=0.5, port=53)
        except dns.exception.Timeout:  # dnsmasq not answering yet: wait_for asks again
            return None
        for rrset in r.answer:
            for rd in rrset:
                return rd.to_text()
        return None

    def _start_postfix(self) -> None:
        w = self.world
        cfg = self.workdir / "postfix"
        (cfg / "queue").mkdir(parents=True)
        data = cfg / "data"
        data.mkdir()
        shutil.chown(data, "postfix", "postfix")
        ports = {"direct": free_port(), "postscreen": free_port(), "next_hop": free_port(),
                 "postscreen_mx": free_port()}
        log = self.workdir / "postfix.log"
        for name, content in {
            "vdom": f"{w.domain} OK\n",
            "vbox": f"{w.rcpt} {w.domain}/user/\n",
            "vali": f"{w.rcpt} {w.rcpt}\n",
            "rev": "192.0.2.1 OK\n",
            "hlo": "never.bench.test OK\n",
            "recip": "sendonly@bench.test REJECT\n",
            "psa.cidr": f"{w.denied_net}.0/24 reject\n{w.pool_denied_net}.0.0/16 reject\n",
        }.items():
            (cfg / name).write_text(content)
        cert, key = self.cert
        t = f"texthash:{cfg}"
        main_cf = f"""
compatibility_level = 3.6
config_directory = {cfg}
queue_directory = {cfg}/queue
data_directory = {data}
maillog_file = {log}
mail_owner = postfix
setgid_group = postdrop
myhostname = {w.mx_name}
mydomain = {w.domain}
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
# the benchmark client (127.0.0.1) must not be trusted, or every check is skipped
mynetworks = 192.0.2.254/32
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtputf8_enable = no
default_process_limit = 300
default_transport = discard
relay_transport = discard
local_transport = discard
virtual_transport = discard
virtual_mailbox_domains = {t}/vdom
virtual_mailbox_maps = {t}/vbox
virtual_alias_maps = {t}/vali
smtpd_helo_required = yes
smtpd_client_restrictions = permit_mynetworks, check_client_access {t}/rev,
    reject_unknown_client_hostname
smtpd_helo_restrictions = permit_mynetworks, check_helo_access {t}/hlo,
    reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname, reject_unknown_helo_hostname
smtpd_relay_restrictions = reject_non_fqdn_recipient, reject_unknown_recipient_domain,
    permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access {t}/recip
smtpd_data_restrictions = reject_unauth_pipelining
message_size_limit = 26214400
disable_vrfy_command = yes
strict_rfc821_envelopes = yes
recipient_delimiter = +
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
postscreen_access_list = permit_mynetworks, cidr:{cfg}/psa.cidr
# the image leaves this at ignore (a bug); drop is what smtpgate does with PSA reject
postscreen_denylist_action = drop
postscreen_greet_action = enforce
postscreen_greet_wait = {self.settings.greet_wait:g}s
postscreen_dnsbl_sites = {w.dnsbl_sites}
postscreen_dnsbl_threshold = {w.dnsbl_threshold}
postscreen_dnsbl_action = drop
postscreen_cache_map = btree:$data_directory/postscreen_cache
"""
        (cfg / "main.cf").write_text(main_cf)
        lean = (
            "-o smtpd_client_restrictions= -o smtpd_helo_restrictions= -o smtpd_helo_required=no"
            " -o smtpd_recipient_restrictions= -o smtpd_data_restrictions="
            " -o smtpd_relay_restrictions=reject_unauth_destination"
            " -o smtpd_authorized_xclient_hosts=127.0.0.1 -o smtpd_tls_security_level=none"
            " -o smtpd_peername_lookup=no"
        )
        # The MX traffic cases' postscreen: the same settings, but room for as many clients
        # in the greet wait as the cases keep in flight (the pre-queue limit is otherwise
        # default_process_limit, and a client past it gets 421), and a cache of its own (two
        # postscreen processes must not share one btree file)
        mx_screen = (f"-o postscreen_pre_queue_limit={self.settings.postscreen_mx_queue_limit}"
                     " -o postscreen_cache_map=btree:$data_directory/postscreen_mx_cache")
        master_cf = f"""
127.0.0.1:{ports['direct']} inet n - n - - smtpd
127.0.0.1:{ports['postscreen']} inet n - n - 1 postscreen
127.0.0.1:{ports['postscreen_mx']} inet n - n - 1 postscreen {mx_screen}
smtpd pass - - n - - smtpd
dnsblog unix - - n - 0 dnsblog
tlsproxy unix - - n - 0 tlsproxy
127.0.0.1:{ports['next_hop']} inet n - n - - smtpd {lean}
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
virtual unix - n n - - virtual
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""
        (cfg / "master.cf").write_text(master_cf)
        resolv = f"nameserver {self.dns_addr}\noptions timeout:2\n"
        (self.workdir / "resolv.conf").write_text(resolv)
        (self.workdir / "hosts").write_text("")
        # The master daemonizes inside the new mount namespace; the bind mounts die with it.
        script = (
            f"mount --bind {self.workdir}/resolv.conf /etc/resolv.conf && "
            f"mount --bind {self.workdir}/hosts /etc/hosts && "
            f"exec postfix -c {cfg} start"
        )
        self.postfix = Postfix(cfg, ports, log)
        start = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            capture_output=True, text=True, timeout=60,
        )
        if start.returncode != 0:
            raise StackError(f"postfix start failed: {start.stdout}{start.stderr}".strip())
        for name, port in ports.items():
            wait_for(f"postfix {name} service", lambda p=port: smtp_banner(p), 20, log)

    def set_process_limit(self, limit: int, deadline: float = 20.0) -> int:
        """Set default_process_limit and reload Postfix (every "-" maxproc service follows).

        Returns the limit it replaced."""
        pf = self.postfix
        current = subprocess.run(["postconf", "-c", str(pf.config_dir), "-h",
                                  "default_process_limit"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        for argv in (["postconf", "-c", str(pf.config_dir), "-e",
                      f"default_process_limit={limit}"],
                     ["postfix", "-c", str(pf.config_dir), "reload"]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise StackError(f"{' '.join(argv[:1] + argv[3:])} failed: "
                                 f"{done.stdout}{done.stderr}".strip())
        time.sleep(0.5)  # the master reads its files again after SIGHUP
        for name, port in pf.ports.items():
            wait_for(f"postfix {name} service", lambda p=port: smtp_banner(p), deadline, pf.log)
        return int(current) if current.isdigit() else 100

    def _stop_postfix(self) -> None:
        pf, self.postfix = self.postfix, None
        master = pf.master_pid()
        subprocess.run(["postfix", "-c", str(pf.config_dir), "stop"],
                       capture_output=True, timeout=30, check=False)
        if master:
            end = time.monotonic() + 15
            while time.monotonic() < end and Path(f"/proc/{master}").exists():
                time.sleep(0.05)
            if Path(f"/proc/{master}").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(master, signal.SIGKILL)

    # smtpgate

    def smtpgate_env(self, port: int | None = None) -> dict[str, str]:
        w, s = self.world, self.settings
        cert, key = self.cert
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
        env.update({
            "REDIS": f"redis://127.0.0.1:{self.redis_port}/0",
            "HOSTNAME": w.mx_name,
            "DOMAIN": w.domain,
            "SMTPGATE_MX_LISTEN": f"127.0.0.1:{port or self._smtpgate_port}",
            "SMTPGATE_SUBMISSION_LISTEN": "",
            "SMTPGATE_NEXT_HOP": f"127.0.0.1:{self.postfix.ports['next_hop']}",
            "SMTPGATE_NAMESERVERS": f"{self.dns_addr}:53",
            "SMTPGATE_GREET_WAIT": f"{s.greet_wait:g}",
            "SMTPGATE_DNSBL_SITES": w.dnsbl_sites,
            "SMTPGATE_DNSBL_THRESHOLD": str(w.dnsbl_threshold),
            "SMTPGATE_WORKERS": str(s.workers),
            "SMTPGATE_TLS_CERT": str(cert),
            "SMTPGATE_TLS_KEY": str(key),
            "SMTPGATE_METRICS_LISTEN": "",
            # empty: trust no one, so the benchmark client from 127.0.0.1 gets every check
            "SMTPGATE_MYNETWORKS": "",
            "SMTPGATE_CONNECTION_LIMIT": "20000",
            "SMTPGATE_CLIENT_CONNECTION_COUNT_LIMIT": "50",
            "SMTPGATE_UVLOOP": "yes" if s.uvloop else "no",
            "PYTHONPATH": str(ROOT),
        })
        return env

    def start_smtpgate(self, deadline: float = 30.0) -> Smtpgate:
        self._smtpgate_port = free_port()
        env = self.smtpgate_env()
        proc = spawn("smtpgate", list(self.settings.smtpgate_cmd), self.workdir, env)
        gate = Smtpgate(proc, self._smtpgate_port, env)

        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise StackError(f"smtpgate exited with {proc.popen.returncode}:\n"
                                 + proc.log.read_text(errors="replace")[-3000:])
            return b"ready" in proc.log.read_bytes() and smtp_banner_any(gate.port)

        try:
            wait_for("smtpgate", ready, deadline, proc.log)
        except StackError:
            proc.stop(grace=3)
            raise
        self.smtpgate = gate
        return gate


    def start_aiosmtpd_front(self, deadline: float = 30.0) -> Smtpgate:
        """The aiosmtpd front end with smtpgate's environment, on a port of its own."""
        port = free_port()
        env = self.smtpgate_env(port)
        proc = spawn("aiosmtpd-front", list(self.settings.aiosmtpd_cmd), self.workdir, env)
        front = Smtpgate(proc, port, env)

        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise StackError(f"aiosmtpd-front exited with {proc.popen.returncode}:\n"
                                 + proc.log.read_text(errors="replace")[-3000:])
            return b"aiosmtpd-front: ready" in proc.log.read_bytes() and smtp_banner(port)

        try:
            wait_for("aiosmtpd-front", ready, deadline, proc.log)
        except StackError:
            proc.stop(grace=3)
            raise
        for line in proc.log.read_text(errors="replace").splitlines():
            if line.startswith("aiosmtpd-front: ready"):
                front.runtime = line.split(" ", 2)[2]
        self.aiosmtpd = front
        return front


def smtp_banner_any(port: int) -> bool:
    """True once the port accepts a connection (smtpgate's banner may wait for the greet wait)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0):
        return True
