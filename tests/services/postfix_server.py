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
        .changed(**settings)            context manager: postconf(), then the old values back
        .settings() -> dict[str, str]   every main.cf parameter's value in effect
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

    The configuration is the shipped one: conf/postfix/main.cf and
    master.cf (the next-hop.cf and submission.cf services, XCLIENT from
    127.0.0.1, mynetworks = 127.0.0.1/32 so that a client impersonated with
    XCLIENT (127.0.0.x, x != 1) is a stranger held to
    reject_unauth_destination, recipient_delimiter = +, inet_protocols =
    all, milter_default_action = tempfail), with only LOCAL_KEYS changed:
    paths, the two services' ports, virtual_transport =
    lmtp:inet:127.0.0.1:<Dovecot LMTP>, smtpd_milters =
    inet:127.0.0.1:<rspamd milter>, smtpd_sasl_path = Dovecot's auth port,
    and texthash tables instead of smtpgate's socketmap:
    virtual_mailbox_domains = example.com, "virtual_mailbox_maps" (user1,
    user2) and "virtual_alias_maps" (sales@example.com -> user1 and user2).
    Mail for other domains is discarded (no outbound mail from tests).
    main_cf settings go over all that, for a test that needs a Postfix
    configured otherwise from its first start on (main.cf is written anew
    at each start; postconf() changes last until the next start).

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

CONF = Path(__file__).resolve().parent.parent.parent / "conf" / "postfix"

# The shipped files' addresses of the two services behind smtpgate (master.cf).
SHIPPED_MX_SERVICE = "127.0.0.1:10025"
SHIPPED_SUBMISSION_SERVICE = "127.0.0.1:10587"

# What the test instance changes in the shipped main.cf: where things are (paths, ports, its
# texthash tables instead of smtpgate's socketmap) and that nothing leaves the machine. The
# policy (XCLIENT, mynetworks, recipient_delimiter, inet_protocols, milter and SASL types,
# limits) is the shipped one. tests/test_postfix_fragments.py holds the list to these keys.
LOCAL_KEYS = frozenset({
    "queue_directory", "data_directory", "maillog_file_prefixes", "maillog_file",
    "myhostname", "virtual_mailbox_domains", "virtual_mailbox_maps", "virtual_alias_maps",
    "smtpd_recipient_restrictions", "virtual_transport", "default_transport",
    "relay_transport", "smtpd_milters", "smtpd_sasl_path", "delay_warning_time",
    "queue_run_delay",
})


def read_main_cf(path: Path) -> dict[str, str]:
    """main.cf's settings in order (continuation lines joined, comments dropped)."""
    settings: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and key is not None:
            settings[key] += " " + line.strip()
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not a setting: {line!r}")
        key = key.strip()
        settings[key] = value.strip()
    return settings


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
        """The shipped conf/postfix/main.cf with this instance's LOCAL_KEYS."""
        maps = self.config_dir
        local = {
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.workdir}",
            "maillog_file": str(self.log_path),
            "myhostname": "next-hop.example.com",
            "virtual_mailbox_domains": "example.com",
            "virtual_mailbox_maps": f"texthash:{maps}/virtual_mailbox_maps",
            "virtual_alias_maps": f"texthash:{maps}/virtual_alias_maps",
            "smtpd_recipient_restrictions": "",
            "virtual_transport": f"lmtp:inet:{self.host}:{self.lmtp_port}",
            "default_transport": "discard:no outbound mail in tests",
            "relay_transport": "discard:no outbound mail in tests",
            "smtpd_milters": f"inet:{self.host}:{self.milter_port}" if self.milter_port else "",
            "smtpd_sasl_path": f"inet:{self.host}:{self.sasl_port or 11330}",
            "delay_warning_time": "0",
            "queue_run_delay": "300s",
        }
        if local.keys() != LOCAL_KEYS:
            raise AssertionError(f"LOCAL_KEYS and the local settings differ: {local.keys()}")
        settings = read_main_cf(CONF / "main.cf")
        settings.update(local)
        settings.update(self.main_cf)
        return settings

    def _master_cf(self) -> str:
        """The shipped conf/postfix/master.cf, its two services on this instance's ports."""
        text = (CONF / "master.cf").read_text()
        for shipped, port in ((SHIPPED_MX_SERVICE, self.port),
                              (SHIPPED_SUBMISSION_SERVICE, self.submission_port)):
            if text.count(f"\n{shipped} ") != 1:
                raise ValueError(f"{CONF / 'master.cf'}: no single {shipped} service")
            text = text.replace(f"\n{shipped} ", f"\n{self.host}:{port} ")
        return text

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        lines = [f"{key} = {value}" for key, value in self._main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self._master_cf())
        shutil.copy(CONF / "submission_header_cleanup", self.config_dir)
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

    def settings(self) -> dict[str, str]:
        """Every main.cf parameter's value in effect (postconf without -n: defaults too)."""
        shown = run(["postconf", "-c", str(self.config_dir)], timeout=10).stdout
        settings = dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                        for line in shown.splitlines())
        settings.pop("process_id", None)  # postconf's own
        return settings

    @contextlib.contextmanager
    def changed(self, **settings: str):
        """postconf(**settings) for a with block; afterwards main.cf says for these keys what
        it said before (a key it did not set is removed), so later tests find it as it was."""
        before = {key: value for key, value in read_main_cf(self.config_dir / "main.cf").items()
                  if key in settings}
        self.postconf(**settings)
        try:
            yield
        finally:
            absent = [key for key in settings if key not in before]
            if absent:
                run(["postconf", "-c", str(self.config_dir), "-X", *absent], timeout=10)
            if before:
                self.postconf(**before)
            elif self._started:
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
