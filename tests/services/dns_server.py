"""dns_server - a real DNS server (unbound) answering for a test world

SYNOPSIS
    DnsServer(workdir: Path)
        .host: str                 "127.0.0.1"
        .port: int                 UDP and TCP
        .nameserver: str           "127.0.0.1:PORT" (for SMTPGATE_NAMESERVERS)
        .log_path: Path
        .start() -> None
        .stop() -> None
        .set(records) -> None      records: iterable of (name, type, value[, ttl])
        .add_ptr(ip, name, ttl=300) -> None
        .remove(name, rtype=None) -> None
        .clear() -> None           no records, no special zones
        .set_servfail_zone(zone) -> None
        .set_timeout_zone(zone) -> None
        .records() -> list[tuple[str, str, str, int]]
        .resolver(timeout=2.0) -> dns.resolver.Resolver
        .queries(rtype) -> int     queries of that type asked so far (unbound's statistics)
    reverse_name(ip) -> str        "77.0.0.127.in-addr.arpa" or the ip6.arpa name

DESCRIPTION
    unbound runs with one local zone "." of type static, so every name is
    answered locally: a name with records answers them (NOERROR, or NODATA
    for a type it lacks), every other name is NXDOMAIN at once. Nothing is
    forwarded or resolved from the internet (there is none here). Unbound's
    built-in zones (localhost, 1.0.0.127.in-addr.arpa -> localhost) stay.

    set() adds records; for every (name, type) it mentions, the old records
    of that name and type are replaced by the new ones (several values of
    one name and type in one call make an RRset). Types: anything dnspython
    parses (A, AAAA, MX "10 mail.example.test", PTR, TXT "hello" or
    "\\"two words\\"", CNAME, NS, SRV, ...). Names and targets are taken as
    absolute. The TTL (default 300) is the one served. Bad input raises
    ValueError naming the record. DNSBL answers are plain A records:
    ("2.0.0.127.zen.test", "A", "127.0.0.2").

    Every change rewrites the zone file and runs "unbound-control reload",
    which also empties unbound's caches: the next query sees the change.

    set_servfail_zone(zone): every name at or below zone answers SERVFAIL
    (the zone is forwarded to a harness responder that answers SERVFAIL).
    set_timeout_zone(zone): every query at or below zone is dropped, so the
    client times out. clear() removes both kinds of zones and all records.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename

from .ports import free_port
from .procs import run, spawn, stop_process
from .waiting import log_tail, wait_until

DEFAULT_TTL = 300


def reverse_name(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise ValueError(f"not an IP address: {ip!r}") from exc
    return dns.reversename.from_address(str(address)).to_text(omit_final_dot=True)


def _absolute(name: str) -> str:
    try:
        return dns.name.from_text(name).to_text()
    except dns.exception.DNSException as exc:
        raise ValueError(f"bad DNS name {name!r}: {exc}") from exc


def _record(entry) -> tuple[str, str, str, int]:
    """Validate one (name, type, value[, ttl]) tuple into canonical text."""
    if not isinstance(entry, tuple | list) or len(entry) not in (3, 4):
        raise ValueError(f"DNS record must be (name, type, value[, ttl]), got {entry!r}")
    name, rtype, value = entry[0], str(entry[1]).upper(), str(entry[2])
    ttl = entry[3] if len(entry) == 4 else DEFAULT_TTL
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl < 2**31:
        raise ValueError(f"bad TTL in DNS record {entry!r}")
    try:
        rdtype = dns.rdatatype.from_text(rtype)
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, rdtype, value, origin=dns.name.root
        )
    except Exception as exc:
        raise ValueError(f"bad DNS record {entry!r}: {exc}") from exc
    return _absolute(str(name)), dns.rdatatype.to_text(rdtype), rdata.to_text(), ttl


class _ServfailResponder:
    """A UDP socket that answers every DNS query with SERVFAIL (unbound's upstream)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="dns-servfail", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            with contextlib.suppress(Exception):
                reply = dns.message.make_response(dns.message.from_wire(data))
                reply.set_rcode(dns.rcode.SERVFAIL)
                self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


class DnsServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.pick_ports()
        self.log_path = self.workdir / "unbound.log"
        self.conf_path = self.workdir / "unbound.conf"
        self.zone_path = self.workdir / "zones.conf"
        self._records: dict[tuple[str, str], list[tuple[str, str, str, int]]] = {}
        self._servfail: set[str] = set()
        self._timeout: set[str] = set()
        self._responder: _ServfailResponder | None = None
        self._proc = None
        self._lock = threading.Lock()

    # Process

    def pick_ports(self) -> None:
        """A new port (services.ports.start_on_free_ports)."""
        self.port = free_port(self.host, udp=True)
        self.nameserver = f"{self.host}:{self.port}"

    def _write_config(self) -> None:
        self.conf_path.write_text(
            f"""server:
  interface: {self.host}@{self.port}
  port: {self.port}
  do-ip4: yes
  do-ip6: no
  do-udp: yes
  do-tcp: yes
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{self.workdir}"
  pidfile: "{self.workdir}/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 1
  num-threads: 1
  so-reuseport: no
  module-config: "iterator"
  qname-minimisation: no
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  msg-cache-size: 1m
  extended-statistics: yes
  rrset-cache-size: 1m
  local-zone: "." static
  include: "{self.zone_path}"
remote-control:
  control-enable: yes
  control-interface: "{self.workdir}/control.sock"
  control-use-cert: no
"""
        )

    def _write_zones(self) -> None:
        lines = ["server:"]
        for zone in sorted(self._timeout):
            lines.append(f'  local-zone: "{zone}" deny')
        for zone in sorted(self._servfail):
            lines.append(f'  local-zone: "{zone}" transparent')
        for rrset in self._records.values():
            for name, rtype, value, ttl in rrset:
                lines.append(f"  local-data: '{name} {ttl} IN {rtype} {value}'")
        for zone in sorted(self._servfail):
            lines += [
                "forward-zone:",
                f'  name: "{zone}"',
                f"  forward-addr: {self.host}@{self._responder.port}",
            ]
        tmp = self.zone_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.zone_path)

    def _control(self, *args: str) -> str:
        return run(
            ["unbound-control", "-c", str(self.conf_path), *args],
            timeout=10,
            what=f"unbound-control {' '.join(args)} (log: {log_tail(self.log_path, 10)})",
        ).stdout

    def queries(self, rtype: str) -> int:
        """How many queries of this type the server has been asked since it started."""
        for line in self._control("stats_noreset").splitlines():
            key, _, value = line.partition("=")
            if key == f"num.query.type.{rtype}":
                return int(value)
        return 0

    def _answers(self) -> bool:
        query = dns.message.make_query("localhost.", "A")
        dns.query.udp(query, self.host, port=self.port, timeout=0.5)
        return True

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._responder is None:
            self._responder = _ServfailResponder(self.host)
        self._write_config()
        self._write_zones()
        run(["unbound-checkconf", str(self.conf_path)], timeout=10)
        self._proc = spawn(["unbound", "-d", "-c", str(self.conf_path)], self.log_path)
        try:
            wait_until(self._answers, timeout, f"unbound on {self.nameserver}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{log_tail(self.log_path)}") from None

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        if self._responder is not None:
            self._responder.close()
            self._responder = None

    def _apply(self) -> None:
        self._write_zones()
        self._control("reload")
        # reload restarts unbound's worker; answer only once it is back.
        wait_until(self._answers, 10, f"unbound on {self.nameserver} after reload")

    # Records

    def set(self, records: Iterable) -> None:
        if isinstance(records, tuple) and records and isinstance(records[0], str):
            records = [records]  # a single record given bare
        parsed = [_record(entry) for entry in records]
        with self._lock:
            fresh: dict[tuple[str, str], list] = {}
            for record in parsed:
                fresh.setdefault((record[0], record[1]), []).append(record)
            self._records.update(fresh)
            self._apply()

    def add_ptr(self, ip: str, name: str, ttl: int = DEFAULT_TTL) -> None:
        self.set([(reverse_name(ip), "PTR", name, ttl)])

    def remove(self, name: str, rtype: str | None = None) -> None:
        name = _absolute(name)
        with self._lock:
            for key in list(self._records):
                if key[0] == name and (rtype is None or key[1] == rtype.upper()):
                    del self._records[key]
            self._apply()

    def records(self) -> list[tuple[str, str, str, int]]:
        return [record for rrset in self._records.values() for record in rrset]

    def clear(self) -> None:
        with self._lock:
            changed = bool(self._records or self._servfail or self._timeout)
            self._records.clear()
            self._servfail.clear()
            self._timeout.clear()
            if changed:
                self._apply()

    def set_servfail_zone(self, zone: str) -> None:
        zone = _absolute(zone)
        with self._lock:
            self._timeout.discard(zone)
            self._servfail.add(zone)
            self._apply()

    def set_timeout_zone(self, zone: str) -> None:
        zone = _absolute(zone)
        with self._lock:
            self._servfail.discard(zone)
            self._timeout.add(zone)
            self._apply()

    def resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = timeout
        resolver.timeout = timeout
        return resolver

    def __repr__(self) -> str:
        return f"<DnsServer {self.nameserver}>"
