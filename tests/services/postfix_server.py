"""postfix_server - a private Postfix instance behind smtpgate, in a temp directory

SYNOPSIS
    PostfixServer(workdir, lmtp_port, milter_port=None, sasl_port=None, main_cf=None)
        .host: str                  "127.0.0.1"
        .port: int                  smtpd (the next hop, XCLIENT allowed)
        .submission_port: int       smtpd with SASL auth (Dovecot), ORIGINATING milter macro
        .config_dir: Path           main.cf, master.cf, the texthash maps
        .log_path: Path             maillog_file
        .start() -> None            postfix -c DIR start; waits for both ports
        .stop() -> None             postfix -c DIR stop; waits for the master to exit
        .reload() -> None
        .postconf(**settings) -> None   edit main.cf (postconf -c DIR -e) and reload
        .set_map(name, mapping) -> None write a texthash map and reload
        .log_text() -> str
        .log_mark() -> int
        .wait_for_log(regex, timeout=20, since=0) -> re.Match
        .queue_ids() -> list[str]
        .flush_queue() -> None      postsuper -d ALL

DESCRIPTION
    The instance has its own queue_directory and data_directory, master.cf
    services with chroot n, and listens on loopback only. The default
    instance (/etc/postfix, /var/spool/postfix) is never touched.

    Policy, as smtpgate expects its next hop: mynetworks = 127.0.0.1/32
    (smtpgate itself) and smtpd_authorized_xclient_hosts = 127.0.0.0/8, so
    that a client impersonated with XCLIENT (127.0.0.x, x != 1) is a
    stranger, held to reject_unauth_destination. virtual_mailbox_domains =
    example.com with texthash maps "virtual_mailbox_maps" (user1, user2)
    and "virtual_alias_maps" (sales@example.com -> user1 and user2);
    virtual_transport = lmtp:inet:127.0.0.1:<Dovecot LMTP>; smtpd_milters =
    inet:127.0.0.1:<rspamd milter>, milter_default_action = tempfail;
    message_size_limit = 26214400; smtpd_helo_required = no. Mail for
    other domains is discarded (no outbound mail from tests). main_cf
    settings replace these from the first start on (main.cf is written
    anew at each start; postconf() changes last until the next start).

    set_map(name, mapping) writes config_dir/<name> ("virtual_alias_maps"
    or "virtual_mailbox_maps", or any new name used in a postconf()
    setting as texthash:<config_dir>/<name>); a value that is a list is
    joined with commas. postconf(virtual_mailbox_domains="example.com
    example.net") writes main.cf; both reload Postfix.

    The log is a file in the temporary directory (maillog_file through
    postlogd). wait_for_log() searches it from character offset since
    (take one with log_mark() before acting) until regex matches, and
    raises TimeoutError with the log tail otherwise.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from pathlib import Path

from .ports import free_port
from .procs import kill_pidfile, run
from .waiting import log_tail, wait_for_port

INITIAL_MAPS = {
    "virtual_mailbox_maps": {
        "user1@example.com": "example.com/user1/",
        "user2@example.com": "example.com/user2/",
    },
    "virtual_alias_maps": {
        "sales@example.com": ["user1@example.com", "user2@example.com"],
    },
}

MASTER_CF = """\
# service type private unpriv chroot wakeup maxproc command + args
{host}:{port} inet n - n - - smtpd
{host}:{submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_tls_security_level=none
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o milter_macro_daemon_name=ORIGINATING
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixServer:
    def __init__(
        self,
        workdir: Path,
        lmtp_port: int,
        milter_port: int | None = None,
        sasl_port: int | None = None,
        main_cf: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.pick_ports()
        self.lmtp_port = lmtp_port
        self.milter_port = milter_port
        self.sasl_port = sasl_port
        self.main_cf = dict(main_cf or {})
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "maillog"
        self._started = False

    def pick_ports(self) -> None:
        """New ports (services.ports.start_on_free_ports); master.cf is written at start."""
        self.port = free_port(self.host)
        self.submission_port = free_port(self.host)

    # Configuration

    def _main_cf(self) -> dict[str, str]:
        maps = self.config_dir
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.workdir}",
            "maillog_file": str(self.log_path),
            "myhostname": "next-hop.example.com",
            "mydomain": "example.com",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_relay_restrictions": (
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
            ),
            "smtpd_helo_required": "no",
            "smtpd_peername_lookup": "no",
            "message_size_limit": "26214400",
            "virtual_mailbox_domains": "example.com",
            "virtual_mailbox_maps": f"texthash:{maps}/virtual_mailbox_maps",
            "virtual_alias_maps": f"texthash:{maps}/virtual_alias_maps",
            "virtual_transport": f"lmtp:inet:{self.host}:{self.lmtp_port}",
            "default_transport": "discard:no outbound mail in tests",
            "relay_transport": "discard:no outbound mail in tests",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "smtputf8_enable": "yes",
            "smtpd_sasl_auth_enable": "no",
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "smtpd_milters": f"inet:{self.host}:{self.milter_port}" if self.milter_port else "",
            "non_smtpd_milters": "",
            "delay_warning_time": "0",
            "queue_run_delay": "300s",
        }
        if self.sasl_port:
            settings["smtpd_sasl_type"] = "dovecot"
            settings["smtpd_sasl_path"] = f"inet:{self.host}:{self.sasl_port}"
        return {**settings, **self.main_cf}

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        lines = [f"{key} = {value}" for key, value in self._main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(
            MASTER_CF.format(host=self.host, port=self.port, submission_port=self.submission_port)
        )
        for name, mapping in INITIAL_MAPS.items():
            if not (self.config_dir / name).exists():
                self._write_map(name, mapping)

    def _write_map(self, name: str, mapping: dict) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad map name {name!r}")
        lines = []
        for key, value in mapping.items():
            if isinstance(value, list | tuple):
                value = ", ".join(value)
            if not str(key) or re.search(r"\s", str(key)) or "\n" in str(value):
                raise ValueError(f"bad map entry {key!r} -> {value!r}")
            lines.append(f"{key} {value}")
        tmp = self.config_dir / f".{name}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.config_dir / name)

    def _postfix(self, *args: str, timeout: float = 60) -> str:
        return run(
            ["postfix", "-c", str(self.config_dir), *args],
            timeout=timeout,
            what=f"postfix -c {self.config_dir} {' '.join(args)}",
        ).stdout

    # Process

    def start(self, timeout: float = 30.0) -> None:
        if self._started:
            return
        self._write_config()
        try:
            self._postfix("start")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nmaillog tail:\n{log_tail(self.log_path)}") from None
        self._started = True
        for port in (self.port, self.submission_port):
            wait_for_port(self.host, port, timeout, log=self.log_path)

    def stop(self) -> None:
        if not self._started:
            return
        # "stop" fails when the master is already gone; the pid file check settles it.
        with contextlib.suppress(RuntimeError):
            self._postfix("stop")
        kill_pidfile(self.queue_dir / "pid" / "master.pid", timeout=10)
        self._started = False

    def reload(self) -> None:
        self._postfix("reload")
        # Give the new master children a moment to take over: wait on the ports.
        for port in (self.port, self.submission_port):
            wait_for_port(self.host, port, 10, log=self.log_path)

    def postconf(self, **settings: str) -> None:
        edits = []
        for key, value in settings.items():
            if "\n" in str(value):
                raise ValueError(f"bad value for {key}: {value!r}")
            edits.append(f"{key}={value}")
        run(["postconf", "-c", str(self.config_dir), "-e", *edits], timeout=10)
        if self._started:
            self.reload()

    def set_map(self, name: str, mapping: dict) -> None:
        self._write_map(name, mapping)
        if self._started:
            self.reload()

    # Observation

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        return len(self.log_text())

    def wait_for_log(self, regex: str, timeout: float = 20, since: int = 0) -> re.Match:
        pattern = re.compile(regex, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.log_text(), since)
            if match:
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no line matching {regex!r} in {self.log_path} after {timeout:g}s; "
                    f"tail:\n{log_tail(self.log_path, 25)}"
                )
            time.sleep(0.05)

    def queue_ids(self) -> list[str]:
        out = run(["postqueue", "-c", str(self.config_dir), "-j"], timeout=20).stdout
        return [json.loads(line)["queue_id"] for line in out.splitlines() if line.strip()]

    def flush_queue(self) -> None:
        run(["postsuper", "-c", str(self.config_dir), "-d", "ALL"], timeout=20)

    def __repr__(self) -> str:
        return f"<PostfixServer smtpd={self.port} submission={self.submission_port}>"
