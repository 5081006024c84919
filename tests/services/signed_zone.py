"""signed_zone - a validating resolver (unbound) over a DNSSEC-signed test zone, for DANE tests

SYNOPSIS
    SignedZoneServer(workdir: Path, zone="example.test", plain_zone="plain.test")
        .host, .port, .nameserver       "127.0.0.1:PORT" (for SMTPGATE_NAMESERVERS)
        .start() -> None ; .stop() -> None
        .set(records) -> None           the signed zone's records besides SOA/NS/DNSKEY:
                                        (name, type, value[, ttl]), replacing all before
        .set_plain(records) -> None     the same for the unsigned zone
        .pick_ports() -> None

DESCRIPTION
    unbound runs as a validating resolver ("validator iterator") with a
    trust anchor (the DS of the zone's key) for `zone`, which it serves
    to itself as an auth-zone for upstream only: its answers go through
    the validator as if they came from the zone's own servers, so a
    signed answer comes back with the AD bit (to a query that asks for
    it, RFC 6840 5.7) and a badly signed one as SERVFAIL. The zone is
    signed here with dnspython's dns.dnssec.sign_zone (an ECDSA P-256
    key made at start, NSEC for the denials), so no signing tool is
    needed. `plain_zone` is unbound's local data: answered without AD,
    as from a zone nobody signed.

    Every change rewrites and re-signs the zone file and runs
    "unbound-control reload", which empties the caches: the next query
    sees the change. Nothing is forwarded or resolved from the internet.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from pathlib import Path

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec

from .dns_server import _record
from .ports import free_port
from .procs import run, spawn, stop_process
from .waiting import log_tail, wait_until


class SignedZoneServer:
    def __init__(self, workdir: Path, zone: str = "example.test",
                 plain_zone: str = "plain.test") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.zone = dns.name.from_text(zone)
        self.plain_zone = dns.name.from_text(plain_zone)
        self.conf_path = self.workdir / "unbound.conf"
        self.zone_path = self.workdir / "signed.zone"
        self.plain_path = self.workdir / "plain.conf"
        self.anchor_path = self.workdir / "anchor.ds"
        self.log_path = self.workdir / "unbound.log"
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._dnskey = dns.dnssec.make_dnskey(self._key.public_key(),
                                              dns.dnssec.Algorithm.ECDSAP256SHA256, flags=257)
        self._records: list[tuple[str, str, str, int]] = []
        self._plain: list[tuple[str, str, str, int]] = []
        self._proc = None
        self.pick_ports()

    def pick_ports(self) -> None:
        self.port = free_port(self.host, udp=True)
        self.nameserver = f"{self.host}:{self.port}"

    def _write_config(self) -> None:
        ds = dns.dnssec.make_ds(self.zone, self._dnskey, "SHA256")
        self.anchor_path.write_text(f"{self.zone} IN DS {ds}\n")
        self.conf_path.write_text(f"""server:
  interface: {self.host}@{self.port}
  port: {self.port}
  do-ip6: no
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
  module-config: "validator iterator"
  trust-anchor-file: "{self.anchor_path}"
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  # .test is one of unbound's built-in refused zones (RFC 6761)
  local-zone: "test." nodefault
  local-zone: "{self.plain_zone}" static
  include: "{self.plain_path}"
auth-zone:
  name: "{self.zone}"
  zonefile: "{self.zone_path}"
  for-upstream: yes
  for-downstream: no
  fallback-enabled: no
remote-control:
  control-enable: yes
  control-interface: "{self.workdir}/control.sock"
  control-use-cert: no
""")

    def _write_zones(self) -> None:
        origin = self.zone.to_text()
        lines = [f"{origin} 300 IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 60",
                 f"{origin} 300 IN NS ns.{origin}", f"ns.{origin} 300 IN A 127.0.0.1"]
        lines += [f"{name} {ttl} IN {rtype} {value}" for name, rtype, value, ttl in self._records]
        zone = dns.zone.from_text("\n".join(lines) + "\n", origin=self.zone, relativize=False)
        now = datetime.datetime.now(datetime.UTC)
        with zone.writer() as txn:
            dns.dnssec.sign_zone(zone, txn=txn, keys=[(self._key, self._dnskey)],
                                 add_dnskey=True, dnskey_ttl=300,
                                 inception=now - datetime.timedelta(hours=1),
                                 expiration=now + datetime.timedelta(days=30))
        self._replace(self.zone_path, zone.to_text(relativize=False))
        plain = ["server:"] + [f"  local-data: '{name} {ttl} IN {rtype} {value}'"
                               for name, rtype, value, ttl in self._plain]
        self._replace(self.plain_path, "\n".join(plain) + "\n")

    @staticmethod
    def _replace(path: Path, text: str) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def _answers(self) -> bool:
        query = dns.message.make_query(f"ns.{self.zone}", "A")
        query.flags |= dns.flags.AD
        reply = dns.query.udp(query, self.host, port=self.port, timeout=0.5)
        return bool(reply.flags & dns.flags.AD)  # the anchor is loaded and the zone validates

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._write_config()
        self._write_zones()
        run(["unbound-checkconf", str(self.conf_path)], timeout=10)
        self._proc = spawn(["unbound", "-d", "-c", str(self.conf_path)], self.log_path)
        try:
            wait_until(self._answers, timeout, f"validating unbound on {self.nameserver}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{log_tail(self.log_path)}") from None

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    def _apply(self) -> None:
        self._write_zones()
        run(["unbound-control", "-c", str(self.conf_path), "reload"], timeout=10,
            what=f"unbound-control reload (log: {log_tail(self.log_path, 10)})")
        wait_until(self._answers, 10, f"validating unbound on {self.nameserver} after reload")

    def set(self, records: Iterable) -> None:
        self._records = [_record(entry) for entry in records]
        self._apply()

    def set_plain(self, records: Iterable) -> None:
        self._plain = [_record(entry) for entry in records]
        self._apply()

    def __repr__(self) -> str:
        return f"<SignedZoneServer {self.zone} {self.nameserver}>"
