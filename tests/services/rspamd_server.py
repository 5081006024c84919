"""rspamd_server - a private rspamd whose proxy worker is a milter on loopback

SYNOPSIS
    RspamdServer(workdir: Path, nameserver: str | None = None)
        .host: str             "127.0.0.1"
        .milter_port: int      proxy worker, milter mode
        .normal_port: int      normal (scanning) worker, rspamd HTTP protocol
        .log_path: Path
        .start() -> None
        .stop() -> None

DESCRIPTION
    The top configuration file is written into workdir; it includes
    Debian's module configuration (/etc/rspamd, read only) for the rules,
    so GTUBE gets the reject action, but has its own sockets, pid file,
    log, database directory and an empty local configuration directory:
    edits in /etc/rspamd/local.d do not reach the tests. Two workers
    run: the proxy in milter mode (milter_port) and the normal worker that
    scans for it (normal_port, also usable with rspamc -h); no controller.

    nameserver ("127.0.0.1:PORT", e.g. the harness DNS server) makes
    rspamd's RBL and other lookups fail fast instead of waiting on the
    absent internet.

    rspamd takes a few seconds to start: start() waits for the milter
    port, with a deadline, and raises with the log tail otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .ports import free_port
from .procs import spawn, stop_process
from .waiting import wait_for_port

CONFDIR = "/etc/rspamd"
USER = "_rspamd"
TLDS = ("com", "net", "org", "de", "uk", "co.uk", "io", "test", "example", "invalid")


class RspamdServer:
    def __init__(self, workdir: Path, nameserver: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.pick_ports()
        self.nameserver = nameserver
        self.log_path = self.workdir / "rspamd.log"
        self.conf_path = self.workdir / "rspamd.conf"
        self._proc = None

    def pick_ports(self) -> None:
        """New ports (services.ports.start_on_free_ports)."""
        self.milter_port = free_port(self.host)
        self.normal_port = free_port(self.host)

    def _write_config(self) -> None:
        local = self.workdir / "local"
        for sub in ("local.d", "override.d"):
            (local / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("db", "run"):
            (self.workdir / sub).mkdir(exist_ok=True)
            shutil.chown(self.workdir / sub, USER, USER)
        dns = ""
        if self.nameserver:
            dns = f'dns {{ nameserver = ["{self.nameserver}"]; timeout = 1s; retransmits = 1; }}'
        # Compiling the full public suffix list costs rspamd ~10 s at start;
        # a short list keeps the session quick and GTUBE does not need it.
        tld = self.workdir / "tld.dat"
        tld.write_text("\n".join(TLDS) + "\n")
        (local / "override.d" / "options.inc").write_text(f'url_tld = "{tld}";\n{dns}\n')
        self.conf_path.write_text(
            f"""# smtpgate test harness rspamd
.include "$CONFDIR/common.conf"

options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/options.inc"
}}

logging {{
    type = "file";
    filename = "{self.log_path}";
    level = "info";
}}

worker "normal" {{
    bind_socket = "{self.host}:{self.normal_port}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}

worker "rspamd_proxy" {{
    bind_socket = "{self.host}:{self.milter_port}";
    milter = yes;
    upstream "local" {{
        default = yes;
        hosts = "{self.host}:{self.normal_port}";
    }}
    timeout = 120s;
    count = 1;
    discard_on_reject = false;
    quarantine_on_reject = false;
    spam_header = "X-Spam";
    reject_message = "Spam message rejected";
}}
"""
        )
        self.log_path.touch()
        shutil.chown(self.log_path, USER, USER)

    def start(self, timeout: float = 30.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._write_config()
        variables = {
            "CONFDIR": CONFDIR,
            "LOCAL_CONFDIR": str(self.workdir / "local"),
            "DBDIR": str(self.workdir / "db"),
            "RUNDIR": str(self.workdir / "run"),
            "LOGDIR": str(self.workdir),
        }
        argv = ["rspamd", "-f", "-u", USER, "-g", USER, "-c", str(self.conf_path)]
        for name, value in variables.items():
            argv += ["--var", f"{name}={value}"]
        self._proc = spawn(argv, self.workdir / "rspamd.out")
        for port in (self.normal_port, self.milter_port):
            wait_for_port(self.host, port, timeout, proc=self._proc, log=self.log_path)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=10)
            self._proc = None

    def __repr__(self) -> str:
        return f"<RspamdServer milter={self.milter_port}>"
