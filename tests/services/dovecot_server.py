"""dovecot_server - a private Dovecot: LMTP delivery to Maildir, SASL auth service

SYNOPSIS
    DovecotServer(workdir: Path, passdb: str | None = None)
        .host: str                       "127.0.0.1"
        .lmtp_port: int                  LMTP, plain TCP on loopback
        .auth_port: int                  auth "client" protocol (Postfix smtpd_sasl_type = dovecot)
        .log_path: Path
        .start() -> None
        .stop() -> None
        .add_user(address, password) -> None
        .maildir(user) -> Path           .../mail/DOMAIN/LOCAL/Maildir
        .messages(user) -> list[bytes]   delivered messages, oldest first (new/ and cur/)
        .wait_for_message(user, predicate=None, timeout=20) -> bytes
        .clear_mail() -> None            delete every delivered message

DESCRIPTION
    Users live in a passwd-file (passdb and userdb, PLAIN scheme) that
    Dovecot rereads when it changes, so add_user() takes effect at once.
    passdb, when given, is the body of the passdb section instead (e.g.
    "driver = static\nargs = password=pass", the dovecot/dovecot image's
    accept-anyone default); "{users}" in it is the passwd-file's path.
    The initial users are user1@example.com/secret1 and
    user2@example.com/secret2. Mail is delivered as the "mail" user.

    wait_for_message() polls the user's Maildir until a message for which
    predicate(raw_bytes) is true appears (any message when predicate is
    None), and returns its raw bytes; past the deadline it raises
    TimeoutError with the Dovecot log tail. Tests that must not see an old
    message should call clear_mail() first or use a predicate on a unique
    Subject or Message-Id.

    Dovecot runs in the foreground (-F), its output in log_path; stop()
    waits for its master process to exit, so its ports are free after.
"""

from __future__ import annotations

import pwd
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .ports import free_port
from .procs import spawn, stop_process
from .waiting import log_tail, wait_for_port

INITIAL_USERS = {"user1@example.com": "secret1", "user2@example.com": "secret2"}


class DovecotServer:
    def __init__(self, workdir: Path, passdb: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.passdb = passdb
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.pick_ports()
        self.log_path = self.workdir / "dovecot.log"
        self.conf_path = self.workdir / "dovecot.conf"
        self.users_path = self.workdir / "users"
        self.mail_root = self.workdir / "mail"
        self._mail = pwd.getpwnam("mail")
        self._users: dict[str, str] = {}
        self._proc = None

    def pick_ports(self) -> None:
        """New ports (services.ports.start_on_free_ports)."""
        self.lmtp_port = free_port(self.host)
        self.auth_port = free_port(self.host)

    def _write_config(self) -> None:
        uid, gid = self._mail.pw_uid, self._mail.pw_gid
        base = self.workdir / "run"
        base.mkdir(exist_ok=True)
        (self.workdir / "state").mkdir(exist_ok=True)
        passdb = (self.passdb or "driver = passwd-file\n"
                  "args = scheme=PLAIN username_format=%Lu {users}").format(users=self.users_path)
        passdb = "\n".join(f"  {line.strip()}" for line in passdb.splitlines())
        self.conf_path.write_text(
            f"""# smtpgate test harness Dovecot
instance_name = smtpgate-test-{self.lmtp_port}
base_dir = {base}
state_dir = {self.workdir}/state
log_path = {self.log_path}
protocols = lmtp
listen = {self.host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Lu
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:~/Maildir
mail_uid = {uid}
mail_gid = {gid}
lmtp_rcpt_check_quota = no
passdb {{
{passdb}
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {self.users_path}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {self.host}
    port = {self.lmtp_port}
  }}
}}
service auth {{
  inet_listener auth-client {{
    address = {self.host}
    port = {self.auth_port}
  }}
}}
"""
        )

    def _write_users(self) -> None:
        lines = []
        for address, password in sorted(self._users.items()):
            local, domain = address.split("@", 1)
            home = self.mail_root / domain / local
            lines.append(
                f"{address}:{{PLAIN}}{password}:{self._mail.pw_uid}:{self._mail.pw_gid}"
                f"::{home}::"
            )
        tmp = self.users_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o644)
        tmp.replace(self.users_path)

    def add_user(self, address: str, password: str) -> None:
        address = address.lower()
        if address.count("@") != 1 or ":" in address + password or "\n" in address + password:
            raise ValueError(f"bad Dovecot user or password: {address!r}")
        self._users[address] = password
        self._write_users()

    def start(self, timeout: float = 15.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.mail_root.mkdir(exist_ok=True)
        shutil.chown(self.mail_root, self._mail.pw_uid, self._mail.pw_gid)
        if not self._users:
            self._users.update(INITIAL_USERS)
        self._write_users()
        self._write_config()
        self._proc = spawn(["dovecot", "-F", "-c", str(self.conf_path)], self.log_path)
        for port in (self.lmtp_port, self.auth_port):
            wait_for_port(self.host, port, timeout, proc=self._proc, log=self.log_path)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=10)
            self._proc = None

    def maildir(self, user: str) -> Path:
        local, _, domain = user.lower().partition("@")
        return self.mail_root / domain / local / "Maildir"

    def _files(self, user: str) -> list[Path]:
        root = self.maildir(user)
        files = [p for sub in ("new", "cur") for p in (root / sub).glob("*") if p.is_file()]
        # Maildir names start with the delivery time: sort oldest first.
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def messages(self, user: str) -> list[bytes]:
        found = []
        for path in self._files(user):
            try:
                found.append(path.read_bytes())
            except FileNotFoundError:  # moved new/ -> cur/ meanwhile
                continue
        return found

    def wait_for_message(
        self,
        user: str,
        predicate: Callable[[bytes], bool] | None = None,
        timeout: float = 20,
    ) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            for raw in self.messages(user):
                if predicate is None or predicate(raw):
                    return raw
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no matching message for {user} in {self.maildir(user)} after "
                    f"{timeout:g}s; Dovecot log tail:\n{log_tail(self.log_path, 20)}"
                )
            time.sleep(0.05)

    def clear_mail(self) -> None:
        for user in self._users:
            for path in self._files(user):
                path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"<DovecotServer lmtp={self.lmtp_port} auth={self.auth_port}>"
